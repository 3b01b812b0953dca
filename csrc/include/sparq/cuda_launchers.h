// Interface between the host file csrc/cuda/attention_cuda.cpp (g++, ATen) and the CUDA
// kernels in csrc/cuda/*.cu (nvcc, no torch headers): plain parameter structs of raw
// pointers, sizes and element strides, and one launcher per stage. Launchers enqueue on the
// given stream, never synchronise, and return cudaGetLastError() for the caller to check.
//
// Stages (DESIGN.md section 6), per (batch b, KV head h) = one "row" (row = b * Hkv + h):
//   row_prep      per batch row: valid length, valid count, local-window start
//   query_prep    i1 = top-r of sum_g |q_g|, per-head approximate scales, fp32 query copies
//   approx_logits group-summed approximate logits (selection scores), per-tile softmax
//                 statistics per head, histogram of the top radix digit
//   radix_hist    radix-select histogram passes 1..3
//   radix_emit    exact top-k indices (unsorted)
//   value_sum     sum of V over valid positions (only when value_mean is not given)
//   attend        exact attention over the selected rows, split over blocks (partials)
//   merge         combine the splits, alpha, alpha * y + (1 - alpha) * v_mean
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sparq {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Block sizes and tiles the host needs for grid and workspace sizes.
constexpr int kPrepThreads = 256;
constexpr int kApproxThreads = 256;       // approx_logits: 16 bytes of key_t per thread per row
constexpr int kTopkThreads = 256;         // must equal kRadixBuckets (one bucket per thread)
constexpr int kTopkKeysPerThread = 16;
constexpr int kTopkChunk = kTopkThreads * kTopkKeysPerThread;  // keys per block and pass
// Rows of at most this many positions are selected by one block each, keys in shared memory
// (128 KiB: fits sm_80 and sm_90), in one launch instead of four.
constexpr int64_t kTopkRowMaxKeys = 32768;
constexpr int kTopkRowThreads = 1024;
constexpr int kAttendWarps = 4;
constexpr int kValueSumChunk = 1024;      // positions per value_sum block
constexpr int kMaxHeadDim = 256;          // kernels are instantiated for head dims 64/128/256
constexpr int kMaxGroupChunk = 8;         // query heads handled together per block

// Positions per approx_logits tile for a dtype: 16-byte loads, one per thread and key_t row.
inline int approx_tile(DType dtype) {
  return kApproxThreads * (dtype == DType::kFloat32 ? 4 : 8);
}

// Query heads per block (1, 4 or 8) for a group of G query heads, and the number of chunks.
inline int group_chunk(int64_t G) { return G <= 1 ? 1 : G <= 4 ? 4 : kMaxGroupChunk; }
inline int64_t group_chunks(int64_t G) { return (G + group_chunk(G) - 1) / group_chunk(G); }

// Per batch row: row_len = clamp(seq_lens[b], 0, S) (S without seq_lens); n_valid = valid
// positions below row_len; win_start = first position of the local window (the last
// `window` valid positions are those valid positions >= win_start).
struct RowPrepParams {
  const int64_t* seq_lens;  // (B,) or nullptr
  const uint8_t* mask;      // (B, S) bool or nullptr
  int64_t B, S;
  int64_t window;
  int32_t* row_len;         // (B,)
  int32_t* n_valid;         // (B,)
  int32_t* win_start;       // (B,)
};

struct QueryPrepParams {
  const void* query;        // (B, Hq, 1, D) contiguous, query dtype
  int64_t rows, G, D, r;
  float scale;
  int32_t* i1;              // (rows, r)
  float* coef;              // (rows, G, r): q_g[i1_j] * approx scale_g
  float* coef_sum;          // (rows, r): sum_g coef
  float* head_scale;        // (rows, G): approximate-logit scale of each query head
};

struct ApproxParams {
  const void* key_t;        // (B, Hkv, D, S), S-stride 1, or nullptr (then gather from key)
  int64_t kt_sb, kt_sh, kt_sd;
  bool kt_vec;              // every key_t row is 16-byte aligned (vector loads allowed)
  const void* key;          // (B, Hkv, S, D), D-stride 1
  int64_t k_sb, k_sh, k_ss;
  const int32_t* i1;
  const float* coef;
  const float* coef_sum;
  const int32_t* row_len;
  const int32_t* win_start;
  const uint8_t* mask;      // (B, S) or nullptr
  int64_t rows, Hkv, G, S, r;
  int64_t S_pad;            // row stride of sel_score (multiple of 4)
  int64_t n_tiles;
  float* sel_score;         // (rows, S_pad): sum_g approx logit, +inf window, -inf invalid
  float* tile_stats;        // (rows, G, n_tiles, 2): softmax (max, sum exp) of approx logits
  uint32_t* hist;           // (rows, kRadixPasses, kRadixBuckets), zeroed; pass 0 filled here
};

struct TopkParams {
  const float* sel_score;
  int64_t S_pad, Hkv, rows;
  int64_t k_eff;            // min(k, S); the per-row clamp to the valid count is on device
  const int32_t* row_len;
  uint32_t* hist;
  uint32_t* counters;       // (rows, 2), zeroed
  int32_t* topk_idx;        // (rows, k_eff): first min(k_eff, valid) entries are written
  int64_t n_chunks;
  int64_t row_max_keys;     // S_pad <= this: one block per row (kTopkRowMaxKeys by default)
};

struct ValueSumParams {
  const void* value;        // (B, Hkv, S, D), D-stride 1, rows 16-byte aligned
  int64_t v_sb, v_sh, v_ss;
  const int32_t* row_len;
  const uint8_t* mask;
  int64_t rows, Hkv, S, D, n_chunks;
  float* value_sum;         // (rows, D), zeroed
};

struct AttendParams {
  const void* key;          // (B, Hkv, S, D), D-stride 1, rows 16-byte aligned
  int64_t k_sb, k_sh, k_ss;
  const void* value;
  int64_t v_sb, v_sh, v_ss;
  const void* query;        // (B, Hq, 1, D) contiguous, query dtype
  const int32_t* i1;        // (rows, r)
  const float* head_scale;  // (rows, G)
  float scale;              // exact-logit scale
  int64_t r;
  const int32_t* topk_idx;
  const uint32_t* hist;     // pass-0 histogram: its total is the number of valid positions
  int64_t rows, Hkv, G, S, D, k_eff;
  int64_t n_splits, split_len;
  float* part_acc;          // (rows, n_splits, G, D): unnormalised sum of p * V
  float* part_stats;        // (rows, n_splits, G, 4): (m, l) exact, (m, l) approx
};

struct MergeParams {
  const float* part_acc;
  const float* part_stats;
  const float* tile_stats;
  const float* value_sum;   // (rows, D) or nullptr when value_mean is given
  const void* value_mean;   // (B, Hkv, 1, D) contiguous, or nullptr
  const int32_t* n_valid;
  int64_t rows, Hkv, G, D, n_splits, n_tiles;
  bool reallocate;
  void* out;                // (B, Hq, 1, D) contiguous, query dtype
};

cudaError_t launch_row_prep(const RowPrepParams& p, cudaStream_t stream);
cudaError_t launch_query_prep(const QueryPrepParams& p, DType dtype, cudaStream_t stream);
cudaError_t launch_approx_logits(const ApproxParams& p, DType dtype, cudaStream_t stream);
cudaError_t launch_radix_topk(const TopkParams& p, cudaStream_t stream);
cudaError_t launch_value_sum(const ValueSumParams& p, DType dtype, int head_dim_bucket,
                             cudaStream_t stream);
cudaError_t launch_attend(const AttendParams& p, DType dtype, int head_dim_bucket,
                          cudaStream_t stream);
cudaError_t launch_merge(const MergeParams& p, DType dtype, cudaStream_t stream);

// Smallest instantiated head dim (64, 128, 256) >= D, or 0 when D > kMaxHeadDim.
inline int head_dim_bucket(int64_t D) {
  return D <= 64 ? 64 : D <= 128 ? 128 : D <= kMaxHeadDim ? 256 : 0;
}

}  // namespace cuda
}  // namespace sparq
