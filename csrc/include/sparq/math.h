// Shared SparQ math, usable from host (CPU kernels, unit tests) and device (CUDA kernels).
//
// Everything here is header-only, free of torch headers, and `SPARQ_HD` so that the CPU tests
// exercise exactly the code the GPU runs: the order-preserving key mapping and digit
// extraction used by the radix top-k, the online-softmax state and its merge, and the
// scale formula of step 1.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SPARQ_HD __host__ __device__ __forceinline__
#else
#define SPARQ_HD inline
#endif

namespace sparq {

// ---------------------------------------------------------------------------------------
// Order-preserving float <-> uint32 keys (radix select over approximate logits).
//
// a < b (as floats, -inf < finite < +inf)  <=>  float_to_ordered(a) < float_to_ordered(b).
// Positive floats get the sign bit set; negative floats are bit-inverted so that larger
// magnitudes sort lower. Every NaN (either sign, any payload) maps to key 0, below -inf:
// without that rule a positive NaN would map above +inf and outrank the local window.
// NaN is tested on the bits, not with x != x, which --use_fast_math may fold away.
// ---------------------------------------------------------------------------------------
SPARQ_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

SPARQ_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

SPARQ_HD bool is_nan_bits(float x) { return (float_bits(x) & 0x7fffffffu) > 0x7f800000u; }

constexpr uint32_t kNaNKey = 0u;

SPARQ_HD uint32_t float_to_ordered(float x) {
  const uint32_t u = float_bits(x);
  if (is_nan_bits(x)) return kNaNKey;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

SPARQ_HD float ordered_to_float(uint32_t key) {
  const uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  return bits_float(u);
}

// Radix select walks the key from the most significant digit down. `pass` 0 is the top
// digit. With kRadixBits = 8 a 32-bit key takes four passes.
constexpr int kRadixBits = 8;
constexpr int kRadixBuckets = 1 << kRadixBits;
constexpr int kRadixPasses = 32 / kRadixBits;

SPARQ_HD uint32_t radix_digit(uint32_t key, int pass) {
  const int shift = 32 - kRadixBits * (pass + 1);
  return (key >> shift) & (kRadixBuckets - 1);
}

// Mask of the bits already fixed after `pass` passes (the prefix the candidates must share).
SPARQ_HD uint32_t radix_prefix_mask(int passes_done) {
  return passes_done <= 0 ? 0u
       : passes_done >= kRadixPasses ? 0xffffffffu
       : ~((1u << (32 - kRadixBits * passes_done)) - 1u);
}

// Given a histogram of one digit (counts[0..kRadixBuckets)) over the candidates and the
// number `want` (>= 1) of largest elements still to find among them, return the bucket
// holding the `want`-th largest, and through `above` how many candidates lie in higher
// buckets (all of which are selected). Scanning from the top bucket down keeps it exact.
template <typename Count>
SPARQ_HD int radix_find_bucket(const Count* counts, int64_t want, int64_t* above) {
  int64_t acc = 0;
  for (int bucket = kRadixBuckets - 1; bucket >= 0; --bucket) {
    const int64_t c = static_cast<int64_t>(counts[bucket]);
    if (acc + c >= want) {
      *above = acc;
      return bucket;
    }
    acc += c;
  }
  *above = acc;
  return 0;  // fewer than `want` candidates: every candidate is selected
}

// Sequential radix select (the reference for the parallel GPU version and the CPU kernel):
// the ordered key of the k-th largest of n keys, and through `count_above` how many keys are
// strictly larger. Selecting every key > threshold plus (k - count_above) keys == threshold
// gives an exact top-k. Four passes of one histogram each; `key_at(i)` yields key i.
template <typename KeyAt>
SPARQ_HD uint32_t radix_select_kth_key(KeyAt key_at, int64_t n, int64_t k, int64_t* count_above) {
  uint32_t prefix = 0;
  int64_t above = 0;  // keys known to be larger than every remaining candidate
  int64_t want = k;   // how many of the remaining candidates are still to be taken
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    int64_t counts[kRadixBuckets] = {};
    const uint32_t mask = radix_prefix_mask(pass);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t key = key_at(i);
      if ((key & mask) == prefix) ++counts[radix_digit(key, pass)];
    }
    int64_t in_higher = 0;
    const int bucket = radix_find_bucket(counts, want, &in_higher);
    above += in_higher;
    want -= in_higher;
    prefix |= static_cast<uint32_t>(bucket) << (32 - kRadixBits * (pass + 1));
  }
  *count_above = above;
  return prefix;
}

