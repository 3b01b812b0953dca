// Exact top-k selection over the step-1 selection scores of one (batch, KV head), in O(S).
//
// Scores are fp32: +inf for the forced local window, -inf for invalid positions, finite
// otherwise. A histogram over linear buckets of [min, max] of the finite scores (float
// subtraction and multiplication by a positive constant are monotone under IEEE rounding, so
// a higher bucket never holds a smaller score) finds the bucket of the k-th largest; one more
// pass emits everything above it and collects that bucket, resolved exactly with
// nth_element. Pure C++ (no torch), so that it can be unit-tested on its own.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>

namespace sparq::cpu {

constexpr int kSelectBuckets = 2048;

struct BucketMap {
  float lo, inv;
  inline int operator()(float x) const {
    float f = (x - lo) * inv;
    if (!(f >= 0.0f)) f = 0.0f;  // also NaN (0 * inf) at x == lo
    if (f > static_cast<float>(kSelectBuckets - 1)) f = static_cast<float>(kSelectBuckets - 1);
    return static_cast<int>(f);
  }
};

// Select `want` positions among scores[begin, end) (all of them when want >= the number of
// positions with score > -inf) into `out`; returns how many were written. `finite_lo/hi`:
// min/max of the finite scores (lo > hi when there are none). `cand` needs room for
// end - begin entries.
inline int64_t select_topk(const float* scores, int64_t begin, int64_t end, int64_t want,
                           float finite_lo, float finite_hi, int64_t* out,
                           std::pair<float, int64_t>* cand) {
  int64_t n_out = 0;
  if (want <= 0) return 0;
  int64_t counts[kSelectBuckets] = {};
  int64_t n_inf = 0, n_finite = 0;
  BucketMap bucket{finite_lo, 0.0f};
  if (finite_hi > finite_lo) {
    const float range = finite_hi - finite_lo;
    bucket.inv = std::isfinite(range) ? static_cast<float>(kSelectBuckets) / range : 0.0f;
  }
  for (int64_t s = begin; s < end; ++s) {
    const float x = scores[s];
    if (x == INFINITY) {
      ++n_inf;
    } else if (x > -INFINITY) {
      ++counts[bucket(x)];
      ++n_finite;
    }
  }
  if (want >= n_inf + n_finite) {  // everything valid is selected (dense limit)
    for (int64_t s = begin; s < end; ++s)
      if (scores[s] > -INFINITY) out[n_out++] = s;
    return n_out;
  }
  int64_t need = want - n_inf;  // finite scores still to take (n_inf <= want by contract)
  if (need <= 0) {
    for (int64_t s = begin; s < end && n_out < want; ++s)
      if (scores[s] == INFINITY) out[n_out++] = s;
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
  int64_t n_cand = 0;
  for (int64_t s = begin; s < end; ++s) {
    const float x = scores[s];
    if (x == INFINITY) {
      out[n_out++] = s;
    } else if (x > -INFINITY) {
      const int b = bucket(x);
      if (b > threshold) out[n_out++] = s;
      else if (b == threshold) cand[n_cand++] = {x, s};
    }
  }
  const int64_t take = need - above;  // 1 <= take <= n_cand
  if (take < n_cand) {
    std::nth_element(cand, cand + take - 1, cand + n_cand,
                     [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
                       return a.first > b.first || (a.first == b.first && a.second < b.second);
                     });
  }
  for (int64_t i = 0; i < take; ++i) out[n_out++] = cand[i].second;
  return n_out;
}

}  // namespace sparq::cpu
