"""The CUDA kernels of ``torch.ops.sparq_ext.attention`` against the pure-torch reference.

Every option and dtype on fresh random data (fixed seeds), GQA groups 1/4/8, head dims
64/128/256 (and odd ones, through the padding path), ragged ``seq_lens``, left-padded masks,
S up to 128K with k up to 16K; CUDA-graph capture/replay and ``torch.compile(fullgraph=True)``.
Skipped without a CUDA device or without the compiled CUDA kernels.
"""

from __future__ import annotations

import math

import pytest
import torch

import sparq_ext
from sparq_ext import sparq_attention_reference
from sparq_testutil import separated_query

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not sparq_ext.has_native_kernel("cuda"),
                       reason="sparq_ext was built without the CUDA kernels "
                              f"({sparq_ext.extension_error or 'FORCE_CUDA=1 to build them'})"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Output tolerances. fp32: a few ulps of fp32 accumulation (sums in a different order).
# Half types: the output is rounded to 8 / 11 mantissa bits.
TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}


def make_inputs(B, Hq, Hkv, S, D, dtype, seed, *, spread=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g, device="cuda") * spread
    k = torch.randn(B, Hkv, S, D, generator=g, device="cuda")
    v = torch.randn(B, Hkv, S, D, generator=g, device="cuda")
    return q.to(dtype), k.to(dtype), v.to(dtype)


def run_both(q, k, v, *, r, kk, with_key_t=True, tol=None, exact_choice=True, **kw):
    key_t = k.transpose(-1, -2).contiguous() if with_key_t else None
    if exact_choice:  # redraw q if the top-r / top-k boundary is a near-tie (sparq_testutil)
        q = separated_query(q, k, r, kk, key_t=key_t, seq_lens=kw.get("seq_lens"),
                            attn_mask=kw.get("attn_mask"),
                            local_window=kw.get("local_window", 0), scale=kw.get("scale"))
    with torch.no_grad():
        got = sparq_ext.attention(q, k, v, r=r, k=kk, key_t=key_t, **kw)
        ref = sparq_attention_reference(q, k, v, r, kk, key_t, kw.get("value_mean"),
                                        kw.get("seq_lens"), kw.get("attn_mask"),
                                        kw.get("local_window", 0), kw.get("reallocate", True),
                                        kw.get("scale"))
    assert got.shape == ref.shape and got.dtype == ref.dtype and got.is_cuda
    assert torch.isfinite(got).all(), "NaN/inf in the output"
    atol, rtol = tol or TOL[q.dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol)
    return got, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (16, 2)])  # G = 1, 4, 8
