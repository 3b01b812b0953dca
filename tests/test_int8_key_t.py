"""The 8-bit selection cache: an int8 ``key_t`` with one float32 scale per position
(``sparq_ext.quantize_key_t``), in both operators. The quantizer's round trip and its
append-safety; the reference's step 1 written out in float64; the dense limit; each backend
against the float64 reference given the same quantized ``key_t`` (every query dtype, GQA and
MHA, ragged rows, softcap and sinks, two approx_logits tiles); the paged operator on shuffled
block tables against the contiguous one; every rejection by name; opcheck and compile."""

from __future__ import annotations

import math

import pytest
import torch

import sparq_ext
from sparq_ext import quantize_key_t
from sparq_ext.reference import (approximate_selection, dense_attention_reference,
                                 sparq_attention_reference, valid_positions)
from sparq_testutil import (DTYPES, assert_both_operators_refuse, attention, make_inputs, page_table,
                            paged_attention, to_pages, tolerance, untie_query)

RATIO = 8


# --- The quantizer -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_round_trip(dtype):
    gen = torch.Generator().manual_seed(0)
    K = (torch.randn(2, 3, 100, 64, generator=gen) * torch.rand(2, 3, 100, 1, generator=gen) * 5).to(dtype)
    K[0, 1, 7] = 0  # an all-zero row: scale 0, zeros
    key_t, scale = quantize_key_t(K)
    assert key_t.dtype == torch.int8 and key_t.shape == (2, 3, 64, 100) and key_t.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (2, 3, 100)
    Kf = K.float()
    torch.testing.assert_close(scale, Kf.abs().amax(-1) / 127, rtol=0, atol=0)
    assert scale[0, 1, 7] == 0 and (key_t[0, 1, :, 7] == 0).all()
    assert key_t.min() >= -127 and key_t.max() <= 127
    # each row's largest magnitude is +-127; every element within half a step of the key
    assert (key_t.abs().amax(-2)[scale > 0] == 127).all()
    dequantized = key_t.float().transpose(-1, -2) * scale[..., None]
    assert ((dequantized - Kf).abs() <= scale[..., None] / 2 + 1e-6 * Kf.abs()).all()
    # the rounding is round-half-even of K / scale in fp32 (what the kernels assume)
    expected = torch.round(Kf / torch.where(scale > 0, scale, 1)[..., None]).to(torch.int8)
    assert torch.equal(key_t, expected.transpose(-1, -2))


def test_quantize_is_per_position_so_appending_never_requantizes():
    K = torch.randn(1, 2, 50, 16)
    whole_t, whole_scale = quantize_key_t(K)
    parts = [quantize_key_t(K[:, :, a:b]) for a, b in ((0, 20), (20, 21), (21, 50))]
    assert torch.equal(torch.cat([p[0] for p in parts], -1), whole_t)
    assert torch.equal(torch.cat([p[1] for p in parts], -1), whole_scale)


# --- The reference -------------------------------------------------------------------------------

def _case(B=2, Hq=8, Hkv=2, S=300, D=32, dtype=torch.float32, seed=0, sinks=False):
    q, K, V = make_inputs(B, Hq, Hkv, S, D, dtype, seed=seed)
    q = (q.float() * 4).to(dtype)  # logits of a few units, so softcap and sinks matter
    key_t, scale = quantize_key_t(K)
    gen = torch.Generator().manual_seed(seed + 101)
    sink_logits = (torch.randn(Hq, generator=gen) + 1.0).float() if sinks else None
    return q, K, V, key_t, scale, sink_logits


