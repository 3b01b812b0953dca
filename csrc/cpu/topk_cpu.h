// Exact top-k selection over the approx_logits selection scores of one (batch, KV head), in O(S).
//
// Scores are fp32: +inf for the forced local window, -inf for invalid positions, finite
// otherwise. Pass 1 builds a histogram over linear buckets of [min, max] of the finite scores
// (bucket = trunc(fma(x, inv, bias)), clamped: monotone in x because every step rounds
// monotonically, so a higher bucket never holds a smaller score) and finds the bucket T of
// the k-th largest. The bucket edges are turned back into two float cuts by a binary search
// over order-preserving keys (sparq/math.h), so pass 2 is plain float compares: every score
// >= cut(T+1) is taken, scores in [cut(T), cut(T+1)) are candidates resolved exactly with
// nth_element. Both passes run on whole vectors; indices come out in ascending order so that
// attend walks the key/value cache forward. Ties: any valid choice (lowest index here).
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "cpu/cpu_simd.h"
#include "sparq/math.h"

namespace sparq::cpu {

constexpr int kSelectBuckets = 2048;

struct BucketMap {
  float inv = 0.0f, bias = 0.0f;  // bucket(x) = clamp(trunc(x * inv + bias), 0, kSelectBuckets - 1)

  BucketMap(float lo, float hi) {
    const float range = hi - lo;
    // inv stays finite and > 0, so no 0 * inf: a zero, tiny or overflowing range just puts
    // (almost) everything in one bucket, still exact, only slower.
    inv = (hi > lo && std::isfinite(range)) ? static_cast<float>(kSelectBuckets) / range : 1e-30f;
    if (!std::isfinite(inv)) inv = 1e-30f;
    bias = std::isfinite(lo) ? -lo * inv : 0.0f;
  }
  int operator()(float x) const {  // the same arithmetic as vec() for every non-NaN x
    float f = std::fma(x, inv, bias);
    f = f > 0.0f ? f : 0.0f;
    f = f < static_cast<float>(kSelectBuckets - 1) ? f : static_cast<float>(kSelectBuckets - 1);
    return static_cast<int>(f);
  }
  at::vec::Vectorized<int32_t> vec(const fVec& x) const {
    fVec f = at::vec::fmadd(x, fVec(inv), fVec(bias));
    f = at::vec::minimum(at::vec::maximum(f, fVec(0.0f)), fVec(static_cast<float>(kSelectBuckets - 1)));
    return at::vec::maximum(at::vec::convert_to_int_of_same_size(f),
                            at::vec::Vectorized<int32_t>(0));  // NaN -> INT_MIN -> 0
  }
  // Smallest non-NaN float x with bucket(x) >= b (b <= kSelectBuckets - 1), by binary search
  // over order-preserving keys.
  float cut(int b) const {
    uint32_t lo = float_to_ordered(-INFINITY), hi = float_to_ordered(INFINITY);
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if ((*this)(ordered_to_float(mid)) >= b) hi = mid;
      else lo = mid + 1;
    }
    return ordered_to_float(lo);
  }
};

inline int lane_bits(const fVec& cmp) {  // lanes where a comparison result is true
  return ~cmp.zero_mask() & static_cast<int>((1u << kVec) - 1u);
}

// Scores of [s, s + kVec) with lanes past `end` read as -inf (never selected).
inline fVec load_scores(const float* scores, int64_t s, int64_t end) {
  const int64_t c = std::min<int64_t>(kVec, end - s);
  if (c == kVec) return fVec::loadu(scores + s);
  return fVec::set(fVec(-INFINITY), fVec::loadu(scores + s, c), c);
}

