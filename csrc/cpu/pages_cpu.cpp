// Page upkeep for an engine's paged KV cache (the vLLM CPU backend, sparq_ext/integrations/vllm):
// the per-token writes into SparQ's page regions and each row's key spread from per-block sums.
// Each is one native call per layer and step, because inside a serving engine every small torch
// op costs tens of microseconds (docs/vllm.md, "Speed") and a layer's upkeep was 4 to 14 of them.
// The pure-torch definitions are sparq_ext.reference.write_page_regions and
// sparq_ext.reference.key_std_from_block_sums; tests/test_page_writes.py checks these against
// them.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "sparq_ops.h"

namespace sparq {
namespace {

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

// A float32 (num_blocks, H, rest...) region of the pages.
void check_region(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                  const char* shape_words, at::ScalarType dtype) {
  check_cpu(t, name);
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape_words, " = ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

// The slot of each token as int64, -1 (vLLM's padding) kept; anything else out of range is an
// error naming slot_mapping.
std::vector<int64_t> read_slots(const at::Tensor& slot_mapping, int64_t num_slots) {
  check_cpu(slot_mapping, "slot_mapping");
  TORCH_CHECK(slot_mapping.dim() == 1, "slot_mapping must be 1-D (tokens,), got shape ",
              slot_mapping.sizes());
  TORCH_CHECK(slot_mapping.scalar_type() == at::kInt || slot_mapping.scalar_type() == at::kLong,
              "slot_mapping must be int32 or int64, got ", slot_mapping.scalar_type());
  const int64_t T = slot_mapping.size(0);
  std::vector<int64_t> slots(T);
  AT_DISPATCH_INDEX_TYPES(slot_mapping.scalar_type(), "write_page_regions", [&] {
    const index_t* p = slot_mapping.data_ptr<index_t>();
    const int64_t st = slot_mapping.stride(0);
    for (int64_t t = 0; t < T; ++t) slots[t] = static_cast<int64_t>(p[t * st]);
  });
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(slots[t] < num_slots, "slot_mapping[", t, "] = ", slots[t],
                " is past the cache's num_blocks * block_size = ", num_slots, " slots");
  }
  return slots;
}

}  // namespace

void write_page_regions_cpu(const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& slot_mapping, const at::Tensor& key_rows,
                            const at::Tensor& value_sums,
                            const std::optional<at::Tensor>& key_t_int8,
                            const std::optional<at::Tensor>& key_t_scale,
                            const std::optional<at::Tensor>& key_sums,
                            const std::optional<at::Tensor>& key_sq_sums) {
  check_cpu(key_rows, "key_rows");
  TORCH_CHECK(key_rows.dim() == 4, "key_rows must be 4-D (num_blocks, H, block_size, D), got shape ",
              key_rows.sizes());
  const int64_t NB = key_rows.size(0), H = key_rows.size(1), BS = key_rows.size(2),
                D = key_rows.size(3);
  const int64_t T = slot_mapping.dim() == 1 ? slot_mapping.size(0) : 0;
  for (const auto& [t, name] : {std::pair{&key, "key"}, std::pair{&value, "value"}}) {
    check_cpu(*t, name);
    TORCH_CHECK(t->dim() == 3 && t->size(0) >= T && t->size(1) == H && t->size(2) == D, name,
                " must have shape (>= tokens, H, D) = (>= ", T, ", ", H, ", ", D,
                ") (tokens from slot_mapping, H and D from key_rows), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == key_rows.scalar_type(), name, " must have key_rows' dtype ",
                key_rows.scalar_type(), ", got ", t->scalar_type());
  }
  check_region(value_sums, "value_sums", {NB, H, D}, "(num_blocks, H, D)", at::kFloat);
  TORCH_CHECK(key_t_int8.has_value() == key_t_scale.has_value(),
              "key_t_int8 and key_t_scale come together (the 8-bit selection cache), got ",
              key_t_int8 ? "key_t_int8 only" : "key_t_scale only");
  if (key_t_int8) {
    check_region(*key_t_int8, "key_t_int8", {NB, H, D, BS}, "(num_blocks, H, D, block_size)",
                 at::kChar);
    check_region(*key_t_scale, "key_t_scale", {NB, H, BS}, "(num_blocks, H, block_size)",
                 at::kFloat);
  }
  TORCH_CHECK(key_sums.has_value() == key_sq_sums.has_value(),
              "key_sums and key_sq_sums come together (the key spread), got ",
              key_sums ? "key_sums only" : "key_sq_sums only");
  if (key_sums) {
    check_region(*key_sums, "key_sums", {NB, H, D}, "(num_blocks, H, D)", at::kFloat);
    check_region(*key_sq_sums, "key_sq_sums", {NB, H, D}, "(num_blocks, H, D)", at::kFloat);
  }
  const std::vector<int64_t> slots = read_slots(slot_mapping, NB * BS);

  // Float32 sums (value; with the key spread, key and key squared) and their strides.
  struct Sums {
    float* data;
    int64_t sb, sh, sd;
  };
  auto sums_of = [](const at::Tensor& t) {
    return Sums{t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
  };
  const Sums vsum = sums_of(value_sums);
  const Sums ksum = key_sums ? sums_of(*key_sums) : Sums{nullptr, 0, 0, 0};
  const Sums k2sum = key_sums ? sums_of(*key_sq_sums) : Sums{nullptr, 0, 0, 0};

  // A block's sums cover the positions written since its position 0 was: blocks fill in order,
  // so writing position 0 means a new (or reused) block. All of this call's resets come before
  // its additions, so a block's tokens count whatever their order in the call.
  for (int64_t t = 0; t < T; ++t) {
    if (slots[t] < 0 || slots[t] % BS != 0) continue;
    const int64_t b = slots[t] / BS;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d) {
        vsum.data[b * vsum.sb + h * vsum.sh + d * vsum.sd] = 0.f;
        if (ksum.data) {
          ksum.data[b * ksum.sb + h * ksum.sh + d * ksum.sd] = 0.f;
          k2sum.data[b * k2sum.sb + h * k2sum.sh + d * k2sum.sd] = 0.f;
        }
      }
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key_rows.scalar_type(),
                                  "write_page_regions", [&] {
    const scalar_t* kp = key.data_ptr<scalar_t>();
    const scalar_t* vp = value.data_ptr<scalar_t>();
    scalar_t* rows = key_rows.data_ptr<scalar_t>();
    int8_t* q8 = key_t_int8 ? key_t_int8->data_ptr<int8_t>() : nullptr;
    float* q8_scale = key_t_int8 ? key_t_scale->data_ptr<float>() : nullptr;
    std::vector<float> k32(D);
    // Tokens in order, as the reference's accumulating index_put_: the same float32 sums.
    for (int64_t t = 0; t < T; ++t) {
      if (slots[t] < 0) continue;
      const int64_t b = slots[t] / BS, o = slots[t] % BS;
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* kr = kp + t * key.stride(0) + h * key.stride(1);
        const scalar_t* vr = vp + t * value.stride(0) + h * value.stride(1);
        scalar_t* dst = rows + b * key_rows.stride(0) + h * key_rows.stride(1) + o * key_rows.stride(2);
        float amax = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          const scalar_t x = kr[d * key.stride(2)];
          dst[d * key_rows.stride(3)] = x;
          k32[d] = static_cast<float>(x);
          amax = std::max(amax, std::fabs(k32[d]));
          vsum.data[b * vsum.sb + h * vsum.sh + d * vsum.sd] +=
              static_cast<float>(vr[d * value.stride(2)]);
        }
        if (ksum.data) {
          for (int64_t d = 0; d < D; ++d) {
            ksum.data[b * ksum.sb + h * ksum.sh + d * ksum.sd] += k32[d];
            k2sum.data[b * k2sum.sb + h * k2sum.sh + d * k2sum.sd] += k32[d] * k32[d];
          }
        }
        if (q8) {  // sparq_ext.quantize_key_t of this one position: its scale, then round(K / scale)
          const float scale = amax / 127.0f;
          const float divisor = scale > 0.f ? scale : 1.f;
          const auto& qt = *key_t_int8;
          for (int64_t d = 0; d < D; ++d) {
            const float q = std::min(127.f, std::max(-127.f, std::nearbyint(k32[d] / divisor)));
            q8[b * qt.stride(0) + h * qt.stride(1) + d * qt.stride(2) + o * qt.stride(3)] =
                static_cast<int8_t>(q);
          }
          q8_scale[b * key_t_scale->stride(0) + h * key_t_scale->stride(1) +
                   o * key_t_scale->stride(2)] = scale;
        }
      }
    }
  });
}

