"""A small CUDA case for compute-sanitizer (memcheck, racecheck, synccheck): every kernel
of torch.ops.sparq_ext.attention once or twice, on shapes that exercise partial tiles, ragged
seq_lens, a masked row, the local window, GQA group chunks and both value-mean paths.

    compute-sanitizer --tool memcheck python benchmarks/sanitizer_case.py

Exits non-zero when an output differs from the pure-torch reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the in-place build; test helpers
import sparq_ext  # noqa: E402
from sparq_ext import sparq_attention_reference  # noqa: E402
from sparq_testutil import separated_query  # noqa: E402  (queries without top-r/k ties)


def case(B, Hq, Hkv, S, D, r, k, dtype, seed, **kw):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g, device="cuda").to(dtype)
    key = torch.randn(B, Hkv, S, D, generator=g, device="cuda").to(dtype)
    value = torch.randn(B, Hkv, S, D, generator=g, device="cuda").to(dtype)
    key_t = key.transpose(-1, -2).contiguous() if kw.pop("with_key_t", True) else None
    q = separated_query(q, key, r, k, key_t=key_t, seq_lens=kw.get("seq_lens"),
                        attn_mask=kw.get("attn_mask"), local_window=kw.get("local_window", 0),
                        scale=kw.get("scale"))
    with torch.no_grad():
        got = sparq_ext.attention(q, key, value, r=r, k=k, key_t=key_t, **kw)
        ref = sparq_attention_reference(q, key, value, r, k, key_t, kw.get("value_mean"),
                                        kw.get("seq_lens"), kw.get("attn_mask"),
                                        kw.get("local_window", 0), kw.get("reallocate", True),
                                        kw.get("scale"))
    torch.cuda.synchronize()
    err = (got.float() - ref.float()).abs().max().item()
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    print(f"B={B} Hq={Hq} Hkv={Hkv} S={S} D={D} r={r} k={k} {dtype}: max |err| = {err:.2e}")
    return err <= tol


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA device"
    assert sparq_ext.has_native_kernel("cuda"), sparq_ext.extension_error
    ok = True
    seq_lens = torch.tensor([1000, 333, 0], device="cuda")
    mask = torch.ones(3, 1, 1, 1000, dtype=torch.bool, device="cuda")
    mask[1, ..., :50] = False
    ok &= case(3, 8, 2, 1000, 128, 16, 100, torch.bfloat16, 1, seq_lens=seq_lens,
               attn_mask=mask, local_window=20)
    ok &= case(2, 12, 1, 777, 64, 8, 64, torch.float16, 2, with_key_t=False)
    if "--quick" in sys.argv:  # racecheck is slow: these two cases reach every kernel
        print("OK" if ok else "MISMATCH")
        return 0 if ok else 1
    ok &= case(1, 4, 4, 5000, 256, 32, 600, torch.float32, 3, reallocate=False)
    ok &= case(2, 4, 2, 300, 80, 10, 500, torch.float32, 4,
               value_mean=torch.zeros(2, 2, 1, 80, device="cuda"), local_window=3)
    ok &= case(1, 2, 1, 9000, 100, 25, 4000, torch.float16, 5)  # padding path (D % 8 != 0)
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
