"""The native CPU kernel (csrc/cpu/) against the pure-torch reference, on every option.

Skipped only when the compiled extension with the CPU kernel is absent. Fixed seeds; no timing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparq_ext
from sparq_ext import sparq_attention_reference

pytestmark = pytest.mark.skipif(
    not sparq_ext.has_native_kernel("cpu"),
    reason="native CPU kernel not built (python setup.py build_ext --inplace): "
    f"{sparq_ext.extension_error or 'extension built without csrc/cpu'}",
)

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(B, Hq, Hkv, S, D, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=gen).to(dtype)
    if dtype != torch.float32:
        q = untied_query(B, Hq, Hkv, D, dtype, gen)
    K = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    V = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    return q, K, V


def untied_query(B, Hq, Hkv, D, dtype, gen):
    """A query whose group sums of |q| have no ties (exact in bf16/fp16), random signs.

    Rounded to 8 or 11 bits, random queries often tie at the r-th largest |q| component, and
    ties may be broken either way (DESIGN.md), which changes i1 and the whole result. The
    magnitudes here are distinct powers-of-two multiples of 1 + j/128, the same pattern
    scaled by 2^-(g % 3) in each head of a group, so every sum is exact and distinct.
    """
    G = Hq // Hkv
    j = torch.stack([torch.randperm(D, generator=gen) for _ in range(B * Hkv)]).reshape(B, Hkv, 1, D)
    mags = 2.0 ** (j // 128) * (1 + (j % 128) / 128)
    head_scale = (2.0 ** -(torch.arange(G) % 3)).reshape(1, 1, G, 1)
    signs = torch.randint(0, 2, (B, Hkv, G, D), generator=gen) * 2 - 1
    return (mags * head_scale * signs).reshape(B, Hq, 1, D).to(dtype)


def native_and_reference(q, K, V, r, k, *, key_t=None, value_mean=None, seq_lens=None,
                         attn_mask=None, local_window=0, reallocate=True, scale=None, reference_dtype=None):
    """The native op's output and the pure-torch reference's (computed in ``reference_dtype``
    when given, e.g. float64 where fp32 rounding in the reference itself would dominate)."""
    with torch.inference_mode():
        out = torch.ops.sparq_ext.attention(
            q, K, V, r=r, k=k, key_t=key_t, value_mean=value_mean, seq_lens=seq_lens,
            attn_mask=attn_mask, local_window=local_window, reallocate=reallocate, scale=scale)
        cast = (lambda x: x) if reference_dtype is None else \
            (lambda x: None if x is None else x.to(reference_dtype))
        ref = sparq_attention_reference(cast(q), cast(K), cast(V), r, k, cast(key_t), cast(value_mean),
                                        seq_lens, attn_mask, local_window, reallocate, scale)
    return out, ref


def check(q, K, V, r, k, **kwargs):
    out, ref = native_and_reference(q, K, V, r, k, **kwargs)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), **TOL[q.dtype])
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("S", [1, 2, 17, 300, 4100])
@pytest.mark.parametrize("with_key_t", [True, False], ids=["key_t", "no_key_t"])
@pytest.mark.parametrize("with_mean", [True, False], ids=["value_mean", "mean_none"])
def test_matches_reference(dtype, G, S, with_key_t, with_mean):
    B, Hkv, D = 2, 2, 64
    q, K, V = make_inputs(B, G * Hkv, Hkv, S, D, dtype, seed=S * 10 + G)
    key_t = K.transpose(-1, -2).contiguous() if with_key_t else None
    value_mean = V.float().mean(2, keepdim=True).to(dtype) if with_mean else None
    check(q, K, V, 8, max(1, S // 8), key_t=key_t, value_mean=value_mean,
          local_window=max(0, S // 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Hkv", [32, 8])
def test_standard_shape_16k(dtype, Hkv):
    S, D = 16384, 128
    q, K, V = make_inputs(1, 32, Hkv, S, D, dtype, seed=Hkv)
    check(q, K, V, 16, S // 16, key_t=K.transpose(-1, -2).contiguous(),
          value_mean=V.float().mean(2, keepdim=True).to(dtype), local_window=S // 64)


@pytest.mark.parametrize("D, r", [(40, 5), (72, 72), (128, 1), (16, 3), (200, 17)])
def test_head_dims_and_r(D, r):
    q, K, V = make_inputs(2, 6, 3, 257, D, seed=D + r)
    check(q, K, V, r, 31, key_t=K.transpose(-1, -2).contiguous(), local_window=4)
    check(q, K, V, r, 31)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [0, 1, 5, 40])
def test_ragged_seq_lens(dtype, window):
    q, K, V = make_inputs(4, 8, 2, 700, 64, dtype, seed=window)
    for lens_dtype in (torch.int32, torch.int64):
        seq_lens = torch.tensor([700, 350, 3, 0], dtype=lens_dtype)
        out = check(q, K, V, 8, 40, key_t=K.transpose(-1, -2).contiguous(), seq_lens=seq_lens,
                    local_window=window)
        assert (out[3] == 0).all()  # no valid position: zeros, not NaN
        check(q, K, V, 8, 40, seq_lens=seq_lens, local_window=window, reallocate=False)


def test_padding_does_not_change_valid_part():
    q, K, V = make_inputs(1, 8, 2, 500, 64, seed=3)
    Kp = torch.cat([K, torch.randn(1, 2, 300, 64) * 100], 2)
    Vp = torch.cat([V, torch.randn(1, 2, 300, 64) * 100], 2)
    with torch.inference_mode():
        a = torch.ops.sparq_ext.attention(q, K, V, r=8, k=50, local_window=10)
        b = torch.ops.sparq_ext.attention(q, Kp, Vp, r=8, k=50, local_window=10,
                                          seq_lens=torch.tensor([500]))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [0, 6])
def test_left_padded_and_holey_masks(dtype, window):
    B, S = 3, 600
    q, K, V = make_inputs(B, 8, 1, S, 64, dtype, seed=11 + window)
    pad = torch.tensor([0, 150, 590])
    mask = torch.arange(S)[None, :] >= pad[:, None]  # left padding
    mask[1, 300:320] = False  # and a hole
    mask[2, -3:] = False  # trailing masked positions after a short valid run
    for m in (mask[:, None, None, :], mask[:, None, None, :].expand(B, 1, 1, S)):
        check(q, K, V, 8, 37, key_t=K.transpose(-1, -2).contiguous(), attn_mask=m,
              local_window=window)
        check(q, K, V, 8, 37, attn_mask=m, local_window=window)  # v_mean over valid positions
    check(q, K, V, 8, 37, attn_mask=mask[:, None, None, :], local_window=window,
          seq_lens=torch.tensor([600, 400, 595]))


@pytest.mark.parametrize("shape", [(600,), (1, 600), (1, 1, 600), (1, 1, 1, 600), (3, 1, 1, 600)])
def test_broadcast_mask_shapes(shape):
    q, K, V = make_inputs(3, 4, 2, 600, 32, seed=5)
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(shape, generator=gen) > 0.3
    check(q, K, V, 4, 50, attn_mask=mask, local_window=3)


def test_rows_with_nothing_valid_are_zero():
    q, K, V = make_inputs(2, 4, 2, 64, 32, seed=9)
    mask = torch.zeros(2, 1, 1, 64, dtype=torch.bool)
    mask[0, ..., 10] = True
    for reallocate in (True, False):
        out = check(q, K, V, 4, 8, attn_mask=mask, reallocate=reallocate, local_window=2)
        assert (out[1] == 0).all()
    out = check(q, K, V, 4, 8, seq_lens=torch.tensor([0, 0]))
    assert (out == 0).all()


@pytest.mark.parametrize("window", [0, 3, 16])
def test_window_and_k_edge_cases(window):
    q, K, V = make_inputs(2, 4, 4, 100, 32, seed=window)
    Kt = K.transpose(-1, -2).contiguous()
    for k in (max(1, window), 16, 99, 100, 101, 1000):
        if window > k:
            continue
        check(q, K, V, 4, k, key_t=Kt, local_window=window)
        check(q, K, V, 4, k, key_t=Kt, local_window=window, reallocate=False)
    # window larger than the valid length: everything valid is forced in
    check(q, K, V, 4, 16, key_t=Kt, local_window=16, seq_lens=torch.tensor([5, 12]))


def test_reallocate_false_and_scale():
    q, K, V = make_inputs(2, 8, 2, 999, 64, seed=21)
    Kt = K.transpose(-1, -2).contiguous()
    for scale in (None, 0.05, 1.0):
        check(q, K, V, 12, 77, key_t=Kt, reallocate=False, scale=scale, local_window=8)
        check(q, K, V, 12, 77, key_t=Kt, reallocate=True, scale=scale, local_window=8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("G", [1, 4, 8])
def test_dense_limit_matches_sdpa(dtype, G):
    B, Hkv, S, D = 2, 2, 333, 64
    q, K, V = make_inputs(B, G * Hkv, Hkv, S, D, dtype, seed=G)
    with torch.inference_mode():
        out = torch.ops.sparq_ext.attention(q, K, V, r=16, k=S + 5,
                                            key_t=K.transpose(-1, -2).contiguous())
        dense = F.scaled_dot_product_attention(q.float(), K.float(), V.float(),
                                               enable_gqa=G > 1)
    torch.testing.assert_close(out.float(), dense, **TOL[dtype])


def test_exact_scores_when_r_is_d():
    # r = D: approximate logits are exact, so the top-k is the true top-k.
    q, K, V = make_inputs(1, 4, 4, 512, 32, seed=4)
    check(q, K, V, 32, 64, key_t=K.transpose(-1, -2).contiguous(), reallocate=False)


def test_non_contiguous_and_expanded_inputs():
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
        check(q, K, V, 8, 30, key_t=key_t, value_mean=vm, local_window=4)
        check(q, K, V, 8, 30, key_t=key_t, value_mean=vm.transpose(-1, -2).contiguous()
              .transpose(-1, -2), local_window=4)
    # Last dim not contiguous: (B, H, D, S) storage viewed as (B, H, S, D).
    K2 = torch.randn(B, Hkv, D, S, generator=gen).transpose(-1, -2)
    check(q, K2, V, 8, 30, key_t=K2.transpose(-1, -2))
    # Expanded (stride-0) batch and head dims.
    K1 = torch.randn(1, 1, S, D, generator=gen)
    V1 = torch.randn(1, 1, S, D, generator=gen)
    Ke, Ve = K1.expand(B, Hkv, S, D), V1.expand(B, Hkv, S, D)
    check(q, Ke, Ve, 8, 30, key_t=K1.transpose(-1, -2).contiguous().expand(B, Hkv, D, S))
    check(q, Ke, Ve, 8, 30)


@pytest.mark.parametrize("B, Hkv, S", [(1, 1, 20000), (1, 2, 9000), (3, 4, 5000), (1, 1, 300)])
def test_independent_of_thread_count(B, Hkv, S):
    q, K, V = make_inputs(B, 4 * Hkv, Hkv, S, 64, seed=S)
    Kt = K.transpose(-1, -2).contiguous()
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[..., : S // 10] = False
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                outs.append([
                    torch.ops.sparq_ext.attention(q, K, V, r=8, k=S // 16, key_t=Kt,
                                                  local_window=S // 64),
                    torch.ops.sparq_ext.attention(q, K, V, r=8, k=S // 16, attn_mask=mask),
                ])
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)
    check(q, K, V, 8, S // 16, key_t=Kt, local_window=S // 64)


def test_opcheck():
    q, K, V = make_inputs(2, 4, 2, 50, 32, seed=2)
    kwargs = dict(r=4, k=10, key_t=K.transpose(-1, -2).contiguous(), local_window=2)
    torch.library.opcheck(torch.ops.sparq_ext.attention.default, (q, K, V), kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tied_scores(dtype):
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
        check(q, K, V, 4, k, key_t=K.transpose(-1, -2).contiguous(), local_window=min(k, 3),
              reference_dtype=torch.float64)


def test_zero_query_and_constant_keys():
    # All approximate scores tie, so only the dense limit has one right answer; below it the
    # output must still be finite (gamma is guarded for an all-zero query).
    q, K, V = make_inputs(2, 4, 2, 500, 32, seed=12)
    ones_t = torch.ones(2, 2, 32, 500)
    for k in (500, 50):
        for args in ((torch.zeros_like(q), K, V), (q, torch.ones_like(K), V)):
            out, ref = native_and_reference(*args, 4, k, local_window=5,
                                            key_t=ones_t if args[1].eq(1).all() else None)
            assert torch.isfinite(out).all()
            if k == 500:
                torch.testing.assert_close(out, ref, **TOL[torch.float32])


# --- the kernel's top-k selection (csrc/cpu/topk_cpu.h), through its test hook -------------


def expected_topk(scores, want):
    """The `want` largest (+inf first), ties to the lowest position, ascending; -inf never."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    order = [i for i in order if scores[i] != float("-inf")][:want]
    return torch.tensor(sorted(order), dtype=torch.long)


