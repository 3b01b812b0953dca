// Host-side interface shared by the operator's backends: the argument checks every backend
// runs (same words as the Python wrapper's errors) and the per-backend entry points that
// csrc/ops.cpp registers. Light on purpose: ATen's Tensor header and the few per-operator
// headers used here, no torch/extension.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

namespace sparq {

// Dimensions of one call, after the checks.
struct AttentionDims {
  int64_t B, Hq, Hkv, G, S, D;
};

inline void check_same(const at::Tensor& t, const at::Tensor& query, const char* name) {
  TORCH_CHECK(t.scalar_type() == query.scalar_type(), name, " must have the query's dtype ",
              query.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == query.device(), name, " must be on the query's device ",
              query.device(), ", got ", t.device());
}

// An int8 selection cache (`key_t_name`, with its expected shape already checked or checked
// here) and its per-position float32 scale `name`: both or neither (sparq_ext.quantize_key_t);
// a key_t in the query's dtype needs no scale. Same words as the Python checks.
inline void check_key_t_scale(const at::Tensor& query, const char* key_t_name,
                              const std::optional<at::Tensor>& key_t, const char* name,
                              const std::optional<at::Tensor>& key_t_scale,
                              at::IntArrayRef scale_shape, const char* scale_shape_words) {
  const bool int8 = key_t && key_t->scalar_type() == at::kChar;
  if (key_t) {
    if (int8) {
      TORCH_CHECK(key_t->device() == query.device(), key_t_name,
                  " must be on the query's device ", query.device(), ", got ", key_t->device());
      TORCH_CHECK(key_t_scale.has_value(), key_t_name, " is int8, so ", name, " (float32 ",
                  scale_shape_words, ", one scale per position) must be given: see "
                  "sparq_ext.quantize_key_t");
    } else {
      check_same(*key_t, query, key_t_name);
    }
  }
  if (!key_t_scale) return;
  TORCH_CHECK(key_t.has_value(), name, " is given without ", key_t_name,
              ": it is the scale of an int8 ", key_t_name);
  TORCH_CHECK(int8, name, " is only for an int8 ", key_t_name, ", got ", key_t_name,
              " of dtype ", key_t->scalar_type());
  TORCH_CHECK(key_t_scale->sizes() == scale_shape, name, " must have shape ", scale_shape_words,
              " = ", scale_shape, ", got ", key_t_scale->sizes());
  TORCH_CHECK(key_t_scale->scalar_type() == at::kFloat, name, " must be float32, got ",
              key_t_scale->scalar_type());
  TORCH_CHECK(key_t_scale->device() == query.device(), name, " must be on the query's device ",
              query.device(), ", got ", key_t_scale->device());
}

// A float32 side input of a given shape on the query's device (component_weights,
// value_sums_cache); same words as the Python checks.
inline void check_float32(const at::Tensor& t, const at::Tensor& query, const char* name,
                          at::IntArrayRef shape, const char* shape_words) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape_words, " = ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == query.device(), name, " must be on the query's device ",
              query.device(), ", got ", t.device());
}

// Step 1's per-component weights, (rows, Hkv, D) float32 (their values, finite and >= 0, are
// checked in Python where reading them costs no device sync).
inline void check_component_weights(const at::Tensor& query,
                                    const std::optional<at::Tensor>& component_weights,
                                    at::IntArrayRef shape, const char* shape_words) {
  if (component_weights)
    check_float32(*component_weights, query, "component_weights", shape, shape_words);
}

// The selection budget, shared by both operators.
inline void check_budget(int64_t D, int64_t r, int64_t k, int64_t local_window) {
  TORCH_CHECK(r >= 1 && r <= D, "r must be an int in [1, head_dim=", D, "], got ", r);
  TORCH_CHECK(k >= 1, "k must be an int >= 1, got ", k);
  TORCH_CHECK(local_window >= 0 && local_window <= k, "local_window must be an int in [0, k=", k,
              "], got ", local_window);
}