at::Tensor key_std_from_block_sums_cpu(const at::Tensor& key_sums, const at::Tensor& key_sq_sums,
                                       const at::Tensor& block_table, const at::Tensor& seq_lens,
                                       int64_t block_size) {
  check_cpu(key_sums, "key_sums");
  TORCH_CHECK(key_sums.dim() == 3, "key_sums must be 3-D (num_blocks, H, D), got shape ",
              key_sums.sizes());
  const int64_t NB = key_sums.size(0), H = key_sums.size(1), D = key_sums.size(2);
  check_region(key_sums, "key_sums", {NB, H, D}, "(num_blocks, H, D)", at::kFloat);
  check_region(key_sq_sums, "key_sq_sums", {NB, H, D}, "(num_blocks, H, D)", at::kFloat);
  check_cpu(block_table, "block_table");
  check_cpu(seq_lens, "seq_lens");
  TORCH_CHECK(block_table.dim() == 2 && block_table.scalar_type() == at::kInt,
              "block_table must be int32 (R, max_blocks), got ", block_table.scalar_type(), " ",
              block_table.sizes());
  const int64_t R = block_table.size(0), max_blocks = block_table.size(1);
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == R && seq_lens.scalar_type() == at::kInt,
              "seq_lens must be int32 (R,) = (", R, ",), got ", seq_lens.scalar_type(), " ",
              seq_lens.sizes());
  TORCH_CHECK(block_size >= 1, "block_size must be >= 1, got ", block_size);
  at::Tensor out = at::zeros({R, H, D}, key_sums.options());
  float* o = out.data_ptr<float>();
  const float* s1 = key_sums.data_ptr<float>();
  const float* s2 = key_sq_sums.data_ptr<float>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  std::vector<double> mean(D), mean_sq(D);
  for (int64_t i = 0; i < R; ++i) {
    const int64_t len = lens[i * seq_lens.stride(0)];
    if (len <= 0) continue;  // an empty row: zeros
    const int64_t used = std::min(max_blocks, (len + block_size - 1) / block_size);
    for (int64_t h = 0; h < H; ++h) {
      std::fill(mean.begin(), mean.end(), 0.0);
      std::fill(mean_sq.begin(), mean_sq.end(), 0.0);
      for (int64_t j = 0; j < used; ++j) {
        // clamped into range, as the operators clamp block ids: never a read outside the cache
        const int64_t b = std::clamp<int64_t>(
            table[i * block_table.stride(0) + j * block_table.stride(1)], 0, NB - 1);
        const float* a = s1 + b * key_sums.stride(0) + h * key_sums.stride(1);
        const float* a2 = s2 + b * key_sq_sums.stride(0) + h * key_sq_sums.stride(1);
        for (int64_t d = 0; d < D; ++d) {
          mean[d] += a[d * key_sums.stride(2)];
          mean_sq[d] += a2[d * key_sq_sums.stride(2)];
        }
      }
      for (int64_t d = 0; d < D; ++d) {
        const double m = mean[d] / len;
        o[(i * H + h) * D + d] = static_cast<float>(std::sqrt(std::max(0.0, mean_sq[d] / len - m * m)));
      }
    }
  }
  return out;
}

}  // namespace sparq
