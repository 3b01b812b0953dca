// sparq::attention_cuda and sparq::paged_attention_cuda: the CUDA backend of
// torch.ops.sparq_ext.attention and torch.ops.sparq_ext.paged_attention (the same kernels, with
// the paged cache's block table as their position policy: docs/design.md section 3a).
//
// Host side only (g++, ATen): checks the arguments, brings the inputs into the layouts the
// kernels read (only where they are not already: last dim contiguous, rows 16-byte aligned),
// takes its one workspace from the caching allocator, and enqueues the kernels of
// csrc/cuda/*.cu on the current stream (docs/cuda-pipeline.md). Nothing here reads device data or synchronises, so
// the op can be captured in a CUDA graph; every size is a function of the shapes alone
// (k_eff = min(k, S); the clamp of k to each row's valid count happens on the device).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <vector>

#include "sparq/cuda_launchers.h"
#include "sparq/cuda_pipeline.h"
#include "sparq/math.h"
#include "sparq_ops.h"

namespace sparq {
namespace {

using cuda::DType;

DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "query must be float32, float16 or bfloat16, got ", t);
}

// K / V rows (the last dim) read with 16-byte loads: unit stride over D and the 16-byte rule
// of sparq/cuda_pipeline.h (aligned start, other strides multiples of 16 bytes).
bool rows_aligned(const at::Tensor& t) {
  if (t.size(3) > 1 && t.stride(3) != 1) return false;
  return cuda::rows_aligned16(t.data_ptr(), t.element_size(), t.stride(0), t.stride(1),
                              t.stride(2));
}

at::Tensor with_aligned_rows(const at::Tensor& t) {
  if (rows_aligned(t)) return t;
  at::Tensor c = t.contiguous();
  // A contiguous view may still start at an unaligned offset: then copy into fresh storage.
  return rows_aligned(c) ? c : t.clone(at::MemoryFormat::Contiguous);
}

// Multiprocessors of each device, queried once (the current device's properties are cached
// by ATen too; this keeps the lookup out of the per-call path).
int64_t sm_count(int device) {
  static std::mutex mu;
  static std::vector<int64_t> counts;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(counts.size())) counts.resize(device + 1, 0);
  if (counts[device] == 0)
    counts[device] = at::cuda::getDeviceProperties(device)->multiProcessorCount;
  return counts[device];
}

// The fields both operators fill alike: shapes, budget, softmax variants, the query, the K / V
// rows and an int8 key_t's scales (read in place whatever their strides). `S`: positions per
// batch row (for the paged cache, its table's capacity).
cuda::AttentionProblem make_problem(DType dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t S,
                                    int64_t D, int64_t r, int64_t k, int64_t local_window,
                                    bool reallocate, double scale, std::optional<double> softcap,
                                    const at::Tensor& sink_logits, const at::Tensor& q,
                                    const at::Tensor& key_rows, const at::Tensor& value_rows,
                                    const std::optional<at::Tensor>& key_t_scale) {
  cuda::AttentionProblem prob{};
  prob.dtype = dtype;
  prob.B = B;
  prob.Hq = Hq;
  prob.Hkv = Hkv;
  prob.S = S;
  prob.D = D;
  prob.r = r;
  prob.k = k;
  prob.window = local_window;
  prob.reallocate = reallocate;
  prob.scale = static_cast<float>(scale);
  prob.softcap = softcap ? static_cast<float>(*softcap) : 0.0f;
  prob.sinks = sink_logits.defined() ? sink_logits.data_ptr<float>() : nullptr;
  prob.sm_count = sm_count(q.get_device());
  prob.query = q.data_ptr();
  prob.key = key_rows.data_ptr();
  prob.k_sb = key_rows.stride(0);
  prob.k_sh = key_rows.stride(1);
  prob.k_ss = key_rows.stride(2);
  prob.value = value_rows.data_ptr();
  prob.v_sb = value_rows.stride(0);
  prob.v_sh = value_rows.stride(1);
  prob.v_ss = value_rows.stride(2);
  if (key_t_scale) {
    prob.key_t_int8 = true;
    prob.key_t_scale = key_t_scale->data_ptr<float>();
    prob.kts_sb = key_t_scale->stride(0);
    prob.kts_sh = key_t_scale->stride(1);
    prob.kts_ss = key_t_scale->stride(2);
  }
  return prob;
}

