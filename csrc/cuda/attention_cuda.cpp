// sparq::attention_cuda: the CUDA backend of torch.ops.sparq_ext.attention.
//
// Host side only (g++, ATen): checks the arguments, brings the inputs into the layouts the
// kernels read (only where they are not already: last dim contiguous, rows 16-byte aligned),
// takes every workspace from the caching allocator, and enqueues the stages of
// csrc/cuda/*.cu on the current stream. Nothing here reads device data or synchronises, so
// the op can be captured in a CUDA graph; every size is a function of the shapes alone
// (k_eff = min(k, S); the clamp of k to each row's valid count happens on the device).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "sparq/cuda_launchers.h"
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

void check_launch(cudaError_t err, const char* stage) {
  TORCH_CHECK(err == cudaSuccess, "sparq_ext.attention (CUDA): launching ", stage,
              " failed: ", cudaGetErrorString(err));
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// K / V rows (the last dim) read with 16-byte loads: unit stride over D, 16-byte aligned
// start, and every other stride a multiple of 16 bytes (expanded dims, stride 0, are fine).
bool rows_aligned(const at::Tensor& t) {
  const int64_t e = t.element_size();
  if (t.size(3) > 1 && t.stride(3) != 1) return false;
  if (!aligned16(t.data_ptr())) return false;
  for (int i = 0; i < 3; ++i)
    if ((t.stride(i) * e) % 16 != 0) return false;
  return true;
}

at::Tensor with_aligned_rows(const at::Tensor& t) {
  if (rows_aligned(t)) return t;
  at::Tensor c = t.contiguous();
  // A contiguous view may still start at an unaligned offset: then copy into fresh storage.
  return rows_aligned(c) ? c : t.clone(at::MemoryFormat::Contiguous);
}

at::Tensor attention_cuda_impl(const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, int64_t r, int64_t k,
                               const std::optional<at::Tensor>& key_t,
                               const std::optional<at::Tensor>& value_mean,
                               const std::optional<at::Tensor>& seq_lens,
                               const std::optional<at::Tensor>& attn_mask, int64_t local_window,
                               bool reallocate, double scale) {
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(3);
  const int64_t Hkv = key.size(1), S = key.size(2), G = Hq / Hkv;
  const int64_t rows = B * Hkv;
  const DType dtype = kernel_dtype(query.scalar_type());
  const int head_bucket = cuda::head_dim_bucket(D);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();

  at::Tensor out = at::empty({B, Hq, 1, D}, query.options());
  if (B == 0) return out;

  // Inputs in the layouts the kernels read (no copies when they already are).
  const at::Tensor q = query.contiguous();
  const at::Tensor key_rows = with_aligned_rows(key);
  const at::Tensor value_rows = with_aligned_rows(value);
  at::Tensor kt;
  bool kt_vec = false;
  if (key_t) {
    kt = key_t->stride(3) == 1 || S == 1 ? *key_t : key_t->contiguous();
    const int64_t e = kt.element_size();
    kt_vec = aligned16(kt.data_ptr()) && (kt.stride(0) * e) % 16 == 0 &&
             (kt.stride(1) * e) % 16 == 0 && (kt.stride(2) * e) % 16 == 0;
  }
  const at::Tensor lens = seq_lens ? seq_lens->to(at::kLong).contiguous() : at::Tensor();
  const at::Tensor mask = attn_mask ? mask_as_batch_by_seq(*attn_mask, B, S) : at::Tensor();
  const at::Tensor v_mean = value_mean ? value_mean->contiguous() : at::Tensor();
  const bool need_value_sum = reallocate && !value_mean;

  // Static sizes.
  const int64_t k_eff = std::min(k, S);
  const int64_t tile = cuda::approx_tile(dtype);
  const int64_t n_tiles = (S + tile - 1) / tile;
  const int64_t S_pad = (S + 3) / 4 * 4;
  const int64_t topk_chunks = (S + cuda::kTopkChunk - 1) / cuda::kTopkChunk;
  const int64_t value_chunks = (S + cuda::kValueSumChunk - 1) / cuda::kValueSumChunk;
  // Flash-decoding splits: about two blocks per SM in all, at least 128 positions a split.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks_per_split = rows * cuda::group_chunks(G);
  int64_t n_splits = (2 * sms + blocks_per_split - 1) / blocks_per_split;
  n_splits = std::clamp<int64_t>(n_splits, 1, (k_eff + 127) / 128);
  const int64_t split_len = (k_eff + n_splits - 1) / n_splits;
  n_splits = (k_eff + split_len - 1) / split_len;

  // Workspaces (caching allocator). One zero-filled block: histograms, emit counters, and
  // the V sum; zeroed on the stream (a memset node under graph capture).
  const auto int_opts = query.options().dtype(at::kInt);
  const auto float_opts = query.options().dtype(at::kFloat);
  const int64_t hist_words = rows * kRadixPasses * kRadixBuckets;
  const int64_t zero_words = hist_words + rows * 2 + (need_value_sum ? rows * D : 0);
  at::Tensor zeroed = at::empty({zero_words}, int_opts);
  C10_CUDA_CHECK(cudaMemsetAsync(zeroed.data_ptr(), 0, zero_words * sizeof(int32_t), stream));
  auto* hist = static_cast<uint32_t*>(zeroed.data_ptr());
  uint32_t* counters = hist + hist_words;
  float* value_sum = need_value_sum ? reinterpret_cast<float*>(counters + rows * 2) : nullptr;

  at::Tensor row_info = at::empty({3 * B}, int_opts);
  auto* row_len = static_cast<int32_t*>(row_info.data_ptr());
  at::Tensor i1 = at::empty({rows * r}, int_opts);
  at::Tensor qbuf = at::empty({rows * G * r + rows * r + rows * G}, float_opts);
  float* coef = static_cast<float*>(qbuf.data_ptr());
  float* coef_sum = coef + rows * G * r;
  float* head_scale = coef_sum + rows * r;
  at::Tensor sel_score = at::empty({rows * S_pad}, float_opts);
  at::Tensor tile_stats = at::empty({rows * G * n_tiles * 2}, float_opts);
  at::Tensor topk_idx = at::empty({rows * k_eff}, int_opts);
  at::Tensor part_acc = at::empty({rows * n_splits * G * D}, float_opts);
  at::Tensor part_stats = at::empty({rows * n_splits * G * 4}, float_opts);

  cuda::RowPrepParams rp{};
  rp.seq_lens = seq_lens ? lens.data_ptr<int64_t>() : nullptr;
  rp.mask = attn_mask ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  rp.B = B;
  rp.S = S;
  rp.window = local_window;
  rp.row_len = row_len;
  rp.n_valid = row_len + B;
  rp.win_start = row_len + 2 * B;
  check_launch(cuda::launch_row_prep(rp, stream), "row_prep");

  cuda::QueryPrepParams qp{};
  qp.query = q.data_ptr();
  qp.rows = rows;
  qp.G = G;
  qp.D = D;
  qp.r = r;
  qp.scale = static_cast<float>(scale);
  qp.i1 = static_cast<int32_t*>(i1.data_ptr());
  qp.coef = coef;
  qp.coef_sum = coef_sum;
  qp.head_scale = head_scale;
  check_launch(cuda::launch_query_prep(qp, dtype, stream), "query_prep");

  cuda::ApproxParams ap{};
  if (key_t) {
    ap.key_t = kt.data_ptr();
    ap.kt_sb = kt.stride(0);
    ap.kt_sh = kt.stride(1);
    ap.kt_sd = kt.stride(2);
    ap.kt_vec = kt_vec;
  }
  ap.key = key_rows.data_ptr();
  ap.k_sb = key_rows.stride(0);
  ap.k_sh = key_rows.stride(1);
  ap.k_ss = key_rows.stride(2);
  ap.i1 = qp.i1;
  ap.coef = coef;
  ap.coef_sum = coef_sum;
  ap.row_len = row_len;
  ap.win_start = rp.win_start;
  ap.mask = rp.mask;
  ap.rows = rows;
  ap.Hkv = Hkv;
  ap.G = G;
  ap.S = S;
  ap.r = r;
  ap.S_pad = S_pad;
  ap.n_tiles = n_tiles;
  ap.sel_score = sel_score.data_ptr<float>();
  ap.tile_stats = tile_stats.data_ptr<float>();
  ap.hist = hist;
  check_launch(cuda::launch_approx_logits(ap, dtype, stream), "approx_logits");

  cuda::TopkParams tp{};
  tp.sel_score = ap.sel_score;
  tp.S_pad = S_pad;
  tp.Hkv = Hkv;
  tp.rows = rows;
  tp.k_eff = k_eff;
  tp.row_len = row_len;
  tp.hist = hist;
  tp.counters = counters;
  tp.topk_idx = static_cast<int32_t*>(topk_idx.data_ptr());
  tp.n_chunks = topk_chunks;
  check_launch(cuda::launch_radix_topk(tp, stream), "radix_topk");

  if (need_value_sum) {
    cuda::ValueSumParams vp{};
    vp.value = value_rows.data_ptr();
    vp.v_sb = value_rows.stride(0);
    vp.v_sh = value_rows.stride(1);
    vp.v_ss = value_rows.stride(2);
    vp.row_len = row_len;
    vp.mask = rp.mask;
    vp.rows = rows;
    vp.Hkv = Hkv;
    vp.S = S;
    vp.D = D;
    vp.n_chunks = value_chunks;
    vp.value_sum = value_sum;
    check_launch(cuda::launch_value_sum(vp, dtype, head_bucket, stream), "value_sum");
  }

  cuda::AttendParams attend{};
  attend.key = key_rows.data_ptr();
  attend.k_sb = key_rows.stride(0);
  attend.k_sh = key_rows.stride(1);
  attend.k_ss = key_rows.stride(2);
  attend.value = value_rows.data_ptr();
  attend.v_sb = value_rows.stride(0);
  attend.v_sh = value_rows.stride(1);
  attend.v_ss = value_rows.stride(2);
  attend.query = q.data_ptr();
  attend.i1 = qp.i1;
  attend.head_scale = head_scale;
  attend.scale = static_cast<float>(scale);
  attend.r = r;
  attend.topk_idx = tp.topk_idx;
  attend.hist = hist;
  attend.rows = rows;
  attend.Hkv = Hkv;
  attend.G = G;
  attend.S = S;
  attend.D = D;
  attend.k_eff = k_eff;
  attend.n_splits = n_splits;
  attend.split_len = split_len;
  attend.part_acc = part_acc.data_ptr<float>();
  attend.part_stats = part_stats.data_ptr<float>();
  check_launch(cuda::launch_attend(attend, dtype, head_bucket, stream), "attend");

  cuda::MergeParams mp{};
  mp.part_acc = attend.part_acc;
  mp.part_stats = attend.part_stats;
  mp.tile_stats = ap.tile_stats;
  mp.value_sum = value_sum;
  mp.value_mean = value_mean ? v_mean.data_ptr() : nullptr;
  mp.n_valid = rp.n_valid;
  mp.rows = rows;
  mp.Hkv = Hkv;
  mp.G = G;
  mp.D = D;
  mp.n_splits = n_splits;
  mp.n_tiles = n_tiles;
  mp.reallocate = reallocate;
  mp.out = out.data_ptr();
  check_launch(cuda::launch_merge(mp, dtype, stream), "merge");
  return out;
}

}  // namespace