// Mirrors sparq_ext.ops.check_attention_inputs (which raises first when called from Python);
// here for direct torch.ops calls. Data-dependent checks (seq_lens values) stay in Python:
// reading them would synchronise the device.
inline AttentionDims check_attention_args(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t r,
    int64_t k, const std::optional<at::Tensor>& key_t,
    const std::optional<at::Tensor>& value_mean, const std::optional<at::Tensor>& seq_lens,
    const std::optional<at::Tensor>& attn_mask, int64_t local_window,
    const std::optional<at::Tensor>& key_t_scale = std::nullopt,
    const std::optional<at::Tensor>& component_weights = std::nullopt) {
  TORCH_CHECK(query.dim() == 4, "query must have 4 dims (B, H, T, D), got ", query.sizes());
  TORCH_CHECK(key.dim() == 4, "key must have 4 dims (B, H, T, D), got ", key.sizes());
  TORCH_CHECK(value.dim() == 4, "value must have 4 dims (B, H, T, D), got ", value.sizes());
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "query must be float32, float16 or bfloat16, got ", dtype);
  AttentionDims d{query.size(0), query.size(1), key.size(1), 0, key.size(2), query.size(3)};
  TORCH_CHECK(query.size(2) == 1, "query must hold one decode position (B, Hq, 1, D), got T = ",
              query.size(2));
  TORCH_CHECK(d.Hq >= 1 && d.D >= 1, "query must have at least one head and head_dim >= 1");
  TORCH_CHECK(key.size(0) == d.B && key.size(3) == d.D, "key must be (B=", d.B, ", Hkv, S, D=",
              d.D, "), got ", key.sizes());
  TORCH_CHECK(value.sizes() == key.sizes(), "value must have key's shape ", key.sizes(),
              ", got ", value.sizes());
  TORCH_CHECK(d.Hkv >= 1 && d.Hq % d.Hkv == 0, "key heads (", d.Hkv,
              ") must divide query heads (", d.Hq, ")");
  TORCH_CHECK(d.S >= 1, "key must hold at least one position (S >= 1)");
  d.G = d.Hq / d.Hkv;
  check_same(key, query, "key");
  check_same(value, query, "value");
  if (key_t) {
    TORCH_CHECK(key_t->sizes() == at::IntArrayRef({d.B, d.Hkv, d.D, d.S}),
                "key_t must have shape (B, Hkv, D, S) = (", d.B, ", ", d.Hkv, ", ", d.D, ", ",
                d.S, "), got ", key_t->sizes());
  }
  check_key_t_scale(query, "key_t", key_t, "key_t_scale", key_t_scale,
                    {d.B, d.Hkv, d.S}, "(B, Hkv, S)");
  if (value_mean) {
    TORCH_CHECK(value_mean->sizes() == at::IntArrayRef({d.B, d.Hkv, 1, d.D}),
                "value_mean must have shape (B, Hkv, 1, D), got ", value_mean->sizes());
    check_same(*value_mean, query, "value_mean");
  }
  check_budget(d.D, r, k, local_window);
  check_component_weights(query, component_weights, {d.B, d.Hkv, d.D}, "(B, Hkv, D)");
  if (seq_lens) {
    TORCH_CHECK(seq_lens->scalar_type() == at::kInt || seq_lens->scalar_type() == at::kLong,
                "seq_lens must be int32 or int64, got ", seq_lens->scalar_type());
    TORCH_CHECK(seq_lens->dim() == 1 && seq_lens->size(0) == d.B,
                "seq_lens must have shape (B,) = (", d.B, ",), got ", seq_lens->sizes());
    TORCH_CHECK(seq_lens->device() == query.device(), "seq_lens must be on the query's device");
  }
  if (attn_mask) {
    TORCH_CHECK(attn_mask->scalar_type() == at::kBool,
                "attn_mask must be a bool tensor (True = may attend), got ",
                attn_mask->scalar_type());
    const auto m = attn_mask->sizes();
    bool ok = m.size() <= 4;
    const int64_t target[4] = {d.B, 1, 1, d.S};
    for (size_t i = 0; ok && i < m.size(); ++i) {
      const int64_t want = target[4 - m.size() + i];
      ok = m[i] == want || m[i] == 1;
    }
    TORCH_CHECK(ok, "attn_mask must be broadcastable to (B, 1, 1, S) = (", d.B, ", 1, 1, ", d.S,
                "), got ", m);
    TORCH_CHECK(attn_mask->device() == query.device(), "attn_mask must be on the query's device");
  }
  return d;
}

