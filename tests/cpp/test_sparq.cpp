// C++ test run by ctest (CMakeLists.txt): the shared math, the operator's registration, and,
// when the native CPU kernel is built, its dense limit against naive attention.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "sparq/math.h"

static int failures = 0;
#define EXPECT(cond)                                                        \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                           \
    }                                                                       \
  } while (0)

static void test_ordered_keys() {
  const float xs[] = {-INFINITY, -1e30f, -2.5f, -1e-40f, -0.0f, 0.0f, 1e-40f, 1.0f, 3e38f, INFINITY};
  for (size_t i = 0; i + 1 < sizeof(xs) / sizeof(xs[0]); ++i) {
    EXPECT(sparq::float_to_ordered(xs[i]) <= sparq::float_to_ordered(xs[i + 1]));
    EXPECT(sparq::ordered_to_float(sparq::float_to_ordered(xs[i])) == xs[i]);
  }
}

static void test_radix_select_matches_nth_element() {
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  for (int64_t n : {1, 7, 1000, 50000}) {
    std::vector<float> x(n);
    for (auto& v : x) v = std::round(normal(rng) * 4) / 4;  // many ties
    for (int64_t k : {int64_t(1), n / 3 + 1, n}) {
      int64_t above = 0;
      const uint32_t key = sparq::radix_select_kth_key(
          [&](int64_t i) { return sparq::float_to_ordered(x[i]); }, n, k, &above);
      std::vector<float> sorted = x;
      std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(), std::greater<float>());
      EXPECT(sparq::ordered_to_float(key) == sorted[k - 1]);
      int64_t strictly = std::count_if(x.begin(), x.end(), [&](float v) { return v > sorted[k - 1]; });
      EXPECT(above == strictly);
    }
  }
}

static void test_softmax_merge() {
  auto a = sparq::softmax_empty();
  auto b = sparq::softmax_empty();
  const float xs[] = {0.5f, -3.f, 2.f, -INFINITY, 7.f};
  double direct = 0;
  for (int i = 0; i < 5; ++i) {
    (i % 2 ? a : b) = sparq::softmax_push(i % 2 ? a : b, xs[i]);
    if (std::isfinite(xs[i])) direct += std::exp(xs[i] - 7.0);
  }
  const auto m = sparq::softmax_merge(a, b);
  EXPECT(m.m == 7.f);
  EXPECT(std::fabs(m.l - direct) < 1e-5);
  const auto e = sparq::softmax_merge(sparq::softmax_empty(), sparq::softmax_empty());
  EXPECT(e.m == -INFINITY && e.l == 0.f);
  EXPECT(sparq::approx_logit_scale(0.f, 0.f, 0.125f) * 0.f == 0.f);
}

static void test_operator() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("sparq_ext::attention", "");
#ifdef SPARQ_WITH_CPU
  auto typed = op.typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                   int64_t, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, int64_t, bool,
                                   std::optional<double>, std::optional<double>,
                                   const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&)>();
  at::manual_seed(0);
  auto q = at::randn({2, 4, 1, 32});
  auto K = at::randn({2, 2, 50, 32});
  auto V = at::randn({2, 2, 50, 32});
  auto out = typed.call(q, K, V, 4, 64, {}, {}, {}, {}, 0, true, {}, {}, {}, {}, {});
  auto Kr = K.repeat_interleave(2, 1), Vr = V.repeat_interleave(2, 1);
  auto logits = at::matmul(q, Kr.transpose(-1, -2)) / std::sqrt(32.0);
  auto dense = at::softmax(logits, -1).matmul(Vr);
  EXPECT(at::allclose(out, dense, 1e-4, 1e-5));
  // softcap and a sink: k beyond the length is dense attention with them
  auto sinks = at::randn({4});
  auto capped = at::tanh(logits / 0.5) * 0.5;
  auto with_sink = at::cat({capped, sinks.reshape({1, 4, 1, 1}).expand({2, 4, 1, 1})}, -1);
  auto dense_variants = at::softmax(with_sink, -1).narrow(-1, 0, 50).matmul(Vr);
  auto out_variants = typed.call(q, K, V, 4, 64, {}, {}, {}, {}, 0, true, {}, 0.5, sinks, {}, {});
  EXPECT(at::allclose(out_variants, dense_variants, 1e-4, 1e-5));
  // an int8 key_t with its per-position scale (the 8-bit selection cache): step 2 is exact, so
  // k beyond the length is dense attention whatever step 1 ranked
  auto key_t_scale = K.abs().amax(-1) / 127;  // (B, Hkv, S)
  auto key_t_int8 = at::round(K / key_t_scale.unsqueeze(-1)).to(at::kChar).transpose(-1, -2).contiguous();
  auto out_int8 = typed.call(q, K, V, 4, 64, key_t_int8, {}, {}, {}, 0, true, {}, {}, {}, key_t_scale, {});
  EXPECT(at::allclose(out_int8, dense, 1e-4, 1e-5));
  // component weights change step 1's ranking only: k beyond the length is still dense, and unit
  // weights are the unweighted rule bit for bit at a real selection
  auto weights = K.std(2, /*unbiased=*/false);  // (B, Hkv, D)
  auto out_weighted = typed.call(q, K, V, 4, 64, {}, {}, {}, {}, 0, true, {}, {}, {}, {}, weights);
  EXPECT(at::allclose(out_weighted, dense, 1e-4, 1e-5));
  auto plain = typed.call(q, K, V, 4, 8, {}, {}, {}, {}, 0, true, {}, {}, {}, {}, {});
  auto unit = typed.call(q, K, V, 4, 8, {}, {}, {}, {}, 0, true, {}, {}, {}, {}, at::ones({2, 2, 32}));
  EXPECT(at::equal(plain, unit));
#else
  (void)op;
  std::printf("native CPU kernel not built: checked the schema only\n");
#endif
}

int main() {
  test_ordered_keys();
  test_radix_select_matches_nth_element();
  test_softmax_merge();
  test_operator();
  std::printf(failures ? "FAILED (%d)\n" : "all C++ checks passed\n", failures);
  return failures ? 1 : 0;
}