// One workspace from the caching allocator (prep clears what needs clearing on the stream),
// then the kernels on the current stream; `op` names the operator in a launch error.
void enqueue(const cuda::AttentionProblem& prob, const at::Tensor& query, const char* op) {
  const cuda::AttentionPlan plan = cuda::plan_attention(prob);
  at::Tensor workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)},
                                   query.options().dtype(at::kByte));
  const char* stage = "";
  const cudaError_t err = cuda::enqueue_attention(
      prob, plan, workspace.data_ptr(), at::cuda::getCurrentCUDAStream().stream(), &stage);
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA): launching ", stage, " failed: ",
              cudaGetErrorString(err));
}

at::Tensor attention_cuda_impl(const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, int64_t r, int64_t k,
                               const std::optional<at::Tensor>& key_t,
                               const std::optional<at::Tensor>& value_mean,
                               const std::optional<at::Tensor>& seq_lens,
                               const std::optional<at::Tensor>& attn_mask, int64_t local_window,
                               bool reallocate, double scale, std::optional<double> softcap,
                               const std::optional<at::Tensor>& sinks,
                               const std::optional<at::Tensor>& key_t_scale,
                               const std::optional<at::Tensor>& component_weights) {
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(3);
  const int64_t Hkv = key.size(1), S = key.size(2);
  const DType dtype = kernel_dtype(query.scalar_type());

  at::Tensor out = at::empty({B, Hq, 1, D}, query.options());
  if (B == 0) return out;

  // Inputs in the layouts the kernels read (no copies when they already are). The query
  // may start at any address: prep reads it with scalar loads and writes the aligned fp32
  // copy attend vector-loads.
  const at::Tensor q = query.contiguous();
  const at::Tensor key_rows = with_aligned_rows(key);
  const at::Tensor value_rows = with_aligned_rows(value);
  at::Tensor kt;
  bool kt_vec = false;
  if (key_t) {
    kt = key_t->stride(3) == 1 || S == 1 ? *key_t : key_t->contiguous();
    kt_vec = cuda::key_t_vec(kt.data_ptr(), dtype, kt.element_size(), kt.stride(0),
                             kt.stride(1), kt.stride(2));
  }
  const at::Tensor lens = seq_lens ? seq_lens->to(at::kLong).contiguous() : at::Tensor();
  const at::Tensor mask = attn_mask ? mask_as_batch_by_seq(*attn_mask, B, S) : at::Tensor();
  const at::Tensor v_mean = value_mean ? value_mean->contiguous() : at::Tensor();
  const at::Tensor sink_logits = sinks ? sinks->contiguous() : at::Tensor();
  const at::Tensor weights = component_weights ? component_weights->contiguous() : at::Tensor();

  cuda::AttentionProblem prob =
      make_problem(dtype, B, Hq, Hkv, S, D, r, k, local_window, reallocate, scale, softcap,
                   sink_logits, q, key_rows, value_rows, key_t_scale);
  prob.component_weights = weights.defined() ? weights.data_ptr<float>() : nullptr;
  if (key_t) {
    prob.key_t = kt.data_ptr();
    prob.kt_sb = kt.stride(0);
    prob.kt_sh = kt.stride(1);
    prob.kt_sd = kt.stride(2);
    prob.kt_ss = 1;  // unit S-stride (made so above; with S = 1 no stride is ever used)
    prob.kt_vec = kt_vec;
  }
  prob.value_mean = value_mean ? v_mean.data_ptr() : nullptr;
  prob.seq_lens = seq_lens ? lens.data_ptr<int64_t>() : nullptr;
  prob.mask = attn_mask ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  prob.out = out.data_ptr();

  enqueue(prob, query, "sparq_ext.attention");
  return out;
}

