"""Step 1's component weights (``component_weights``): ``i1`` = the ``r`` largest components of
``w * sum_g |q_g|`` and ``gamma`` from the same weighted magnitudes, in both operators.

The weights the library computes (``sparq_ext.key_channel_std``) and the reference's step 1
written out in float64; unit weights are the paper's rule bit for bit; each backend against
the float64 reference (every query dtype, GQA and MHA, the full and the 8-bit selection cache);
the paged operator against the contiguous one; what the weights are for (a large but constant
key channel no longer takes step 1's budget); every rejection by name; opcheck and compile."""

from __future__ import annotations

import pytest
import torch

import sparq_ext
from sparq_ext import key_channel_std, quantize_key_t
from sparq_ext.reference import (approximate_selection, dense_attention_reference,
                                 sparq_attention_reference, valid_positions)
from sparq_testutil import (DTYPES, assert_both_operators_refuse, attention, make_inputs, page_table,
                            paged_attention, separated_query, to_pages, tolerance)


def test_key_channel_std_is_the_population_std_over_valid_positions():
    gen = torch.Generator().manual_seed(0)
    K = torch.randn(2, 3, 50, 8, generator=gen) * 3 + 7
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, :20] = False
    w = key_channel_std(K, valid)
    assert w.shape == (2, 3, 8) and w.dtype == torch.float32
    torch.testing.assert_close(w[0], K[0].std(1, unbiased=False))
    torch.testing.assert_close(w[1], K[1, :, 20:].std(1, unbiased=False))
    torch.testing.assert_close(key_channel_std(K), K.std(2, unbiased=False))
    valid[0] = False  # no valid position: zeros, not NaN
    assert (key_channel_std(K, valid)[0] == 0).all()


def test_reference_step1_ranks_weighted_magnitudes_in_float64():
    """l_hat = q[i1] . K[:, i1] * scale / sqrt(gamma), i1 = top-r of w * sum_g |q_g|,
    gamma_g = sum_{i1} w |q_g| / sum w |q_g|."""
    B, Hkv, G, S, D, r = 2, 2, 3, 40, 16, 4
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, Hkv, G, D, generator=gen, dtype=torch.float64)
    K = torch.randn(B, Hkv, S, D, generator=gen, dtype=torch.float64)
    w = torch.rand(B, Hkv, D, generator=gen, dtype=torch.float64) * 2
    approx, _ = approximate_selection(q, K, r, 8, valid_positions(B, S), None, 0, D**-0.5, None,
                                      None, w)
    for b in range(B):
        for h in range(Hkv):
            i1 = (w[b, h] * q[b, h].abs().sum(0)).topk(r).indices
            for g in range(G):
                m = w[b, h] * q[b, h, g].abs()
                gamma = m[i1].sum() / m.sum()
                want = (K[b, h][:, i1] @ q[b, h, g, i1]) * D**-0.5 / gamma.sqrt()
                torch.testing.assert_close(approx[b, h, g], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("int8", [False, True], ids=["key_t", "int8_key_t"])
def test_unit_weights_are_the_papers_rule(backend, int8):
    q, K, V = make_inputs(2, 8, 2, 300, 32, seed=3)
    key_t, kscale = quantize_key_t(K) if int8 else (K.transpose(-1, -2).contiguous(), None)
    kw = dict(r=4, k=40, key_t=key_t, key_t_scale=kscale, local_window=4)
    plain = attention(backend, q, K, V, **kw)
    unit = attention(backend, q, K, V, component_weights=torch.ones(2, 2, 32), **kw)
    assert torch.equal(plain, unit)


def _weights(K, lens=None):
    """The library's weights for K: each channel's std over the valid positions; a few channels
    made nearly constant and large (as RoPE's slow channels are), so the weights matter."""
    K = K.clone()
    K[..., :3] = (K[..., :3].float() * 0.01 + 6).to(K.dtype)
    valid = valid_positions(K.shape[0], K.shape[2], lens)
    return K, key_channel_std(K, valid)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("int8", [False, True], ids=["key_t", "int8_key_t"])
def test_matches_float64_reference(backend, dtype, G, int8):
    """r = D/8 on a ragged batch spanning two approx_logits tiles, local window, step 3 on."""
    S, D = 4100, 64
    q, K, V = make_inputs(2, 2 * G, 2, S, D, dtype, seed=20 + G)
    lens = torch.tensor([S, 2000])
    K, w = _weights(K, lens)
    key_t, kscale = quantize_key_t(K) if int8 else (K.transpose(-1, -2).contiguous(), None)
    r, k, window = D // 8, S // 16, 16
    q = separated_query(q, K, r, k, key_t=key_t, key_t_scale=kscale, seq_lens=lens,
                        local_window=window, component_weights=w, seed=G)
    out = attention(backend, q, K, V, r=r, k=k, key_t=key_t, key_t_scale=kscale, seq_lens=lens,
                    local_window=window, component_weights=w)
    ref = sparq_attention_reference(q.double(), K.double(), V.double(), r, k, key_t, None, lens,
                                    None, window, True, None, None, None, kscale, w)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, **tolerance(dtype, backend))


