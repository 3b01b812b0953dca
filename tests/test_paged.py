"""``sparq_ext.paged_attention`` against ``sparq_ext.attention`` on the same cache laid out
contiguously: shuffled block tables, blocks shared between rows, partial last blocks, strided
views, every dtype, GQA, the local window, empty rows; then registration (opcheck, compile) and
the rejections. Slots of the paged cache that no row owns are NaN, so reading one shows.
"""

from __future__ import annotations

import pytest
import torch

import sparq_ext
from sparq_ext import paged_attention_reference, sparq_attention_reference
from sparq_ext.reference import gather_pages
from sparq_testutil import (DTYPES, UNUSED_BLOCK, attention, make_inputs, page_table,
                            paged_attention, separated_query, to_pages, tolerance)


def paged_case(R=3, G=2, Hkv=2, D=32, block_size=16, seq_lens=(40, 0, 23), dtype=torch.float32,
               shared_blocks=1, seed=0, storage_order=(0, 1, 2, 3), key_t_order=None, r=8, k=12,
               local_window=2):
    """Contiguous inputs and their paged copy. ``S`` = the table's capacity, so the contiguous
    cache has the positions the table can address; rows after the first repeat the first row's
    first ``shared_blocks`` blocks (so they may share them). ``key_t_order``: also a paged
    ``key_t_cache``, the storage order of the ``(num_blocks, Hkv, block_size, D)`` keys it is the
    transpose of (``"contiguous"``: a contiguous ``(num_blocks, Hkv, D, block_size)``)."""
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    table, num_blocks = page_table(lens, block_size, shared_blocks=shared_blocks, seed=seed)
    S = table.shape[1] * block_size
    q, K, V = make_inputs(R, G * Hkv, Hkv, S, D, dtype, seed=seed)
    shared = min(shared_blocks * block_size, S)
    K[1:, :, :shared] = K[:1, :, :shared]
    V[1:, :, :shared] = V[:1, :, :shared]
    q = separated_query(q, K, r, k, seq_lens=lens, local_window=local_window, seed=seed)[:, :, 0]
    key_cache = to_pages(K, table, lens, num_blocks, block_size, storage_order=storage_order)
    value_cache = to_pages(V, table, lens, num_blocks, block_size, storage_order=storage_order)
    key_t_cache = None
    if key_t_order == "contiguous":
        key_t_cache = to_pages(K, table, lens, num_blocks, block_size).transpose(2, 3).contiguous()
    elif key_t_order is not None:
        key_t_cache = to_pages(K, table, lens, num_blocks, block_size,
                               storage_order=key_t_order).transpose(2, 3)
    return dict(q=q, K=K, V=V, lens=lens, table=table, key_cache=key_cache,
                value_cache=value_cache, key_t_cache=key_t_cache, r=r, k=k,
                local_window=local_window)


def run_both(backend, c, *, value_mean=None, reallocate=True, contiguous_backend=None):
    """(paged on ``backend``, attention on the contiguous cache on ``contiguous_backend``)."""
    paged = paged_attention(backend, c["q"], c["key_cache"], c["value_cache"], c["table"],
                            c["lens"], r=c["r"], k=c["k"], key_t_cache=c["key_t_cache"],
                            value_mean=value_mean, local_window=c["local_window"],
                            reallocate=reallocate)
    key_t = None if c["key_t_cache"] is None else c["K"].transpose(-1, -2).contiguous()
    contiguous = attention(contiguous_backend or backend, c["q"][:, :, None], c["K"], c["V"],
                           r=c["r"], k=c["k"], key_t=key_t,
                           value_mean=None if value_mean is None else value_mean[:, :, None],
                           seq_lens=c["lens"], local_window=c["local_window"],
                           reallocate=reallocate)
    return paged, contiguous[:, :, 0]