// `rows`: the (batch or request row, KV head) pairs, named by `rows_name` in the error.
void check_cuda_limits(const at::Tensor& query, int64_t D, int64_t rows, const char* rows_name) {
  TORCH_CHECK(query.is_cuda(), "query must be a CUDA tensor for the CUDA kernel, got ",
              query.device());
  TORCH_CHECK(D <= cuda::kMaxHeadDim, "the CUDA kernels support head_dim <= ",
              cuda::kMaxHeadDim, ", got ", D);
  TORCH_CHECK(rows <= 65535, "the CUDA kernels support ", rows_name, " <= 65535, got ", rows);
}

}  // namespace

at::Tensor attention_cuda(SPARQ_ATTENTION_ARGS, SPARQ_SOFTMAX_VARIANT_ARGS,
                          SPARQ_KEY_T_SCALE_ARG, SPARQ_COMPONENT_WEIGHTS_ARG) {
  const AttentionDims d = check_attention_args(query, key, value, r, k, key_t, value_mean,
                                               seq_lens, attn_mask, local_window, key_t_scale,
                                               component_weights);
  check_softmax_variants(query, d.Hq, softcap, sinks);
  check_cuda_limits(query, d.D, d.B * d.Hkv, "B * Hkv");
  TORCH_CHECK(d.S < std::numeric_limits<int32_t>::max() / 2,
              "the CUDA kernels support S < 2^30 positions, got ", d.S);
  if (scale) TORCH_CHECK(std::isfinite(*scale), "scale must be a finite float or None");
  const double logit_scale = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(d.D));
  c10::cuda::CUDAGuard guard(query.device());

  // Head dims that are not a multiple of 8: zero-pad D (dot products, |q| sums and the
  // top-r choice are unchanged: padded components are 0, with weight 0, and rank after the
  // real ones) and cut the output back.
  if (d.D % 8 != 0) {
    const int64_t pad = 8 - d.D % 8;
    auto pad_last = [pad](const at::Tensor& t) { return at::constant_pad_nd(t, {0, pad}); };
    std::optional<at::Tensor> kt, vm, w;
    if (key_t) kt = at::constant_pad_nd(*key_t, {0, 0, 0, pad});
    if (value_mean) vm = pad_last(*value_mean);
    if (component_weights) w = pad_last(*component_weights);
    return attention_cuda_impl(pad_last(query), pad_last(key), pad_last(value), r, k, kt, vm,
                               seq_lens, attn_mask, local_window, reallocate, logit_scale,
                               softcap, sinks, key_t_scale, w)
        .narrow(3, 0, d.D)
        .contiguous();
  }
  return attention_cuda_impl(query, key, value, r, k, key_t, value_mean, seq_lens, attn_mask,
                             local_window, reallocate, logit_scale, softcap, sinks, key_t_scale,
                             component_weights);
}