// Dimensions of one paged call, after the checks.
struct PagedDims {
  int64_t R, Hq, Hkv, G, D, num_blocks, block_size, max_blocks;
};

// Mirrors sparq_ext.ops.check_paged_attention_inputs, shapes and dtypes only (same words).
// The values of block_table and seq_lens are checked by each backend where reading them costs
// no device sync (the CPU kernel checks them before reading the cache).
inline PagedDims check_paged_attention_args(
    const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_table, const at::Tensor& seq_lens, int64_t r, int64_t k,
    const std::optional<at::Tensor>& key_t_cache, const std::optional<at::Tensor>& value_mean,
    int64_t local_window, const std::optional<at::Tensor>& key_t_scale = std::nullopt,
    const std::optional<at::Tensor>& value_sums_cache = std::nullopt,
    const std::optional<at::Tensor>& component_weights = std::nullopt) {
  TORCH_CHECK(query.dim() == 3, "query must have 3 dims (R, Hq, D), got ", query.sizes());
  TORCH_CHECK(key_cache.dim() == 4, "key_cache must have 4 dims (num_blocks, Hkv, block_size, D), got ",
              key_cache.sizes());
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "query must be float32, float16 or bfloat16, got ", dtype);
  PagedDims d{query.size(0), query.size(1), key_cache.size(1), 0, query.size(2),
              key_cache.size(0), key_cache.size(2), block_table.dim() == 2 ? block_table.size(1) : 0};
  TORCH_CHECK(d.Hq >= 1 && d.D >= 1, "query must have at least one head and head_dim >= 1");
  TORCH_CHECK(key_cache.size(3) == d.D, "key_cache must be (num_blocks, Hkv, block_size, D=", d.D,
              "), got ", key_cache.sizes());
  TORCH_CHECK(d.num_blocks >= 1 && d.block_size >= 1,
              "key_cache must hold at least one block of at least one position, got ",
              key_cache.sizes());
  TORCH_CHECK(d.Hkv >= 1 && d.Hq % d.Hkv == 0, "key_cache heads (", d.Hkv,
              ") must divide query heads (", d.Hq, ")");
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache must have key_cache's shape ",
              key_cache.sizes(), ", got ", value_cache.sizes());
  d.G = d.Hq / d.Hkv;
  check_same(key_cache, query, "key_cache");
  check_same(value_cache, query, "value_cache");
  if (key_t_cache) {
    TORCH_CHECK(key_t_cache->sizes() ==
                    at::IntArrayRef({d.num_blocks, d.Hkv, d.D, d.block_size}),
                "key_t_cache must have shape (num_blocks, Hkv, D, block_size) = (", d.num_blocks,
                ", ", d.Hkv, ", ", d.D, ", ", d.block_size, "), got ", key_t_cache->sizes());
  }
  check_key_t_scale(query, "key_t_cache", key_t_cache, "key_t_scale", key_t_scale,
                    {d.num_blocks, d.Hkv, d.block_size}, "(num_blocks, Hkv, block_size)");
  if (value_mean) {
    TORCH_CHECK(value_mean->sizes() == at::IntArrayRef({d.R, d.Hkv, d.D}),
                "value_mean must have shape (R, Hkv, D) = (", d.R, ", ", d.Hkv, ", ", d.D,
                "), got ", value_mean->sizes());
    check_same(*value_mean, query, "value_mean");
  }
  if (value_sums_cache) {
    TORCH_CHECK(!value_mean, "value_mean and value_sums_cache are two ways to give v_mean: "
                "pass at most one");
    check_float32(*value_sums_cache, query, "value_sums_cache", {d.num_blocks, d.Hkv, d.D},
                  "(num_blocks, Hkv, D)");
  }
  TORCH_CHECK(block_table.scalar_type() == at::kInt, "block_table must be int32, got ",
              block_table.scalar_type());
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == d.R,
              "block_table must have shape (R=", d.R, ", max_blocks), got ", block_table.sizes());
  TORCH_CHECK(block_table.device() == query.device(), "block_table must be on the query's device ",
              query.device(), ", got ", block_table.device());
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt, "seq_lens must be int32, got ",
              seq_lens.scalar_type());
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == d.R, "seq_lens must have shape (R,) = (",
              d.R, ",), got ", seq_lens.sizes());
  TORCH_CHECK(seq_lens.device() == query.device(), "seq_lens must be on the query's device ",
              query.device(), ", got ", seq_lens.device());
  check_budget(d.D, r, k, local_window);
  check_component_weights(query, component_weights, {d.R, d.Hkv, d.D}, "(R, Hkv, D)");
  return d;
}