def test_reference_step1_is_the_scaled_int8_dot_product():
    """docs/design.md: l_hat[s] = key_t_scale[s] * (q[i1] . key_t[i1, s]) * scale / sqrt(gamma)."""
    B, Hq, Hkv, S, D, r = 2, 4, 2, 60, 16, 4
    q, K, _, key_t, kscale, _ = _case(B, Hq, Hkv, S, D)
    qg = q.double().reshape(B, Hkv, 2, D)
    valid = valid_positions(B, S)
    approx, _ = approximate_selection(qg, K.double(), r, 8, valid, key_t, 0, D**-0.5, None, kscale)
    i1 = qg.abs().sum(2).topk(r, -1).indices  # (B, Hkv, r)
    for b in range(B):
        for h in range(Hkv):
            rows = key_t[b, h, i1[b, h]].double()  # (r, S)
            for g in range(2):
                qh = qg[b, h, g, i1[b, h]]
                gamma = qh.abs().sum() / qg[b, h, g].abs().sum()
                expected = (qh @ rows) * kscale[b, h].double() * D**-0.5 / gamma.sqrt()
                torch.testing.assert_close(approx[b, h, g], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("variant", [(None, False), (2.0, True)], ids=["plain", "softcap_sinks"])
def test_reference_k_beyond_valid_length_is_dense_in_float64(G, variant):
    softcap, with_sinks = variant
    q, K, V, key_t, kscale, sinks = _case(Hq=2 * G, sinks=with_sinks)
    lens = torch.tensor([300, 117])
    out = sparq_attention_reference(q.double(), K.double(), V.double(), 4, 300, key_t, None, lens,
                                    None, 0, True, None, softcap, sinks, kscale)
    dense = dense_attention_reference(q.double(), K.double(), V.double(), seq_lens=lens,
                                      softcap=softcap, sinks=sinks)
    torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)


def test_full_precision_key_t_is_unchanged():
    """A key_t in the query's dtype keeps today's semantics, bit for bit, on every backend."""
    q, K, V, _, _, _ = _case()
    Kt = K.transpose(-1, -2).contiguous()
    for backend in ("reference", "cpu"):
        if backend == "cpu" and not sparq_ext.has_native_kernel("cpu"):
            continue
        a = attention(backend, q, K, V, r=4, k=40, key_t=Kt, local_window=4)
        b = attention(backend, q, K, V, r=4, k=40, key_t=Kt, local_window=4, key_t_scale=None)
        assert torch.equal(a, b)


# --- Every backend against the float64 reference ----------------------------------------------

def _separated(q, key_t, kscale, r, k, *, softcap=None, seq_lens=None, local_window=0, seed=0,
               rel=1e-4):
    """``q`` (redrawn if needed) without a near-tie at the top-r components or at the top-k
    boundary of the int8 approximate logits (two correct backends may break those apart)."""
    B, Hq, _, D = q.shape
    Hkv, S = key_t.shape[1], key_t.shape[3]
    valid = valid_positions(B, S, seq_lens)
    window = torch.zeros_like(valid)
    if local_window:
        from sparq_ext.reference import local_window_positions
        window = local_window_positions(valid, local_window)
    dummy_key = torch.zeros(B, Hkv, S, D, dtype=torch.float64)
    for attempt in range(100):
        q = untie_query(q, Hkv, r, seed=seed + attempt, rel=rel)
        qf = q.double().reshape(B, Hkv, Hq // Hkv, D)
        approx, _ = approximate_selection(qf, dummy_key, r, k, valid, key_t, 0, D**-0.5, softcap,
                                          kscale)
        score = approx.sum(2).masked_fill(~valid[:, None, :] | window[:, None, :], -math.inf)
        k_left = k - int(window[0].sum())  # rows here are long enough that k > the window
        top = score.topk(k_left + 1, dim=-1).values
        span = score.masked_fill(torch.isinf(score), 0).abs().amax(-1)
        gap = (top[..., k_left - 1] - top[..., k_left]) / span
        gap = torch.where(torch.isinf(top[..., k_left]), torch.full_like(gap, math.inf), gap)
        if gap.min().item() > rel:
            return q
        gen = torch.Generator().manual_seed(9_000_001 * (seed + 1) + attempt)
        q = (torch.randn(q.shape, generator=gen) * 4).to(q.dtype)
    raise AssertionError("could not draw a query with separated boundaries")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("reallocate", [True, False])
def test_ratio_8_matches_float64_reference(backend, dtype, G, reallocate):
    """r = D/8, k = S/16 on a ragged batch spanning two approx_logits tiles, local window."""
    S, D = 4100, 64
    q, K, V, key_t, kscale, _ = _case(Hq=2 * G, Hkv=2, S=S, D=D, dtype=dtype, seed=11 + G)
    lens = torch.tensor([S, 2000])
    r, k, window = D // RATIO, S // (2 * RATIO), 16
    q = _separated(q, key_t, kscale, r, k, seq_lens=lens, local_window=window, seed=G)
    out = attention(backend, q, K, V, r=r, k=k, key_t=key_t, key_t_scale=kscale, seq_lens=lens,
                    local_window=window, reallocate=reallocate)
    ref = sparq_attention_reference(q.double(), K.double(), V.double(), r, k, key_t, None, lens,
                                    None, window, reallocate, None, None, None, kscale)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, **tolerance(dtype, backend))


