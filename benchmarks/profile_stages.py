"""Where one SparQ decode step spends its device time, beside dense SDPA: torch.profiler's kernel
records grouped by kernel name (time and launches per call), and the total per call with the
bandwidth it implies for the bytes the method must read (sparq_ext.transfer_bytes). Kernel names
are read from the profile, not assumed, so this works whatever the kernels are called. The
latency benchmark is benchmarks/bench_attention.py; this is for finding the stage to speed up.

    python benchmarks/profile_stages.py                       # CUDA: B=1, S=32K and 128K
    python benchmarks/profile_stages.py --device cpu --seq 4096 --iters 5

On the CPU the groups are operators (their self time) rather than kernels.
"""

from __future__ import annotations

import argparse
import collections
import functools

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import sparq_ext
from sparq_ext.evaluation import timing

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The estimated time per stage (us) that docs/cuda-pipeline.md holds the first GPU run against:
# B = 1, Hq = 32, Hkv = 8, D = 128, bf16, ratio 8, key_t and value_mean given. Stage -> (low, high)
# per (GPU, S). A kernel is matched to a stage by its name ("<stage>_kernel").
STANDARD_SHAPE = dict(B=1, Hq=32, Hkv=8, D=128, dtype="bf16", ratio=8.0)
EXPECTED_US = {
    ("H100", 4096): {"prep": (2, 2), "approx_logits": (2.4, 2.4), "topk": (5, 6), "attend": (3.4, 3.4)},
    ("H200", 4096): {"prep": (2, 2), "approx_logits": (2.3, 2.3), "topk": (5, 6), "attend": (3.3, 3.3)},
    ("H100", 32768): {"prep": (2, 2), "approx_logits": (5.5, 5.5), "topk": (6, 8), "attend": (6.1, 6.1)},
    ("H200", 32768): {"prep": (2, 2), "approx_logits": (4.5, 4.5), "topk": (6, 8), "attend": (5.2, 5.2)},
    ("H100", 131072): {"prep": (2, 2), "approx_logits": (16.0, 16.0), "topk": (9, 15), "attend": (15.5, 15.5)},
    ("H200", 131072): {"prep": (2, 2), "approx_logits": (11.9, 11.9), "topk": (9, 15), "attend": (11.9, 11.9)},
}


def expected_stage_us(device_name: str, shape: dict, seq_len: int) -> dict[str, tuple[float, float]] | None:
    """docs/cuda-pipeline.md's estimate for this GPU and shape, or None where it has none."""
    if shape != STANDARD_SHAPE:
        return None
    gpu = next((g for g in ("H100", "H200") if g in device_name), None)
    return EXPECTED_US.get((gpu, seq_len))