// v_mean of each paged row from per-block value sums (paged_attention's value_sums_cache): the
// sum over the row's ceil(len / block_size) blocks, divided by len; zeros for an empty row. ATen
// only, reading no device data on the host (graph-capturable); block ids are clamped into range,
// as the CUDA kernels clamp them. Float32 (R, Hkv, D).
inline at::Tensor value_mean_from_block_sums(const at::Tensor& value_sums_cache,
                                             const at::Tensor& block_table,
                                             const at::Tensor& seq_lens, int64_t block_size) {
  const int64_t R = block_table.size(0), max_blocks = block_table.size(1);
  const at::Tensor lens = seq_lens.to(at::kLong);
  const at::Tensor used =  // (R, max_blocks, 1, 1): the block holds some of the row's positions
      at::arange(max_blocks, lens.options()).mul(block_size).unsqueeze(0).lt(lens.unsqueeze(1))
          .view({R, max_blocks, 1, 1});
  const at::Tensor ids =
      block_table.to(at::kLong).clamp(0, value_sums_cache.size(0) - 1).reshape({-1});
  const at::Tensor sums = value_sums_cache.index_select(0, ids).view(
      {R, max_blocks, value_sums_cache.size(1), value_sums_cache.size(2)});
  // where, not a product: a block past the row's end may hold anything, NaN included
  return at::where(used, sums, at::zeros({}, sums.options()))
      .sum(1)
      .div(lens.clamp_min(1).to(at::kFloat).view({R, 1, 1}));
}

// attn_mask as a contiguous (B, S) bool tensor (a view when it already is one).
inline at::Tensor mask_as_batch_by_seq(const at::Tensor& attn_mask, int64_t B, int64_t S) {
  return attn_mask.expand({B, 1, 1, S}).reshape({B, S}).contiguous();
}

// softcap and sinks, checked alike by both operators (same words as the Python checks).
inline void check_softmax_variants(const at::Tensor& query, int64_t Hq,
                                   std::optional<double> softcap,
                                   const std::optional<at::Tensor>& sinks) {
  if (softcap) {
    TORCH_CHECK(std::isfinite(*softcap) && *softcap > 0.0,
                "softcap must be a finite float > 0 or None, got ", *softcap);
  }
  if (sinks) {
    TORCH_CHECK(sinks->dim() == 1 && sinks->size(0) == Hq, "sinks must have shape (Hq,) = (", Hq,
                ",), got ", sinks->sizes());
    TORCH_CHECK(sinks->scalar_type() == at::kFloat, "sinks must be float32, got ",
                sinks->scalar_type());
    TORCH_CHECK(sinks->device() == query.device(), "sinks must be on the query's device ",
                query.device(), ", got ", sinks->device());
  }
}

// Backend entry points: SPARQ_ATTENTION_ARGS (the schema in csrc/ops.cpp up to `scale`), then
// SPARQ_SOFTMAX_VARIANT_ARGS and SPARQ_KEY_T_SCALE_ARG (paged: then SPARQ_VALUE_SUMS_ARG), then
// SPARQ_COMPONENT_WEIGHTS_ARG.
#define SPARQ_SOFTMAX_VARIANT_ARGS \
  std::optional<double> softcap, const std::optional<at::Tensor>&sinks
