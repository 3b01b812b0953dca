"""What only the native CPU kernel (csrc/cpu/) has: results independent of the thread count, and
its exact top-k selection (csrc/cpu/topk_cpu.h) through the test hook ``_cpu_select_topk``.
Its agreement with the reference on every option is in test_backends.py."""

from __future__ import annotations

import pytest
import torch

import sparq_ext
from sparq_testutil import backend_unavailable, make_inputs

_why = backend_unavailable("cpu")  # where the kernel is required, conftest.py fails the run instead
pytestmark = pytest.mark.skipif(_why is not None, reason=f"native CPU kernel: {_why}")


@pytest.mark.slow
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
