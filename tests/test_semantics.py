"""SparQ's semantics (docs/design.md) on every backend: the pure-torch reference and each native
kernel present (``backend`` fixture, tests/conftest.py). Against the seed article's code, dense
attention, the paper's GQA rule written out, and the properties every backend must share.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparq_ext
from sparq_ext.seed import sparq_attn
from sparq_testutil import DTYPES, attention, make_inputs, tolerance


def dense(q, K, V, valid=None, scale=None):
    """Exact attention in fp32, GQA by repeating KV heads; valid: (B, S) bool."""
    G = q.shape[1] // K.shape[1]
    K = K.float().repeat_interleave(G, dim=1)
    V = V.float().repeat_interleave(G, dim=1)
    mask = None if valid is None else valid[:, None, None, :]
    return F.scaled_dot_product_attention(q.float(), K, V, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("B,H,S,D,r,k", [(1, 1, 16, 8, 2, 4), (2, 4, 256, 64, 8, 32),
                                          (3, 8, 1000, 128, 16, 63), (1, 2, 4096, 128, 16, 256)])
def test_matches_seed_code(backend, B, H, S, D, r, k):
    q, K, V = make_inputs(B, H, H, S, D, seed=S)
    V_mean = V.mean(dim=2, keepdim=True)
    expected = sparq_attn(q, K, V, V_mean, torch.zeros(B, H, 1, S), r, k)
    got = attention(backend, q, K, V, r=r, k=k)
    torch.testing.assert_close(got, expected, **tolerance(torch.float32, backend))
    # the same through the transposed cache and a given mean
    got_t = attention(backend, q, K, V, r=r, k=k, key_t=K.transpose(-1, -2).contiguous(),
                                value_mean=V_mean)
    torch.testing.assert_close(got_t, expected, **tolerance(torch.float32, backend))


def test_seed_code_reallocate_false_is_topk_attention(backend):
    q, K, V = make_inputs(2, 4, 4, 128, 32, seed=3)
    # With V_mean = 0 and alpha known, the seed's output divided by alpha is y.
    y = attention(backend, q, K, V, r=8, k=16, reallocate=False)
    seed_out = sparq_attn(q, K, V, torch.zeros(2, 4, 1, 32), torch.zeros(2, 4, 1, 128), 8, 16)
    ratio = seed_out / y  # alpha per head, constant over D
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4, atol=1e-4)
    assert ((ratio > 0) & (ratio <= 1 + 1e-5)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (8, 1)])
def test_dense_limit_k_at_least_valid_length(backend, dtype, Hq, Hkv):
    q, K, V = make_inputs(2, Hq, Hkv, 100, 32, dtype=dtype, seed=1)
    expected = dense(q, K, V)
    for k in (100, 101, 10_000):
        got = attention(backend, q, K, V, r=3, k=k)
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.float(), expected, **tolerance(dtype, backend))


def test_dense_limit_with_padding_clamps_k_to_valid_length(backend):
    q, K, V = make_inputs(2, 4, 2, 64, 16, seed=2)
    seq_lens = torch.tensor([10, 64])
    valid = torch.arange(64)[None, :] < seq_lens[:, None]
    # k = 10 is >= the first row's valid length (exact there), < the second's (sparse there)
    got = attention(backend, q, K, V, r=16, k=64, seq_lens=seq_lens)
    torch.testing.assert_close(got, dense(q, K, V, valid), **tolerance(torch.float32, backend))


def test_exact_scores_at_r_equals_d_give_exact_topk(backend):
    """r = D: approximate logits are the exact ones, so i2 is the exact top-k of q.K."""
    B, H, S, D, k = 2, 4, 200, 16, 20
    q, K, V = make_inputs(B, H, H, S, D, seed=4)
    logits = (q @ K.transpose(-1, -2)) / math.sqrt(D)  # (B, H, 1, S)
    top = logits.topk(k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True)
    y = torch.softmax(logits.masked_fill(~keep, -math.inf), -1) @ V
    alpha = (torch.softmax(logits, -1) * keep).sum(-1, keepdim=True)
    expected = alpha * y + (1 - alpha) * V.mean(2, keepdim=True)
    got = attention(backend, q, K, V, r=D, k=k)
    torch.testing.assert_close(got, expected, **tolerance(torch.float32, backend))
    torch.testing.assert_close(attention(backend, q, K, V, r=D, k=k, reallocate=False), y,
                               **tolerance(torch.float32, backend))


def test_padding_never_changes_the_valid_part(backend):
    q, K, V = make_inputs(3, 8, 2, 300, 32, seed=5)
    lens = [300, 123, 7]
    got = attention(backend, q, K, V, r=8, k=40, local_window=5,
                              seq_lens=torch.tensor(lens))
    garbage = torch.randn(3, 2, 300, 32) * 100  # whatever lies past the length is ignored
    keep = (torch.arange(300)[None, None, :, None] < torch.tensor(lens)[:, None, None, None])
    got_garbage = attention(backend, q, torch.where(keep, K, garbage),
                                      torch.where(keep, V, -garbage), r=8, k=40,
                                      local_window=5, seq_lens=torch.tensor(lens))
    torch.testing.assert_close(got_garbage, got, rtol=0, atol=0)
    for b, n in enumerate(lens):  # each row equals the unpadded call
        alone = attention(backend, q[b:b + 1], K[b:b + 1, :, :n], V[b:b + 1, :, :n], r=8, k=40,
                                    local_window=5)
        torch.testing.assert_close(got[b:b + 1], alone, **tolerance(torch.float32, backend))


def test_left_padding_mask_equals_unpadded(backend):
    q, K, V = make_inputs(2, 4, 4, 50, 16, seed=6)
    pad = 13
    mask = torch.ones(2, 1, 1, 50, dtype=torch.bool)
    mask[1, ..., :pad] = False
    got = attention(backend, q, K, V, r=4, k=8, local_window=2, attn_mask=mask)
    alone = attention(backend, q[1:], K[1:, :, pad:], V[1:, :, pad:], r=4, k=8, local_window=2)
    torch.testing.assert_close(got[1:], alone, **tolerance(torch.float32, backend))
    # both padding kinds together: mask on the left, seq_lens on the right
    got_both = attention(backend, q, K, V, r=4, k=8, local_window=2, attn_mask=mask,
                                   seq_lens=torch.tensor([50, 40]))
    alone_both = attention(backend, q[1:], K[1:, :, pad:40], V[1:, :, pad:40], r=4, k=8,
                                     local_window=2)
    torch.testing.assert_close(got_both[1:], alone_both, **tolerance(torch.float32, backend))


def test_permuting_positions_changes_nothing(backend):
    q, K, V = make_inputs(2, 4, 2, 128, 32, seed=7)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    a = attention(backend, q, K, V, r=8, k=16)
    b = attention(backend, q, K[:, :, perm], V[:, :, perm], r=8, k=16)
    torch.testing.assert_close(a, b, **tolerance(torch.float32, backend))


def test_gqa_shares_indices_like_the_paper(backend):
    """GQA equals the paper's shared-index semantics written out independently."""
    B, Hq, Hkv, S, D, r, k = 2, 8, 2, 96, 16, 4, 12
    G = Hq // Hkv
    q, K, V = make_inputs(B, Hq, Hkv, S, D, seed=8)
    got = attention(backend, q, K, V, r=r, k=k)
    out = torch.empty(B, Hq, 1, D)
    for b in range(B):
        for h in range(Hkv):
            qg = q[b, h * G:(h + 1) * G, 0]  # (G, D)
            i1 = qg.abs().sum(0).topk(r).indices
            gamma = qg[:, i1].abs().sum(-1) / qg.abs().sum(-1)
            approx = (qg[:, i1] @ K[b, h][:, i1].T) / torch.sqrt(D * gamma)[:, None]  # (G, S)
            i2 = approx.sum(0).topk(k).indices
            s_hat = torch.softmax(approx, -1)
            alpha = s_hat[:, i2].sum(-1, keepdim=True)
            y = torch.softmax(qg @ K[b, h][i2].T / math.sqrt(D), -1) @ V[b, h][i2]
            out[b, h * G:(h + 1) * G, 0] = alpha * y + (1 - alpha) * V[b, h].mean(0)
    torch.testing.assert_close(got, out, **tolerance(torch.float32, backend))