// Select min(want, #scores > -inf) positions among scores[begin, end) into `out` (ascending);
// returns how many. `finite_lo/hi`: min/max of the finite scores (lo > hi when there are
// none).
inline int64_t select_topk_histogram(const float* scores, int64_t begin, int64_t end, int64_t want,
                           float finite_lo, float finite_hi, int64_t* out) {
  if (want <= 0 || end <= begin) return 0;
  const BucketMap bucket(finite_lo, finite_hi);
  int32_t counts[kSelectBuckets] = {};
  int64_t n_pos_inf = 0, n_neg_inf = 0;
  const fVec pos_inf(INFINITY), neg_inf(-INFINITY);
  alignas(64) int32_t lanes[kVec];
  for (int64_t s = begin; s < end; s += kVec) {
    const fVec x = load_scores(scores, s, end);
    n_pos_inf += __builtin_popcount(lane_bits(x == pos_inf));
    n_neg_inf += __builtin_popcount(lane_bits(x == neg_inf));
    bucket.vec(x).store(lanes);
    for (int l = 0; l < kVec; ++l) ++counts[lanes[l]];
  }
  counts[kSelectBuckets - 1] -= static_cast<int32_t>(n_pos_inf);  // +inf landed in the top
  counts[0] -= static_cast<int32_t>(n_neg_inf);                   // and -inf in the bottom bucket
  const int64_t lanes_read = (end - begin + kVec - 1) / kVec * kVec;
  const int64_t n_finite = lanes_read - n_pos_inf - n_neg_inf;

  int64_t n_out = 0;
  auto emit_where = [&](float lo_cut) {  // the first `want` scores >= lo_cut, in order
    for (int64_t s = begin; s < end; s += kVec) {
      for (int bits = lane_bits(load_scores(scores, s, end) >= fVec(lo_cut)); bits; bits &= bits - 1) {
        if (n_out == want) return;
        out[n_out++] = s + __builtin_ctz(bits);
      }
    }
  };
  if (want >= n_pos_inf + n_finite) {  // everything valid is selected (dense limit)
    emit_where(-FLT_MAX);
    return n_out;
  }
  const int64_t need = want - n_pos_inf;  // finite scores still to take
  if (need <= 0) {  // the +inf scores (the window) alone fill k: the first `want` of them
    emit_where(INFINITY);
    return n_out;
  }
  int threshold = 0;
  int64_t above = 0;
  for (int b = kSelectBuckets - 1; b >= 0; --b) {
    if (above + counts[b] >= need) {
      threshold = b;
      break;
    }
    above += counts[b];
  }
  const float hi_cut = threshold == kSelectBuckets - 1 ? INFINITY : bucket.cut(threshold + 1);
  const float lo_cut = std::max(bucket.cut(threshold), -FLT_MAX);
  // Exactly the finite scores of bucket T fall in [lo_cut, hi_cut): usually a few dozen.
  std::vector<std::pair<float, int64_t>> cand_store(std::max<int32_t>(counts[threshold], 1));
  std::pair<float, int64_t>* cand = cand_store.data();
  const int64_t cand_cap = static_cast<int64_t>(cand_store.size());
  int64_t n_cand = 0;
  for (int64_t s = begin; s < end; s += kVec) {
    const fVec x = load_scores(scores, s, end);
    const int ge_lo = lane_bits(x >= fVec(lo_cut));
    if (!ge_lo) continue;
    const int ge_hi = lane_bits(x >= fVec(hi_cut));
    for (int bits = ge_hi; bits; bits &= bits - 1) out[n_out++] = s + __builtin_ctz(bits);
    for (int bits = ge_lo & ~ge_hi; bits; bits &= bits - 1) {
      const int64_t i = s + __builtin_ctz(bits);
      if (n_cand < cand_cap) cand[n_cand++] = {scores[i], i};
    }
  }
  const int64_t take = std::min(need - above, n_cand);  // >= 1 by the choice of threshold
  if (take < n_cand) {
    std::nth_element(cand, cand + take - 1, cand + n_cand,
                     [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
                       return a.first > b.first || (a.first == b.first && a.second < b.second);
                     });
  }
  const int64_t n_above = n_out;
  for (int64_t i = 0; i < take; ++i) out[n_out++] = cand[i].second;
  std::sort(out + n_above, out + n_out);
  std::inplace_merge(out, out + n_above, out + n_out);
  return n_out;
}

// Copies the scores >= cut of [begin, end) and their positions to values/positions (room
// for cap + kVec), in position order; returns how many, or cap + 1 once more than cap pass.
// `finite_max`: the largest finite score that passed (-inf if none).
inline int64_t compact_at_or_above(const float* scores, int64_t begin, int64_t end, float cut,
                                   int64_t cap, float* values, int32_t* positions,
                                   float* finite_max) {
  int64_t n = 0;
#if defined(CPU_CAPABILITY_AVX512)
  // Compress in registers, then store whole vectors: no branch per passing lane (they are
  // scattered, so a per-lane loop mispredicts about once per vector), and no compress-to-
  // memory form, which is several times slower than a register compress plus a plain store.
  // The stores write up to kVec - 1 lanes past the passing ones: room the caller provides.
  const __m512 cut_v = _mm512_set1_ps(cut);
  const __m512 inf_v = _mm512_set1_ps(INFINITY);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 max_v = _mm512_set1_ps(-INFINITY);
  for (int64_t s = begin; s < end; s += kVec) {
    if (n > cap) return cap + 1;
    const __m512 x = load_scores(scores, s, end);
    const __mmask16 pass = _mm512_cmp_ps_mask(x, cut_v, _CMP_GE_OQ);
    max_v = _mm512_mask_max_ps(max_v, _mm512_mask_cmp_ps_mask(pass, x, inf_v, _CMP_LT_OQ),
                               max_v, x);
    _mm512_storeu_ps(values + n, _mm512_maskz_compress_ps(pass, x));
    _mm512_storeu_si512(positions + n,
                        _mm512_maskz_compress_epi32(
                            pass, _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(s)))));
    n += __builtin_popcount(pass);
  }
  if (n > cap) return cap + 1;
  *finite_max = _mm512_reduce_max_ps(max_v);