@pytest.mark.parametrize("variant", [(8.0, False), (None, True), (8.0, True)],
                         ids=["softcap", "sinks", "softcap_sinks"])
@pytest.mark.parametrize("G", [1, 4])
def test_with_softcap_and_sinks(backend, variant, G):
    softcap, with_sinks = variant
    q, K, V, key_t, kscale, sinks = _case(Hq=2 * G, S=700, D=32, sinks=with_sinks, seed=3)
    mask = torch.ones(2, 1, 1, 700, dtype=torch.bool)
    mask[1, ..., :90] = False  # left padding
    out = attention(backend, q, K, V, r=4, k=60, key_t=key_t, key_t_scale=kscale, attn_mask=mask,
                    local_window=10, softcap=softcap, sinks=sinks)
    ref = sparq_attention_reference(q, K, V, 4, 60, key_t, None, None, mask, 10, True, None,
                                    softcap, sinks, kscale)
    torch.testing.assert_close(out, ref, **tolerance(torch.float32, backend))


@pytest.mark.parametrize("G", [1, 4])
def test_k_beyond_valid_length_equals_dense(backend, G):
    """Step 2 reads the exact keys, so k >= the valid length is dense attention whatever the
    selection cache holds."""
    q, K, V, key_t, kscale, sinks = _case(Hq=2 * G, sinks=True, seed=G)
    lens = torch.tensor([300, 57])
    out = attention(backend, q, K, V, r=4, k=1000, key_t=key_t, key_t_scale=kscale, seq_lens=lens,
                    local_window=3, sinks=sinks)
    dense = dense_attention_reference(q.double(), K.double(), V.double(), seq_lens=lens,
                                      sinks=sinks)
    torch.testing.assert_close(out.double(), dense, **tolerance(torch.float32, backend))


def test_strided_and_expanded_key_t_and_scale(backend):
    """A key_t sliced out of a longer cache and a scale that is a stride-0 expand over B."""
    q, K, V, key_t, kscale, _ = _case(B=2, Hq=4, Hkv=2, S=300)
    long_t, long_scale = quantize_key_t(torch.cat([K[:1], K[:1].flip(2)], 2))  # (1, Hkv, D, 600)
    Kb, Vb = K[:1].expand(2, -1, -1, -1), V[:1].expand(2, -1, -1, -1)
    key_t_view = long_t[:, :, :, :300].expand(2, -1, -1, -1)
    scale_view = long_scale[:, :, :300].expand(2, -1, -1)
    q = _separated(q, key_t_view, scale_view, 4, 30)
    out = attention(backend, q, Kb, Vb, r=4, k=30, key_t=key_t_view, key_t_scale=scale_view)
    ref = sparq_attention_reference(q, Kb, Vb, 4, 30, key_t_view.contiguous(), None, None, None, 0,
                                    True, None, None, None, scale_view.contiguous())
    torch.testing.assert_close(out, ref, **tolerance(torch.float32, backend))


def test_scale_with_strided_positions(backend):
    """key_t_scale stored position-major ((B, S, Hkv), passed transposed): read where it is."""
    q, K, V, key_t, kscale, _ = _case(B=1, Hq=2, Hkv=1, S=5000)  # two tiles: split over threads
    kscale = torch.cat([kscale, kscale * 2], 1)  # (B, 2, S): the first head of a position-major store
    strided_scale = kscale.transpose(1, 2).contiguous().transpose(1, 2)[:, :1]  # S-stride 2
    kscale = kscale[:, :1]
    assert strided_scale.stride(2) != 1
    q = _separated(q, key_t, kscale, 4, 50, local_window=5)
    for threads in (1, 2):  # per-task and tiled work items
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = attention(backend, q, K, V, r=4, k=50, key_t=key_t, key_t_scale=strided_scale,
                            local_window=5)
        finally:
            torch.set_num_threads(previous)
        ref = sparq_attention_reference(q, K, V, 4, 50, key_t, None, None, None, 5, True, None,
                                        None, None, kscale)
        torch.testing.assert_close(out, ref, **tolerance(torch.float32, backend))