@pytest.mark.parametrize("block_size", [5, 16])
@pytest.mark.parametrize("G", [1, 4])
def test_paged_equals_attention_on_the_contiguous_cache(backend, block_size, G):
    lens = torch.tensor([300, 0, 129, 7], dtype=torch.int32)
    table, num_blocks = page_table(lens, block_size, shared_blocks=2, seed=block_size)
    S = table.shape[1] * block_size
    q, K, V = make_inputs(4, 2 * G, 2, S, 32, seed=block_size + G)
    shared = 2 * block_size
    K[1:, :, :shared], V[1:, :, :shared] = K[:1, :, :shared], V[:1, :, :shared]
    K, w = _weights(K, lens)
    w[lens == 0] = 1.0  # an empty row's are zeros: every component would tie
    q = separated_query(q, K, 4, 40, seq_lens=lens, local_window=4, component_weights=w)
    kw = dict(r=4, k=40, local_window=4, component_weights=w)
    key_t_cache = to_pages(K, table, lens, num_blocks, block_size).transpose(2, 3).contiguous()
    paged = paged_attention(backend, q[:, :, 0], to_pages(K, table, lens, num_blocks, block_size),
                            to_pages(V, table, lens, num_blocks, block_size), table, lens,
                            key_t_cache=key_t_cache, **kw)
    contiguous = attention(backend, q, K, V, seq_lens=lens, **kw)
    torch.testing.assert_close(paged, contiguous[:, :, 0], **tolerance(torch.float32, backend))
    assert not paged[1].any()  # the empty row


def test_weights_keep_a_constant_channel_out_of_step_1(backend):
    """What the weights are for: the query's largest components sit on key channels that are
    large but constant (they shift every logit alike and rank nothing). The paper's rule spends
    all of r on them and picks the top-k blindly; weighted by the keys' spread, step 1 ranks on
    the channels that vary, finds the positions dense attention attends to, and the output moves
    much closer to dense."""
    B, Hkv, G, S, D, r, k = 1, 2, 2, 2000, 32, 4, 64
    gen = torch.Generator().manual_seed(7)
    K = torch.randn(B, Hkv, S, D, generator=gen)
    K[..., :4] = 5.0  # constant channels
    V = torch.randn(B, Hkv, S, D, generator=gen)
    q = (torch.randn(B, Hkv, 1, 1, D, generator=gen) * 0.5).expand(B, Hkv, G, 1, D)
    q = q.reshape(B, Hkv * G, 1, D).clone()  # the heads of a group alike
    q[..., :4] = 4.0  # the largest |q|, on the constant channels
    hot = torch.randperm(S, generator=gen)[:16]
    K[:, :, hot, 4:] += 3.0 * q.reshape(B, Hkv, G, D)[:, :, :1, 4:].sign()  # aligned with q
    w = key_channel_std(K)
    assert (w[..., :4] == 0).all()
    dense = dense_attention_reference(q, K, V)
    # step 2's attention alone (no step 3 blend): what the selection found
    plain = attention(backend, q, K, V, r=r, k=k, reallocate=False)
    weighted = attention(backend, q, K, V, r=r, k=k, reallocate=False, component_weights=w)
    err = lambda out: (out - dense).norm().item()  # noqa: E731
    assert err(weighted) < 0.2 * err(plain), (err(weighted), err(plain))
    _, i2 = sparq_attention_reference(q, K, V, r, k, component_weights=w, return_selection=True)
    for h in range(Hkv):
        assert set(hot.tolist()) <= set(i2[0, h].tolist())


# --- Argument checks ------------------------------------------------------------------------------

def _bad_weights():
    """(attention kwargs, paged kwargs, error, match) for q (1, 4, 1, 8), K (1, 2, 16, 8)."""
    w = torch.ones(1, 2, 8)
    negative, nan, inf = w.clone(), w.clone(), w.clone()
    negative[0, 1, 3], nan[0, 0, 0], inf[0, 0, 7] = -1.0, float("nan"), float("inf")
    return [
        (w[..., :7], ValueError, r"component_weights must have shape \((B|R), Hkv, D\)"),
        (w[0], ValueError, "component_weights must have shape"),
        (w.double(), TypeError, "component_weights must be float32, got"),
        (w.to("meta"), ValueError, "component_weights must be on the query's device"),
        ([1.0] * 8, TypeError, "component_weights must be a torch.Tensor or None"),
        (negative, ValueError, r"component_weights must be finite and >= 0 .* got -1.0"),
        (nan, ValueError, "component_weights must be finite and >= 0"),
        (inf, ValueError, "component_weights must be finite and >= 0"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_weights())))
