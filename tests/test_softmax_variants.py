"""Logit softcapping (``softcap``, Gemma 2) and attention sinks (``sinks``, gpt-oss) in both
operators: ``k >=`` the valid length equals dense attention with them (float64, against a dense
reference written independently of the operator's), step 3 with a sink as docs/design.md
defines it, each backend against the reference at ratio 8, the paged operator against the
contiguous one, argument checks, opcheck and compile."""

from __future__ import annotations

import math

import pytest
import torch

import sparq_ext
from sparq_ext.reference import (approximate_selection, dense_attention_reference,
                                 softcap_logits, sparq_attention_reference, valid_positions)
from sparq_testutil import (DTYPES, assert_both_operators_refuse, attention, make_inputs, paged_attention,
                            page_table, to_pages, tolerance)

RATIO = 8


def _sinks(Hq, seed=0, loc=1.0):
    """fp32 sink logits of the size of the logits here (so the sink takes a real share)."""
    gen = torch.Generator().manual_seed(seed + 101)
    return (torch.randn(Hq, generator=gen) + loc).float()


def _variants():
    # (softcap, sinks?): softcap 2 caps most logits of 4 * randn(D) . randn(D) / sqrt(D)
    return [(None, False), (2.0, False), (50.0, False), (None, True), (2.0, True)]


def _selective_variants():
    # softcap 8 bends the logits (whose top is ~14 here) without saturating the top-k boundary:
    # a cap that flattens it (2) makes the boundary a tie in fp32, which backends may break apart
    return [(None, False), (8.0, False), (None, True), (8.0, True)]


def _ids(v):
    return f"softcap={v[0]}-{'sinks' if v[1] else 'no_sinks'}"


def _separated(q, K, r, k, *, softcap=None, seq_lens=None, rel=1e-4, seed=0):
    """``q`` (redrawn if needed) such that neither the top-r components nor the top-k boundary
    of the softcapped, group-summed approximate logits is a near-tie (which two correct
    backends may break differently)."""
    B, Hq, _, D = q.shape
    Hkv, S = K.shape[1], K.shape[2]
    valid = valid_positions(B, S, seq_lens)
    for attempt in range(100):
        qf = q.double().reshape(B, Hkv, Hq // Hkv, D)
        mags = qf.abs().sum(2).sort(-1, descending=True).values
        gap_r = ((mags[..., r - 1] - mags[..., r]) / mags[..., r - 1]).min().item() if r < D else math.inf
        approx, _ = approximate_selection(qf, K.double(), r, k, valid, None, 0, D**-0.5, softcap)
        score = approx.sum(2).masked_fill(~valid[:, None, :], -math.inf)
        top = score.topk(k + 1, dim=-1).values  # a row with <= k valid positions: -inf, no boundary
        span = score.masked_fill(torch.isinf(score), 0).abs().amax(-1)
        gap_k = ((top[..., k - 1] - top[..., k]) / span).min().item()
        if gap_r > rel and gap_k > rel:
            return q
        gen = torch.Generator().manual_seed(7_000_001 * (seed + 1) + attempt)
        q = (torch.randn(q.shape, generator=gen) * 4).to(q.dtype)
    raise AssertionError("could not draw a query with separated boundaries")


def _case(B=2, Hq=8, Hkv=2, S=300, D=32, dtype=torch.float32, seed=0, sinks=False):
    q, K, V, Kt = make_inputs(B, Hq, Hkv, S, D, dtype, seed=seed, with_key_t=True)
    q = (q.float() * 4).to(dtype)  # logits of a few units: softcap 2 and the sinks matter
    return q, K, V, Kt, (_sinks(Hq, seed) if sinks else None)


# --- The dense limit -----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", _variants(), ids=_ids)
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("reallocate", [True, False])
def test_reference_k_beyond_valid_length_is_dense_in_float64(variant, G, reallocate):
    softcap, with_sinks = variant
    q, K, V, Kt, sinks = _case(Hq=2 * G, Hkv=2, sinks=with_sinks)
    q, K, V, Kt = (t.double() for t in (q, K, V, Kt))
    lens = torch.tensor([300, 117])
    out = sparq_attention_reference(q, K, V, r=4, k=300, key_t=Kt, seq_lens=lens,
                                    reallocate=reallocate, softcap=softcap, sinks=sinks)
    dense = dense_attention_reference(q, K, V, seq_lens=lens, softcap=softcap, sinks=sinks)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)


