"""The host/device shared math of csrc/include/sparq/math.h, through the test hooks in
``sparq_ext._C``. The CUDA kernels use exactly these functions (order-preserving keys and
digits for the radix top-k, online-softmax push/merge for the attention splits, the step-1
scale), so these CPU tests cover the GPU's arithmetic. Runs without a GPU.
"""

from __future__ import annotations

import math
import struct

import pytest
import torch

import sparq_ext

_C = pytest.importorskip("sparq_ext._C", reason="the compiled extension is not built")

INF = math.inf


def f32(x: float) -> float:
    """Round a Python float to float32."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def from_bits(u: int) -> float:
    return struct.unpack("<f", struct.pack("<I", u))[0]


DENORM_MIN = from_bits(0x00000001)
DENORM_MAX = from_bits(0x007FFFFF)
NORMAL_MIN = from_bits(0x00800000)
FLOAT_MAX = from_bits(0x7F7FFFFF)

SPECIAL = [
    -INF, -FLOAT_MAX, -1e30, -2.5, -1.0, -NORMAL_MIN, -DENORM_MAX, -DENORM_MIN, -0.0,
    0.0, DENORM_MIN, DENORM_MAX, NORMAL_MIN, 1e-30, 1.0, 1.5, 2.0, 3e38, FLOAT_MAX, INF,
]


def test_extension_loaded():
    assert sparq_ext.extension_error is None


class TestOrderedKeys:
    def test_special_values_are_ordered(self):
        keys = [_C._float_to_ordered(x) for x in SPECIAL]
        for (a, ka), (b, kb) in zip(zip(SPECIAL, keys), zip(SPECIAL[1:], keys[1:])):
            if a < b:
                assert ka < kb, (a, b, hex(ka), hex(kb))
            else:  # -0.0 == 0.0: the keys differ by one, in the float bits' order
                assert (a, b) == (-0.0, 0.0) and kb == ka + 1

    def test_known_keys(self):
        assert _C._float_to_ordered(0.0) == 0x80000000
        assert _C._float_to_ordered(-0.0) == 0x7FFFFFFF
        assert _C._float_to_ordered(INF) == 0xFF800000
        assert _C._float_to_ordered(-INF) == 0x007FFFFF  # kNegInfKey in the CUDA kernels

    @pytest.mark.parametrize("x", SPECIAL)
    def test_round_trip_is_bit_exact(self, x):
        back = _C._ordered_to_float(_C._float_to_ordered(x))
        assert bits(back) == bits(x)

    def test_random_floats_sorted_by_key(self):
        g = torch.Generator().manual_seed(0)
        raw = torch.randint(0, 2**32, (4000,), generator=g, dtype=torch.int64)
        values = [from_bits(int(u)) for u in raw]
        values = [v for v in values if not math.isnan(v)] + SPECIAL
        by_key = sorted(values, key=_C._float_to_ordered)
        assert all(a <= b for a, b in zip(by_key, by_key[1:]))

    def test_every_key_round_trips(self):
        g = torch.Generator().manual_seed(1)
        for key in torch.randint(0, 2**32, (2000,), generator=g, dtype=torch.int64).tolist():
            x = _C._ordered_to_float(key)
            if not math.isnan(x):
                assert _C._float_to_ordered(x) == key


class TestRadixDigits:
    def test_digits_rebuild_the_key(self):
        g = torch.Generator().manual_seed(2)
        for key in torch.randint(0, 2**32, (500,), generator=g, dtype=torch.int64).tolist():
            digits = [_C._radix_digit(key, p) for p in range(4)]
            assert all(0 <= d < 256 for d in digits)
            assert sum(d << (24 - 8 * p) for p, d in enumerate(digits)) == key

    def test_top_digit_orders_keys(self):
        keys = sorted(_C._float_to_ordered(x) for x in SPECIAL)
        tops = [_C._radix_digit(k, 0) for k in keys]
        assert tops == sorted(tops)


def _check_topk(scores: torch.Tensor, k: int):
    picked = _C._radix_topk(scores, k)
    assert picked.dtype == torch.int64 and picked.numel() == k
    assert picked.unique().numel() == k, "indices must be distinct"
    expect = torch.topk(scores, k).values.sort().values
    got = scores[picked].sort().values
    assert torch.equal(got, expect), "the selected values must be exactly the top-k values"


class TestRadixTopk:
    @pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (256, 1), (1000, 999), (4096, 512),
                                     (10000, 1), (10000, 10000)])
    def test_random(self, n, k):
        g = torch.Generator().manual_seed(n * 31 + k)
        _check_topk(torch.randn(n, generator=g), k)

    @pytest.mark.parametrize("k", [1, 5, 50, 99, 100])
    def test_heavy_ties(self, k):
        g = torch.Generator().manual_seed(k)
        scores = torch.randint(0, 3, (100,), generator=g).float()
        _check_topk(scores, k)

    def test_all_equal(self):
        _check_topk(torch.full((333,), 0.25), 100)

    def test_infinities_like_the_kernels(self):
        # +inf (local window) always in, -inf (invalid) only when k exceeds the rest.
        g = torch.Generator().manual_seed(3)
        scores = torch.randn(500, generator=g)
        scores[-8:] = INF
        scores[:100] = -INF
        for k in (8, 9, 100, 400, 450, 500):
            _check_topk(scores, k)
        picked = set(_C._radix_topk(scores, 8).tolist())
        assert picked == set(range(492, 500))

    def test_signed_zeros_denormals_and_close_values(self):
        values = [-0.0, 0.0, DENORM_MIN, -DENORM_MIN, DENORM_MAX, NORMAL_MIN, 1.0,
                  f32(1.0 + 2**-23), -1.0, f32(-1.0 - 2**-23)]
        scores = torch.tensor(values * 7, dtype=torch.float32)
        for k in range(1, scores.numel() + 1, 5):
            _check_topk(scores, k)

    def test_values_sharing_top_digits(self):
        # Logits in a narrow range share their top radix digits: the later passes decide.
        g = torch.Generator().manual_seed(4)
        scores = 1.0 + torch.rand(20000, generator=g) * 1e-3
        _check_topk(scores, 1234)

    def test_rejects_bad_k(self):
        with pytest.raises(RuntimeError):
            _C._radix_topk(torch.randn(5), 0)
        with pytest.raises(RuntimeError):
            _C._radix_topk(torch.randn(5), 6)


def _state(xs):
    m, l = -INF, 0.0
    for x in xs:
        m, l = _C._softmax_push(m, l, x)
    return m, l


class TestOnlineSoftmax:
    def test_push_matches_logsumexp(self):
        xs = [0.5, -3.0, 10.0, 2.0, -INF, 7.5]
        m, l = _state(xs)
        finite = torch.tensor([x for x in xs if x != -INF], dtype=torch.float64)
        assert m == pytest.approx(finite.max().item())
        assert m + math.log(l) == pytest.approx(torch.logsumexp(finite, 0).item(), rel=1e-6)

    def test_push_minus_inf_is_a_no_op(self):
        assert _C._softmax_push(-INF, 0.0, -INF) == (-INF, 0.0)
        assert _C._softmax_push(1.0, 2.0, -INF) == (1.0, 2.0)

    def test_empty_states(self):
        assert _C._softmax_merge(-INF, 0.0, -INF, 0.0) == (-INF, 0.0)
        s = _state([1.0, 2.0])
        assert _C._softmax_merge(*s, -INF, 0.0) == pytest.approx(s)
        assert _C._softmax_merge(-INF, 0.0, *s) == pytest.approx(s)
        for v in _C._softmax_merge(-INF, 0.0, -INF, 0.0):
            assert not math.isnan(v)

    def test_merge_equals_sequential(self):
        g = torch.Generator().manual_seed(5)
        xs = (torch.randn(64, generator=g) * 20).tolist()
        whole = _state(xs)
        for cut in (0, 1, 17, 63, 64):
            merged = _C._softmax_merge(*_state(xs[:cut]), *_state(xs[cut:]))
            assert merged[0] == whole[0]
            assert merged[1] == pytest.approx(whole[1], rel=1e-5)

    def test_merge_is_associative_and_commutative(self):
        g = torch.Generator().manual_seed(6)
        parts = [_state((torch.randn(9, generator=g) * 30).tolist()) for _ in range(3)]
        a, b, c = parts
        left = _C._softmax_merge(*_C._softmax_merge(*a, *b), *c)
        right = _C._softmax_merge(*a, *_C._softmax_merge(*b, *c))
        assert left[0] == right[0] and left[1] == pytest.approx(right[1], rel=1e-5)
        assert _C._softmax_merge(*a, *b) == pytest.approx(_C._softmax_merge(*b, *a), rel=1e-6)

    def test_large_spread_stays_finite(self):
        m, l = _C._softmax_merge(*_state([1e4]), *_state([-1e4]))
        assert m == 1e4 and l == pytest.approx(1.0)


class TestApproxLogitScale:
    def test_formula(self):
        # gamma = |q_hat|_1 / |q|_1; scale / sqrt(gamma).
        assert _C._approx_logit_scale(2.0, 8.0, 0.125) == pytest.approx(0.125 / math.sqrt(0.25))
        assert _C._approx_logit_scale(5.0, 5.0, 0.5) == pytest.approx(0.5)

    def test_zero_query_stays_finite(self):
        for hat, full in ((0.0, 0.0), (0.0, 3.0), (1e-38, 1e-38)):
            v = _C._approx_logit_scale(hat, full, 0.1)
            assert math.isfinite(v) and v > 0

    def test_matches_reference_formula(self):
        g = torch.Generator().manual_seed(7)
        q = torch.randn(16, 128, generator=g)
        i1 = q.abs().topk(16, dim=-1).indices
        hat = q.gather(-1, i1).abs().sum(-1)
        full = q.abs().sum(-1)
        ref = 0.088 / (hat / full).sqrt()
        got = torch.tensor([_C._approx_logit_scale(h, f, 0.088)
                            for h, f in zip(hat.tolist(), full.tolist())])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)


class TestNaNKeys:
    """docs/cuda-pipeline.md's NaN rule: every NaN ranks below -inf (key 0), so a positive
    NaN can never outrank the local window's +inf."""

    @pytest.mark.parametrize("nan_bits", [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF])
    def test_every_nan_is_the_smallest_key(self, nan_bits):
        key = _C._float_to_ordered(from_bits(nan_bits))
        assert key == 0
        assert key < _C._float_to_ordered(-INF) < _C._float_to_ordered(INF)
