"""Every native backend (the CPU kernel, csrc/cpu/; the CUDA kernels, csrc/cuda/) against the
pure-torch reference, on every option, dtype, head dim, GQA group and layout. Fixed seeds; no
timing. A backend that is not built or has no device is skipped (or fails, where
SPARQ_EXT_REQUIRE_NATIVE names it). What only CUDA has (graphs, streams, no host sync, very long
caches) is in tests/test_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparq_ext import sparq_attention_reference
from sparq_testutil import DTYPES, attention, make_inputs, separated_query, tolerance, untied_query


def native_and_reference(backend, q, K, V, r, k, *, key_t=None, value_mean=None, seq_lens=None,
                         attn_mask=None, local_window=0, reallocate=True, scale=None, reference_dtype=None):
    """The backend's output and the pure-torch reference's (computed in ``reference_dtype``
    when given, e.g. float64 where fp32 rounding in the reference itself would dominate)."""
    out = attention(backend, q, K, V, r=r, k=k, key_t=key_t, value_mean=value_mean, seq_lens=seq_lens,
                    attn_mask=attn_mask, local_window=local_window, reallocate=reallocate, scale=scale)
    cast = (lambda x: x) if reference_dtype is None else \
        (lambda x: None if x is None else x.to(reference_dtype))
    with torch.no_grad():
        ref = sparq_attention_reference(cast(q), cast(K), cast(V), r, k, cast(key_t), cast(value_mean),
                                        seq_lens, attn_mask, local_window, reallocate, scale)
    return out, ref


def check(backend, q, K, V, r, k, separate=True, **kwargs):
    """``backend`` against the reference at the backend's tolerance. ``separate``: first redraw
    the query (in its layout) if the top-r or top-k boundary is a near-tie, which two correct
    implementations may break differently (tests/sparq_testutil.py)."""
    if separate:
        q = _in_layout_of(q, separated_query(
            q, K, r, k, key_t=kwargs.get("key_t"), seq_lens=kwargs.get("seq_lens"),
            attn_mask=kwargs.get("attn_mask"), local_window=kwargs.get("local_window", 0),
            scale=kwargs.get("scale")))
    out, ref = native_and_reference(backend, q, K, V, r, k, **kwargs)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), **tolerance(q.dtype, backend))
    return out


def _in_layout_of(like, values):
    """``values`` with ``like``'s strides and storage offset (``like`` itself when they are it),
    so a layout test keeps its layout when its query is redrawn."""
    if values is like:
        return like
    base = like if like._base is None else like._base
    out = base.clone().as_strided(like.size(), like.stride(), like.storage_offset() - base.storage_offset())
    return out.copy_(values)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("S", [1, 2, 17, 300, 4100])
@pytest.mark.parametrize("with_key_t", [True, False], ids=["key_t", "no_key_t"])
@pytest.mark.parametrize("with_mean", [True, False], ids=["value_mean", "mean_none"])
def test_matches_reference(native_backend, dtype, G, S, with_key_t, with_mean):
    B, Hkv, D = 2, 2, 64
    q, K, V = make_inputs(B, G * Hkv, Hkv, S, D, dtype, seed=S * 10 + G)
    key_t = K.transpose(-1, -2).contiguous() if with_key_t else None
    value_mean = V.float().mean(2, keepdim=True).to(dtype) if with_mean else None
    check(native_backend, q, K, V, 8, max(1, S // 8), key_t=key_t, value_mean=value_mean,
          local_window=max(0, S // 32))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Hkv", [32, 8])
def test_standard_shape_16k(native_backend, dtype, Hkv):
    S, D = 16384, 128
    q, K, V = make_inputs(1, 32, Hkv, S, D, dtype, seed=Hkv)
    check(native_backend, q, K, V, 16, S // 16, key_t=K.transpose(-1, -2).contiguous(),
          value_mean=V.float().mean(2, keepdim=True).to(dtype), local_window=S // 64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("Hq, Hkv", [(4, 4), (8, 2), (16, 2)])  # G = 1, 4, 8
def test_head_dims_groups_dtypes(native_backend, dtype, D, Hq, Hkv):
    q, K, V = make_inputs(2, Hq, Hkv, 1531, D, dtype, seed=D + Hq)
    check(native_backend, q, K, V, D // 8, 97, key_t=K.transpose(-1, -2).contiguous())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_key_t", [True, False], ids=["key_t", "no_key_t"])
@pytest.mark.parametrize("reallocate", [True, False])
@pytest.mark.parametrize("with_mean", [False, True], ids=["mean_none", "value_mean"])
def test_option_combinations(native_backend, dtype, with_key_t, reallocate, with_mean):
    q, K, V = make_inputs(3, 8, 2, 3000, 128, dtype, seed=11)
    check(native_backend, q, K, V, 16, 200, key_t=K.transpose(-1, -2).contiguous() if with_key_t else None,
          value_mean=V.float().mean(2, keepdim=True).to(dtype) if with_mean else None,
          seq_lens=torch.tensor([3000, 1777, 5]), local_window=50, reallocate=reallocate, scale=0.07)


@pytest.mark.parametrize("S, k, r", [(1, 1, 64), (2, 1, 1), (5, 3, 64), (17, 17, 3), (4097, 4096, 64)])
def test_tiny_caches_and_k_near_s(native_backend, S, k, r):
    q, K, V = make_inputs(1, 2, 1, S, 64, seed=S)
    check(native_backend, q, K, V, r, k, key_t=K.transpose(-1, -2).contiguous(), local_window=min(k, 2))


@pytest.mark.parametrize("Hq, Hkv", [(32, 1), (12, 1), (6, 3)])  # G = 32, 12, 2
def test_large_and_odd_groups(native_backend, Hq, Hkv):
    q, K, V = make_inputs(2, Hq, Hkv, 2000, 128, torch.float16, seed=Hq)
    check(native_backend, q, K, V, 16, 128, key_t=K.transpose(-1, -2).contiguous(), local_window=16)


def test_large_logits_stay_finite(native_backend):
    q, K, V = make_inputs(2, 8, 2, 2000, 128, seed=27)
    for q_scale, scale in ((40.0, None), (1.0, 1e-6)):
        out, ref = native_and_reference(native_backend, q * q_scale, K, V, 32, 100, local_window=10, scale=scale)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)  # logits up to ~1e3 amplify rounding


@pytest.mark.parametrize("D, r", [(40, 5), (72, 72), (128, 1), (16, 3), (200, 17), (57, 14), (80, 80), (96, 24)])
def test_head_dims_and_r(native_backend, D, r):
    q, K, V = make_inputs(2, 6, 3, 257, D, seed=D + r)
    check(native_backend, q, K, V, r, 31, key_t=K.transpose(-1, -2).contiguous(), local_window=4)
    check(native_backend, q, K, V, r, 31)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [0, 1, 5, 40])
def test_ragged_seq_lens(native_backend, dtype, window):
    q, K, V = make_inputs(4, 8, 2, 700, 64, dtype, seed=window)
    for lens_dtype in (torch.int32, torch.int64):
        seq_lens = torch.tensor([700, 350, 3, 0], dtype=lens_dtype)
        out = check(native_backend, q, K, V, 8, 40, key_t=K.transpose(-1, -2).contiguous(), seq_lens=seq_lens,
                    local_window=window)
        assert (out[3] == 0).all()  # no valid position: zeros, not NaN
        check(native_backend, q, K, V, 8, 40, seq_lens=seq_lens, local_window=window, reallocate=False)


def test_padding_does_not_change_valid_part(native_backend):
    q, K, V = make_inputs(1, 8, 2, 500, 64, seed=3)
    Kp = torch.cat([K, torch.randn(1, 2, 300, 64) * 100], 2)
    Vp = torch.cat([V, torch.randn(1, 2, 300, 64) * 100], 2)
    a = attention(native_backend, q, K, V, r=8, k=50, local_window=10)
    b = attention(native_backend, q, Kp, Vp, r=8, k=50, local_window=10, seq_lens=torch.tensor([500]))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [0, 6])
def test_left_padded_and_holey_masks(native_backend, dtype, window):
    B, S = 3, 600
    q, K, V = make_inputs(B, 8, 1, S, 64, dtype, seed=11 + window)
    pad = torch.tensor([0, 150, 590])
    mask = torch.arange(S)[None, :] >= pad[:, None]  # left padding
    mask[1, 300:320] = False  # and a hole
    mask[2, -3:] = False  # trailing masked positions after a short valid run
    for m in (mask[:, None, None, :], mask[:, None, None, :].expand(B, 1, 1, S)):
        check(native_backend, q, K, V, 8, 37, key_t=K.transpose(-1, -2).contiguous(), attn_mask=m,
              local_window=window)
        check(native_backend, q, K, V, 8, 37, attn_mask=m, local_window=window)  # v_mean over valid positions
    check(native_backend, q, K, V, 8, 37, attn_mask=mask[:, None, None, :], local_window=window,
          seq_lens=torch.tensor([600, 400, 595]))


@pytest.mark.parametrize("shape", [(600,), (1, 600), (1, 1, 600), (1, 1, 1, 600), (3, 1, 1, 600)])
def test_broadcast_mask_shapes(native_backend, shape):
    q, K, V = make_inputs(3, 4, 2, 600, 32, seed=5)
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(shape, generator=gen) > 0.3
    check(native_backend, q, K, V, 4, 50, attn_mask=mask, local_window=3)
    check(native_backend, q, K, V, 4, 50, attn_mask=mask, local_window=3,
          seq_lens=torch.tensor([600, 211, 7], dtype=torch.int32))


def test_rows_with_nothing_valid_are_zero(native_backend):
    q, K, V = make_inputs(2, 4, 2, 64, 32, seed=9)
    mask = torch.zeros(2, 1, 1, 64, dtype=torch.bool)
    mask[0, ..., 10] = True
    for reallocate in (True, False):
        out = check(native_backend, q, K, V, 4, 8, attn_mask=mask, reallocate=reallocate, local_window=2)
        assert (out[1] == 0).all()
    out = check(native_backend, q, K, V, 4, 8, seq_lens=torch.tensor([0, 0]))
    assert (out == 0).all()


@pytest.mark.parametrize("window", [0, 3, 16])
def test_window_and_k_edge_cases(native_backend, window):
    q, K, V = make_inputs(2, 4, 4, 100, 32, seed=window)
    Kt = K.transpose(-1, -2).contiguous()
    for k in (max(1, window), 16, 99, 100, 101, 1000):
        if window > k:
            continue
        check(native_backend, q, K, V, 4, k, key_t=Kt, local_window=window)
        check(native_backend, q, K, V, 4, k, key_t=Kt, local_window=window, reallocate=False)
    # window larger than the valid length: everything valid is forced in
    check(native_backend, q, K, V, 4, 16, key_t=Kt, local_window=16, seq_lens=torch.tensor([5, 12]))


def test_reallocate_false_and_scale(native_backend):
    q, K, V = make_inputs(2, 8, 2, 999, 64, seed=21)
    Kt = K.transpose(-1, -2).contiguous()
    for scale in (None, 0.05, 1.0):
        check(native_backend, q, K, V, 12, 77, key_t=Kt, reallocate=False, scale=scale, local_window=8)
        check(native_backend, q, K, V, 12, 77, key_t=Kt, reallocate=True, scale=scale, local_window=8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("G", [1, 4, 8])
def test_dense_limit_matches_sdpa(native_backend, dtype, G):
    B, Hkv, S, D = 2, 2, 333, 64
    q, K, V = make_inputs(B, G * Hkv, Hkv, S, D, dtype, seed=G)
    out = attention(native_backend, q, K, V, r=16, k=S + 5, key_t=K.transpose(-1, -2).contiguous())
    dense = F.scaled_dot_product_attention(q.float(), K.float(), V.float(), enable_gqa=G > 1)
    torch.testing.assert_close(out.float(), dense, **tolerance(dtype, native_backend))


def test_exact_scores_when_r_is_d(native_backend):
    # r = D: approximate logits are exact, so the top-k is the true top-k.
    q, K, V = make_inputs(1, 4, 4, 512, 32, seed=4)
    check(native_backend, q, K, V, 32, 64, key_t=K.transpose(-1, -2).contiguous(), reallocate=False)


def test_non_contiguous_and_expanded_inputs(native_backend):
    B, Hq, Hkv, S, D = 2, 8, 2, 300, 64
    gen = torch.Generator().manual_seed(7)
    # Caches stored (B, S, H, D) and viewed as (B, H, S, D): strided, last dim contiguous.
    K = torch.randn(B, S, Hkv, D, generator=gen).transpose(1, 2)
    V = torch.randn(B, S, Hkv, D, generator=gen).transpose(1, 2)
    q = torch.randn(B, 1, Hq, D, generator=gen).transpose(1, 2)  # non-contiguous query
    Kt_view = K.transpose(-1, -2)  # (B, H, D, S) with S strided: copied by the kernel
    Kt_strided = torch.randn(B, Hkv, D, S + 8, generator=gen)[..., :S]
    Kt_strided.copy_(K.transpose(-1, -2))
    vm = V.mean(2, keepdim=True)
    for key_t in (None, Kt_view, Kt_strided):
        check(native_backend, q, K, V, 8, 30, key_t=key_t, value_mean=vm, local_window=4)
        check(native_backend, q, K, V, 8, 30, key_t=key_t, value_mean=vm.transpose(-1, -2).contiguous()
              .transpose(-1, -2), local_window=4)
    # Last dim not contiguous: (B, H, D, S) storage viewed as (B, H, S, D).
    K2 = torch.randn(B, Hkv, D, S, generator=gen).transpose(-1, -2)
    check(native_backend, q, K2, V, 8, 30, key_t=K2.transpose(-1, -2))
    # An odd storage offset (not 16-byte aligned) and a query that is every other element of a
    # wider tensor.
    K_odd = torch.randn(B * Hkv * S * D + 3, generator=gen)[3:].view(B, Hkv, S, D)
    check(native_backend, q, K_odd, V, 8, 30)
    q_wide = torch.zeros(B, Hq, 1, 2 * D)
    q_wide[..., ::2] = q
    check(native_backend, q_wide[..., ::2], K, V, 8, 30, key_t=Kt_strided)
    # Expanded (stride-0) batch and head dims.
    K1 = torch.randn(1, 1, S, D, generator=gen)
    V1 = torch.randn(1, 1, S, D, generator=gen)
    Ke, Ve = K1.expand(B, Hkv, S, D), V1.expand(B, Hkv, S, D)
    check(native_backend, q, Ke, Ve, 8, 30, key_t=K1.transpose(-1, -2).contiguous().expand(B, Hkv, D, S))
    check(native_backend, q, Ke, Ve, 8, 30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tied_scores(native_backend, dtype):
    # Rows drawn from 5 distinct (key, value) pairs: the approximate scores are heavily tied at
    # the k-th place. Any tie-break gives the same output because tied rows are identical.
    gen = torch.Generator().manual_seed(8)
    B, Hkv, G, S, D = 2, 2, 2, 3000, 32
    which = torch.randint(0, 5, (B, Hkv, S), generator=gen)
    K = torch.randn(5, D, generator=gen)[which].to(dtype)
    V = torch.randn(5, D, generator=gen)[which].to(dtype)
    q = untied_query(B, Hkv * G, Hkv, D, dtype, gen) if dtype != torch.float32 else \
        torch.randn(B, Hkv * G, 1, D, generator=gen)
    # Thousands of identical rows make fp32 sums drift one way: torch's fp32 reference is itself
    # off by 6e-5 at k = 2999 on an AMD EPYC (the kernel by 5e-6), so the truth is float64.
    for k in (1, 100, 700, 2999):
        check(native_backend, q, K, V, 4, k, key_t=K.transpose(-1, -2).contiguous(), local_window=min(k, 3),
              reference_dtype=torch.float64, separate=False)


def test_zero_query_and_constant_keys(native_backend):
    # All approximate scores tie, so only the dense limit has one right answer; below it the
    # output must still be finite (gamma is guarded for an all-zero query).
    q, K, V = make_inputs(2, 4, 2, 500, 32, seed=12)
    ones_t = torch.ones(2, 2, 32, 500)
    for k in (500, 50):
        for args in ((torch.zeros_like(q), K, V), (q, torch.ones_like(K), V)):
            out, ref = native_and_reference(native_backend, *args, 4, k, local_window=5,
                                            key_t=ones_t if args[1].eq(1).all() else None)
            assert torch.isfinite(out).all()
            if k == 500:
                torch.testing.assert_close(out, ref, **tolerance(torch.float32, native_backend))


