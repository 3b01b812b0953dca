// Exact top-k selection over the stage-1 selection scores of one (batch, KV head), in O(S).
//
// Scores are fp32: +inf for the forced local window, -inf for invalid positions, finite
// otherwise. Pass 1 builds a histogram over linear buckets of [min, max] of the finite scores
// (bucket = trunc(fma(x, inv, bias)), clamped: monotone in x because every step rounds
// monotonically, so a higher bucket never holds a smaller score) and finds the bucket T of
// the k-th largest. The bucket edges are turned back into two float cuts by a binary search
// over order-preserving keys (sparq/math.h), so pass 2 is plain float compares: every score
// >= cut(T+1) is taken, scores in [cut(T), cut(T+1)) are candidates resolved exactly with
// nth_element. Both passes run on whole vectors; indices come out in ascending order so that
// stage 2 walks the key/value cache forward. Ties: any valid choice (lowest index here).
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
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
inline int64_t select_topk(const float* scores, int64_t begin, int64_t end, int64_t want,
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
  auto emit_where = [&](float lo_cut) {  // every score >= lo_cut, in order
    for (int64_t s = begin; s < end; s += kVec) {
      for (int bits = lane_bits(load_scores(scores, s, end) >= fVec(lo_cut)); bits; bits &= bits - 1)
        out[n_out++] = s + __builtin_ctz(bits);
    }
  };
  if (want >= n_pos_inf + n_finite) {  // everything valid is selected (dense limit)
    emit_where(-FLT_MAX);
    return n_out;
  }
  const int64_t need = want - n_pos_inf;  // finite scores still to take
  if (need <= 0) {  // the window alone fills k (only when want == n_pos_inf here)
    emit_where(INFINITY);
    n_out = std::min(n_out, want);
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

}  // namespace sparq::cpu
