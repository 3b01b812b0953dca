"""Decode-step latency: sparq_ext.attention vs torch SDPA vs the seed's pure-torch SparQ.

One run compares the methods side by side on the same inputs (these machines are noisy, so
read the ratios), reports achieved GB/s against a memory copy measured in the same run and
the ideal speedup from the bytes each method must read, and writes a table, JSON and a PNG
(speedup vs sequence length) under benchmarks/results/.

    python benchmarks/bench_attention.py                    # CPU: the CPU-sized subset (--quick)
    python benchmarks/bench_attention.py --device cuda      # the standard GPU grid (docs/design.md)
    python benchmarks/bench_attention.py --key-t both       # also the 8-bit selection cache, its
                                                            # calls interleaved with the full copy's
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F

import sparq_ext
from sparq_ext.evaluation import timing as common
from sparq_ext.seed import sparq_attn

HERE = os.path.dirname(os.path.abspath(__file__))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROTATION_BYTES = 512 << 20  # inputs rotated so each call reads from beyond the caches


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--quick", action="store_true",
                   help="B=1, S in 1K..64K: the CPU subset (the default on CPU)")
    p.add_argument("--full", action="store_true",
                   help="the standard grid (B 1/8/32, S 1K..128K) even on CPU (hours there)")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 1 8 32; quick: 1)")
    p.add_argument("--seq-lens", type=int, nargs="+", help="cache lengths S")
    p.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    p.add_argument("--query-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--ratios", type=float, nargs="+", default=[8.0],
                   help="compression ratios rho: r = D/rho, k = S/(2 rho) (standard: 8, also 4)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default cpu: fp32 bf16; cuda: bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, help="timed calls per method (default cpu 21, cuda 100)")
    p.add_argument("--no-seed", action="store_true", help="skip the seed's pure-torch SparQ")
    p.add_argument("--key-t", choices=("full", "int8", "both"), default="full",
                   help="the selection cache sparq reads: a full-precision key_t (default), the "
                        "8-bit one (int8 key_t + per-position scale, the 8-bit split of the same "
                        "ratio), or both, timed interleaved (sparq_int8_ms)")
    p.add_argument("--int8-rk", choices=("split", "same"), default="split",
                   help="r and k of the 8-bit selection cache: rk_for_ratio's 8-bit split of the "
                        "ratio's bytes (a larger r and k, default), or the full copy's r and k "
                        "(the same selection budget, fewer bytes read)")
    p.add_argument("--seed-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the seed under torch.compile (default: on for cuda)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay sparq/SDPA calls as CUDA graphs")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--cache", choices=("cold", "warm"), default=None,
                   help="cold (CPU default): read 2x the last-level cache, untimed, before every "
                        "call, so each method reads its inputs from memory as a decode step does; "
                        "warm: no flush (inputs still rotate). CUDA default: warm (rotation "
                        "already exceeds its L2)")
    p.add_argument("--bandwidth-mib", type=int,
                   help="buffer size of the copy and row-gather bandwidth probes (default cuda 4096, "
                        "cpu 1024)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for JSON and PNG")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only (no PNG)")
    p.add_argument("--tag", help="file name tag (default: device type)")
    return p.parse_args(argv)


def sdpa_backends(device):
    """(name, context factory) for each SDPA backend to try; the best one is reported."""
    from contextlib import nullcontext

    if device.type != "cuda":
        return [("default", nullcontext)]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    return [(n.lower(), lambda b=getattr(SDPBackend, n): sdpa_kernel([b]))
            for n in names if hasattr(SDPBackend, n)]


def free_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def make_set(B, Hq, Hkv, S, D, dtype, device, seed_heads: bool, key_t="full"):
    gen = torch.Generator(device=device).manual_seed(S + B + Hkv)
    q = torch.randn(B, Hq, 1, D, dtype=dtype, device=device, generator=gen)
    K = torch.randn(B, Hkv, S, D, dtype=dtype, device=device, generator=gen)
    V = torch.randn(B, Hkv, S, D, dtype=dtype, device=device, generator=gen)
    s = dict(q=q, K=K, V=V, Vm=V.mean(2, keepdim=True))
    if key_t in ("full", "both"):
        s["Kt"] = K.transpose(-1, -2).contiguous()
    if key_t in ("int8", "both"):
        s["Kt8"], s["Kt8_scale"] = sparq_ext.quantize_key_t(K)
    if seed_heads:  # the seed's code is MHA-only: it gets K/V expanded to the query heads
        G = Hq // Hkv
        s["K_mha"] = K.repeat_interleave(G, dim=1) if G > 1 else K
        s["V_mha"] = V.repeat_interleave(G, dim=1) if G > 1 else V
        s["Vm_mha"] = s["Vm"].repeat_interleave(G, dim=1)
        s["M"] = torch.zeros(B, Hq, 1, S, dtype=dtype, device=device)
    return s


def bench_config(args, device, dtype_name, B, Hkv, S, ratio, seed_compiled, pbar, flush=None):
    Hq, D = args.query_heads, args.head_dim
    dtype = DTYPES[dtype_name]
    r, k = sparq_ext.rk_for_ratio(ratio, S, D)
    r8, k8 = (sparq_ext.rk_for_ratio(ratio, S, D, dtype=dtype, key_t_dtype=torch.int8)
              if args.int8_rk == "split" else (r, k))
    e = torch.empty((), dtype=dtype).element_size()
    full_t, int8_t = args.key_t in ("full", "both"), args.key_t in ("int8", "both")
    set_bytes = B * Hkv * S * ((2 + full_t) * D * e + int8_t * (D + 4))  # K, V, the key_t(s)
    seed_bytes = 2 * B * Hq * S * D * e + (2 * B * Hq * S * D * e if Hq != Hkv else 0)  # + its temporaries
    row = dict(dtype=dtype_name, B=B, Hq=Hq, Hkv=Hkv, S=S, D=D, ratio=ratio, r=r, k=k)
    if int8_t:
        row.update(r_int8=r8, k_int8=k8)
    available = free_bytes(device)
    if set_bytes * 1.3 > available:
        row["skipped"] = f"needs {set_bytes / 2**30:.1f} GiB"
        return row
    with_seed = not args.no_seed and (set_bytes + seed_bytes) * 1.3 <= available
    if not args.no_seed and not with_seed:
        row["seed_skipped"] = f"the seed's MHA copies need {seed_bytes / 2**30:.1f} GiB more"
    n_sets = max(1, min(8, math.ceil(ROTATION_BYTES / (set_bytes + (seed_bytes if with_seed else 0)))))
    sets = [make_set(B, Hq, Hkv, S, D, dtype, device, with_seed, args.key_t) for _ in range(n_sets)]
    enable_gqa = Hq != Hkv

    def sparq(i):
        s = sets[i % n_sets]
        return sparq_ext.attention(s["q"], s["K"], s["V"], r=r, k=k, key_t=s["Kt"], value_mean=s["Vm"])

    def sparq_int8(i):
        s = sets[i % n_sets]
        return sparq_ext.attention(s["q"], s["K"], s["V"], r=r8, k=k8, key_t=s["Kt8"],
                                   key_t_scale=s["Kt8_scale"], value_mean=s["Vm"])

    def sdpa(i):
        s = sets[i % n_sets]
        return F.scaled_dot_product_attention(s["q"], s["K"], s["V"], enable_gqa=enable_gqa)

    def seed(i, fn=sparq_attn):
        s = sets[i % n_sets]
        return fn(s["q"], s["K_mha"], s["V_mha"], s["Vm_mha"], s["M"], r, k)

    times = {}
    reps, warm = args.repeats, args.warmup
    with torch.inference_mode():
        if args.key_t == "both":  # interleaved, so that load drift falls on both alike
            pbar.set_postfix_str(f"S={S} sparq full/int8")
            times.update(common.time_interleaved(
                {"sparq": maybe_graphs(sparq, n_sets, args, device),
                 "sparq_int8": maybe_graphs(sparq_int8, n_sets, args, device)}, device, warm, reps, flush))
        elif args.key_t == "int8":
            times["sparq"] = common.time_call(maybe_graphs(sparq_int8, n_sets, args, device), device,
                                              warm, reps, flush)
        else:
            times["sparq"] = common.time_call(maybe_graphs(sparq, n_sets, args, device), device, warm,
                                              reps, flush)
        pbar.set_postfix_str(f"S={S} sdpa")
        best = None
        for name, ctx in sdpa_backends(device):
            try:
                with ctx():
                    t = common.time_call(maybe_graphs(sdpa, n_sets, args, device), device, warm, reps,
                                         flush)
            except RuntimeError:  # backend does not support this shape/dtype
                continue
            times[f"sdpa_{name}"] = t
            if best is None or t < times[best]:
                best = f"sdpa_{name}"
        row["sdpa_best_backend"] = best
        if with_seed:
            pbar.set_postfix_str(f"S={S} seed")
            times["seed"] = common.time_call(seed, device, warm, max(3, reps // 3), flush)
            if seed_compiled is not None:
                times["seed_compiled"] = common.time_call(lambda i: seed(i, seed_compiled), device,
                                                          warm, reps, flush)
    del sets
    if args.key_t == "int8":  # the one sparq timed reads the 8-bit selection cache
        row.update(r=r8, k=k8)
        bytes_ = sparq_ext.transfer_bytes(B, Hkv, S, D, r8, k8, dtype=dtype, query_heads=Hq,
                                          key_t_dtype=torch.int8)
    else:
        bytes_ = sparq_ext.transfer_bytes(B, Hkv, S, D, r, k, dtype=dtype, query_heads=Hq)
    if "sparq_int8" in times:
        bytes_int8 = sparq_ext.transfer_bytes(B, Hkv, S, D, r8, k8, dtype=dtype, query_heads=Hq,
                                              key_t_dtype=torch.int8)
        row["sparq_int8_bytes"] = bytes_int8["sparq"]
        row["speedup_int8_vs_full"] = times["sparq"] / times["sparq_int8"]
        row["speedup_int8_vs_sdpa"] = None  # set below, once the best SDPA is known
    row.update({f"{m}_ms": t * 1e3 for m, t in times.items()})
    row["sdpa_ms"] = times[best] * 1e3
    row["speedup_vs_sdpa"] = times[best] / times["sparq"]
    if "sparq_int8" in times:
        row["speedup_int8_vs_sdpa"] = times[best] / times["sparq_int8"]
    if "seed" in times:
        row["speedup_vs_seed"] = times["seed"] / times["sparq"]
    if "seed_compiled" in times:
        row["speedup_vs_seed_compiled"] = times["seed_compiled"] / times["sparq"]
    row["ideal_speedup"] = bytes_["ideal_speedup"]
    row["sparq_bytes"], row["dense_bytes"] = bytes_["sparq"], bytes_["dense"]
    row["sparq_GBps"] = bytes_["sparq"] / times["sparq"] / 1e9
    row["sdpa_GBps"] = bytes_["dense"] / times[best] / 1e9
    return row


def maybe_graphs(fn, n_sets, args, device):
    """With --cuda-graphs, capture one graph per input set and replay it (no launch overhead)."""
    if not (args.cuda_graphs and device.type == "cuda"):
        return fn
    graphs = []
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(n_sets):
            fn(i)  # warm up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    for i in range(n_sets):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(i)
        graphs.append(g)
    return lambda i: graphs[i % n_sets].replay()


def print_table(rows):
    from tabulate import tabulate

    headers = ["dtype", "B", "Hkv", "S", "r", "k", "sparq ms", "SDPA ms", "SDPA backend", "seed ms",
               "x SDPA", "x seed", "ideal x", "sparq GB/s", "SDPA GB/s", "sparq % copy", "SDPA % copy"]
    table = []
    for r in rows:
        if "skipped" in r:
            table.append([r["dtype"], r["B"], r["Hkv"], r["S"], r["r"], r["k"], r["skipped"]]
                         + [""] * (len(headers) - 7))
            continue
        table.append([r["dtype"], r["B"], r["Hkv"], r["S"], r["r"], r["k"], r["sparq_ms"], r["sdpa_ms"],
                      r["sdpa_best_backend"], r.get("seed_ms", float("nan")), r["speedup_vs_sdpa"],
                      r.get("speedup_vs_seed", float("nan")), r["ideal_speedup"], r["sparq_GBps"],
                      r["sdpa_GBps"], r.get("sparq_pct_of_copy", float("nan")),
                      r.get("sdpa_pct_of_copy", float("nan"))])
    print(tabulate(table, headers=headers, floatfmt=".3g"))
    int8 = [r for r in rows if "sparq_int8_ms" in r]
    if int8:  # --key-t both: the 8-bit selection cache beside the full copy, same ratio
        print(tabulate([[r["dtype"], r["B"], r["Hkv"], r["S"], r["ratio"], f"{r['r']}/{r['k']}",
                         f"{r['r_int8']}/{r['k_int8']}", r["sparq_ms"], r["sparq_int8_ms"],
                         r["speedup_int8_vs_full"], r["speedup_int8_vs_sdpa"]] for r in int8],
                       headers=["dtype", "B", "Hkv", "S", "ratio", "full r/k", "int8 r/k", "full ms",
                                "int8 ms", "x int8 vs full", "int8 x SDPA"], floatfmt=".3g"))


def plot(rows, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "skipped" not in r]
    dtypes = sorted({r["dtype"] for r in done})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for ax, dt in zip(axes[0], dtypes):
        groups = sorted({(r["B"], r["Hkv"], r["ratio"]) for r in done if r["dtype"] == dt})
        for B, Hkv, ratio in groups:
            pts = sorted((r["S"], r["speedup_vs_sdpa"], r["ideal_speedup"]) for r in done
                         if (r["dtype"], r["B"], r["Hkv"], r["ratio"]) == (dt, B, Hkv, ratio))
            xs = [p[0] for p in pts]
            line, = ax.plot(xs, [p[1] for p in pts], marker="o", label=f"B={B} Hkv={Hkv} ρ={ratio:g}")
            ax.plot(xs, [p[2] for p in pts], ls="--", color=line.get_color(), alpha=0.5)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S")
        ax.set_ylabel("speedup over best torch SDPA (dashed: ideal bytes ratio)")
        ax.set_title(f"{dt}")
        ax.legend(fontsize=8)
    fig.suptitle(f"sparq_ext.attention vs SDPA — {meta['device']} ({meta['sparq_backend']}), "
                 f"torch {meta['torch']}, {meta['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    from tqdm import tqdm

    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    args.quick = args.quick or not (cuda or args.full)
    args.batch = args.batch or ([1] if args.quick else [1, 8, 32])
    args.seq_lens = args.seq_lens or ([1024, 4096, 16384, 65536] if args.quick
                                      else [1024 << i for i in range(8)])
    args.dtypes = args.dtypes or (["bf16"] if cuda else ["fp32", "bf16"])
    args.repeats = args.repeats or (100 if cuda else 21)
    if args.seed_compile is None:
        args.seed_compile = cuda
    # dynamic=True: one compiled graph for every S and k instead of a recompile per shape
    seed_compiled = (torch.compile(sparq_attn, dynamic=True) if args.seed_compile and not args.no_seed
                     else None)

    meta = common.run_metadata(device, root=HERE)
    probe_bytes = (args.bandwidth_mib or (4096 if cuda else 1024)) << 20
    meta["copy_GBps"] = common.copy_bandwidth(device, nbytes=probe_bytes) / 1e9
    meta["cuda_graphs"] = bool(args.cuda_graphs and cuda)
    args.cache = args.cache or ("warm" if cuda else "cold")
    flush = None
    if args.cache == "cold":
        if cuda:
            raise SystemExit("--cache cold is for CPU runs (on CUDA the rotated inputs exceed L2)")
        flush = common.CacheFlush()
        meta["cache_flush_bytes"] = flush.nbytes
    meta["cache"] = args.cache
    row_bytes = args.head_dim * 4
    meta["row_gather_GBps"] = common.row_gather_bandwidth(device, row_bytes=row_bytes, nbytes=probe_bytes,
                                                          before=flush) / 1e9
    meta["row_gather_row_bytes"] = row_bytes
    print(f"device: {meta['device']} | torch {meta['torch']} | commit {meta['commit']} | "
          f"sparq backend: {meta['sparq_backend']} | copy bandwidth {meta['copy_GBps']:.1f} GB/s | "
          f"row gather ({row_bytes} B rows, index_select) {meta['row_gather_GBps']:.1f} GB/s"
          + (f" | threads {meta['threads']} | cache {args.cache}" if not cuda else ""))

    configs = [(dt, B, Hkv, S, ratio) for dt in args.dtypes for ratio in args.ratios
               for B in args.batch for Hkv in args.kv_heads for S in args.seq_lens]
    tag = args.tag or device.type
    json_path = os.path.join(args.out, f"bench_attention_{tag}.json")
    rows = []
    with tqdm(configs, desc="bench_attention", unit="shape") as pbar:
        for dt, B, Hkv, S, ratio in pbar:
            pbar.set_postfix_str(f"{dt} B={B} Hkv={Hkv} S={S}")
            row = bench_config(args, device, dt, B, Hkv, S, ratio, seed_compiled, pbar, flush)
            if "sparq_GBps" in row:
                row["sparq_pct_of_copy"] = 100 * row["sparq_GBps"] / meta["copy_GBps"]
                row["sdpa_pct_of_copy"] = 100 * row["sdpa_GBps"] / meta["copy_GBps"]
            rows.append(row)
            # after every shape, so a run cut short (a time limit) keeps what it measured
            common.write_json(json_path, {"meta": meta, "args": vars(args), "rows": rows})
    print_table(rows)
    print(f"wrote {json_path}")
    if not args.no_plot:
        png_path = os.path.join(args.out, f"bench_attention_{tag}.png")
        plot(rows, meta, png_path)
        print(f"wrote {png_path}")
    return rows


if __name__ == "__main__":
    main()