// The paged cache is read in place: K / V rows with unit D-stride and 16-byte aligned rows
// (an engine's (num_blocks, block_size, Hkv, D) cache passed as transpose(1, 2) is), key_t_cache
// with any strides (16-byte loads where they allow, sparq/cuda_pipeline.h:paged_key_t_vec);
// block_table and seq_lens as given (int32, any strides), read only on the device. Every size
// comes from the shapes (S = max_blocks * block_size, the table's capacity), so the call is
// CUDA-graph capturable; each row's work is bounded by its seq_lens on the device (blocks of
// approx_logits, topk and value_sum past a row's length return at once).
at::Tensor paged_attention_cuda(SPARQ_PAGED_ATTENTION_ARGS, SPARQ_SOFTMAX_VARIANT_ARGS,
                                SPARQ_KEY_T_SCALE_ARG, SPARQ_VALUE_SUMS_ARG,
                                SPARQ_COMPONENT_WEIGHTS_ARG) {
  const PagedDims d = check_paged_attention_args(query, key_cache, value_cache, block_table,
                                                 seq_lens, r, k, key_t_cache, value_mean,
                                                 local_window, key_t_scale, value_sums_cache,
                                                 component_weights);
  check_softmax_variants(query, d.Hq, softcap, sinks);
  check_cuda_limits(query, d.D, d.R * d.Hkv, "R * Hkv");
  // attention zero-pads such head dims; padding a paged cache would copy all of it per call.
  TORCH_CHECK(d.D % 8 == 0, "paged_attention on CUDA needs head_dim (D) a multiple of 8 (the "
              "kernels read cache rows in 16-byte vectors), got ", d.D);
  const int64_t capacity = d.max_blocks * d.block_size;
  TORCH_CHECK(capacity < std::numeric_limits<int32_t>::max() / 2,
              "the CUDA kernels support max_blocks * block_size < 2^30 positions, got "
              "max_blocks = ", d.max_blocks, " and block_size = ", d.block_size);
  TORCH_CHECK(d.num_blocks <= std::numeric_limits<int32_t>::max(),
              "the CUDA kernels support num_blocks < 2^31, got ", d.num_blocks);
  if (scale) TORCH_CHECK(std::isfinite(*scale), "scale must be a finite float or None");
  const double logit_scale = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(d.D));
  c10::cuda::CUDAGuard guard(query.device());
  if (d.R == 0 || capacity == 0) return at::zeros({d.R, d.Hq, d.D}, query.options());

  const DType dtype = kernel_dtype(query.scalar_type());
  at::Tensor out = at::empty({d.R, d.Hq, d.D}, query.options());
  const at::Tensor q = query.contiguous();
  const at::Tensor key_rows = with_aligned_rows(key_cache);
  const at::Tensor value_rows = with_aligned_rows(value_cache);
  // v_mean from the block sums: a few ATen ops on the stream, then the kernels' value_mean path
  const at::Tensor v_mean =
      value_mean         ? value_mean->contiguous()
      : value_sums_cache ? value_mean_from_block_sums(*value_sums_cache, block_table, seq_lens,
                                                      d.block_size).to(query.scalar_type())
                         : at::Tensor();
  const at::Tensor sink_logits = sinks ? sinks->contiguous() : at::Tensor();
  const at::Tensor weights = component_weights ? component_weights->contiguous() : at::Tensor();

  cuda::AttentionProblem prob =
      make_problem(dtype, d.R, d.Hq, d.Hkv, capacity, d.D, r, k, local_window, reallocate,
                   logit_scale, softcap, sink_logits, q, key_rows, value_rows, key_t_scale);
  prob.component_weights = weights.defined() ? weights.data_ptr<float>() : nullptr;
  prob.pages = {block_table.data_ptr<int32_t>(), block_table.stride(0), block_table.stride(1),
                static_cast<int32_t>(d.block_size), static_cast<int32_t>(d.num_blocks)};
  if (key_t_cache) {
    const at::Tensor& kt = *key_t_cache;
    prob.key_t = kt.data_ptr();
    prob.kt_sb = kt.stride(0);
    prob.kt_sh = kt.stride(1);
    prob.kt_sd = kt.stride(2);
    prob.kt_ss = kt.stride(3);
    prob.kt_vec = cuda::paged_key_t_vec(kt.data_ptr(), dtype, kt.element_size(), prob.kt_sb,
                                        prob.kt_sh, prob.kt_sd, prob.kt_ss, d.block_size);
  }
  prob.value_mean = v_mean.defined() ? v_mean.data_ptr() : nullptr;
  prob.seq_lens_i32 = seq_lens.data_ptr<int32_t>();
  prob.seq_lens_i32_stride = seq_lens.stride(0);
  prob.out = out.data_ptr();

  enqueue(prob, query, "sparq_ext.paged_attention");
  return out;
}

}  // namespace sparq