@pytest.mark.skipif(not sparq_ext.has_native_kernel("cpu"), reason="the native CPU kernel is not built")
def test_cpu_kernel_is_independent_of_thread_count():
    q, K, V, key_t, kscale, sinks = _case(B=1, Hq=4, Hkv=1, S=9000, D=32, sinks=True)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(sparq_ext.attention(q, K, V, r=4, k=1100, key_t=key_t, key_t_scale=kscale,
                                            local_window=30, sinks=sinks))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


# --- The paged operator --------------------------------------------------------------------------

def _paged_int8(K, table, lens, num_blocks, block_size, key_t_order="contiguous"):
    """The int8 key_t_cache and key_t_scale of the contiguous keys ``K``, paged by ``table``.
    Slots no row owns hold int8 garbage and NaN scales (a kernel reading one shows)."""
    key_t, kscale = quantize_key_t(K)
    pages = to_pages(key_t.transpose(-1, -2).float(), table, lens, num_blocks, block_size,
                     storage_order=(0, 1, 2, 3) if key_t_order == "contiguous" else key_t_order)
    pages = torch.nan_to_num(pages, nan=99.0).to(torch.int8).transpose(2, 3)
    if key_t_order == "contiguous":
        pages = pages.contiguous()
    scale_pages = to_pages(kscale[..., None], table, lens, num_blocks, block_size)[..., 0]
    return key_t, kscale, pages, scale_pages