#else
  const fVec cut_v(cut);
  float max_finite = -INFINITY;
  for (int64_t s = begin; s < end; s += kVec) {
    for (int bits = lane_bits(load_scores(scores, s, end) >= cut_v); bits; bits &= bits - 1) {
      if (n == cap) return cap + 1;
      const int64_t i = s + __builtin_ctz(bits);
      values[n] = scores[i];
      positions[n++] = static_cast<int32_t>(i);
      if (scores[i] < INFINITY) max_finite = std::max(max_finite, scores[i]);
    }
  }
  *finite_max = max_finite;
#endif
  return n;
}

// A cut that at least rank + 1 of the n samples (n a multiple of kVec, no NaN) lie at or
// above: the bucket edge below the sample's rank-th largest, from a histogram of the sample
// over the buckets of [lo, hi]. (nth_element on the sample costs ~20 cycles per element in
// mispredicted branches, more than the compaction pass it prepares.) -inf when the rank
// falls into the bottom bucket.
inline float sample_cut(const float* sample, int64_t n, int64_t rank, float lo, float hi) {
  const BucketMap bucket(lo, hi);
  int32_t counts[kSelectBuckets] = {};
  alignas(64) int32_t lanes[kVec];
  for (int64_t i = 0; i < n; i += kVec) {
    bucket.vec(fVec::loadu(sample + i)).store(lanes);
    for (int l = 0; l < kVec; ++l) ++counts[lanes[l]];
  }
  int64_t at_or_above = 0;
  for (int b = kSelectBuckets - 1; b > 0; --b) {
    at_or_above += counts[b];
    if (at_or_above > rank) return bucket.cut(b);
  }
  return -INFINITY;
}

// select_topk_histogram's two passes over all of scores cost ~1 ns per score, as much as a
// tenth of a decode step. Usually far fewer suffice: a cut from a strided sample of the
// scores leaves a little over `want` positions at or above it; one vectorised compare pass
// compacts them (in position order) and the histogram select runs on those few. Exact for
// any input: when the sample misjudges (fewer than `want` or more than `cap` positions pass
// the cut, or it holds a NaN) the histogram runs on all of scores. The result is the same
// either way: the `want` largest (+inf first), ties to the lowest position, ascending.
inline int64_t select_topk(const float* scores, int64_t begin, int64_t end, int64_t want,
                           float finite_lo, float finite_hi, int64_t* out) {
  constexpr int64_t kSample = 1024;
  const int64_t len = end - begin;
  if (want <= 0 || len < 4 * kSample || want * 4 > len)  // small or dense: histogram as is
    return select_topk_histogram(scores, begin, end, want, finite_lo, finite_hi, out);

  // The cut: the sample's order statistic that a quarter more than want/len of the
  // positions (plus a margin for the sampling error) should pass.
  float sample[kSample];
  const int64_t stride = len / kSample;
  bool usable = true;
  for (int64_t i = 0; i < kSample; ++i) {
    sample[i] = scores[begin + i * stride];
    usable &= !std::isnan(sample[i]);
  }
  const int64_t rank = std::min<int64_t>(kSample - 1, want * 5 * kSample / (4 * len) + 24);
  const float cut = usable ? sample_cut(sample, kSample, rank, finite_lo, finite_hi) : NAN;
  if (usable && cut > -INFINITY && cut < INFINITY) {
    const int64_t cap = 2 * want + 256;
    std::unique_ptr<float[]> values(new float[cap + kVec]);
    std::unique_ptr<int32_t[]> positions(new int32_t[cap + kVec]);  // S < 2^31 (checked)
    std::unique_ptr<int64_t[]> picked(new int64_t[want]);
    float hi = -INFINITY;  // largest finite score that passed
    const int64_t n = compact_at_or_above(scores, begin, end, cut, cap, values.get(),
                                          positions.get(), &hi);
    if (n >= want && n <= cap) {
      const int64_t taken = select_topk_histogram(values.get(), 0, n, want, cut, hi, picked.get());
      for (int64_t j = 0; j < taken; ++j) out[j] = positions[picked[j]];  // still ascending
      return taken;
    }
  }
  return select_topk_histogram(scores, begin, end, want, finite_lo, finite_hi, out);
}

}  // namespace sparq::cpu