def test_grid_dtype_headdim_group(dtype, D, Hq, Hkv):
    q, k, v = make_inputs(2, Hq, Hkv, 1531, D, dtype, seed=D + Hq)
    run_both(q, k, v, r=D // 8, kk=97)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_key_t", [True, False], ids=["key_t", "no_key_t"])
@pytest.mark.parametrize("reallocate", [True, False])
@pytest.mark.parametrize("given_mean", [False, True], ids=["mean_none", "mean_given"])
def test_options(dtype, with_key_t, reallocate, given_mean):
    B, Hq, Hkv, S, D = 3, 8, 2, 3000, 128
    q, k, v = make_inputs(B, Hq, Hkv, S, D, dtype, seed=11)
    seq_lens = torch.tensor([3000, 1777, 5], device="cuda")
    vm = v.float().mean(2, keepdim=True).to(dtype) if given_mean else None
    run_both(q, k, v, r=16, kk=200, with_key_t=with_key_t, seq_lens=seq_lens,
             local_window=50, reallocate=reallocate, value_mean=vm, scale=0.07)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_left_padded_mask_and_window(dtype):
    B, Hq, Hkv, S, D = 4, 8, 8, 2500, 64
    q, k, v = make_inputs(B, Hq, Hkv, S, D, dtype, seed=12)
    pads = torch.tensor([0, 1, 700, 2400], device="cuda")
    mask = (torch.arange(S, device="cuda")[None, :] >= pads[:, None]).view(B, 1, 1, S)
    run_both(q, k, v, r=8, kk=128, attn_mask=mask, local_window=32)
    # Same with holes inside the mask (the window counts valid positions only).
    g = torch.Generator(device="cuda").manual_seed(3)
    holes = torch.rand(B, 1, 1, S, generator=g, device="cuda") > 0.3
    run_both(q, k, v, r=8, kk=128, attn_mask=mask & holes, local_window=100)


@pytest.mark.parametrize("mask_shape", [(2500,), (1, 1, 1, 2500), (2, 1, 1, 2500)])
def test_mask_broadcasting_with_seq_lens(mask_shape):
    q, k, v = make_inputs(2, 4, 2, 2500, 128, torch.bfloat16, seed=13)
    g = torch.Generator(device="cuda").manual_seed(4)
    mask = torch.rand(mask_shape, generator=g, device="cuda") > 0.5
    seq_lens = torch.tensor([2500, 1200], device="cuda", dtype=torch.int32)
    run_both(q, k, v, r=16, kk=300, attn_mask=mask, seq_lens=seq_lens, local_window=20)


def test_rows_without_valid_positions_give_zeros():
    q, k, v = make_inputs(3, 4, 2, 600, 64, torch.float16, seed=14)
    seq_lens = torch.tensor([0, 600, 3], device="cuda")
    mask = torch.ones(3, 1, 1, 600, dtype=torch.bool, device="cuda")
    mask[2] = False
    for reallocate in (True, False):
        got, _ = run_both(q, k, v, r=8, kk=64, seq_lens=seq_lens, attn_mask=mask,
                          reallocate=reallocate)
        assert (got[0] == 0).all() and (got[2] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_k_at_least_valid_length_is_dense_attention(dtype):
    q, k, v = make_inputs(2, 8, 2, 700, 128, dtype, seed=15)
    with torch.no_grad():
        got = sparq_ext.attention(q, k, v, r=4, k=700, key_t=k.transpose(-1, -2).contiguous())
        dense = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(4, 1), v.float().repeat_interleave(4, 1))
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), dense, atol=atol, rtol=rtol)
    # k beyond S is clamped; beyond the valid length too.
    seq_lens = torch.tensor([700, 123], device="cuda")
    run_both(q, k, v, r=4, kk=5000, seq_lens=seq_lens, local_window=5000)


