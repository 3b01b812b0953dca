"""What only the CUDA backend has: CUDA-graph capture and replay, streams, no host
synchronisation, ``torch.compile`` and the operator checks on the device, and caches long enough
to take the kernels' multi-block and large-shared-memory paths.

Correctness on every option, dtype, head dim, GQA group and layout is tested for every backend,
CUDA included, in tests/test_backends.py and tests/test_semantics.py (softcap and sinks in
tests/test_softmax_variants.py, the 8-bit selection cache in tests/test_int8_key_t.py, step 1's
component weights in tests/test_component_weights.py).
Skipped without a CUDA device or the compiled CUDA kernels (failed where SPARQ_EXT_REQUIRE_NATIVE
names cuda).
"""

from __future__ import annotations

import pytest
import torch

import sparq_ext
from sparq_ext import sparq_attention_reference
from sparq_testutil import backend_unavailable, make_inputs, separated_query, tolerance

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(backend_unavailable("cuda") is not None,
                       reason=f"backend cuda: {backend_unavailable('cuda')}"),
]


def cuda_inputs(B, Hq, Hkv, S, D, dtype=torch.bfloat16, seed=0):
    """sparq_testutil's inputs on the GPU, with the transposed key cache."""
    q, K, V, Kt = make_inputs(B, Hq, Hkv, S, D, dtype, seed=seed, with_key_t=True)
    return q.cuda(), K.cuda(), V.cuda(), Kt.cuda()


def check_against_reference(q, K, V, r, k, **kwargs):
    """The CUDA kernels against the reference, both on the GPU; the query redrawn first where its
    top-r / top-k boundary is a near-tie."""
    q = separated_query(q, K, r, k, key_t=kwargs.get("key_t"), seq_lens=kwargs.get("seq_lens"),
                        attn_mask=kwargs.get("attn_mask"),
                        local_window=kwargs.get("local_window", 0), scale=kwargs.get("scale"),
                        softcap=kwargs.get("softcap"), key_t_scale=kwargs.get("key_t_scale"))
    with torch.no_grad():
        out = sparq_ext.attention(q, K, V, r=r, k=k, **kwargs)
        ref = sparq_attention_reference(q, K, V, r=r, k=k, **kwargs)
    assert out.is_cuda and out.dtype == q.dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), **tolerance(q.dtype, "cuda"))
    return out