def select_cases():
    gen = torch.Generator().manual_seed(7)
    S = 16384
    normal = torch.randn(S, generator=gen)
    yield "normal", normal, S // 16
    yield "normal_k_quarter", normal, S // 4
    yield "normal_small_k", normal, 3
    ties = (torch.randn(S, generator=gen) * 4).round()  # a few dozen distinct values
    yield "ties", ties, S // 16
    window = torch.randn(S, generator=gen)
    window[-300:] = float("inf")
    window[:2000:3] = float("-inf")  # masked positions
    yield "window_and_masked", window, S // 16
    yield "window_fills_k", window, 200
    # the sample (every len/1024-th position) sees only zeros, the large scores lie between:
    # the cut passes everything, the fast path gives up and the histogram decides
    hidden = torch.zeros(S)
    off_sample = torch.arange(S)[torch.arange(S) % (S // 1024) != 0]
    hidden[off_sample[torch.randperm(len(off_sample), generator=gen)[:3000]]] = 1 + torch.rand(3000, generator=gen)
    yield "large_scores_off_sample", hidden, S // 16
    # the sample sees only the largest scores: too few pass its cut
    on_sample = torch.randn(S, generator=gen)
    on_sample[:: S // 1024] += 100
    yield "large_scores_on_sample", on_sample, S // 8
    yield "mostly_invalid", torch.where(torch.arange(S) % 7 == 0, normal, float("-inf")), S // 16


@pytest.mark.parametrize("histogram_only", [False, True], ids=["sampled", "histogram"])
@pytest.mark.parametrize("case", list(select_cases()), ids=lambda c: c[0])
def test_select_topk_exact(case, histogram_only):
    name, scores, want = case
    got = sparq_ext._C._cpu_select_topk(scores, want, histogram_only)
    torch.testing.assert_close(got, expected_topk(scores.tolist(), want), rtol=0, atol=0)


def test_select_topk_paths_agree_on_random_scores():
    gen = torch.Generator().manual_seed(11)
    for trial in range(20):
        S = int(torch.randint(4096, 40000, (1,), generator=gen))
        want = int(torch.randint(1, S // 4 + 1, (1,), generator=gen))
        scores = torch.randn(S, generator=gen) * float(torch.rand(1, generator=gen) * 10 + 0.01)
        fast = sparq_ext._C._cpu_select_topk(scores, want)
        hist = sparq_ext._C._cpu_select_topk(scores, want, histogram_only=True)
        assert len(fast) == want
        torch.testing.assert_close(fast, hist, rtol=0, atol=0)
        assert scores[fast].min() >= scores.topk(want).values.min()