def stage_of(kernel_name: str, expected: dict) -> str | None:
    return next((stage for stage in expected if f"{stage}_kernel" in kernel_name), None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--seq", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--query-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--ratio", type=float, default=8.0, help="compression ratio (r, k from sparq_ext.rk_for_ratio)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=20, help="profiled calls per method")
    return p.parse_args(argv)


def kernel_times(fn, device: torch.device, iters: int) -> dict[str, tuple[float, float]]:
    """``{name: (microseconds per call, launches per call)}`` for what ``fn()`` runs on
    ``device``: CUDA kernels (and copies/memsets) on a GPU, operators' self time on the CPU."""
    for _ in range(3):  # warm-up: workspaces, lazy module loads, autotuning stay out of the profile
        fn()
    timing.sync(device)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(iters):
            fn()
        timing.sync(device)
    total_us: dict[str, float] = collections.defaultdict(float)
    launches: dict[str, int] = collections.Counter()
    for event in prof.events():
        if device.type == "cuda":
            if event.device_type != DeviceType.CUDA:
                continue
            us = event.time_range.elapsed_us()
        else:
            if event.device_type != DeviceType.CPU:
                continue
            us = event.self_cpu_time_total
        total_us[event.name] += us
        launches[event.name] += 1
    return {name: (total_us[name] / iters, launches[name] / iters) for name in total_us}


def report(title: str, times: dict[str, tuple[float, float]], nbytes: int, copy_GBps: float,
           expected: dict | None = None) -> float:
    total = sum(us for us, _ in times.values())
    launches = sum(n for _, n in times.values())
    gbps = nbytes / (total * 1e-6) / 1e9 if total > 0 else float("nan")
    print(f"--- {title}: {total:.1f} us per call, {launches:g} launches per call, "
          f"{nbytes / 1e6:.1f} MB read -> {gbps:.0f} GB/s ({100 * gbps / copy_GBps:.0f}% of copy)")
    print(f"{'us/call':>9} {'share':>6} {'launches':>8} {'estimate':>9}  name")
    for name, (us, n) in sorted(times.items(), key=lambda item: -item[1][0]):
        stage = stage_of(name, expected) if expected else None
        est = f"{expected[stage][0]:g}-{expected[stage][1]:g}" if stage else "-"
        print(f"{us:9.1f} {100 * us / total if total else 0:5.1f}% {n:8g} {est:>9}  {name[:110]}")
    if expected:
        low, high = (sum(v[i] for v in expected.values()) for i in (0, 1))
        print(f"    estimated total (docs/cuda-pipeline.md): {low:g}-{high:g} us per call")
    return total


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if not sparq_ext.has_native_kernel(device.type):
        print(f"note: no native {device.type} kernel ({sparq_ext.extension_error or 'not built'}); "
              "profiling the pure-torch fallback")
    Hq, Hkv, D, dtype = args.query_heads, args.kv_heads, args.head_dim, DTYPES[args.dtype]
    copy_GBps = timing.copy_bandwidth(device, nbytes=(2 << 30) if device.type == "cuda" else (64 << 20)) / 1e9
    print(f"device: {timing.device_name(device)} | torch {torch.__version__} | "
          f"commit {timing.git_commit()} | copy bandwidth {copy_GBps:.0f} GB/s")
    for B in args.batch:
        for S in args.seq:
            r, k = sparq_ext.rk_for_ratio(args.ratio, S, D)
            gen = torch.Generator(device=device).manual_seed(S + B)
            q = torch.randn(B, Hq, 1, D, device=device, generator=gen).to(dtype)
            key = torch.randn(B, Hkv, S, D, device=device, generator=gen).to(dtype)
            value = torch.randn(B, Hkv, S, D, device=device, generator=gen).to(dtype)
            key_t = key.transpose(-1, -2).contiguous()
            v_mean = value.float().mean(2, keepdim=True).to(dtype)
            nbytes = sparq_ext.transfer_bytes(B, Hkv, S, D, r, k, dtype=dtype, query_heads=Hq)
            print(f"\n=== B={B} Hq={Hq} Hkv={Hkv} S={S} D={D} r={r} k={k} {args.dtype} ===")
            with torch.inference_mode():
                sparq = kernel_times(functools.partial(sparq_ext.attention, q, key, value, r=r, k=k,
                                                       key_t=key_t, value_mean=v_mean), device, args.iters)
                sdpa = kernel_times(functools.partial(F.scaled_dot_product_attention, q, key, value,
                                                      enable_gqa=Hq != Hkv), device, args.iters)
            shape = dict(B=B, Hq=Hq, Hkv=Hkv, D=D, dtype=args.dtype, ratio=args.ratio)
            expected = (expected_stage_us(timing.device_name(device), shape, S)
                        if device.type == "cuda" else None)
            t_sparq = report("sparq_ext.attention", sparq, nbytes["sparq"], copy_GBps, expected)
            t_sdpa = report("SDPA (default backend)", sdpa, nbytes["dense"], copy_GBps)
            if t_sparq > 0:
                print(f"device-time ratio SDPA / SparQ: {t_sdpa / t_sparq:.2f}x "
                      f"(bytes ratio {nbytes['ideal_speedup']:.2f}x)")


if __name__ == "__main__":
    main()