def test_dense_reference_is_the_model_definitions():
    """The dense reference against Gemma 2's and gpt-oss's eager attention, written out."""
    q, K, V, _, sinks = _case(B=1, Hq=4, Hkv=4, S=50, sinks=True)
    q, K, V = q.double(), K.double(), V.double()
    logits = q @ K.transpose(-1, -2) / math.sqrt(32)
    gemma2 = torch.softmax(torch.tanh(logits / 3.0) * 3.0, -1) @ V
    torch.testing.assert_close(dense_attention_reference(q, K, V, softcap=3.0), gemma2)
    combined = torch.cat([logits, sinks.double().reshape(1, -1, 1, 1)], -1)
    gpt_oss = torch.softmax(combined, -1)[..., :-1] @ V
    torch.testing.assert_close(dense_attention_reference(q, K, V, sinks=sinks), gpt_oss)


@pytest.mark.parametrize("variant", _variants(), ids=_ids)
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("with_key_t", [True, False], ids=["key_t", "no_key_t"])
def test_k_beyond_valid_length_equals_dense(backend, variant, G, with_key_t):
    softcap, with_sinks = variant
    q, K, V, Kt, sinks = _case(Hq=2 * G, Hkv=2, sinks=with_sinks, seed=G)
    lens = torch.tensor([300, 57])
    out = attention(backend, q, K, V, r=4, k=1000, key_t=Kt if with_key_t else None,
                    seq_lens=lens, local_window=3, softcap=softcap, sinks=sinks)
    dense = dense_attention_reference(q.double(), K.double(), V.double(), seq_lens=lens,
                                      softcap=softcap, sinks=sinks)
    torch.testing.assert_close(out.double(), dense, **tolerance(torch.float32, backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_k_beyond_valid_length_equals_dense_half(backend, dtype):
    q, K, V, Kt, sinks = _case(Hq=8, Hkv=2, dtype=dtype, sinks=True)
    out = attention(backend, q, K, V, r=8, k=300, key_t=Kt, softcap=5.0, sinks=sinks)
    dense = dense_attention_reference(q.double(), K.double(), V.double(), softcap=5.0, sinks=sinks)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), dense, **tolerance(dtype, backend))


# --- Step 3 with a sink ----------------------------------------------------------------------------

@pytest.mark.parametrize("softcap", [None, 8.0])
def test_step3_with_a_sink_is_the_documented_definition(softcap):
    """docs/design.md §1: the sink is always selected, value zero, in y's denominator and in
    alpha's numerator and denominator; v_mean over valid positions. Written out in float64."""
    B, Hq, Hkv, S, D = 2, 8, 2, 300, 32
    G = Hq // Hkv
    r, k = D // RATIO, S // (2 * RATIO)
    q, K, V, Kt, sinks = _case(B, Hq, Hkv, S, D, sinks=True, seed=3)
    q, K, V = q.double(), K.double(), V.double()
    lens = torch.tensor([300, 201])
    out, i2 = sparq_attention_reference(q, K, V, r, k, seq_lens=lens, softcap=softcap,
                                        sinks=sinks, return_selection=True)
    valid = valid_positions(B, S, lens)
    qg = q.reshape(B, Hkv, G, D)
    approx, i2_again = approximate_selection(qg, K, r, k, valid, None, 0, D**-0.5, softcap)
    assert torch.equal(i2, i2_again)
    sink = sinks.double().reshape(1, Hkv, G, 1)
    e_hat = approx.masked_fill(~valid[:, None, None, :], -math.inf).exp()  # (B, Hkv, G, S)
    sel = lambda x: x.gather(-1, i2[:, :, None, :].expand(B, Hkv, G, k))  # noqa: E731
    alpha = (sink.exp() + sel(e_hat).sum(-1, keepdim=True)) / (sink.exp() + e_hat.sum(-1, keepdim=True))
    exact = softcap_logits(qg @ K.transpose(-1, -2) / math.sqrt(D), softcap).exp()
    V_sel = V.gather(2, i2[..., None].expand(B, Hkv, k, D))
    y = (sel(exact)[..., None] * V_sel[:, :, None]).sum(-2) / (sink.exp() + sel(exact).sum(-1, keepdim=True))
    v_mean = (V * valid[:, None, :, None]).sum(2) / valid.sum(-1).reshape(B, 1, 1)
    expected = alpha * y + (1 - alpha) * v_mean[:, :, None, :]
    torch.testing.assert_close(out, expected.reshape(B, Hq, 1, D), rtol=1e-12, atol=1e-12)
    assert (alpha < 1).all() and (alpha > 0).all()