@pytest.mark.parametrize("block_size", [5, 16, 32])
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("key_t_order", ["contiguous", (0, 2, 1, 3)], ids=["key_t", "key_t_strided"])
def test_paged_equals_attention_on_the_contiguous_cache(backend, block_size, G, key_t_order):
    Hkv, D = 2, 32
    lens = torch.tensor([300, 0, 129], dtype=torch.int32)
    table, num_blocks = page_table(lens, block_size, seed=block_size + G)
    S = table.shape[1] * block_size
    q, K, V = make_inputs(3, G * Hkv, Hkv, S, D, seed=G)
    q = q * 4
    key_t, kscale, key_t_cache, scale_cache = _paged_int8(K, table, lens, num_blocks, block_size,
                                                          key_t_order)
    q = _separated(q, key_t, kscale, 8, 40, seq_lens=lens, local_window=4, seed=G)
    key_cache = to_pages(K, table, lens, num_blocks, block_size)
    value_cache = to_pages(V, table, lens, num_blocks, block_size)
    paged = paged_attention(backend, q[:, :, 0], key_cache, value_cache, table, lens, r=8, k=40,
                            key_t_cache=key_t_cache, key_t_scale=scale_cache, local_window=4)
    contiguous = attention(backend, q, K, V, r=8, k=40, key_t=key_t, key_t_scale=kscale,
                           seq_lens=lens.long(), local_window=4)[:, :, 0]
    assert torch.isfinite(paged).all()
    if backend in ("reference", "cpu"):  # the same computation (docs/design.md 3a)
        assert torch.equal(paged, contiguous)
    else:
        torch.testing.assert_close(paged, contiguous, **tolerance(torch.float32, backend))
    ref = sparq_attention_reference(q.double(), K.double(), V.double(), 8, 40, key_t, None, lens,
                                    None, 4, True, None, None, None, kscale)[:, :, 0]
    torch.testing.assert_close(paged.double(), ref, **tolerance(torch.float32, backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_every_dtype(backend, dtype):
    lens = torch.tensor([200, 77], dtype=torch.int32)
    table, num_blocks = page_table(lens, 16, seed=1)
    S = table.shape[1] * 16
    q, K, V = make_inputs(2, 8, 2, S, 32, dtype, seed=2)
    key_t, kscale, key_t_cache, scale_cache = _paged_int8(K, table, lens, num_blocks, 16)
    q = _separated(q, key_t, kscale, 4, 30, seq_lens=lens)
    paged = paged_attention(backend, q[:, :, 0], to_pages(K, table, lens, num_blocks, 16),
                            to_pages(V, table, lens, num_blocks, 16), table, lens, r=4, k=30,
                            key_t_cache=key_t_cache, key_t_scale=scale_cache)
    ref = sparq_attention_reference(q.double(), K.double(), V.double(), 4, 30, key_t, None, lens,
                                    None, 0, True, None, None, None, kscale)[:, :, 0]
    assert paged.dtype == dtype
    torch.testing.assert_close(paged.double(), ref, **tolerance(dtype, backend))


# --- Argument checks ------------------------------------------------------------------------------

def _bad_key_t():
    """(attention kwargs, paged kwargs, error, match): q (1, 4, 1, 8), K (1, 2, 16, 8); the paged
    cache is the same K as one block of 16."""
    kt = torch.zeros(1, 2, 8, 16, dtype=torch.int8)
    sc = torch.ones(1, 2, 16)
    return [
        (dict(key_t=kt), dict(key_t_cache=kt), ValueError,
         r"key_t(_cache)? is int8, so key_t_scale .* must be given"),
        (dict(key_t_scale=sc), dict(key_t_scale=sc), ValueError,
         r"key_t_scale is given without key_t"),
        (dict(key_t=torch.zeros(1, 2, 8, 16), key_t_scale=sc),
         dict(key_t_cache=torch.zeros(1, 2, 8, 16), key_t_scale=sc), TypeError,
         r"key_t_scale is only for an int8 key_t(_cache)?, got key_t(_cache)? of dtype"),
        (dict(key_t=kt, key_t_scale=sc.double()), dict(key_t_cache=kt, key_t_scale=sc.double()),
         TypeError, "key_t_scale must be float32, got"),
        (dict(key_t=kt, key_t_scale=sc[..., :15]), dict(key_t_cache=kt, key_t_scale=sc[..., :15]),
         ValueError, r"key_t_scale must have shape \((B, Hkv, S|num_blocks, Hkv, block_size)\)"),
        (dict(key_t=kt, key_t_scale=sc[:, :, None]), dict(key_t_cache=kt, key_t_scale=sc[:, :, None]),
         ValueError, "key_t_scale must have shape"),
        (dict(key_t=kt, key_t_scale=sc.to("meta")), dict(key_t_cache=kt, key_t_scale=sc.to("meta")),
         ValueError, "key_t_scale must be on the query's device"),
        (dict(key_t=kt, key_t_scale=[1.0] * 16), dict(key_t_cache=kt, key_t_scale=[1.0] * 16),
         TypeError, "key_t_scale must be a torch.Tensor or None"),
        (dict(key_t=kt[..., :15], key_t_scale=sc[..., :15]),
         dict(key_t_cache=kt[..., :15], key_t_scale=sc[..., :15]), ValueError,
         r"key_t(_cache)? must have shape"),
        (dict(key_t=kt.to("meta"), key_t_scale=sc), dict(key_t_cache=kt.to("meta"), key_t_scale=sc),
         ValueError, r"key_t(_cache)? must be on the query's device"),
        (dict(key_t=kt.to(torch.uint8), key_t_scale=sc),
         dict(key_t_cache=kt.to(torch.uint8), key_t_scale=sc), TypeError,
         r"key_t(_cache)? must have the query's dtype"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_key_t())))
def test_bad_selection_cache_is_refused_by_name(case):
    kwargs, paged_kwargs, error, match = _bad_key_t()[case]
    assert_both_operators_refuse(error, match, kwargs, paged_kwargs)


def test_scale_that_requires_grad_is_refused():
    q, K, V = make_inputs(1, 4, 2, 16, 8)
    key_t, kscale = quantize_key_t(K)
    kscale.requires_grad_(True)
    with pytest.raises(ValueError, match="key_t_scale requires grad"):
        sparq_ext.attention(q, K, V, r=2, k=4, key_t=key_t, key_t_scale=kscale)
    with torch.no_grad():
        sparq_ext.attention(q, K, V, r=2, k=4, key_t=key_t, key_t_scale=kscale)


# the cases a direct torch.ops call can reach the CPU kernel with (tensors, none on "meta")
_NATIVE_CASES = [i for i, c in enumerate(_bad_key_t())
                 if all(isinstance(v, torch.Tensor) and v.device.type != "meta" for v in c[0].values())]


@pytest.mark.skipif(not sparq_ext.has_native_kernel("cpu"), reason="the native CPU kernel is not built")
@pytest.mark.parametrize("case", _NATIVE_CASES)
def test_native_cpu_kernel_checks_them_too(case):
    """Direct torch.ops calls skip the Python checks: the C++ ones say the same."""
    kwargs, paged_kwargs, _, match = _bad_key_t()[case]
    q, K, V = make_inputs(1, 4, 2, 16, 8)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparq_ext.attention(q, K, V, r=2, k=4, **kwargs)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparq_ext.paged_attention(q[:, :, 0], K, V, torch.zeros(1, 1, dtype=torch.int32),
                                            torch.tensor([16], dtype=torch.int32), r=2, k=4,
                                            **paged_kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and sparq_ext.has_native_kernel("cuda")),
                    reason="needs the native CUDA kernel and a GPU")