def test_local_window_is_always_attended(backend):
    """With exact scores (r = D), i2 = the window plus the top (k - w) of the rest."""
    S, D, k, w = 64, 8, 8, 3
    q, K, V = make_inputs(1, 1, 1, S, D, seed=9)
    K = K.clone()
    K[:, :, -w:] = -0.1 * q  # the window's scores are among the lowest: never picked on merit
    logits = ((q @ K.transpose(-1, -2)) / math.sqrt(D))[0, 0, 0]
    rest = logits[:-w].topk(k - w).indices
    picked = torch.cat([rest, torch.arange(S - w, S)])
    y = torch.softmax(logits[picked], -1) @ V[0, 0, picked]
    got = attention(backend, q, K, V, r=D, k=k, local_window=w, reallocate=False)
    torch.testing.assert_close(got[0, 0, 0], y, **tolerance(torch.float32, backend))
    without = attention(backend, q, K, V, r=D, k=k, reallocate=False)
    assert not torch.allclose(without, got, atol=1e-3)


def test_local_window_equal_to_k_is_a_sliding_window(backend):
    q, K, V = make_inputs(2, 4, 2, 80, 16, seed=10)
    got = attention(backend, q, K, V, r=4, k=10, local_window=10, reallocate=False)
    torch.testing.assert_close(got, dense(q, K[:, :, -10:], V[:, :, -10:]).to(got.dtype),
                               **tolerance(torch.float32, backend))