@pytest.mark.parametrize("variant", _selective_variants(), ids=_ids)
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("reallocate", [True, False])
def test_ratio_8_matches_reference(native_backend, variant, G, reallocate):
    """alpha, y and the mix of step 3 at ratio 8 (r = D/8, k = S/16), on a ragged batch, against
    the float64 reference."""
    softcap, with_sinks = variant
    S, D = 4100, 64  # two approx_logits tiles on the CPU
    q, K, V, Kt, sinks = _case(Hq=2 * G, Hkv=2, S=S, D=D, sinks=with_sinks, seed=11 + G)
    lens = torch.tensor([S, 2000])
    r, k = D // RATIO, S // (2 * RATIO)
    q = _separated(q, K, r, k, softcap=softcap, seq_lens=lens)
    out = attention(native_backend, q, K, V, r=r, k=k, key_t=Kt, seq_lens=lens,
                    reallocate=reallocate, softcap=softcap, sinks=sinks)
    ref = sparq_attention_reference(q.double(), K.double(), V.double(), r, k, Kt.double(), None,
                                    lens, None, 0, reallocate, None, softcap, sinks)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, **tolerance(torch.float32, native_backend))


@pytest.mark.parametrize("window", [0, 40])
def test_ratio_8_with_window_mask_and_value_mean(backend, window):
    B, Hq, Hkv, S, D = 2, 8, 2, 700, 32
    q, K, V, Kt, sinks = _case(B, Hq, Hkv, S, D, sinks=True, seed=5)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[1, ..., :90] = False  # left padding
    k = 60
    v_mean = V.mean(2, keepdim=True)
    out = attention(backend, q, K, V, r=4, k=k, key_t=Kt, attn_mask=mask, local_window=window,
                    value_mean=v_mean, softcap=8.0, sinks=sinks)
    ref = sparq_attention_reference(q, K, V, 4, k, Kt, v_mean, None, mask, window, True, None,
                                    8.0, sinks)
    torch.testing.assert_close(out, ref, **tolerance(torch.float32, backend))


def test_sink_extremes(backend):
    """A sink far below every logit changes nothing; one far above leaves (almost) nothing; a row
    with no valid position is zeros with a sink too."""
    q, K, V, Kt, _ = _case(Hq=4, Hkv=2, S=100)
    lens = torch.tensor([100, 0])
    plain = attention(backend, q, K, V, r=8, k=20, seq_lens=lens)
    low = attention(backend, q, K, V, r=8, k=20, seq_lens=lens, sinks=torch.full((4,), -1e4))
    torch.testing.assert_close(low, plain, rtol=0, atol=1e-6)
    high = attention(backend, q, K, V, r=8, k=20, seq_lens=lens, sinks=torch.full((4,), 80.0))
    assert torch.isfinite(high).all() and high.abs().max() < 1e-20
    assert torch.equal(low[1], torch.zeros_like(low[1])) and torch.equal(high[1], torch.zeros_like(high[1]))


# --- The paged operator --------------------------------------------------------------------------