def test_cuda_kernels_implement_it():
    """The CUDA kernels read the 8-bit selection cache themselves: a direct torch.ops call (no
    Python wrapper, so no reference behind it) equals the reference, contiguous and paged
    (block size 20: elementwise key_t reads), with and without reallocation."""
    q, K, V, key_t, kscale, _ = _case()
    q = _separated(q, key_t, kscale, 4, 20, local_window=2)
    lens = torch.tensor([300, 300], dtype=torch.int32)
    table = torch.arange(30, dtype=torch.int32).reshape(2, 15)
    _, _, key_t_cache, scale_cache = _paged_int8(K, table, lens, 30, 20)
    cuda = lambda t: t.cuda()  # noqa: E731
    for reallocate in (True, False):
        ref = sparq_attention_reference(q, K, V, 4, 20, key_t, local_window=2,
                                        reallocate=reallocate, key_t_scale=kscale)
        with torch.no_grad():
            out = torch.ops.sparq_ext.attention(cuda(q), cuda(K), cuda(V), r=4, k=20,
                                                key_t=cuda(key_t), local_window=2,
                                                reallocate=reallocate, key_t_scale=cuda(kscale))
            paged = torch.ops.sparq_ext.paged_attention(
                cuda(q[:, :, 0]), cuda(to_pages(K, table, lens, 30, 20)),
                cuda(to_pages(V, table, lens, 30, 20)), cuda(table), cuda(lens), r=4, k=20,
                key_t_cache=cuda(key_t_cache), key_t_scale=cuda(scale_cache), local_window=2,
                reallocate=reallocate)
        torch.testing.assert_close(out.cpu(), ref, **tolerance(torch.float32, "cuda"))
        torch.testing.assert_close(paged.cpu(), ref[:, :, 0], **tolerance(torch.float32, "cuda"))


# --- Registration -------------------------------------------------------------------------------

def _opcheck_cases():
    q, K, V, key_t, kscale, sinks = _case(Hq=4, Hkv=2, S=32, D=16, sinks=True)
    lens = torch.tensor([32, 20])
    cases = [
        ("attention", (q, K, V), dict(r=4, k=8, key_t=key_t, key_t_scale=kscale)),
        ("attention", (q, K, V), dict(r=4, k=8, key_t=key_t, key_t_scale=kscale, seq_lens=lens,
                                      local_window=2, softcap=30.0, sinks=sinks)),
        ("attention", (q.bfloat16(), K.bfloat16(), V.bfloat16()),
         dict(r=16, k=100, key_t=key_t, key_t_scale=kscale)),
    ]
    table = torch.tensor([[1, 0], [2, 3]], dtype=torch.int32)
    cache = K.reshape(2, 2, 2, 16, 16).transpose(1, 2).reshape(4, 2, 16, 16)
    key_t_cache, scale_cache = quantize_key_t(cache)
    paged_lens = torch.tensor([32, 17], dtype=torch.int32)
    cases.append(("paged_attention", (q[:, :, 0], cache, cache, table, paged_lens),
                  dict(r=4, k=8, key_t_cache=key_t_cache, key_t_scale=scale_cache)))
    return cases


@pytest.mark.parametrize("case", range(4))
def test_opcheck(case):
    op, args, kwargs = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.sparq_ext, op).default, args, kwargs)


def test_torch_compile_fullgraph_cpu():
    q, K, V, key_t, kscale, sinks = _case(Hq=8, Hkv=2, S=256, D=32, sinks=True)
    lens = torch.tensor([256, 100])

    def step(q, K, V, key_t, kscale, lens, sinks):
        return sparq_ext.attention(q * 2, K, V, r=4, k=32, key_t=key_t, key_t_scale=kscale,
                                   seq_lens=lens, local_window=8, sinks=sinks) + 1

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    args = (q, K, V, key_t, kscale, lens, sinks)
    torch.testing.assert_close(compiled(*args), step(*args), **tolerance(torch.float32))