at::Tensor attention_cuda(SPARQ_ATTENTION_ARGS) {
  const AttentionDims d = check_attention_args(query, key, value, r, k, key_t, value_mean,
                                               seq_lens, attn_mask, local_window);
  TORCH_CHECK(query.is_cuda(), "query must be a CUDA tensor for the CUDA kernel, got ",
              query.device());
  TORCH_CHECK(d.D <= cuda::kMaxHeadDim, "the CUDA kernels support head_dim <= ",
              cuda::kMaxHeadDim, ", got ", d.D);
  TORCH_CHECK(d.B * d.Hkv <= 65535, "the CUDA kernels support B * Hkv <= 65535, got ",
              d.B * d.Hkv);
  TORCH_CHECK(d.S < std::numeric_limits<int32_t>::max() / 2,
              "the CUDA kernels support S < 2^30 positions, got ", d.S);
  if (scale) TORCH_CHECK(std::isfinite(*scale), "scale must be a finite float or None");
  const double logit_scale = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(d.D));
  c10::cuda::CUDAGuard guard(query.device());

  // Head dims that are not a multiple of 8: zero-pad D (dot products, |q| sums and the
  // top-r choice are unchanged: padded components are 0 and rank after the real ones) and
  // cut the output back.
  if (d.D % 8 != 0) {
    const int64_t pad = 8 - d.D % 8;
    auto pad_last = [pad](const at::Tensor& t) { return at::constant_pad_nd(t, {0, pad}); };
    std::optional<at::Tensor> kt, vm;
    if (key_t) kt = at::constant_pad_nd(*key_t, {0, 0, 0, pad});
    if (value_mean) vm = pad_last(*value_mean);
    return attention_cuda_impl(pad_last(query), pad_last(key), pad_last(value), r, k, kt, vm,
                               seq_lens, attn_mask, local_window, reallocate, logit_scale)
        .narrow(3, 0, d.D)
        .contiguous();
  }
  return attention_cuda_impl(query, key, value, r, k, key_t, value_mean, seq_lens, attn_mask,
                             local_window, reallocate, logit_scale);
}

}  // namespace sparq