@pytest.mark.parametrize("variant", _selective_variants(), ids=_ids)
def test_paged_equals_attention_on_the_contiguous_cache(backend, variant):
    softcap, with_sinks = variant
    G, Hkv, D, block_size = 2, 2, 32, 16
    lens = torch.tensor([40, 0, 23], dtype=torch.int32)
    table, num_blocks = page_table(lens, block_size, seed=4)
    S = table.shape[1] * block_size
    q, K, V = make_inputs(3, G * Hkv, Hkv, S, D, seed=4)
    q = q * 4
    sinks = _sinks(G * Hkv) if with_sinks else None
    key_cache = to_pages(K, table, lens, num_blocks, block_size)
    value_cache = to_pages(V, table, lens, num_blocks, block_size)
    for k in (12, 64):  # selective, and beyond every row (dense)
        paged = paged_attention(backend, q[:, :, 0], key_cache, value_cache, table, lens, r=8, k=k,
                                local_window=2, softcap=softcap, sinks=sinks)
        contiguous = attention(backend, q, K, V, r=8, k=k, seq_lens=lens.long(), local_window=2,
                               softcap=softcap, sinks=sinks)[:, :, 0]
        torch.testing.assert_close(paged, contiguous, **tolerance(torch.float32, backend))
    dense = dense_attention_reference(q.double(), K.double(), V.double(), seq_lens=lens,
                                      softcap=softcap, sinks=sinks)[:, :, 0]
    torch.testing.assert_close(paged.double(), dense, **tolerance(torch.float32, backend))


# --- Argument checks ------------------------------------------------------------------------------

def _bad_variants():
    return [
        (dict(softcap=0.0), ValueError, "softcap must be a finite float > 0"),
        (dict(softcap=-1.0), ValueError, "softcap must be a finite float > 0"),
        (dict(softcap=math.inf), ValueError, "softcap must be a finite float > 0"),
        (dict(softcap=math.nan), ValueError, "softcap must be a finite float > 0"),
        (dict(softcap=True), ValueError, "softcap must be a finite float > 0"),
        (dict(softcap="50"), ValueError, "softcap must be a finite float > 0"),
        (dict(sinks=[0.0] * 4), TypeError, "sinks must be a torch.Tensor or None"),
        (dict(sinks=torch.zeros(2)), ValueError, r"sinks must have shape \(Hq,\) = \(4,\)"),
        (dict(sinks=torch.zeros(1, 4)), ValueError, r"sinks must have shape \(Hq,\)"),
        (dict(sinks=torch.zeros(4, dtype=torch.bfloat16)), TypeError, "sinks must be float32"),
        (dict(sinks=torch.zeros(4, device="meta")), ValueError, "sinks must be on the query's device"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_variants())))
def test_bad_softcap_and_sinks_are_refused_by_name(case):
    kwargs, error, match = _bad_variants()[case]
    assert_both_operators_refuse(error, match, kwargs)


def test_sinks_that_require_grad_are_refused():
    q, K, V = make_inputs(1, 4, 2, 16, 8)
    sinks = torch.zeros(4, requires_grad=True)
    with pytest.raises(ValueError, match="sinks requires grad"):
        sparq_ext.attention(q, K, V, r=2, k=4, sinks=sinks)
    with torch.no_grad():
        sparq_ext.attention(q, K, V, r=2, k=4, sinks=sinks)


@pytest.mark.skipif(not sparq_ext.has_native_kernel("cpu"), reason="the native CPU kernel is not built")
def test_native_cpu_kernel_checks_them_too():
    """Direct torch.ops calls skip the Python checks: the C++ ones say the same."""
    q, K, V = make_inputs(1, 4, 2, 16, 8)
    for kwargs, match in ((dict(softcap=0.0), "softcap must be a finite float > 0"),
                          (dict(sinks=torch.zeros(3)), r"sinks must have shape \(Hq,\)"),
                          (dict(sinks=torch.zeros(4, dtype=torch.float64)), "sinks must be float32")):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.sparq_ext.attention(q, K, V, r=2, k=4, **kwargs)
        with pytest.raises(RuntimeError, match=match):
            torch.ops.sparq_ext.paged_attention(q[:, :, 0], K, V, torch.zeros(1, 1, dtype=torch.int32),
                                                torch.tensor([16], dtype=torch.int32), r=2, k=4, **kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and sparq_ext.has_native_kernel("cuda")),
                    reason="needs the native CUDA kernel and a GPU")