def test_rows_without_valid_positions_give_zeros(backend):
    q, K, V = make_inputs(3, 4, 2, 32, 16, seed=11)
    mask = torch.ones(3, 1, 1, 32, dtype=torch.bool)
    mask[2] = False
    for kwargs in (dict(seq_lens=torch.tensor([32, 0, 5])), dict(attn_mask=mask)):
        for reallocate in (True, False):
            out = attention(backend, q, K, V, r=4, k=8, reallocate=reallocate, **kwargs)
            assert torch.isfinite(out).all()
            empty_row = 1 if "seq_lens" in kwargs else 2
            assert (out[empty_row] == 0).all()
            assert out[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_grid_matches_fp32_reference(backend, dtype):
    q, K, V, Kt = make_inputs(2, 8, 2, 512, 64, dtype=dtype, seed=12, with_key_t=True)
    # The reference run in fp32 on the same (rounded) values, options all on.
    kwargs = dict(r=8, k=64, local_window=16, seq_lens=torch.tensor([512, 300]))
    expected = sparq_ext.sparq_attention_reference(q.float(), K.float(), V.float(),
                                                   key_t=Kt.float(), **kwargs)
    got = attention(backend, q, K, V, key_t=Kt, **kwargs)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, **tolerance(dtype, backend))


def test_scale_keyword(backend):
    q, K, V = make_inputs(1, 2, 2, 40, 16, seed=13)
    torch.testing.assert_close(attention(backend, q, K, V, r=16, k=40, scale=0.3),
                               dense(q, K, V, scale=0.3), **tolerance(torch.float32, backend))


def test_all_zero_query_gives_mean_of_values_not_nan(backend):
    q, K, V = make_inputs(1, 4, 2, 30, 8, seed=14)
    zero = torch.zeros_like(q)
    out = attention(backend, zero, K, V, r=2, k=5)
    assert torch.isfinite(out).all()
    # uniform scores: y = mean of the 5 picked rows (any 5), alpha = 5/30 exactly
    y = attention(backend, zero, K, V, r=2, k=5, reallocate=False)
    v_mean = V.mean(2, keepdim=True).repeat_interleave(2, dim=1)
    torch.testing.assert_close(out, y / 6 + v_mean * 5 / 6, **tolerance(torch.float32, backend))
    # k covering every position: exactly the mean of V
    torch.testing.assert_close(attention(backend, zero, K, V, r=2, k=30), v_mean,
                               **tolerance(torch.float32, backend))


def test_non_contiguous_and_expanded_inputs(backend):
    B, Hq, Hkv, S, D = 2, 4, 2, 70, 16
    q, K, V = make_inputs(B, Hq, Hkv, S, D, seed=15)
    expected = attention(backend, q, K, V, r=4, k=9, value_mean=V.mean(2, keepdim=True),
                                   key_t=K.transpose(-1, -2).contiguous())
    # strided views: key stored (B, S, Hkv, D), value inside a wider buffer, key_t a transpose
    K_bshd = K.transpose(1, 2).contiguous().transpose(1, 2)
    V_wide = torch.cat([V, V], dim=-1)[..., :D]
    q_strided = torch.stack([q, -q], dim=-1)[..., 0]  # stride 2 along D
    got = attention(backend, q_strided, K_bshd, V_wide, r=4, k=9, key_t=K.transpose(-1, -2),
                              value_mean=V.mean(2, keepdim=True))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # expanded (stride-0) batch and mask: one cache shared by every batch row
    K1, V1 = K[:1].expand(B, -1, -1, -1), V[:1].expand(B, -1, -1, -1)
    mask = torch.ones(1, 1, 1, S, dtype=torch.bool).expand(B, 1, 1, S)
    got_exp = attention(backend, q, K1, V1, r=4, k=9, attn_mask=mask)
    ref = attention(backend, q, K1.contiguous(), V1.contiguous(), r=4, k=9)
    torch.testing.assert_close(got_exp, ref, rtol=0, atol=1e-6)


def test_works_under_no_grad_and_inference_mode():
    q, K, V = make_inputs(1, 2, 2, 16, 8, seed=16)
    q.requires_grad_(True)
    with torch.no_grad():
        a = sparq_ext.attention(q, K, V, r=2, k=4)
    with torch.inference_mode():
        b = sparq_ext.attention(q.detach(), K, V, r=2, k=4)
    torch.testing.assert_close(a, b)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 3), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 4]),
       S=st.integers(1, 300), D=st.sampled_from([4, 16, 64]), data=st.data())