# --- Bytes (sparq_ext.budget) ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("ratio", [4, 8, 16])
def test_8bit_split_spends_half_the_saving_on_r_and_reads_one_ratio_of_dense(dtype, D, ratio):
    """At the full copy's r0 = D/ratio the 8-bit rows and scale save e*r0 - r0 - 4 bytes per
    position; half buys components (r = r0*(1 + e)/2 - 2), the rest selected rows (k on the
    budget): 1/ratio of dense's bytes, with a larger r and k wherever there is a saving."""
    from sparq_ext.budget import rk_for_ratio, transfer_bytes
    e = torch.empty((), dtype=dtype).element_size()
    for S in (4096, 16384):
        r, k = rk_for_ratio(ratio, S, D, dtype=dtype, key_t_dtype=torch.int8)
        r_full, k_full = rk_for_ratio(ratio, S, D)
        saving = e * r_full - r_full - 4
        assert r == max(1, round(r_full + saving / 2))
        assert (r > r_full and k > k_full) if saving > 0 else (r == r_full and k == k_full)
        t = transfer_bytes(1, 1, S, D, r, k, dtype=dtype, query_heads=1, key_t_dtype=torch.int8)
        full = transfer_bytes(1, 1, S, D, r_full, k_full, dtype=dtype, query_heads=1)
        assert t["dense"] == full["dense"]
        assert abs(t["sparq"] - full["sparq"]) <= D * e  # the same bytes, up to k's rounding


def test_transfer_bytes_counts_int8_rows_and_scales():
    from sparq_ext.budget import transfer_bytes
    B, H, S, D, r, k = 2, 3, 1000, 64, 28, 50
    t = transfer_bytes(B, H, S, D, r, k, dtype=torch.float32, query_heads=6, key_t_dtype=torch.int8)
    assert t["sparq"] == B * (H * (S * (r + 4) + (2 * k * D + D) * 4) + 2 * 6 * D * 4)
    same = transfer_bytes(B, H, S, D, r, k, dtype=torch.float32, query_heads=6,
                          key_t_dtype=torch.float32)
    assert same == transfer_bytes(B, H, S, D, r, k, dtype=torch.float32, query_heads=6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ratio", [4, 8, 16])
@pytest.mark.parametrize("D", [64, 128])
def test_every_int8_candidate_respects_the_byte_budget(dtype, ratio, D):
    from sparq_ext.budget import candidate_rs, k_on_budget, rk_for_ratio, transfer_bytes
    e = torch.empty((), dtype=dtype).element_size()
    rs = candidate_rs(ratio, D, dtype=dtype, key_t_dtype=torch.int8)
    assert rk_for_ratio(ratio, 4096, D, dtype=dtype, key_t_dtype=torch.int8)[0] in rs
    for S in (1024, 8192):
        for r in rs:
            k = k_on_budget(ratio, S, D, r, dtype=dtype, key_t_dtype=torch.int8)
            t = transfer_bytes(1, 3, S, D, r, k, dtype=dtype, query_heads=9, key_t_dtype=torch.int8)
            assert t["sparq"] <= t["dense"] / ratio + 3 * (D + 2 * 9 * D) * e, (r, k)
            assert k >= 1
    assert max(rs) + 4 < 2 * e * D / ratio  # the largest fits, and
    bigger = [r for r in range(1, D + 1) if r + 4 < 2 * e * D / ratio]
    assert max(rs) <= max(bigger)


def test_budget_refuses_an_int8_selection_cache_without_the_cache_dtype():
    from sparq_ext.budget import k_on_budget, rk_for_ratio
    with pytest.raises(ValueError, match="dtype .* must be given with key_t_dtype=torch.int8"):
        rk_for_ratio(8, 4096, 64, key_t_dtype=torch.int8)
    with pytest.raises(ValueError, match="key_t_dtype must be"):
        rk_for_ratio(8, 4096, 64, dtype=torch.float32, key_t_dtype=torch.uint8)
    with pytest.raises(ValueError, match="whole budget"):
        k_on_budget(8, 4096, 64, 60, dtype=torch.float32, key_t_dtype=torch.int8)
    # a full-precision key_t_dtype is today's count
    assert rk_for_ratio(8, 4096, 64, dtype=torch.bfloat16, key_t_dtype=torch.bfloat16) == \
        rk_for_ratio(8, 4096, 64)