def capture_attention(q, K, V, **kwargs):
    """``sparq_ext.attention(q, K, V, **kwargs)`` captured in a CUDA graph, after warming the
    allocator up on a side stream: the graph and its output buffer."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            sparq_ext.attention(q, K, V, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparq_ext.attention(q, K, V, **kwargs)
    return graph, out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
# Around the single-block top-k's shared-memory limit (12000, 12288), the multi-block threshold
# (32768, 32769), past it with a ragged tail (70000) and the longest standard cache (131072).
@pytest.mark.parametrize("S", [12000, 12288, 32768, 32769, 70000, 131072])
def test_long_caches(dtype, S):
    q, K, V, Kt = cuda_inputs(2, 16, 4, S, 128, dtype, seed=S)
    k = S // 16
    seq_lens = torch.tensor([S, S // 2 + 1], device="cuda")
    check_against_reference(q, K, V, 16, k, key_t=Kt, seq_lens=seq_lens, local_window=k // 4)
    check_against_reference(q[:1], K[:1], V[:1], 16, k, key_t=Kt[:1])  # B = 1: the fewest blocks


def test_repeated_calls_agree():
    q, K, V, Kt = cuda_inputs(2, 8, 2, 5000, 128, seed=20)
    with torch.no_grad():
        a = sparq_ext.attention(q, K, V, r=16, k=300, key_t=Kt)
        b = sparq_ext.attention(q, K, V, r=16, k=300, key_t=Kt)
    torch.testing.assert_close(a, b, atol=1e-2, rtol=0)  # split order may vary in the last bit


def test_no_host_sync_in_an_eager_call():
    q, K, V, Kt = cuda_inputs(3, 8, 2, 3000, 128, seed=30)
    seq_lens = torch.tensor([3000, 1200, 0], device="cuda")
    mask = torch.ones(3, 1, 1, 3000, dtype=torch.bool, device="cuda")
    mask[1, ..., :100] = False
    kwargs = dict(r=16, k=256, key_t=Kt, seq_lens=seq_lens, attn_mask=mask, local_window=32)
    with torch.no_grad():
        sparq_ext.attention(q, K, V, **kwargs)  # first call: workspace allocation may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = sparq_ext.attention(q, K, V, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


def test_side_stream_orders_with_its_inputs():
    q, K, V, Kt = cuda_inputs(2, 8, 2, 4000, 128, seed=31)
    with torch.no_grad():
        expected = sparq_ext.attention(q, K, V, r=16, k=256, key_t=Kt)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # inputs written and read on the side stream only
            q2 = q * 1.0
            out = sparq_ext.attention(q2, K, V, r=16, k=256, key_t=Kt)
        torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=0)


def test_cuda_graph_capture_and_replay():
    B, Hq, Hkv, S, D = 2, 8, 2, 4000, 128
    q, K, V, Kt = cuda_inputs(B, Hq, Hkv, S, D, seed=21)
    seq_lens = torch.tensor([4000, 2500], device="cuda")
    kwargs = dict(r=16, k=256, key_t=Kt, seq_lens=seq_lens, local_window=64)
    with torch.no_grad():
        eager = sparq_ext.attention(q, K, V, **kwargs)
        graph, static_out = capture_attention(q, K, V, **kwargs)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, eager, atol=1e-2, rtol=0)
        # New data in the captured buffers, seq_lens included: the replay follows it.
        q2, K2, V2, Kt2 = cuda_inputs(B, Hq, Hkv, S, D, seed=22)
        new_lens = torch.tensor([1000, 3999], device="cuda")
        q2 = separated_query(q2, K2, 16, 256, key_t=Kt2, seq_lens=new_lens, local_window=64)
        for buffer, new in ((q, q2), (K, K2), (V, V2), (Kt, Kt2), (seq_lens, new_lens)):
            buffer.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        ref = sparq_attention_reference(q, K, V, 16, 256, Kt, None, seq_lens, None, 64)
    torch.testing.assert_close(static_out.float(), ref.float(), **tolerance(q.dtype, "cuda"))


def test_torch_compile_fullgraph():
    q, K, V, Kt = cuda_inputs(2, 8, 2, 3000, 128, torch.float16, seed=23)
    mask = torch.ones(2, 1, 1, 3000, dtype=torch.bool, device="cuda")
    mask[1, ..., :100] = False

    def step(q, K, V, Kt, mask):
        return sparq_ext.attention(q * 1.0, K, V, r=16, k=256, key_t=Kt, attn_mask=mask,
                                   local_window=32) + 0.0

    with torch.no_grad():
        got = torch.compile(step, fullgraph=True)(q, K, V, Kt, mask)
        eager = step(q, K, V, Kt, mask)
    torch.testing.assert_close(got, eager, atol=4e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("key_t_dtype", ["cache", "int8"])
def test_softcap_sinks_and_int8_key_t_without_host_sync(dtype, key_t_dtype):
    # G = 12 (two group chunks: with softcap one approx_logits block forms both), rows over
    # several topk blocks and partitions, a ragged batch with an empty row; the key_t in the
    # cache's dtype or the 8-bit selection cache.
    q, K, V, Kt = cuda_inputs(3, 24, 2, 9000, 128, dtype, seed=40)
    q = (q.float() * 3).to(dtype)  # logits of a few units: softcap 5 bends them
    sinks = torch.randn(24, generator=torch.Generator().manual_seed(41)).cuda() * 2 + 9
    seq_lens = torch.tensor([9000, 4000, 0], device="cuda")
    kwargs = dict(key_t=Kt, seq_lens=seq_lens, local_window=32, softcap=5.0, sinks=sinks)
    if key_t_dtype == "int8":
        kwargs["key_t"], kwargs["key_t_scale"] = sparq_ext.quantize_key_t(K)
    out = check_against_reference(q, K, V, 16, 560, **kwargs)
    assert not out[2].any()
    with torch.no_grad():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = sparq_ext.attention(q, K, V, r=16, k=560, reallocate=False, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(again).all()


def test_int8_key_t_cuda_graph_capture_and_replay():
    B, Hq, Hkv, S, D = 2, 8, 2, 4000, 128
    q, K, V, _ = cuda_inputs(B, Hq, Hkv, S, D, seed=42)
    Kt, kscale = sparq_ext.quantize_key_t(K)
    seq_lens = torch.tensor([4000, 2500], device="cuda")
    kwargs = dict(r=28, k=256, key_t=Kt, key_t_scale=kscale, seq_lens=seq_lens, local_window=64)
    with torch.no_grad():
        graph, static_out = capture_attention(q, K, V, **kwargs)
        # New data in the captured buffers, the 8-bit keys, scales and lengths included.
        q2, K2, V2, _ = cuda_inputs(B, Hq, Hkv, S, D, seed=43)
        Kt2, kscale2 = sparq_ext.quantize_key_t(K2)
        new_lens = torch.tensor([1000, 3999], device="cuda")
        q2 = separated_query(q2, K2, 28, 256, key_t=Kt2, key_t_scale=kscale2, seq_lens=new_lens,
                             local_window=64)
        for buffer, new in ((q, q2), (K, K2), (V, V2), (Kt, Kt2), (kscale, kscale2),
                            (seq_lens, new_lens)):
            buffer.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        ref = sparq_attention_reference(q, K, V, 28, 256, Kt, None, seq_lens, None, 64,
                                        key_t_scale=kscale)
    torch.testing.assert_close(static_out.float(), ref.float(), **tolerance(q.dtype, "cuda"))


def test_opcheck():
    q, K, V, Kt = cuda_inputs(1, 4, 2, 500, 64, torch.float32, seed=24)
    torch.library.opcheck(torch.ops.sparq_ext.attention.default, (q, K, V),
                          dict(r=8, k=64, key_t=Kt, local_window=8),
                          test_utils=("test_schema", "test_faketensor"))


def test_rejects_mixed_devices_and_unsupported_head_dim():
    q, K, V, _ = cuda_inputs(1, 2, 1, 50, 64, torch.float32, seed=25)
    with pytest.raises(ValueError, match="key must be on the query's device"):
        sparq_ext.attention(q, K.cpu(), V, r=4, k=8)
    q5, K5, V5, _ = cuda_inputs(1, 2, 1, 50, 512, torch.float32, seed=26)
    with pytest.raises(RuntimeError, match="head_dim"):
        torch.ops.sparq_ext.attention(q5, K5, V5, r=4, k=8)