def test_randomised_shapes_against_reference_and_dense(backend, B, Hkv, G, S, D, data):
    r = data.draw(st.integers(1, D))
    k = data.draw(st.integers(1, S + 5))
    window = data.draw(st.integers(0, min(k, 8)))
    seed = data.draw(st.integers(0, 2**16))
    q, K, V = make_inputs(B, Hkv * G, Hkv, S, D, seed=seed)
    lens = torch.randint(0, S + 1, (B,), generator=torch.Generator().manual_seed(seed))
    kwargs = dict(r=r, k=k, local_window=window, seq_lens=lens)
    got = attention(backend, q, K, V, **kwargs)
    assert got.shape == q.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, sparq_ext.sparq_attention_reference(q, K, V, **kwargs),
                               **tolerance(torch.float32, backend))
    if k >= S:  # dense limit for every row that has a valid position
        valid = torch.arange(S)[None, :] < lens[:, None]
        rows = lens > 0
        torch.testing.assert_close(got[rows], dense(q, K, V, valid)[rows],
                                   **tolerance(torch.float32, backend))


def test_rk_for_ratio_and_transfer_bytes():
    assert sparq_ext.rk_for_ratio(8, 4096, 128) == (16, 256)
    assert sparq_ext.rk_for_ratio(4, 1024, 64) == (16, 128)
    assert sparq_ext.rk_for_ratio(1000, 10, 8) == (1, 1)
    assert sparq_ext.rk_for_ratio(0.5, 10, 8) == (8, 10)
    with pytest.raises(ValueError, match="ratio"):
        sparq_ext.rk_for_ratio(0, 10, 8)
    S, D = 65536, 128
    r, k = sparq_ext.rk_for_ratio(8, S, D)
    t = sparq_ext.transfer_bytes(1, 8, S, D, r, k, dtype=torch.bfloat16, query_heads=32)
    assert t["dense"] == (8 * 2 * S * D + 2 * 32 * D) * 2
    assert t["sparq"] == (8 * (S * r + 2 * k * D + D) + 2 * 32 * D) * 2
    assert 7.5 < t["ideal_speedup"] <= 8.0  # compression ratio ~ rho
    assert sparq_ext.transfer_bytes(1, 1, 10, 4, 1, 100, dtype=4)["sparq"] == (10 + 2 * 10 * 4 + 4 + 8) * 4


def _nan_key_inputs(S=120, D=16, k_nan_pos=37):
    """Two KV heads, two query heads each; head 0's key at ``k_nan_pos`` holds a NaN in the
    component with the largest |q| of its group, so that position's approximate logit (any
    r) and its exact logit are NaN. Head 1 is clean."""
    q, K, V = make_inputs(1, 4, 2, S, D, seed=11)
    top = q[0, :2, 0].abs().sum(0).argmax()
    q[0, :2, 0, top] += 5.0 * torch.sign(q[0, :2, 0, top])  # clearly the top component
    K = K.clone()
    K[0, 0, k_nan_pos, top] = float("nan")
    return q, K, V, k_nan_pos


def test_nan_logit_ranks_below_every_valid_position(backend):
    """docs/cuda-pipeline.md's NaN rule: a NaN approximate logit is selected only when k covers
    every other valid position; it still counts as valid; alpha over a group that holds it is
    NaN (its softmax is), so the reallocated output of that group is NaN."""
    S = 120
    q, K, V, p = _nan_key_inputs(S)
    without_p = torch.ones(1, 1, 1, S, dtype=torch.bool)
    without_p[..., p] = False
    for k in (10, S - 1):  # never needed: head 0's group is as if p were masked out
        got = attention(backend, q, K, V, r=4, k=k, reallocate=False, local_window=3)
        expected = attention(backend, q, K, V, r=4, k=k, reallocate=False, local_window=3,
                             attn_mask=without_p)
        assert torch.isfinite(got).all(), k
        torch.testing.assert_close(got[:, :2], expected[:, :2],
                                   **tolerance(torch.float32, backend))
    # k = S needs every valid position, the NaN one too: its exact logit makes head 0's
    # group NaN; the other group is untouched.
    got = attention(backend, q, K, V, r=4, k=S, reallocate=False)
    assert torch.isnan(got[0, :2]).all() and torch.isfinite(got[0, 2:]).all()
    # reallocate: alpha of the NaN group is NaN (the approximate softmax holds the NaN logit)
    got = attention(backend, q, K, V, r=4, k=10)
    assert torch.isnan(got[0, :2]).all() and torch.isfinite(got[0, 2:]).all()
