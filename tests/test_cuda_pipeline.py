"""GPU checks of the CUDA pipeline's hazards (docs/cuda-pipeline.md) that only a device can
run: launch sizes around the old shared-memory limits, a query at an odd storage offset, and the
NaN rule. The emulator (tests/test_cuda_emulation.py) covers the same on the CPU. Skipped without
a CUDA device or without the compiled CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch

import sparq_ext
from sparq_ext import sparq_attention_reference
from sparq_testutil import separated_query

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not sparq_ext.has_native_kernel("cuda"),
                       reason="sparq_ext was built without the CUDA kernels"),
]

TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2}


def _inputs(B, Hq, Hkv, S, D, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(B, Hq, 1, D), (B, Hkv, S, D), (B, Hkv, S, D)]
    return [torch.randn(s, generator=g, device="cuda").to(dtype) for s in shapes]


def _compare(q, k, v, r, kk, dtype, **kw):
    key_t = k.transpose(-1, -2).contiguous()
    q = separated_query(q, k, r, kk, key_t=key_t)
    got = sparq_ext.attention(q, k, v, r=r, k=kk, key_t=key_t, **kw)
    ref = sparq_attention_reference(q, k, v, r, kk, key_t, **kw)
    torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("S", [11997, 12000, 12288, 25000, 32768, 32769, 70000])
def test_lengths_around_the_old_shared_memory_limits(S):
    q, k, v = _inputs(1, 32, 8, S, 128, torch.bfloat16, S)
    _compare(q, k, v, 16, S // 16, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_query_at_an_odd_storage_offset(dtype):
    q0, k, v = _inputs(2, 8, 2, 3000, 128, dtype, 1)
    buf = torch.empty(q0.numel() + 1, dtype=dtype, device="cuda")
    q = buf[1:].view_as(q0).copy_(q0)
    assert q.data_ptr() % 16 != 0
    _compare(q, k, v, 16, 200, dtype)
    torch.cuda.synchronize()  # a misaligned access would surface here


def test_nan_logit_is_selected_last():
    S, D = 4000, 128
    q, k, v = _inputs(1, 8, 2, S, D, torch.float32, 2)
    top = q[0, :4, 0].abs().sum(0).argmax()
    q[0, :4, 0, top] += 5.0 * torch.sign(q[0, :4, 0, top])
    k[0, 0, 123, top] = float("nan")
    for kk in (100, S - 1):
        got = sparq_ext.attention(q, k, v, r=16, k=kk, reallocate=False)
        assert torch.isfinite(got).all()
    got = sparq_ext.attention(q, k, v, r=16, k=S, reallocate=False)
    assert torch.isnan(got[0, :4]).all() and torch.isfinite(got[0, 4:]).all()