def test_bad_weights_are_refused_by_name(case):
    w, error, match = _bad_weights()[case]
    assert_both_operators_refuse(error, match, dict(component_weights=w))


def test_weights_that_require_grad_are_refused():
    q, K, V = make_inputs(1, 4, 2, 16, 8)
    w = torch.ones(1, 2, 8, requires_grad=True)
    with pytest.raises(ValueError, match="component_weights requires grad"):
        sparq_ext.attention(q, K, V, r=2, k=4, component_weights=w)
    with torch.no_grad():
        sparq_ext.attention(q, K, V, r=2, k=4, component_weights=w)


# the shape, dtype cases a direct torch.ops call can reach the CPU kernel with
_NATIVE_CASES = [0, 1, 2]


@pytest.mark.skipif(not sparq_ext.has_native_kernel("cpu"), reason="the native CPU kernel is not built")
@pytest.mark.parametrize("case", _NATIVE_CASES)
def test_native_cpu_kernel_checks_them_too(case):
    w, _, match = _bad_weights()[case]
    q, K, V = make_inputs(1, 4, 2, 16, 8)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparq_ext.attention(q, K, V, r=2, k=4, component_weights=w)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparq_ext.paged_attention(q[:, :, 0], K, V, torch.zeros(1, 1, dtype=torch.int32),
                                            torch.tensor([16], dtype=torch.int32), r=2, k=4,
                                            component_weights=w)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and sparq_ext.has_native_kernel("cuda")),
                    reason="needs the native CUDA kernel and a GPU")
def test_cuda_kernels_implement_it():
    """A direct torch.ops call (no Python wrapper, so no reference behind it) equals the
    reference, contiguous (D = 36: the host glue pads D, and the weights, to 40) and paged."""
    q, K, V = make_inputs(2, 8, 2, 300, 36, seed=9)
    K, w = _weights(K)
    q = separated_query(q, K, 4, 20, local_window=2, component_weights=w)
    ref = sparq_attention_reference(q, K, V, 4, 20, local_window=2, component_weights=w)
    with torch.no_grad():
        out = torch.ops.sparq_ext.attention(q.cuda(), K.cuda(), V.cuda(), r=4, k=20, local_window=2,
                                            component_weights=w.cuda())
    torch.testing.assert_close(out.cpu(), ref, **tolerance(torch.float32, "cuda"))
    q, K, V = make_inputs(2, 8, 2, 300, 32, seed=10)
    K, w = _weights(K)
    q = separated_query(q, K, 4, 20, local_window=2, component_weights=w)
    lens = torch.tensor([300, 300], dtype=torch.int32)
    table = torch.arange(30, dtype=torch.int32).reshape(2, 15)
    ref = sparq_attention_reference(q, K, V, 4, 20, local_window=2, component_weights=w)
    with torch.no_grad():
        paged = torch.ops.sparq_ext.paged_attention(
            q[:, :, 0].cuda(), to_pages(K, table, lens, 30, 20).cuda(),
            to_pages(V, table, lens, 30, 20).cuda(), table.cuda(), lens.cuda(), r=4, k=20,
            local_window=2, component_weights=w.cuda())
    torch.testing.assert_close(paged.cpu(), ref[:, :, 0], **tolerance(torch.float32, "cuda"))


# --- Registration -------------------------------------------------------------------------------

def _opcheck_cases():
    q, K, V = make_inputs(2, 4, 2, 32, 16)
    w = key_channel_std(K)
    table = torch.tensor([[1, 0], [2, 3]], dtype=torch.int32)
    cache = K.reshape(2, 2, 2, 16, 16).transpose(1, 2).reshape(4, 2, 16, 16)
    lens = torch.tensor([32, 17], dtype=torch.int32)
    return [
        ("attention", (q, K, V), dict(r=4, k=8, component_weights=w)),
        ("attention", (q.bfloat16(), K.bfloat16(), V.bfloat16()),
         dict(r=4, k=8, seq_lens=lens.long(), component_weights=w)),
        ("paged_attention", (q[:, :, 0], cache, cache, table, lens), dict(r=4, k=8, component_weights=w)),
    ]


@pytest.mark.parametrize("case", range(3))
def test_opcheck(case):
    op, args, kwargs = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.sparq_ext, op).default, args, kwargs)


def test_torch_compile_fullgraph_cpu():
    q, K, V = make_inputs(2, 8, 2, 256, 32)
    w = key_channel_std(K)

    def step(q, K, V, w):
        return sparq_ext.attention(q * 2, K, V, r=4, k=32, local_window=8, component_weights=w) + 1

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(q, K, V, w), step(q, K, V, w), **tolerance(torch.float32))
