"""A small case for compute-sanitizer (memcheck, synccheck, initcheck, racecheck): every kernel of
torch.ops.sparq_ext.attention once or twice, on shapes that exercise partial tiles, ragged
seq_lens, a masked row, the local window, GQA group chunks, an odd head dim, both value-mean
paths, softcap with sinks and the 8-bit selection cache, and torch.ops.sparq_ext.paged_attention
on a shuffled engine-layout cache (the 8-bit selection cache too). Exits non-zero when an output
differs from the pure-torch reference.

    compute-sanitizer --tool memcheck python benchmarks/sanitizer_case.py [--quick]
    python benchmarks/sanitizer_case.py --device cpu      # the same cases on the CPU kernel

Half-precision cases use r = D: a rounded query often ties at the r-th largest |q| component,
and two correct implementations may break that tie differently (docs/design.md), so only
r = D (no choice to make) gives one right answer without drawing special queries.
"""

from __future__ import annotations

import argparse
import sys

import torch

import sparq_ext
from sparq_ext import sparq_attention_reference

TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def case(device, B, Hq, Hkv, S, D, r, k, dtype, seed, with_key_t=True, int8_key_t=False,
         **kwargs) -> bool:
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=gen, device=device).to(dtype)
    key = torch.randn(B, Hkv, S, D, generator=gen, device=device).to(dtype)
    value = torch.randn(B, Hkv, S, D, generator=gen, device=device).to(dtype)
    key_t = key.transpose(-1, -2).contiguous() if with_key_t else None
    if int8_key_t:  # the 8-bit selection cache
        key_t, kwargs["key_t_scale"] = sparq_ext.quantize_key_t(key)
    with torch.no_grad():
        got = sparq_ext.attention(q, key, value, r=r, k=k, key_t=key_t, **kwargs)
        ref = sparq_attention_reference(q, key, value, r=r, k=k, key_t=key_t, **kwargs)
    err = (got.float() - ref.float()).abs().max().item()
    ok = bool(torch.isfinite(got).all()) and err <= TOLERANCE[dtype]
    print(f"B={B} Hq={Hq} Hkv={Hkv} S={S} D={D} r={r} k={k} {dtype}"
          + (" int8 key_t" if int8_key_t else "") + f": max |err| = {err:.2e}"
          + ("" if ok else "  MISMATCH"))
    return ok


