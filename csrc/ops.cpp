// The operator's one schema and its per-backend registration, plus the Python module
// sparq_ext._C (pybind11), which also exposes the shared math of csrc/include/sparq/math.h
// to the CPU tests so they exercise the code the GPU kernels run. The CMake build (libtorch,
// no Python) defines SPARQ_NO_PYTHON and keeps only the registration.
#ifdef SPARQ_NO_PYTHON
#include <torch/library.h>
#else
#include <torch/extension.h>
#endif

#include <vector>

#include "sparq/math.h"
#include "sparq_ops.h"

// Must match sparq_ext/ops.py:SCHEMA (tests/test_registration.py checks it).
TORCH_LIBRARY(sparq_ext, m) {
  m.def(
      "attention(Tensor query, Tensor key, Tensor value, *, int r, int k, Tensor? key_t=None, "
      "Tensor? value_mean=None, Tensor? seq_lens=None, Tensor? attn_mask=None, "
      "int local_window=0, bool reallocate=True, float? scale=None, float? softcap=None, "
      "Tensor? sinks=None, Tensor? key_t_scale=None, Tensor? component_weights=None) -> Tensor");
  // Must match sparq_ext/ops.py:PAGED_SCHEMA.
  m.def(
      "paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_table, "
      "Tensor seq_lens, *, int r, int k, Tensor? key_t_cache=None, Tensor? value_mean=None, "
      "int local_window=0, bool reallocate=True, float? scale=None, float? softcap=None, "
      "Tensor? sinks=None, Tensor? key_t_scale=None, Tensor? value_sums_cache=None, "
      "Tensor? component_weights=None) -> Tensor");
}

// Dispatch keys without a native kernel get the pure-torch reference from Python.
#ifdef SPARQ_WITH_CPU
TORCH_LIBRARY_IMPL(sparq_ext, CPU, m) {
  m.impl("attention", &sparq::attention_cpu);
  m.impl("paged_attention", &sparq::paged_attention_cpu);
}
#endif
#ifdef SPARQ_WITH_CUDA
TORCH_LIBRARY_IMPL(sparq_ext, CUDA, m) {
  m.impl("attention", &sparq::attention_cuda);
  m.impl("paged_attention", &sparq::paged_attention_cuda);
}
#endif

#ifndef SPARQ_NO_PYTHON
namespace {

// Exact top-k indices of a 1-D float32 tensor by sequential radix select (test hook).
at::Tensor radix_topk_host(const at::Tensor& scores, int64_t k) {
  TORCH_CHECK(scores.dim() == 1 && scores.scalar_type() == at::kFloat && scores.is_cpu(),
              "scores must be a 1-D float32 CPU tensor");
  const auto x = scores.contiguous();
  const float* data = x.data_ptr<float>();
  const int64_t n = x.numel();
  TORCH_CHECK(k >= 1 && k <= n, "k must be in [1, ", n, "], got ", k);
  int64_t above = 0;
  const uint32_t threshold = sparq::radix_select_kth_key(
      [data](int64_t i) { return sparq::float_to_ordered(data[i]); }, n, k, &above);
  std::vector<int64_t> picked;
  int64_t ties_left = k - above;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = sparq::float_to_ordered(data[i]);
    if (key > threshold || (key == threshold && ties_left-- > 0)) picked.push_back(i);
  }
  return torch::tensor(picked, torch::kLong);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparq_ext native kernels (operators registered as torch.ops.sparq_ext.attention and "
          "torch.ops.sparq_ext.paged_attention)";
#ifdef SPARQ_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("_float_to_ordered", [](float x) { return sparq::float_to_ordered(x); });
  m.def("_ordered_to_float", [](uint32_t key) { return sparq::ordered_to_float(key); });
  m.def("_radix_digit", [](uint32_t key, int pass) { return sparq::radix_digit(key, pass); });
  m.def("_radix_topk", &radix_topk_host, "exact top-k indices by radix select (unsorted)");
  m.def("_softmax_push", [](float m_, float l, float x) {
    const auto s = sparq::softmax_push({m_, l}, x);
    return std::make_pair(s.m, s.l);
  });
  m.def("_softmax_merge", [](float m1, float l1, float m2, float l2) {
    const auto s = sparq::softmax_merge({m1, l1}, {m2, l2});
    return std::make_pair(s.m, s.l);
  });
  m.def("_approx_logit_scale", &sparq::approx_logit_scale);
  m.def("_value_mean_from_block_sums", &sparq::value_mean_from_block_sums,
        "the mean of per-block sums over each paged row, as the CUDA paged operator computes v_mean "
        "(also the vLLM backend's key spread)");
#ifdef SPARQ_WITH_CPU
  m.def("_cpu_select_topk", &sparq::select_topk_cpu, "the CPU kernel's exact top-k (test hook)",
        pybind11::arg("scores"), pybind11::arg("want"), pybind11::arg("histogram_only") = false);
  m.def("_write_page_regions", &sparq::write_page_regions_cpu,
        "an engine step's writes into SparQ's page regions, one call per layer (the vLLM CPU "
        "backend; pure-torch definition: sparq_ext.reference.write_page_regions)",
        pybind11::arg("key"), pybind11::arg("value"), pybind11::arg("slot_mapping"),
        pybind11::arg("key_rows"), pybind11::arg("value_sums"), pybind11::arg("key_t_int8") = pybind11::none(),
        pybind11::arg("key_t_scale") = pybind11::none(), pybind11::arg("key_sums") = pybind11::none(),
        pybind11::arg("key_sq_sums") = pybind11::none());
  m.def("_key_std_from_block_sums", &sparq::key_std_from_block_sums_cpu,
        "each paged row's key channel spread from per-block sums of K and K^2 (the vLLM CPU "
        "backend's component_rule='key_std')");
#endif
}
#endif  // SPARQ_NO_PYTHON
