"""Side-by-side CPU timing of the native SparQ kernel vs SDPA and the seed's pure-torch SparQ.

For kernel iteration (the official benchmark is benchmarks/bench_attention.py). Median of many
runs after warm-up; all variants timed in one process, interleaved, so ratios are comparable
on a noisy shared machine. Example:
    python benchmarks/cpu_kernel_timing.py --seq 1024 4096 16384 65536 --hkv 32 8
    python benchmarks/cpu_kernel_timing.py --threads 1 --clock thread   # on a busy machine

Stage 2 gathers k random rows of key and value: latency- and TLB-bound, so transparent huge
pages for the caches help it most (THP_MEM_ALLOC_ENABLE=1 makes torch's CPU allocator
madvise them; measured here: fp32, Hkv=32, S=64K 44.6 -> 34.8 ms single-thread, SDPA
171 -> 148 ms). Compare both with and without it, never one against the other.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import sparq_ext
from sparq_ext.seed import sparq_attn


CLOCK = time.perf_counter


def median_ms(fn, min_runs: int, min_time: float) -> float:
    for _ in range(3):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
        if len(times) > 2000:
            break
    MINIMA[fn] = min(times) * 1e3
    return statistics.median(times) * 1e3


MINIMA: dict = {}  # fn -> best run (ms): robust to time slices lost to other jobs


def copy_bandwidth_gbs() -> float:
    src = torch.empty(64 * 2**20, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 10, 0.5)
    return 2 * src.numel() / ms / 1e6  # read + write


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--hkv", type=int, nargs="+", default=[32, 8])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--k-div", type=int, default=16, help="k = S / k_div")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--no-seed", action="store_true")
    p.add_argument("--no-sdpa", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all)")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="thread: CPU time of the calling thread, robust to other jobs on a "
                        "shared machine, meaningful only with --threads 1")
    args = p.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread":
        CLOCK = time.thread_time
    torch.manual_seed(0)
    print(f"clock={args.clock} threads={torch.get_num_threads()} native_cpu={sparq_ext.has_native_kernel('cpu')} "
          f"copy_bw={copy_bandwidth_gbs():.1f} GB/s")
    hdr = (f"{'dtype':9} {'Hkv':>3} {'S':>6} {'sparq ms':>9} {'sdpa ms':>9} {'seed ms':>9} "
           f"{'x sdpa':>7} {'x seed':>7} {'GB/s':>6}   min: {'sparq':>7} {'sdpa':>8} {'x sdpa':>6}")
    print(hdr)
    B, Hq, D, r = args.batch, args.hq, args.d, args.r
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        e = torch.finfo(dtype).bits // 8
        for Hkv in args.hkv:
            for S in args.seq:
                k = max(1, S // args.k_div)
                q = torch.randn(B, Hq, 1, D, dtype=dtype)
                K = torch.randn(B, Hkv, S, D, dtype=dtype)
                V = torch.randn(B, Hkv, S, D, dtype=dtype)
                Kt = K.transpose(-1, -2).contiguous()
                vm = V.mean(2, keepdim=True)
                with torch.inference_mode():
                    sparq = lambda: sparq_ext.attention(q, K, V, r=r, k=k, key_t=Kt, value_mean=vm)  # noqa: E731
                    t_sparq = median_ms(sparq, 20, args.min_time)
                    t_sdpa = m_sdpa = float("nan")
                    if not args.no_sdpa:
                        sdpa = lambda: F.scaled_dot_product_attention(q, K, V, enable_gqa=Hkv != Hq)  # noqa: E731
                        t_sdpa = median_ms(sdpa, 5, args.min_time)
                        m_sdpa = MINIMA[sdpa]
                    m_sparq = MINIMA[sparq]
                    t_seed = float("nan")
                    if not args.no_seed:
                        G = Hq // Hkv
                        Ke, Ve = K.repeat_interleave(G, 1), V.repeat_interleave(G, 1)
                        vme = vm.repeat_interleave(G, 1)
                        M = torch.zeros(B, Hq, 1, S, dtype=dtype)  # the seed gathers M per head
                        seed = lambda: sparq_attn(q, Ke, Ve, vme, M, r, k)  # noqa: E731
                        t_seed = median_ms(seed, 3, args.min_time)
                        del Ke, Ve
                sparq_bytes = B * Hkv * (S * r * e + 2 * k * D * e + D * e) + 2 * B * Hq * D * e
                gbs = sparq_bytes / t_sparq / 1e6
                print(f"{dtype_name:9} {Hkv:>3} {S:>6} {t_sparq:9.3f} {t_sdpa:9.3f} {t_seed:9.3f} "
                      f"{t_sdpa / t_sparq:7.2f} {t_seed / t_sparq:7.1f} {gbs:6.1f}   "
                      f"     {m_sparq:7.3f} {m_sdpa:8.3f} {m_sdpa / m_sparq:6.2f}", flush=True)


if __name__ == "__main__":
    main()