@pytest.mark.parametrize("D", [32, 80, 96, 100, 57])
def test_other_head_dims(D):
    q, k, v = make_inputs(2, 4, 1, 999, D, torch.float32, seed=D)
    run_both(q, k, v, r=max(1, D // 4), kk=77, local_window=7)
    run_both(q, k, v, r=D, kk=77, with_key_t=False)


def test_r_equals_d_and_tiny_shapes():
    for S, kk, r in [(1, 1, 64), (2, 1, 1), (5, 3, 64), (17, 17, 3), (4097, 4096, 64)]:
        q, k, v = make_inputs(1, 2, 1, S, 64, torch.float32, seed=S)
        run_both(q, k, v, r=r, kk=kk, local_window=min(kk, 2))


def test_non_contiguous_and_expanded_inputs():
    B, Hq, Hkv, S_max, S, D = 2, 8, 2, 4096, 3000, 128
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(16)
    cache_k = torch.randn(B, Hkv, S_max, D, generator=g, device="cuda").to(dtype)
    cache_v = torch.randn(B, Hkv, S_max, D, generator=g, device="cuda").to(dtype)
    q = torch.randn(B, Hq, 1, D, generator=g, device="cuda").to(dtype)
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]  # strided views of a larger cache
    key_t_store = torch.randn(B, Hkv, D, S_max, device="cuda").to(dtype)
    key_t_store[..., :S] = k.transpose(-1, -2)
    q = separated_query(q, k, 16, 256)
    with torch.no_grad():
        got = sparq_ext.attention(q, k, v, r=16, k=256, key_t=key_t_store[..., :S])
        ref = sparq_attention_reference(q, k.contiguous(), v.contiguous(), 16, 256,
                                        k.transpose(-1, -2).contiguous())
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    # (B, S, H, D) storage transposed to (B, H, S, D); an unaligned storage offset; MQA
    # expanded to several heads; a query that is a non-contiguous view.
    k_bshd = torch.randn(B, S, Hkv, D, device="cuda").to(dtype).transpose(1, 2)
    v_bshd = torch.randn(B, S, Hkv, D, device="cuda").to(dtype).transpose(1, 2)
    run_both(q, k_bshd, v_bshd, r=16, kk=256)
    flat = torch.randn(B * Hkv * S * D + 3, device="cuda").to(dtype)
    k_odd = flat[3:].view(B, Hkv, S, D)
    run_both(q, k_odd, v, r=16, kk=256, with_key_t=False)
    k1, v1 = make_inputs(B, 1, 1, S, D, dtype, seed=17)[1:]
    run_both(q, k1.expand(B, Hkv, S, D), v1.expand(B, Hkv, S, D), r=16, kk=256)
    q_sep = separated_query(q, k, 16, 256)
    q_wide = torch.zeros(B, Hq, 1, 2 * D, device="cuda", dtype=dtype)
    q_wide[..., ::2] = q_sep
    run_both(q_wide[..., ::2], k, v, r=16, kk=256, with_key_t=False, exact_choice=False)


@pytest.mark.parametrize("Hq,Hkv", [(32, 1), (12, 1), (6, 3)])  # G = 32, 12, 2: group chunks
def test_large_and_odd_groups(Hq, Hkv):
    q, k, v = make_inputs(2, Hq, Hkv, 2000, 128, torch.float16, seed=Hq)
    run_both(q, k, v, r=16, kk=128, local_window=16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_long_context_128k(dtype):
    S, kk = 128 * 1024, 16 * 1024
    q, k, v = make_inputs(1, 8, 2, S, 128, dtype, seed=18)
    seq_lens = torch.tensor([S - 1000], device="cuda")
    run_both(q, k, v, r=16, kk=kk, seq_lens=seq_lens, local_window=kk // 4)


def test_ragged_batch_many_rows():
    B, S = 8, 20000
    q, k, v = make_inputs(B, 32, 8, S, 128, torch.bfloat16, seed=19)
    seq_lens = torch.tensor([20000, 1, 0, 4096, 4097, 12345, 19999, 64], device="cuda")
    run_both(q, k, v, r=16, kk=S // 16, seq_lens=seq_lens, local_window=S // 64)


@pytest.mark.parametrize("kk", [10, 25, 37, 50, 1900])
def test_heavy_ties_in_scores(kk):
    # Keys and values constant within 4 groups of positions (sizes 10, 15, 25, 1950): every
    # approximate score ties inside its group and the k-th often falls inside one; any choice
    # among equal rows gives the same output, so the reference must match exactly.
    S, D = 2000, 64
    g = torch.Generator(device="cuda").manual_seed(kk)
    group = torch.repeat_interleave(torch.arange(4, device="cuda"),
                                    torch.tensor([10, 15, 25, 1950], device="cuda"))
    group = group[torch.randperm(S, generator=g, device="cuda")]
    rows_k = torch.randn(4, D, generator=g, device="cuda")
    rows_k[1:] *= torch.tensor([0.7, 0.4, 0.1], device="cuda")[:, None]
    q = (rows_k[0] * 3).view(1, 1, 1, D).expand(2, 4, 1, D).contiguous()
    k = rows_k[group].view(1, 1, S, D).expand(2, 2, S, D).contiguous()
    v = torch.randn(4, D, generator=g, device="cuda")[group].view(1, 1, S, D).expand(2, 2, S, D)
    run_both(q, k, v, r=64, kk=kk, exact_choice=False)
    run_both(q, k, v, r=64, kk=kk, exact_choice=False, reallocate=False)


def test_deterministic_shape_independent_of_data():
    q, k, v = make_inputs(2, 8, 2, 5000, 128, torch.bfloat16, seed=20)
    with torch.no_grad():
        a = sparq_ext.attention(q, k, v, r=16, k=300)
        b = sparq_ext.attention(q, k, v, r=16, k=300)
    torch.testing.assert_close(a, b, atol=1e-2, rtol=0)  # split order may vary in the last bit


def test_cuda_graph_capture_and_replay():
    B, Hq, Hkv, S, D = 2, 8, 2, 4000, 128
    q, k, v = make_inputs(B, Hq, Hkv, S, D, torch.bfloat16, seed=21)
    key_t = k.transpose(-1, -2).contiguous()
    seq_lens = torch.tensor([4000, 2500], device="cuda")
    kw = dict(r=16, k=256, key_t=key_t, seq_lens=seq_lens, local_window=64)
    with torch.no_grad():
        eager = sparq_ext.attention(q, k, v, **kw)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up the allocator on the side stream
            for _ in range(2):
                sparq_ext.attention(q, k, v, **kw)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = sparq_ext.attention(q, k, v, **kw)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, eager, atol=1e-2, rtol=0)
        # New data in the captured buffers: the replay follows it.
        q2, k2, v2 = make_inputs(B, Hq, Hkv, S, D, torch.bfloat16, seed=22)
        new_lens = torch.tensor([1000, 3999], device="cuda")
        q2 = separated_query(q2, k2, 16, 256, seq_lens=new_lens, local_window=64)
        q.copy_(q2), k.copy_(k2), v.copy_(v2), key_t.copy_(k2.transpose(-1, -2))
        seq_lens.copy_(new_lens)
        graph.replay()
        torch.cuda.synchronize()
        fresh = sparq_ext.attention(q, k, v, **kw)
        torch.testing.assert_close(static_out, fresh, atol=1e-2, rtol=0)
        ref = sparq_attention_reference(q, k, v, 16, 256, key_t, None, seq_lens, None, 64)
        torch.testing.assert_close(static_out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_torch_compile_fullgraph():
    q, k, v = make_inputs(2, 8, 2, 3000, 128, torch.float16, seed=23)
    key_t = k.transpose(-1, -2).contiguous()
    mask = torch.ones(2, 1, 1, 3000, dtype=torch.bool, device="cuda")
    mask[1, ..., :100] = False

    def step(q, k, v, key_t, mask):
        return sparq_ext.attention(q * 1.0, k, v, r=16, k=256, key_t=key_t, attn_mask=mask,
                                   local_window=32) + 0.0

    with torch.no_grad():
        compiled = torch.compile(step, fullgraph=True)
        got = compiled(q, k, v, key_t, mask)
        eager = step(q, k, v, key_t, mask)
    torch.testing.assert_close(got, eager, atol=4e-3, rtol=0)


def test_opcheck():
    q, k, v = make_inputs(1, 4, 2, 500, 64, torch.float32, seed=24)
    args = (q, k, v)
    kwargs = dict(r=8, k=64, key_t=k.transpose(-1, -2).contiguous(), local_window=8)
    torch.library.opcheck(torch.ops.sparq_ext.attention.default, args, kwargs,
                          test_utils=("test_schema", "test_faketensor"))


def test_rejects_non_cuda_mix_and_big_head_dim():
    q, k, v = make_inputs(1, 2, 1, 50, 64, torch.float32, seed=25)
    with pytest.raises((ValueError, RuntimeError)):
        sparq_ext.attention(q, k.cpu(), v, r=4, k=8)
    q5, k5, v5 = make_inputs(1, 2, 1, 50, 512, torch.float32, seed=26)
    with pytest.raises(RuntimeError, match="head_dim"):
        torch.ops.sparq_ext.attention(q5, k5, v5, r=4, k=8)


def test_large_logits_stay_finite():
    q, k, v = make_inputs(2, 8, 2, 2000, 128, torch.float32, seed=27, spread=40.0)
    run_both(q, k, v, r=32, kk=100, local_window=10, tol=(1e-3, 1e-3))
    run_both(q, k, v, r=32, kk=100, scale=1e-6)

