// Interface between the host file csrc/cuda/attention_cuda.cpp (g++, ATen) and the CUDA
// kernels in csrc/cuda/*.cu (nvcc, no torch headers): plain parameter structs of raw
// pointers, sizes and element strides, and one launcher per kernel. Launchers enqueue on the
// given stream, never synchronise, and return cudaGetLastError() for the caller to check.
//
// Kernels (docs/design.md section 2 names the stages; docs/cuda-pipeline.md has the launch
// list, the shared-memory budget and the estimated time of each), per (batch b, KV head h)
// = one "row" (row = b * Hkv + h):
//   prep          zeroes the row's counters and histogram, the batch row's valid length and
//                 local-window start, i1 = top-r of sum_g |q_g|, per-head approximate
//                 scales, an fp32 copy of the query in aligned workspace
//   approx_logits group-summed approximate logits (selection scores; softcapped per head
//                 first when softcap is set), per-tile softmax statistics per head, the
//                 12-bit first-digit histogram, the valid count
//   topk          exact top-k: several blocks per row take every key above the pivot
//                 digit and collect the pivot digit's candidates; the last block of the
//                 row to finish refines the candidates on the remaining 20 bits
//   value_sum     sum of V over valid positions (only when value_mean is not given)
//   attend        exact attention over the selected rows, split over blocks; the last
//                 block of each (row, group chunk) to finish does the merge (alpha, output;
//                 a head's sink joins both softmaxes there)
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sparq {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Block sizes and tiles the host needs for grid and workspace sizes.
constexpr int kPrepThreads = 256;
constexpr int kApproxThreads = 256;       // approx_logits: 16 bytes of key_t per thread per row
// topk: the first radix digit is the top kTopkDigitBits of the ordered key (sign, exponent
// and 3 mantissa bits of the score); the candidates sharing the pivot digit are refined on
// two more digits of kTopkRefineBits.
constexpr int kTopkDigitBits = 12;
constexpr int kTopkDigitBuckets = 1 << kTopkDigitBits;
constexpr int kTopkRefineBits = 10;
constexpr int kTopkRefineBuckets = 1 << kTopkRefineBits;
constexpr int kTopkThreads = 1024;        // one refine bucket per thread
constexpr int64_t kTopkMinChunk = 2048;   // positions per topk block at least
constexpr int kAttendWarps = 4;
constexpr int kValueSumChunk = 1024;      // positions per value_sum block
constexpr int kMaxHeadDim = 256;          // kernels are instantiated for head dims 64/128/256
constexpr int kMaxGroupChunk = 8;         // query heads handled together per block
// Every kernel keeps static + dynamic shared memory within the default 48 KiB, so no launch
// needs cudaFuncAttributeMaxDynamicSharedMemorySize on any architecture (docs/cuda-pipeline.md).
constexpr int kSharedMemoryBudget = 48 * 1024;

// Per-row counters, zeroed by prep (graph replays start from zero too).
enum RowCounter : int {
  kValidCount = 0,    // valid positions (approx_logits adds each block's count)
  kAboveSlots = 1,    // topk: output slots taken by keys above the pivot digit
  kCandidates = 2,    // topk: candidates collected (keys with the pivot digit)
  kTopkDone = 3,      // topk: blocks of the row finished
  kAttendDone = 4,    // attend: blocks finished, one counter per group chunk from here
};

// Positions each approx_logits thread reads per key_t row: one 16-byte load in the cache dtype
// (an int8 key_t reads the same positions: a 4- or 8-byte load).
inline int approx_run(DType dtype) { return dtype == DType::kFloat32 ? 4 : 8; }

// Positions per approx_logits tile for a dtype.
inline int approx_tile(DType dtype) { return kApproxThreads * approx_run(dtype); }

// Query heads per block (1, 4 or 8) for a group of G query heads, and the number of chunks.
inline int group_chunk(int64_t G) { return G <= 1 ? 1 : G <= 4 ? 4 : kMaxGroupChunk; }
inline int64_t group_chunks(int64_t G) { return (G + group_chunk(G) - 1) / group_chunk(G); }

// How a batch row's position maps to memory. block_table == nullptr: a contiguous cache
// (attention), position s of batch row b at b * s_outer + s * s_pos; otherwise a paged one
// (paged_attention, docs/design.md section 3a), position s of row b in block
// block_table[b * bt_row + (s / block_size) * bt_col] at offset s % block_size, that is at
// block * s_outer + (s % block_size) * s_pos. The kernels that read the cache are templated on
// which (StridedPositions, PagedPositions in sparq/cuda_common.cuh), never branch on it.
struct PageTable {
  const int32_t* block_table;  // (B, max_blocks), any strides, or nullptr
  int64_t bt_row, bt_col;
  int32_t block_size;
  int32_t num_blocks;          // block ids are clamped to [0, num_blocks): never outside the cache
};

struct PrepParams {
  const void* query;        // (B, Hq, 1, D) contiguous, query dtype; any alignment
  const float* component_weights;  // (rows, D) contiguous fp32, or nullptr (all 1)
  const int64_t* seq_lens;  // (B,) or nullptr
  const int32_t* seq_lens_i32;  // (B,) int32 with element stride seq_lens_i32_stride, or nullptr
  int64_t seq_lens_i32_stride;
  const uint8_t* mask;      // (B, S) bool or nullptr
  int64_t B, Hkv, rows, G, D, r, S, window;
  float scale;
  // Zeroed here, per row: hist (kTopkDigitBuckets), counters (counter_stride), value_sum (D)
  uint32_t* hist;
  uint32_t* counters;
  int64_t counter_stride;
  float* value_sum;         // or nullptr
  int32_t* row_len;         // (B,): clamp(seq_lens[b], 0, S)
  int32_t* win_start;       // (B,): first position of the local window
  int32_t* i1;              // (rows, r)
  float* coef;              // (rows, G, r): q_g[i1_j] * approx scale_g
  float* coef_sum;          // (rows, r): sum_g coef
  float* head_scale;        // (rows, G): approximate-logit scale of each query head
  float* q32;               // (rows, G, D) fp32 query, 16-byte aligned rows
};

// Caches are (B or blocks, Hkv, positions, D) (key_t: (B or blocks, Hkv, D, positions)) with
// element strides (outer, head, position); `pages` says what the outer index is.
struct ApproxParams {
  PageTable pages;
  const void* key_t;        // (B, Hkv, D, S), or nullptr (then gather from key)
  int64_t kt_sb, kt_sh, kt_sd, kt_ss;  // kt_ss: read for paged caches only (contiguous: 1)
  bool kt_vec;              // vector loads of a run of VEC positions (approx_run): unit kt_ss,
                            // rows aligned to the run's bytes and (paged) block_size a multiple
                            // of VEC (sparq/cuda_pipeline.h: key_t_vec, paged_key_t_vec)
  bool key_t_int8;          // key_t is the 8-bit selection cache, key_t_scale beside it
  const float* key_t_scale; // (B or blocks, Hkv, positions) fp32, any strides, or nullptr
  int64_t kts_sb, kts_sh, kts_ss;
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
  float softcap;            // logit softcapping of the approximate logits; 0 when absent
  float* sel_score;         // (rows, S_pad): sum_g approx logit, +inf window, -inf invalid
  float* tile_stats;        // (rows, G, n_tiles, 2): softmax (max, sum exp) of approx logits
  uint32_t* hist;           // (rows, kTopkDigitBuckets), zeroed: first-digit histogram
  uint32_t* counters;       // (rows, counter_stride): kValidCount added here
  int64_t counter_stride;
};

struct TopkParams {
  const float* sel_score;
  int64_t S_pad, Hkv, rows;
  int64_t k_eff;            // min(k, S); the per-row clamp to the valid count is on device
  const int32_t* row_len;
  const uint32_t* hist;
  uint32_t* counters;
  int64_t counter_stride;
  uint32_t* cand_key;       // (rows, S_pad): candidates' ordered keys
  int32_t* cand_pos;        // (rows, S_pad): candidates' positions
  int32_t* topk_idx;        // (rows, k_eff): first min(k_eff, valid) entries are written
  int64_t blocks_per_row, chunk_len;
};

struct ValueSumParams {
  PageTable pages;
  const void* value;        // (B, Hkv, S, D), D-stride 1, rows 16-byte aligned
  int64_t v_sb, v_sh, v_ss;
  const int32_t* row_len;
  const uint8_t* mask;
  int64_t rows, Hkv, S, D, n_chunks;
  float* value_sum;         // (rows, D), zeroed
};

struct AttendParams {
  PageTable pages;
  const void* key;          // (B, Hkv, S, D), D-stride 1, rows 16-byte aligned
  int64_t k_sb, k_sh, k_ss;
  const void* value;
  int64_t v_sb, v_sh, v_ss;
  const float* q32;         // (rows, G, D) fp32 query from prep, aligned
  const int32_t* i1;        // (rows, r)
  const float* head_scale;  // (rows, G)
  float scale;              // exact-logit scale
  float softcap;            // logit softcapping, exact and approximate logits; 0 when absent
  int64_t r;
  // The 8-bit selection cache (int8 key_t, else nullptr): alpha's approximate logits come from
  // its i1 components at each selected position times the position's scale, as in step 1.
  const int8_t* key_t;
  int64_t kt_sb, kt_sh, kt_sd, kt_ss;
  const float* key_t_scale;
  int64_t kts_sb, kts_sh, kts_ss;
  const int32_t* topk_idx;
  uint32_t* counters;       // kValidCount read; kAttendDone + chunk counts finished blocks
  int64_t counter_stride;
  int64_t rows, Hkv, G, S, D, k_eff;
  int64_t n_splits, split_len;
  float* part_acc;          // (rows, n_splits, G, D): unnormalised sum of p * V
  float* part_stats;        // (rows, n_splits, G, 4): (m, l) exact, (m, l) approx
  // merge, in the last block of each (row, group chunk)
  const float* tile_stats;  // (rows, G, n_tiles, 2)
  int64_t n_tiles;
  const float* value_sum;   // (rows, D) or nullptr when value_mean is given
  const void* value_mean;   // (B, Hkv, 1, D) contiguous, or nullptr
  const float* sinks;       // (Hq,) sink logits, or nullptr: one more softmax entry per head
  bool reallocate;
  void* out;                // (B, Hq, 1, D) contiguous, query dtype
};

cudaError_t launch_prep(const PrepParams& p, DType dtype, cudaStream_t stream);
cudaError_t launch_approx_logits(const ApproxParams& p, DType dtype, cudaStream_t stream);
cudaError_t launch_topk(const TopkParams& p, cudaStream_t stream);
cudaError_t launch_value_sum(const ValueSumParams& p, DType dtype, int head_dim_bucket,
                             cudaStream_t stream);
cudaError_t launch_attend(const AttendParams& p, DType dtype, int head_dim_bucket,
                          cudaStream_t stream);

// Smallest instantiated head dim (64, 128, 256) >= D, or 0 when D > kMaxHeadDim.
inline int head_dim_bucket(int64_t D) {
  return D <= 64 ? 64 : D <= 128 ? 128 : D <= kMaxHeadDim ? 256 : 0;
}

}  // namespace cuda
}  // namespace sparq