def exact_on(backend):
    """Paged and contiguous are the same computation on the reference and on the CPU kernel
    (whose result does not depend on the thread count or on where a row's blocks are)."""
    return backend in ("reference", "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("key_t_order", [None, "contiguous"], ids=["no_key_t", "key_t"])
def test_matches_contiguous(backend, dtype, block_size, G, key_t_order):
    c = paged_case(G=G, block_size=block_size, seq_lens=(300, 0, 129), dtype=dtype,
                   shared_blocks=2, seed=block_size + G, key_t_order=key_t_order, k=40,
                   local_window=8)
    paged, contiguous = run_both(backend, c)
    assert paged.shape == c["q"].shape and paged.dtype == dtype
    assert torch.isfinite(paged).all()
    if exact_on(backend):
        assert torch.equal(paged, contiguous)
    else:
        torch.testing.assert_close(paged, contiguous, **tolerance(dtype, backend))
    assert not paged[1].any()  # the empty row


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_matches_reference(native_backend, dtype):
    c = paged_case(G=4, block_size=16, seq_lens=(200, 77, 16, 1), R=4, dtype=dtype,
                   key_t_order="contiguous", k=24, local_window=4, seed=5)
    out = paged_attention(native_backend, c["q"], c["key_cache"], c["value_cache"], c["table"],
                          c["lens"], r=8, k=24, key_t_cache=c["key_t_cache"], local_window=4)
    with torch.no_grad():
        ref = sparq_attention_reference(c["q"][:, :, None], c["K"], c["V"], 8, 24,
                                        seq_lens=c["lens"], local_window=4)[:, :, 0]
    torch.testing.assert_close(out.float(), ref.float(), **tolerance(dtype, native_backend))


@pytest.mark.parametrize("layout", ["tokens_first", "heads_outer", "D_strided"])
@pytest.mark.parametrize("key_t_order", [(0, 1, 2, 3), (1, 0, 3, 2)], ids=["key_t_rows_by_D",
                                                                           "key_t_heads_outer"])
def test_strided_views(backend, layout, key_t_order):
    """Caches as an engine holds them, passed as views: ``(num_blocks, block_size, Hkv, D)`` via
    ``transpose(1, 2)``, heads outermost, ``key_t_cache`` whose positions are not contiguous."""
    order = {"tokens_first": (0, 2, 1, 3), "heads_outer": (1, 0, 2, 3), "D_strided": (0, 1, 3, 2)}[layout]
    c = paged_case(block_size=16, seq_lens=(70, 33, 5), storage_order=order,
                   key_t_order=key_t_order, seed=11)
    assert not c["key_cache"].is_contiguous() and not c["key_t_cache"].is_contiguous()
    # the table and lengths as views into larger tensors (column / element stride 2)
    table = torch.full((3, 2 * c["table"].shape[1]), UNUSED_BLOCK, dtype=torch.int32)
    table[:, ::2] = c["table"]
    lens = torch.stack([c["lens"], torch.zeros_like(c["lens"])], 1).reshape(-1)
    c["table"], c["lens"] = table[:, ::2], lens[::2]
    value_mean = c["V"].float().mean(2)[..., :].to(c["V"].dtype)  # any (R, Hkv, D) values
    value_mean = value_mean.transpose(0, 1).contiguous().transpose(0, 1)  # a strided view
    paged, contiguous = run_both(backend, c, value_mean=value_mean)
    if exact_on(backend):
        assert torch.equal(paged, contiguous)
    else:
        torch.testing.assert_close(paged, contiguous, **tolerance(torch.float32, backend))


@pytest.mark.parametrize("with_mean", [True, False], ids=["value_mean", "mean_none"])
@pytest.mark.parametrize("reallocate", [True, False])
def test_options(backend, with_mean, reallocate):
    c = paged_case(G=2, block_size=4, seq_lens=(37, 12, 64), shared_blocks=3, seed=3, k=9,
                   local_window=3)
    value_mean = None
    if with_mean:  # the mean over each row's own positions
        value_mean = torch.stack([c["V"][i, :, :n].mean(1) for i, n in enumerate(c["lens"])])
    paged, contiguous = run_both(backend, c, value_mean=value_mean, reallocate=reallocate)
    if exact_on(backend):
        assert torch.equal(paged, contiguous)
    else:
        torch.testing.assert_close(paged, contiguous, **tolerance(torch.float32, backend))


def block_value_sums(c):
    """Per-block fp32 sums of the values the rows wrote (an engine's value_sums_cache); blocks no
    row uses are NaN, so reading one shows."""
    value_cache = c["value_cache"]
    sums = value_cache.float().nan_to_num(0.0).sum(2)  # unwritten slots are NaN: they add nothing
    block_size = value_cache.shape[2]
    used = torch.zeros(value_cache.shape[0], dtype=torch.bool)
    for i, n in enumerate(c["lens"].tolist()):
        used[c["table"][i, :-(-n // block_size)].long()] = True
    sums[~used] = float("nan")
    return sums


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_value_sums_cache_gives_each_rows_mean(backend, dtype):
    """v_mean from the blocks' value sums is each row's mean: the same output as value_mean given
    as that mean (shared blocks, partial last blocks, an empty row); the sums are really read."""
    c = paged_case(R=4, G=2, block_size=4, seq_lens=(37, 12, 0, 64), shared_blocks=3, seed=3, k=9,
                   local_window=3, dtype=dtype)
    sums = block_value_sums(c)
    mean = torch.stack([c["V"][i, :, :max(n, 1)].float().mean(1) * (n > 0)
                        for i, n in enumerate(c["lens"].tolist())]).to(dtype)
    args = (c["q"], c["key_cache"], c["value_cache"], c["table"], c["lens"])
    options = dict(r=c["r"], k=c["k"], local_window=c["local_window"])
    from_sums = paged_attention(backend, *args, value_sums_cache=sums, **options)
    from_mean = paged_attention(backend, *args, value_mean=mean, **options)
    assert not from_sums.isnan().any()
    torch.testing.assert_close(from_sums, from_mean, **tolerance(dtype, backend))
    assert from_sums[2].eq(0).all()  # the empty row: zeros
    doubled = paged_attention(backend, *args, value_sums_cache=sums * 2, **options)
    assert not torch.allclose(doubled, from_sums, **tolerance(dtype, backend))


def test_value_sums_cache_strided_view():
    """The sums are read in place from a strided view (a region of an engine's page)."""
    c = paged_case(R=2, G=2, block_size=8, seq_lens=(40, 23), shared_blocks=2, seed=5)
    sums = block_value_sums(c)
    page = torch.full((sums.shape[0], 5, *sums.shape[1:]), float("nan"))
    page[:, 3] = sums
    args = (c["q"], c["key_cache"], c["value_cache"], c["table"], c["lens"])
    got = sparq_ext.paged_attention(*args, r=c["r"], k=c["k"], value_sums_cache=page[:, 3])
    want = sparq_ext.paged_attention(*args, r=c["r"], k=c["k"], value_sums_cache=sums.clone())
    assert torch.equal(got, want)


def test_mean_from_block_sums_of_the_cuda_host_code():
    """The ATen code with which the CUDA operator turns value_sums_cache into v_mean (run here on
    the CPU) equals the reference's: table entries past a row's end are out of range, blocks no
    row uses are NaN, a row is empty."""
    if not sparq_ext.has_native_kernel("cpu"):
        pytest.skip("the compiled extension is not built")
    from sparq_ext import _C
    from sparq_ext.reference import mean_from_block_sums

    c = paged_case(R=4, G=2, block_size=4, seq_lens=(37, 12, 0, 64), shared_blocks=3, seed=3, k=9)
    sums = block_value_sums(c)
    got = _C._value_mean_from_block_sums(sums, c["table"], c["lens"], 4)
    want = mean_from_block_sums(sums, c["table"], c["lens"], 4)
    assert not want.isnan().any() and want[2].eq(0).all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_reference_is_the_contiguous_reference():
    """The reference gathers the table and runs the contiguous reference: bit for bit."""
    c = paged_case(G=4, block_size=8, seq_lens=(50, 3, 64), key_t_order="contiguous", seed=7)
    kwargs = dict(r=8, k=12, local_window=2)
    with torch.no_grad():
        paged = paged_attention_reference(c["q"], c["key_cache"], c["value_cache"], c["table"],
                                          c["lens"], key_t_cache=c["key_t_cache"], **kwargs)
        K = gather_pages(c["key_cache"], c["table"], c["lens"])
        V = gather_pages(c["value_cache"], c["table"], c["lens"])
        assert torch.isfinite(K).all()  # padding gathered as zeros, not the NaN slots
        contiguous = sparq_attention_reference(c["q"][:, :, None], K, V, seq_lens=c["lens"],
                                               key_t=K.transpose(-1, -2), **kwargs)
    assert torch.equal(paged, contiguous[:, :, 0])


def test_dense_limit(backend):
    """``k`` at or above every row's length is dense attention over the row's positions."""
    c = paged_case(G=2, block_size=16, seq_lens=(45, 16, 7), seed=2, k=64, local_window=0)
    out = paged_attention(backend, c["q"], c["key_cache"], c["value_cache"], c["table"],
                          c["lens"], r=4, k=64)
    for i, n in enumerate(c["lens"].tolist()):
        dense = torch.nn.functional.scaled_dot_product_attention(
            c["q"][i:i + 1, :, None], c["K"][i:i + 1, :, :n], c["V"][i:i + 1, :, :n],
            enable_gqa=True)[0, :, 0]
        torch.testing.assert_close(out[i], dense, **tolerance(torch.float32, backend))


def test_empty_rows_and_tables(backend):
    """Rows of length 0 give zeros; so does a batch where every row is empty, whatever the
    table's entries (none is read)."""
    c = paged_case(seq_lens=(0, 0, 0), seed=4)
    out = paged_attention(backend, c["q"], c["key_cache"], c["value_cache"], c["table"],
                          c["lens"], r=8, k=12)
    assert out.shape == c["q"].shape and not out.any()


def test_capacity_far_beyond_rows(backend):
    """A table sized for a long context (entries past each row's blocks unused) gives the same
    result as a tight one: only a row's own blocks are read."""
    c = paged_case(block_size=16, seq_lens=(40, 9, 23), seed=6)
    wide = torch.full((3, 4096), UNUSED_BLOCK, dtype=torch.int32)
    wide[:, :c["table"].shape[1]] = c["table"]
    kwargs = dict(r=8, k=12, local_window=2)
    tight = paged_attention(backend, c["q"], c["key_cache"], c["value_cache"], c["table"],
                            c["lens"], **kwargs)
    if backend == "reference":  # it gathers the whole table: give it valid ids to gather
        wide = torch.where(wide == UNUSED_BLOCK, torch.zeros_like(wide), wide)
    out = paged_attention(backend, c["q"], c["key_cache"], c["value_cache"], wide, c["lens"],
                          **kwargs)
    if backend == "cpu":
        assert torch.equal(out, tight)
    else:
        torch.testing.assert_close(out, tight, **tolerance(torch.float32, backend))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_tiles_and_partitions_bit_exact(dtype, threads):
    """Rows longer than one approx_logits tile (4096) and k over one attend partition (512),
    few enough tasks that the stages split into separate work items: still bit for bit."""
    if not sparq_ext.has_native_kernel("cpu", "paged_attention"):
        pytest.skip("the native CPU paged kernel is not built")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        c = paged_case(R=2, G=4, Hkv=1, D=64, block_size=16, seq_lens=(5000, 700), dtype=dtype,
                       shared_blocks=8, key_t_order="contiguous", k=600, local_window=16, seed=9)
        paged, contiguous = run_both("cpu", c)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(paged, contiguous)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_standard_shape_16k(backend, dtype):
    c = paged_case(R=2, G=4, Hkv=8, D=128, block_size=16, seq_lens=(16384, 9000), dtype=dtype,
                   shared_blocks=64, key_t_order="contiguous", r=16, k=1024, local_window=64,
                   seed=12)
    paged, contiguous = run_both(backend, c)
    if exact_on(backend):
        assert torch.equal(paged, contiguous)
    else:
        torch.testing.assert_close(paged, contiguous, **tolerance(dtype, backend))


# --- Registration ------------------------------------------------------------------------------

def _opcheck_cases():
    c = paged_case(block_size=8, seq_lens=(20, 0, 13), key_t_order="contiguous", seed=1)
    args = (c["q"], c["key_cache"], c["value_cache"], c["table"], c["lens"])
    half = paged_case(block_size=4, seq_lens=(9, 16, 1), dtype=torch.bfloat16, seed=2)
    return [
        (args, dict(r=8, k=12)),
        (args, dict(r=4, k=6, key_t_cache=c["key_t_cache"], value_mean=c["V"].mean(2),
                    local_window=2, reallocate=False, scale=0.2)),
        (args, dict(r=4, k=6, value_sums_cache=block_value_sums(c).nan_to_num(0.0))),
        ((half["q"], half["key_cache"], half["value_cache"], half["table"], half["lens"]),
         dict(r=32, k=100)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_opcheck(case):
    args, kwargs = _opcheck_cases()[case]
    torch.library.opcheck(torch.ops.sparq_ext.paged_attention.default, args, kwargs)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(3, 8, 64, dtype=torch.bfloat16)
        cache = torch.empty(100, 16, 2, 64, dtype=torch.bfloat16).transpose(1, 2)
        table = torch.empty(3, 50, dtype=torch.int32)
        lens = torch.empty(3, dtype=torch.int32)
        out = torch.ops.sparq_ext.paged_attention(q, cache, cache, table, lens, r=8, k=64)
    assert out.shape == (3, 8, 64) and out.dtype == torch.bfloat16


def test_torch_compile_fullgraph_cpu():
    c = paged_case(G=4, block_size=16, seq_lens=(100, 31, 64), key_t_order="contiguous", seed=8)

    def step(q, key_cache, value_cache, table, lens, key_t_cache):
        return sparq_ext.paged_attention(q * 2, key_cache, value_cache, table, lens, r=8, k=12,
                                         key_t_cache=key_t_cache, local_window=2) + 1

    args = (c["q"], c["key_cache"], c["value_cache"], c["table"], c["lens"], c["key_t_cache"])
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(*args), step(*args), **tolerance(torch.float32))


# --- Rejections --------------------------------------------------------------------------------

def _bad_inputs():
    c = paged_case(block_size=8, seq_lens=(20, 0, 13), seed=1)
    q, kc, vc, table, lens = c["q"], c["key_cache"], c["value_cache"], c["table"], c["lens"]
    out_of_range = table.clone()
    out_of_range[0, 1] = kc.shape[0]
    negative = table.clone()
    negative[2, 0] = -1
    base = dict(query=q, key_cache=kc, value_cache=vc, block_table=table, seq_lens=lens, r=8, k=12)
    cases = {
        "query_dims": (dict(query=q[:, :, None]), ValueError, "query must have 3 dims"),
        "query_dtype": (dict(query=q.double()), TypeError, "query must be float32"),
        "key_cache_dims": (dict(key_cache=kc[0]), ValueError, "key_cache must have 4 dims"),
        "key_cache_D": (dict(key_cache=kc[..., :16]), ValueError, "key_cache must be"),
        "key_cache_dtype": (dict(key_cache=kc.half()), TypeError, "key_cache must have the query's dtype"),
        "heads": (dict(key_cache=kc[:, :1].expand(-1, 3, -1, -1),
                       value_cache=vc[:, :1].expand(-1, 3, -1, -1)), ValueError,
                  r"key_cache heads \(3\) must divide"),
        "value_cache_shape": (dict(value_cache=vc[:-1]), ValueError, "value_cache must have key_cache's shape"),
        "key_t_cache_shape": (dict(key_t_cache=kc), ValueError, "key_t_cache must have shape"),
        "value_mean_shape": (dict(value_mean=q), ValueError, "value_mean must have shape"),
        "value_sums_cache_shape": (dict(value_sums_cache=kc[:, :, 0, :16].float()), ValueError,
                                   "value_sums_cache must have shape"),
        "value_sums_cache_dtype": (dict(value_sums_cache=kc[:, :, 0].double()), TypeError,
                                   "value_sums_cache must be float32"),
        "value_sums_cache_and_value_mean": (dict(value_sums_cache=kc[:, :, 0].float(),
                                                 value_mean=q[:, :2]), ValueError,
                                            "value_mean and value_sums_cache"),
        "block_table_dtype": (dict(block_table=table.long()), TypeError, "block_table must be int32"),
        "block_table_shape": (dict(block_table=table[:2]), ValueError, "block_table must have shape"),
        "seq_lens_dtype": (dict(seq_lens=lens.long()), TypeError, "seq_lens must be int32"),
        "seq_lens_shape": (dict(seq_lens=lens[:, None]), ValueError, "seq_lens must have shape"),
        "seq_lens_beyond_table": (dict(seq_lens=lens + table.shape[1] * 8), ValueError,
                                  "seq_lens must lie in"),
        "seq_lens_negative": (dict(seq_lens=lens - 1), ValueError, "seq_lens must lie in"),
        "block_id_too_large": (dict(block_table=out_of_range), ValueError, "block_table must hold block ids"),
        "block_id_negative": (dict(block_table=negative), ValueError, "block_table must hold block ids"),
        "r": (dict(r=33), ValueError, "r must be an int"),
        "k": (dict(k=0), ValueError, "k must be an int"),
        "local_window": (dict(local_window=13), ValueError, "local_window must be an int"),
        "scale": (dict(scale=float("nan")), ValueError, "scale must be a finite float"),
        "reallocate": (dict(reallocate=1), TypeError, "reallocate must be a bool"),
    }
    return base, cases


_BASE, _BAD = _bad_inputs()


@pytest.mark.parametrize("name", sorted(_BAD))
def test_bad_inputs_name_the_argument(name):
    change, error, message = _BAD[name]
    kwargs = {**_BASE, **change}
    positional = [kwargs.pop(n) for n in ("query", "key_cache", "value_cache", "block_table", "seq_lens")]
    with pytest.raises(error, match=message):
        sparq_ext.paged_attention(*positional, **kwargs)


# The C++ checks, reached by calling the operator directly (no Python checks on the way).
_NATIVE_CHECKED = ["query_dims", "key_cache_D", "heads", "value_cache_shape", "key_t_cache_shape",
                   "value_mean_shape", "value_sums_cache_shape", "value_sums_cache_dtype",
                   "value_sums_cache_and_value_mean", "block_table_dtype", "seq_lens_dtype",
                   "seq_lens_beyond_table", "block_id_too_large", "block_id_negative", "r", "k"]


@pytest.mark.parametrize("name", _NATIVE_CHECKED)
def test_native_checks_name_the_argument(name):
    if not sparq_ext.has_native_kernel("cpu", "paged_attention"):
        pytest.skip("the native CPU paged kernel is not built")
    change, _, message = _BAD[name]
    kwargs = {**_BASE, **change}
    positional = [kwargs.pop(n) for n in ("query", "key_cache", "value_cache", "block_table", "seq_lens")]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.sparq_ext.paged_attention(*positional, **kwargs)


def test_requires_grad_is_refused():
    c = paged_case(seed=1)
    q = c["q"].clone().requires_grad_()
    with pytest.raises(ValueError, match="query requires grad"):
        sparq_ext.paged_attention(q, c["key_cache"], c["value_cache"], c["table"], c["lens"],
                                  r=8, k=12)


# --- The CUDA kernel (skipped without a CUDA device; the emulator tests cover it on the CPU) ---

_CUDA_ONLY = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
              pytest.mark.skipif(not sparq_ext.has_native_kernel("cuda", "paged_attention"),
                                 reason="sparq_ext was built without the CUDA kernels")]


def cuda_only(test):
    """Skipped without a CUDA device or without the compiled CUDA kernels."""
    for mark in _CUDA_ONLY:
        test = mark(test)
    return test


def _on_cuda(c):
    """paged_case's tensors on the GPU, views kept as views (sparq_testutil's ``_to``)."""
    from sparq_testutil import _to
    return {name: _to(t, "cuda") if isinstance(t, torch.Tensor) else t for name, t in c.items()}


@cuda_only
@pytest.mark.parametrize("dtype,block_size,layout", [
    (torch.float32, 16, "contiguous"), (torch.bfloat16, 16, "engine"),
    (torch.bfloat16, 48, "engine"), (torch.bfloat16, 128, "contiguous")], ids=str)
def test_cuda_long_rows_match_contiguous(dtype, block_size, layout):
    """Rows long enough for many approx_logits tiles, several topk blocks per row and several
    attend partitions; an engine's (num_blocks, block_size, Hkv, D) caches via transpose(1, 2)
    and a key_t_cache view whose positions are strided."""
    order = (0, 2, 1, 3) if layout == "engine" else (0, 1, 2, 3)
    c = paged_case(R=3, G=4, Hkv=2, D=128, block_size=block_size, seq_lens=(40000, 9000, 0),
                   dtype=dtype, shared_blocks=4, storage_order=order,
                   key_t_order=order if layout == "engine" else "contiguous", r=16, k=2500,
                   local_window=64, seed=block_size)
    paged, contiguous = run_both("cuda", c)
    torch.testing.assert_close(paged, contiguous, **tolerance(dtype, "cuda"))
    assert not paged[2].any()


@cuda_only
def test_cuda_graph_capture_and_replay():
    """Captured once, replayed with new query, lengths and table contents: the kernels read
    seq_lens and block_table on the device only, so the replay follows them."""
    kwargs = dict(r=16, k=256, local_window=32)
    first = _on_cuda(paged_case(R=2, G=4, Hkv=2, D=128, block_size=16, seq_lens=(3000, 1700),
                                dtype=torch.bfloat16, key_t_order="contiguous", r=16, k=256,
                                local_window=32, seed=31))
    q, kc, vc, kt = first["q"], first["key_cache"], first["value_cache"], first["key_t_cache"]
    table, lens = first["table"], first["lens"]

    def step():
        return sparq_ext.paged_attention(q, kc, vc, table, lens, key_t_cache=kt, **kwargs)

    with torch.no_grad():
        eager = step()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up the allocator on the side stream
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, eager, **tolerance(torch.bfloat16, "cuda"))
        # Same shapes, other rows: lengths swapped, another shuffle of the blocks, new values.
        second = _on_cuda(paged_case(R=2, G=4, Hkv=2, D=128, block_size=16,
                                     seq_lens=(1700, 3000), dtype=torch.bfloat16,
                                     key_t_order="contiguous", r=16, k=256, local_window=32,
                                     seed=32))
        assert second["key_cache"].shape == kc.shape and second["table"].shape == table.shape
        for buffer, name in ((q, "q"), (kc, "key_cache"), (vc, "value_cache"),
                             (kt, "key_t_cache"), (table, "table"), (lens, "lens")):
            buffer.copy_(second[name])
        graph.replay()
        torch.cuda.synchronize()
        ref = sparq_attention_reference(second["q"][:, :, None], second["K"], second["V"], 16,
                                        256, seq_lens=second["lens"], local_window=32)[:, :, 0]
    torch.testing.assert_close(static_out.float(), ref.float(),
                               **tolerance(torch.bfloat16, "cuda"))


@cuda_only
def test_cuda_refuses_head_dims_it_cannot_read_in_place():
    c = _on_cuda(paged_case(D=20, seq_lens=(20, 5, 1), r=4, k=8, seed=33))
    with pytest.raises(RuntimeError, match=r"head_dim \(D\) a multiple of 8"):
        sparq_ext.paged_attention(c["q"], c["key_cache"], c["value_cache"], c["table"],
                                  c["lens"], r=4, k=8)