def test_cuda_kernels_implement_them():
    """The CUDA kernels take softcap and sinks themselves: a direct torch.ops call (no Python
    wrapper, so no reference behind it) equals the reference, contiguous and paged."""
    q0, K, V, Kt, sinks = _case(sinks=True)
    lens = torch.tensor([300, 300], dtype=torch.int32)
    table = torch.arange(2 * 300 // 20, dtype=torch.int32).reshape(2, 15)
    key_cache = to_pages(K, table, lens, 30, 20)
    value_cache = to_pages(V, table, lens, 30, 20)
    cuda = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    for softcap, with_sinks in ((8.0, False), (None, True), (8.0, True)):
        kwargs = dict(softcap=softcap, sinks=sinks if with_sinks else None)
        q = _separated(q0, K, 4, 20, softcap=softcap)
        ref = sparq_attention_reference(q, K, V, 4, 20, key_t=Kt, local_window=2, **kwargs)
        with torch.no_grad():
            out = torch.ops.sparq_ext.attention(cuda(q), cuda(K), cuda(V), r=4, k=20,
                                                key_t=cuda(Kt), local_window=2,
                                                **{n: cuda(t) for n, t in kwargs.items()})
            paged = torch.ops.sparq_ext.paged_attention(
                cuda(q[:, :, 0]), cuda(key_cache), cuda(value_cache), cuda(table), cuda(lens),
                r=4, k=20, local_window=2, **{n: cuda(t) for n, t in kwargs.items()})
        torch.testing.assert_close(out.cpu(), ref, **tolerance(torch.float32, "cuda"))
        torch.testing.assert_close(paged.cpu(), ref[:, :, 0], **tolerance(torch.float32, "cuda"))


# --- Registration -------------------------------------------------------------------------------

def _opcheck_cases():
    q, K, V, Kt, sinks = _case(Hq=4, Hkv=2, S=32, D=16, sinks=True)
    lens = torch.tensor([32, 20])
    cases = [
        ("attention", (q, K, V), dict(r=4, k=8, softcap=2.0)),
        ("attention", (q, K, V), dict(r=4, k=8, key_t=Kt, seq_lens=lens, local_window=2,
                                      softcap=30.0, sinks=sinks)),
        ("attention", (q.bfloat16(), K.bfloat16(), V.bfloat16()), dict(r=16, k=100, sinks=sinks)),
    ]
    table = torch.tensor([[1, 0], [2, 3]], dtype=torch.int32)
    cache = K.reshape(2, 2, 2, 16, 16).transpose(1, 2).reshape(4, 2, 16, 16)
    paged_lens = torch.tensor([32, 17], dtype=torch.int32)
    cases.append(("paged_attention", (q[:, :, 0], cache, cache, table, paged_lens),
                  dict(r=4, k=8, softcap=2.0, sinks=sinks)))
    return cases


@pytest.mark.parametrize("case", range(4))
def test_opcheck(case):
    op, args, kwargs = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.sparq_ext, op).default, args, kwargs)


def test_torch_compile_fullgraph_cpu():
    q, K, V, Kt, sinks = _case(Hq=8, Hkv=2, S=256, D=32, sinks=True)
    lens = torch.tensor([256, 100])

    def step(q, K, V, Kt, lens, sinks):
        return sparq_ext.attention(q * 2, K, V, r=4, k=32, key_t=Kt, seq_lens=lens,
                                   local_window=8, softcap=20.0, sinks=sinks) + 1

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(q, K, V, Kt, lens, sinks), step(q, K, V, Kt, lens, sinks),
                               **tolerance(torch.float32))


@pytest.mark.skipif(not sparq_ext.has_native_kernel("cpu"), reason="the native CPU kernel is not built")
def test_cpu_kernel_with_them_is_independent_of_thread_count():
    """One task split into tiles and partitions (threads > tasks) or run whole: the same bits."""
    q, K, V, Kt, sinks = _case(B=1, Hq=4, Hkv=1, S=9000, D=32, sinks=True)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(sparq_ext.attention(q, K, V, r=4, k=1100, key_t=Kt, softcap=8.0, sinks=sinks))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