def paged_case(device, block_size, dtype, seed, with_key_t=True, int8_key_t=False) -> bool:
    """paged_attention on (num_blocks, block_size, Hkv, D) caches seen through transpose(1, 2),
    blocks shuffled, rows of 1000, 0 and 333 positions, against the reference on the same rows
    laid out contiguously. Only the blocks the rows use exist: a read past them is out of bounds."""
    R, Hq, Hkv, D, r, k = 3, 8, 2, 128, 16, 100
    lens = [1000, 0, 333]
    gen = torch.Generator(device=device).manual_seed(seed)
    S = max(lens)
    q = torch.randn(R, Hq, D, generator=gen, device=device).to(dtype)
    key = torch.randn(R, Hkv, S, D, generator=gen, device=device).to(dtype)
    value = torch.randn(R, Hkv, S, D, generator=gen, device=device).to(dtype)
    used = [-(-n // block_size) for n in lens]
    ids = torch.randperm(sum(used), generator=gen, device=device).to(torch.int32)
    table = torch.full((R, max(used) + 1), 1 << 30, dtype=torch.int32, device=device)
    taken = 0
    for i, n in enumerate(used):
        table[i, :n] = ids[taken:taken + n]
        taken += n

    def to_pages(x):  # (R, Hkv, S, D) -> (num_blocks, Hkv, block_size, D), an engine's layout
        storage = torch.zeros(sum(used), block_size, Hkv, D, dtype=dtype, device=device)
        for i, n in enumerate(used):
            for j in range(n):
                rows = x[i, :, j * block_size:(j + 1) * block_size].transpose(0, 1)
                storage[table[i, j].long(), :rows.shape[0]] = rows
        return storage.transpose(1, 2)

    key_cache, value_cache = to_pages(key), to_pages(value)
    key_t_cache = key_cache.transpose(2, 3).contiguous() if with_key_t else None
    int8 = {}  # the 8-bit selection cache: paged, and of the contiguous rows for the reference
    if int8_key_t:
        key_t_cache, int8["key_t_scale"] = sparq_ext.quantize_key_t(key_cache)
        ref_key_t, ref_scale = sparq_ext.quantize_key_t(key)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    with torch.no_grad():
        got = sparq_ext.paged_attention(q, key_cache, value_cache, table, seq_lens, r=r, k=k,
                                        key_t_cache=key_t_cache, local_window=8, **int8)
        ref = sparq_attention_reference(q[:, :, None], key, value, r=r, k=k, seq_lens=seq_lens,
                                        local_window=8,
                                        key_t=ref_key_t if int8_key_t else None,
                                        key_t_scale=ref_scale if int8_key_t else None)[:, :, 0]
    err = (got.float() - ref.float()).abs().max().item()
    ok = bool(torch.isfinite(got).all()) and err <= TOLERANCE[dtype]
    print(f"paged R={R} Hq={Hq} Hkv={Hkv} block_size={block_size} D={D} r={r} k={k} {dtype}"
          + (" int8 key_t" if int8_key_t else "") + ": "
          f"max |err| = {err:.2e}" + ("" if ok else "  MISMATCH"))
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--quick", action="store_true",
                    help="the first two cases and the first paged one (racecheck is slow)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if not sparq_ext.has_native_kernel(device.type):
        raise SystemExit(f"no native {device.type} kernel: {sparq_ext.extension_error or 'not built'}")
    seq_lens = torch.tensor([1000, 333, 0], device=device)
    mask = torch.ones(3, 1, 1, 1000, dtype=torch.bool, device=device)
    mask[1, ..., :50] = False
    ok = case(device, 3, 8, 2, 1000, 128, 128, 100, torch.bfloat16, 1, seq_lens=seq_lens,
              attn_mask=mask, local_window=20)
    ok &= case(device, 2, 12, 1, 777, 64, 8, 64, torch.float32, 2, with_key_t=False)
    ok &= paged_case(device, 16, torch.float32, 7)
    if not args.quick:
        ok &= paged_case(device, 48, torch.float32, 8, with_key_t=False)
        ok &= case(device, 1, 4, 4, 5000, 256, 32, 600, torch.float32, 3, reallocate=False)
        ok &= case(device, 2, 4, 2, 300, 80, 10, 500, torch.float32, 4, local_window=3,
                   value_mean=torch.zeros(2, 2, 1, 80, device=device))
        ok &= case(device, 1, 2, 1, 9000, 100, 100, 4000, torch.float16, 5)  # D % 8 != 0
        ok &= case(device, 2, 8, 2, 2000, 128, 16, 128, torch.float32, 6, local_window=16,
                   seq_lens=torch.tensor([2000, 1], device=device))
        sinks = torch.linspace(-2.0, 6.0, 24, device=device)  # softcap and sinks, G = 12
        ok &= case(device, 2, 24, 2, 1500, 64, 8, 100, torch.float32, 9, local_window=5,
                   seq_lens=torch.tensor([1500, 0], device=device), softcap=3.0, sinks=sinks)
        ok &= case(device, 2, 8, 2, 1001, 128, 28, 100, torch.float32, 10, int8_key_t=True,
                   local_window=8, sinks=sinks[:8])  # S % 4 != 0: elementwise int8 loads
        ok &= case(device, 1, 4, 4, 2048, 64, 16, 128, torch.float32, 11, int8_key_t=True)
        ok &= paged_case(device, 16, torch.float32, 12, int8_key_t=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