#define SPARQ_KEY_T_SCALE_ARG const std::optional<at::Tensor>&key_t_scale
#define SPARQ_VALUE_SUMS_ARG const std::optional<at::Tensor>&value_sums_cache
#define SPARQ_COMPONENT_WEIGHTS_ARG const std::optional<at::Tensor>&component_weights

#define SPARQ_ATTENTION_ARGS                                                              \
  const at::Tensor &query, const at::Tensor &key, const at::Tensor &value, int64_t r,     \
      int64_t k, const std::optional<at::Tensor>&key_t,                                   \
      const std::optional<at::Tensor>&value_mean, const std::optional<at::Tensor>&seq_lens, \
      const std::optional<at::Tensor>&attn_mask, int64_t local_window, bool reallocate,   \
      std::optional<double> scale

at::Tensor attention_cpu(SPARQ_ATTENTION_ARGS, SPARQ_SOFTMAX_VARIANT_ARGS,
                         SPARQ_KEY_T_SCALE_ARG, SPARQ_COMPONENT_WEIGHTS_ARG);  // csrc/cpu/
// Test hook: the CPU kernel's exact top-k of a 1-D float32 CPU tensor (positions, ascending);
// `histogram_only` skips the sampled fast path.
at::Tensor select_topk_cpu(const at::Tensor& scores, int64_t want, bool histogram_only);
at::Tensor attention_cuda(SPARQ_ATTENTION_ARGS, SPARQ_SOFTMAX_VARIANT_ARGS, SPARQ_KEY_T_SCALE_ARG,
                          SPARQ_COMPONENT_WEIGHTS_ARG);  // csrc/cuda/ (SPARQ_WITH_CUDA)

#define SPARQ_PAGED_ATTENTION_ARGS                                                          \
  const at::Tensor &query, const at::Tensor &key_cache, const at::Tensor &value_cache,      \
      const at::Tensor &block_table, const at::Tensor &seq_lens, int64_t r, int64_t k,      \
      const std::optional<at::Tensor>&key_t_cache, const std::optional<at::Tensor>&value_mean, \
      int64_t local_window, bool reallocate, std::optional<double> scale

at::Tensor paged_attention_cpu(SPARQ_PAGED_ATTENTION_ARGS, SPARQ_SOFTMAX_VARIANT_ARGS,
                               SPARQ_KEY_T_SCALE_ARG, SPARQ_VALUE_SUMS_ARG,
                               SPARQ_COMPONENT_WEIGHTS_ARG);  // csrc/cpu/
at::Tensor paged_attention_cuda(SPARQ_PAGED_ATTENTION_ARGS, SPARQ_SOFTMAX_VARIANT_ARGS,
                                SPARQ_KEY_T_SCALE_ARG, SPARQ_VALUE_SUMS_ARG,
                                SPARQ_COMPONENT_WEIGHTS_ARG);  // csrc/cuda/ (SPARQ_WITH_CUDA)

// Page upkeep for an engine's paged cache (csrc/cpu/pages_cpu.cpp; the vLLM CPU backend). Each
// token's key row into key_rows at its slot (negative slots are padding), its value added to its
// block's float32 sum (a block's sums reset when its position 0 is written), with the 8-bit
// selection cache its quantize_key_t codes and scale, with the key spread its key and key² added
// to key_sums and key_sq_sums.
void write_page_regions_cpu(const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& slot_mapping, const at::Tensor& key_rows,
                            const at::Tensor& value_sums,
                            const std::optional<at::Tensor>& key_t_int8,
                            const std::optional<at::Tensor>& key_t_scale,
                            const std::optional<at::Tensor>& key_sums,
                            const std::optional<at::Tensor>& key_sq_sums);
// Each paged row's key channel standard deviation (R, H, D) float32 from per-block sums of K and
// K² over its ceil(len / block_size) blocks; zeros for an empty row.
at::Tensor key_std_from_block_sums_cpu(const at::Tensor& key_sums, const at::Tensor& key_sq_sums,
                                       const at::Tensor& block_table, const at::Tensor& seq_lens,
                                       int64_t block_size);

}  // namespace sparq
