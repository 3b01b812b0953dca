"""Per-kernel GPU time of one SparQ decode step (torch.profiler), beside dense SDPA, with the
bytes each stage must move and the bandwidth that implies. For finding the stage to speed up
next; the latency sweep itself is benchmarks/bench_attention.py.

    python benchmarks/profile_stages.py [--seq 32768 131072] [--batch 1 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the in-place build
import sparq_ext  # noqa: E402


def stage_bytes(B, Hq, Hkv, S, D, r, k, e):
    rows = B * Hkv
    return {
        "approx_logits": rows * S * (r * e + 4),          # key_t rows + selection score
        "radix_hist": rows * S * 4 * 3,                   # three passes over the scores
        "radix_emit": rows * (S * 4 + k * 4),
        "attend": rows * k * (2 * D * e + 4),             # K and V rows + index
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    assert torch.cuda.is_available() and sparq_ext.has_native_kernel("cuda")
    dev = torch.cuda.get_device_name()
    Hq, Hkv, D, dtype = 32, 8, 128, torch.bfloat16
    for B in args.batch:
        for S in args.seq:
            r, k = 16, S // 16
            q = torch.randn(B, Hq, 1, D, device="cuda", dtype=dtype)
            key = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype)
            value = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype)
            key_t = key.transpose(-1, -2).contiguous()
            v_mean = value.float().mean(2, keepdim=True).to(dtype)
            kw = dict(r=r, k=k, key_t=key_t, value_mean=v_mean, local_window=k // 4)
            with torch.no_grad():
                for _ in range(3):
                    sparq_ext.attention(q, key, value, **kw)
                    torch.nn.functional.scaled_dot_product_attention(q, key, value,
                                                                     enable_gqa=True)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(args.iters):
                        sparq_ext.attention(q, key, value, **kw)
                    for _ in range(args.iters):
                        torch.nn.functional.scaled_dot_product_attention(q, key, value,
                                                                         enable_gqa=True)
                    torch.cuda.synchronize()
            print(f"\n=== {dev}  B={B} Hq={Hq} Hkv={Hkv} S={S} D={D} r={r} k={k} bf16 ===")
            want = stage_bytes(B, Hq, Hkv, S, D, r, k, 2)
            rows = []
            for ev in prof.key_averages():
                t = getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0.0)  # us/call
                if ev.count < args.iters or t <= 0:
                    continue
                name = ev.key
                stage = next((s for s in want if s in name), None)
                per_step = t * ev.count / args.iters
                gbs = f"{want[stage] / (per_step * 1e-6) / 1e9:8.0f}" if stage else " " * 8
                rows.append((per_step, ev.count // args.iters, t, gbs, name))
            rows.sort(reverse=True)
            print(f"{'us/step':>9} {'calls':>5} {'us/call':>9} {'GB/s':>8}  kernel")
            for per_step, calls, t, gbs, name in rows:
                print(f"{per_step:9.1f} {calls:5d} {t:9.1f} {gbs}  {name[:90]}")


if __name__ == "__main__":
    main()