// ---------------------------------------------------------------------------------------
// Online softmax state: running max `m`, running sum of exp(x - m) `l`.
// Empty state is (m = -inf, l = 0); merging keeps it NaN-free when one side is empty.
// ---------------------------------------------------------------------------------------
struct SoftmaxState {
  float m;
  float l;
};

SPARQ_HD SoftmaxState softmax_empty() { return {-INFINITY, 0.0f}; }

// Rescale factor exp(old_m - new_m), defined as 0 when the old state is empty.
SPARQ_HD float softmax_rescale(float old_m, float new_m) {
  return old_m == -INFINITY ? 0.0f : expf(old_m - new_m);
}

SPARQ_HD SoftmaxState softmax_merge(SoftmaxState a, SoftmaxState b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return softmax_empty();
  return {m, a.l * softmax_rescale(a.m, m) + b.l * softmax_rescale(b.m, m)};
}

// A state that holds a NaN logit: l is NaN and m finite, so that every later merge keeps
// the NaN (a state with m = -inf would be taken for empty and dropped).
SPARQ_HD SoftmaxState softmax_nan(SoftmaxState s) {
  return {s.m == -INFINITY ? 0.0f : s.m, NAN};
}

// Add one logit x (may be -inf for a masked position, which leaves the state unchanged; a
// NaN makes the state NaN, as in the reference's softmax).
SPARQ_HD SoftmaxState softmax_push(SoftmaxState s, float x) {
  if (x == -INFINITY) return s;
  if (is_nan_bits(x)) return softmax_nan(s);
  const float m = fmaxf(s.m, x);
  return {m, s.l * softmax_rescale(s.m, m) + expf(x - m)};
}

// Probability of logit x under a finished state; 0 for an empty state or a masked x.
SPARQ_HD float softmax_prob(SoftmaxState s, float x) {
  if (s.l <= 0.0f || x == -INFINITY) return 0.0f;
  return expf(x - s.m) / s.l;
}

// Probability mass that a subset's state `part` holds under the full state `full`:
// sum_{i in part} exp(x_i - full.m) / full.l. Step 3's alpha, with `part` the approximate
// logits of the selected positions. 0 when either state is empty.
SPARQ_HD float softmax_mass_ratio(SoftmaxState part, SoftmaxState full) {
  if (part.l <= 0.0f || full.l <= 0.0f) return 0.0f;
  return part.l * expf(part.m - full.m) / full.l;
}

// ---------------------------------------------------------------------------------------
// Step 1 scale: approximate logits are (q[i1] . K[:, i1]) * scale / sqrt(gamma) with
// gamma = |q[i1]|_1 / |q|_1. Guarded so that an all-zero query (or a group member whose
// selected components are all zero) gives logits of 0, never NaN or inf.
// ---------------------------------------------------------------------------------------
constexpr float kTiny = 1e-30f;

SPARQ_HD float approx_logit_scale(float q_hat_l1, float q_l1, float scale) {
  const float gamma = fmaxf(q_hat_l1 / fmaxf(q_l1, kTiny), kTiny);
  return scale / sqrtf(gamma);
}

// Logit softcapping (Gemma 2): cap * tanh(x / cap), for the approximate and exact logits alike.
SPARQ_HD float softcap_logit(float x, float cap) { return cap * tanhf(x / cap); }

// Output interpolation of step 3: alpha * y + (1 - alpha) * v_mean.
SPARQ_HD float reallocate_mix(float alpha, float y, float v_mean) {
  return alpha * y + (1.0f - alpha) * v_mean;
}

// Selection score sentinels: the local window is forced in, invalid positions never chosen.
constexpr float kWindowScore = INFINITY;
constexpr float kInvalidScore = -INFINITY;

// The NaN rule every backend shares (docs/cuda-pipeline.md, "Non-finite inputs"): a valid
// position whose group-summed approximate logit is NaN keeps its place among the valid
// positions but ranks below every other one: its selection score is the lowest finite float.
// So it is selected only when k covers every other valid position, and it still counts
// towards the valid count (k's clamp, v_mean). Its NaN per-head approximate logits still
// enter the softmax statistics, so alpha (and a reallocated output) is NaN for that group,
// as in the reference's softmax. The pure-torch reference applies the same substitution.
constexpr float kNaNScore = -3.402823466e38f;  // -FLT_MAX

SPARQ_HD float selection_score(float group_sum) {
  return is_nan_bits(group_sum) ? kNaNScore : group_sum;
}

// Ceil division for grid sizes and tiles.
SPARQ_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace sparq
