// The CUDA backend's launch sequence, free of torch: sizes every workspace from the shapes
// alone (so the op can be captured in a CUDA graph) and enqueues the kernels of
// sparq/cuda_launchers.h (docs/cuda-pipeline.md). csrc/cuda/attention_cuda.cpp calls it
// with ATen-allocated buffers; tests/cuda_emu/ calls the very same code with host buffers to
// run the kernels on the CPU.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "sparq/cuda_launchers.h"
#include "sparq/math.h"

namespace sparq {
namespace cuda {

// Whether a tensor's rows may be read with `bytes`-byte vector loads: an aligned start and
// every stride but the unit one a multiple of `bytes` (stride 0, an expanded dim, is fine).
inline bool rows_aligned(const void* ptr, int64_t elem_bytes, int64_t s0, int64_t s1, int64_t s2,
                         int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0 && (s0 * elem_bytes) % bytes == 0 &&
         (s1 * elem_bytes) % bytes == 0 && (s2 * elem_bytes) % bytes == 0;
}

// 16-byte loads: K / V rows (strides batch, head, position); the host glue copies a tensor
// that fails this.
inline bool rows_aligned16(const void* ptr, int64_t elem_bytes, int64_t s0, int64_t s1,
                           int64_t s2) {
  return rows_aligned(ptr, elem_bytes, s0, s1, s2, 16);
}

// Whether approx_logits may read a contiguous cache's key_t (unit position stride; strides
// batch, head, component) with vector loads: each thread's run of approx_run(dtype) positions,
// approx_run * kt_elem_bytes bytes (16 for a key_t in the cache dtype, 4 or 8 for an int8 one),
// must be aligned. Otherwise it reads elementwise.
inline bool key_t_vec(const void* ptr, DType dtype, int64_t kt_elem_bytes, int64_t s_b,
                      int64_t s_h, int64_t s_comp) {
  return rows_aligned(ptr, kt_elem_bytes, s_b, s_h, s_comp, approx_run(dtype) * kt_elem_bytes);
}

// The same for a paged key_t_cache (num_blocks, Hkv, D, block_size): a run must also be
// consecutive bytes within one block, so unit position stride and block_size a multiple of the
// run. Otherwise it reads elementwise, in place (a paged cache is never copied for key_t).
inline bool paged_key_t_vec(const void* ptr, DType dtype, int64_t kt_elem_bytes, int64_t s_block,
                            int64_t s_head, int64_t s_comp, int64_t s_pos, int64_t block_size) {
  return s_pos == 1 && block_size % approx_run(dtype) == 0 &&
         key_t_vec(ptr, dtype, kt_elem_bytes, s_block, s_head, s_comp);
}

// One call, in the layouts the kernels read: query (any alignment) and value_mean contiguous;
// key / value rows with unit D-stride and 16-byte aligned rows; key_t with unit S-stride
// (paged: any strides), in the cache dtype or int8 (key_t_int8, with key_t_scale, any
// strides). Element strides (outer, head, position); the outer index is the batch
// row, or with a block table (pages.block_table) the block: then B is the number of request
// rows R, S the table's capacity max_blocks * block_size (every size a function of the shapes,
// as for a contiguous cache), and each row's work is bounded by its seq_lens.
// Optional pointers are nullptr when absent.
struct AttentionProblem {
  DType dtype;
  int64_t B, Hq, Hkv, S, D, r, k, window;
  bool reallocate;
  float scale;
  float softcap;        // logit softcapping (approximate and exact logits); 0 when absent
  const float* sinks;   // (Hq,) fp32 sink logits, or nullptr
  int64_t sm_count;     // multiprocessors of the device (sizes partitions and topk blocks)
  int64_t topk_blocks;  // 0: from sm_count (tests force several blocks per row at small S)
  PageTable pages;      // block_table nullptr: a contiguous cache
  const void* query;
  const void* key;
  int64_t k_sb, k_sh, k_ss;
  const void* value;
  int64_t v_sb, v_sh, v_ss;
  const void* key_t;
  int64_t kt_sb, kt_sh, kt_sd, kt_ss;
  bool kt_vec;
  bool key_t_int8;          // the 8-bit selection cache
  const float* key_t_scale;  // its per-position scale (outer, head, position strides below)
  int64_t kts_sb, kts_sh, kts_ss;
  const void* value_mean;
  const float* component_weights;  // (B, Hkv, D) contiguous step-1 weights, or nullptr (all 1)
  const int64_t* seq_lens;
  const int32_t* seq_lens_i32;  // instead of seq_lens (paged_attention's), element stride below
  int64_t seq_lens_i32_stride;
  const uint8_t* mask;  // (B, S)
  void* out;            // (B, Hq, 1, D) contiguous
};

// Static sizes and the workspace layout: one block, carved at 256-byte boundaries. Nothing
// needs clearing before the call: prep zeroes what the later kernels accumulate into.
struct AttentionPlan {
  int64_t rows, G, k_eff, n_tiles, S_pad, value_chunks, n_splits, split_len;
  int64_t group_chunks, counter_stride, topk_blocks, topk_chunk;
  bool need_value_sum;
  size_t hist_off, counters_off, value_sum_off, row_len_off, win_start_off, i1_off, coef_off,
      coef_sum_off, head_scale_off, q32_off, sel_off, tile_off, cand_key_off, cand_pos_off,
      topk_off, part_acc_off, part_stats_off, workspace_bytes;
  // Every carved region as (offset, bytes): lets the CPU emulation poison the gaps between
  // regions and catch out-of-bounds workspace accesses.
  size_t region_off[20], region_bytes[20];
  int n_regions;
};

// Gap left after each region: none on the GPU; in the CPU emulation a poisoned guard zone.
#ifdef SPARQ_WORKSPACE_GUARD_BYTES
constexpr size_t kWorkspaceGuard = SPARQ_WORKSPACE_GUARD_BYTES;
#else
constexpr size_t kWorkspaceGuard = 0;
#endif

inline size_t align_up(size_t n) { return (n + 255) / 256 * 256; }

inline AttentionPlan plan_attention(const AttentionProblem& a) {
  AttentionPlan p{};
  p.rows = a.B * a.Hkv;
  p.G = a.Hq / a.Hkv;
  p.k_eff = std::min(a.k, a.S);
  const int64_t tile = approx_tile(a.dtype);
  p.n_tiles = (a.S + tile - 1) / tile;
  p.S_pad = (a.S + 3) / 4 * 4;
  p.value_chunks = (a.S + kValueSumChunk - 1) / kValueSumChunk;
  p.group_chunks = group_chunks(p.G);
  p.counter_stride = kAttendDone + p.group_chunks;
  const int64_t sms = std::max<int64_t>(a.sm_count, 1);
  // Partitions of the selected rows (flash-decoding splits): about two blocks per SM in all,
  // at least 128 positions each.
  const int64_t blocks_per_split = p.rows * p.group_chunks;
  const int64_t want = (2 * sms + blocks_per_split - 1) / blocks_per_split;
  p.n_splits = std::clamp<int64_t>(want, 1, (p.k_eff + 127) / 128);
  p.split_len = (p.k_eff + p.n_splits - 1) / p.n_splits;
  p.split_len = std::max<int64_t>(p.split_len, 1);
  p.n_splits = std::max<int64_t>((p.k_eff + p.split_len - 1) / p.split_len, 1);
  // topk blocks per row: about two 1024-thread blocks per SM in all (what fits at once, so
  // each block makes few dependent steps over its chunk), chunks of at least kTopkMinChunk.
  const int64_t topk_want = (2 * sms + p.rows - 1) / p.rows;
  const int64_t topk_max = std::max<int64_t>((a.S + kTopkMinChunk - 1) / kTopkMinChunk, 1);
  const int64_t blocks = a.topk_blocks > 0
                             ? std::min<int64_t>(a.topk_blocks, std::max<int64_t>(a.S, 1))
                             : std::clamp<int64_t>(topk_want, 1, topk_max);
  p.topk_chunk = std::max<int64_t>((a.S + blocks - 1) / blocks, 1);
  p.topk_blocks = (std::max<int64_t>(a.S, 1) + p.topk_chunk - 1) / p.topk_chunk;
  p.need_value_sum = a.reallocate && a.value_mean == nullptr;

  size_t off = 0;
  auto take = [&off, &p](size_t bytes) {
    const size_t at = off;
    off += align_up(bytes + kWorkspaceGuard);
    p.region_off[p.n_regions] = at;
    p.region_bytes[p.n_regions] = bytes;
    ++p.n_regions;
    return at;
  };
  p.hist_off = take(sizeof(uint32_t) * p.rows * kTopkDigitBuckets);
  p.counters_off = take(sizeof(uint32_t) * p.rows * p.counter_stride);
  p.value_sum_off = take(p.need_value_sum ? sizeof(float) * p.rows * a.D : 0);
  p.row_len_off = take(sizeof(int32_t) * a.B);
  p.win_start_off = take(sizeof(int32_t) * a.B);
  p.i1_off = take(sizeof(int32_t) * p.rows * a.r);
  p.coef_off = take(sizeof(float) * p.rows * p.G * a.r);
  p.coef_sum_off = take(sizeof(float) * p.rows * a.r);
  p.head_scale_off = take(sizeof(float) * p.rows * p.G);
  p.q32_off = take(sizeof(float) * p.rows * p.G * a.D);
  p.sel_off = take(sizeof(float) * p.rows * p.S_pad);
  p.tile_off = take(sizeof(float) * p.rows * p.G * p.n_tiles * 2);
  p.cand_key_off = take(sizeof(uint32_t) * p.rows * p.S_pad);
  p.cand_pos_off = take(sizeof(int32_t) * p.rows * p.S_pad);
  p.topk_off = take(sizeof(int32_t) * p.rows * p.k_eff);
  p.part_acc_off = take(sizeof(float) * p.rows * p.n_splits * p.G * a.D);
  p.part_stats_off = take(sizeof(float) * p.rows * p.n_splits * p.G * 4);
  p.workspace_bytes = off;
  return p;
}

// Enqueues every kernel on `stream`: prep, approx_logits, topk, (value_sum,) attend.
// `workspace` (plan.workspace_bytes, 256-byte aligned) may hold anything. Returns the first
// launch error and the name of its kernel through `failed_stage`.
inline cudaError_t enqueue_attention(const AttentionProblem& a, const AttentionPlan& plan,
                                     void* workspace, cudaStream_t stream,
                                     const char** failed_stage) {
  char* w = static_cast<char*>(workspace);
  auto* hist = reinterpret_cast<uint32_t*>(w + plan.hist_off);
  auto* counters = reinterpret_cast<uint32_t*>(w + plan.counters_off);
  float* value_sum = plan.need_value_sum ? reinterpret_cast<float*>(w + plan.value_sum_off)
                                         : nullptr;
  auto* row_len = reinterpret_cast<int32_t*>(w + plan.row_len_off);
  auto* win_start = reinterpret_cast<int32_t*>(w + plan.win_start_off);
  auto* i1 = reinterpret_cast<int32_t*>(w + plan.i1_off);
  auto* coef = reinterpret_cast<float*>(w + plan.coef_off);
  auto* coef_sum = reinterpret_cast<float*>(w + plan.coef_sum_off);
  auto* head_scale = reinterpret_cast<float*>(w + plan.head_scale_off);
  auto* q32 = reinterpret_cast<float*>(w + plan.q32_off);
  auto* sel_score = reinterpret_cast<float*>(w + plan.sel_off);
  auto* tile_stats = reinterpret_cast<float*>(w + plan.tile_off);
  auto* cand_key = reinterpret_cast<uint32_t*>(w + plan.cand_key_off);
  auto* cand_pos = reinterpret_cast<int32_t*>(w + plan.cand_pos_off);
  auto* topk_idx = reinterpret_cast<int32_t*>(w + plan.topk_off);
  auto* part_acc = reinterpret_cast<float*>(w + plan.part_acc_off);
  auto* part_stats = reinterpret_cast<float*>(w + plan.part_stats_off);
  const int head_bucket = head_dim_bucket(a.D);
  cudaError_t err = cudaSuccess;
  auto check = [&](cudaError_t e, const char* stage) {
    if (e != cudaSuccess && err == cudaSuccess) {
      err = e;
      if (failed_stage != nullptr) *failed_stage = stage;
    }
    return err == cudaSuccess;
  };

  PrepParams pp{};
  pp.query = a.query;
  pp.component_weights = a.component_weights;
  pp.seq_lens = a.seq_lens;
  pp.seq_lens_i32 = a.seq_lens_i32;
  pp.seq_lens_i32_stride = a.seq_lens_i32_stride;
  pp.mask = a.mask;
  pp.B = a.B;
  pp.Hkv = a.Hkv;
  pp.rows = plan.rows;
  pp.G = plan.G;
  pp.D = a.D;
  pp.r = a.r;
  pp.S = a.S;
  pp.window = a.window;
  pp.scale = a.scale;
  pp.hist = hist;
  pp.counters = counters;
  pp.counter_stride = plan.counter_stride;
  pp.value_sum = value_sum;
  pp.row_len = row_len;
  pp.win_start = win_start;
  pp.i1 = i1;
  pp.coef = coef;
  pp.coef_sum = coef_sum;
  pp.head_scale = head_scale;
  pp.q32 = q32;
  if (!check(launch_prep(pp, a.dtype, stream), "prep")) return err;

  ApproxParams ap{};
  ap.pages = a.pages;
  ap.key_t = a.key_t;
  ap.kt_sb = a.kt_sb;
  ap.kt_sh = a.kt_sh;
  ap.kt_sd = a.kt_sd;
  ap.kt_ss = a.kt_ss;
  ap.kt_vec = a.kt_vec;
  ap.key_t_int8 = a.key_t_int8;
  ap.key_t_scale = a.key_t_scale;
  ap.kts_sb = a.kts_sb;
  ap.kts_sh = a.kts_sh;
  ap.kts_ss = a.kts_ss;
  ap.key = a.key;
  ap.k_sb = a.k_sb;
  ap.k_sh = a.k_sh;
  ap.k_ss = a.k_ss;
  ap.i1 = i1;
  ap.coef = coef;
  ap.coef_sum = coef_sum;
  ap.row_len = row_len;
  ap.win_start = win_start;
  ap.mask = a.mask;
  ap.rows = plan.rows;
  ap.Hkv = a.Hkv;
  ap.G = plan.G;
  ap.S = a.S;
  ap.r = a.r;
  ap.S_pad = plan.S_pad;
  ap.n_tiles = plan.n_tiles;
  ap.softcap = a.softcap;
  ap.sel_score = sel_score;
  ap.tile_stats = tile_stats;
  ap.hist = hist;
  ap.counters = counters;
  ap.counter_stride = plan.counter_stride;
  if (!check(launch_approx_logits(ap, a.dtype, stream), "approx_logits")) return err;

  TopkParams tp{};
  tp.sel_score = sel_score;
  tp.S_pad = plan.S_pad;
  tp.Hkv = a.Hkv;
  tp.rows = plan.rows;
  tp.k_eff = plan.k_eff;
  tp.row_len = row_len;
  tp.hist = hist;
  tp.counters = counters;
  tp.counter_stride = plan.counter_stride;
  tp.cand_key = cand_key;
  tp.cand_pos = cand_pos;
  tp.topk_idx = topk_idx;
  tp.blocks_per_row = plan.topk_blocks;
  tp.chunk_len = plan.topk_chunk;
  if (!check(launch_topk(tp, stream), "topk")) return err;

  if (plan.need_value_sum) {
    ValueSumParams vp{};
    vp.pages = a.pages;
    vp.value = a.value;
    vp.v_sb = a.v_sb;
    vp.v_sh = a.v_sh;
    vp.v_ss = a.v_ss;
    vp.row_len = row_len;
    vp.mask = a.mask;
    vp.rows = plan.rows;
    vp.Hkv = a.Hkv;
    vp.S = a.S;
    vp.D = a.D;
    vp.n_chunks = plan.value_chunks;
    vp.value_sum = value_sum;
    if (!check(launch_value_sum(vp, a.dtype, head_bucket, stream), "value_sum")) return err;
  }

  AttendParams at{};
  at.pages = a.pages;
  at.key = a.key;
  at.k_sb = a.k_sb;
  at.k_sh = a.k_sh;
  at.k_ss = a.k_ss;
  at.value = a.value;
  at.v_sb = a.v_sb;
  at.v_sh = a.v_sh;
  at.v_ss = a.v_ss;
  at.q32 = q32;
  at.i1 = i1;
  at.head_scale = head_scale;
  at.scale = a.scale;
  at.softcap = a.softcap;
  at.r = a.r;
  if (a.key_t_int8) {
    at.key_t = static_cast<const int8_t*>(a.key_t);
    at.kt_sb = a.kt_sb;
    at.kt_sh = a.kt_sh;
    at.kt_sd = a.kt_sd;
    at.kt_ss = a.kt_ss;
    at.key_t_scale = a.key_t_scale;
    at.kts_sb = a.kts_sb;
    at.kts_sh = a.kts_sh;
    at.kts_ss = a.kts_ss;
  }
  at.topk_idx = topk_idx;
  at.counters = counters;
  at.counter_stride = plan.counter_stride;
  at.rows = plan.rows;
  at.Hkv = a.Hkv;
  at.G = plan.G;
  at.S = a.S;
  at.D = a.D;
  at.k_eff = plan.k_eff;
  at.n_splits = plan.n_splits;
  at.split_len = plan.split_len;
  at.part_acc = part_acc;
  at.part_stats = part_stats;
  at.tile_stats = tile_stats;
  at.n_tiles = plan.n_tiles;
  at.value_sum = value_sum;
  at.value_mean = a.value_mean;
  at.sinks = a.sinks;
  at.reallocate = a.reallocate;
  at.out = a.out;
  check(launch_attend(at, a.dtype, head_bucket, stream), "attend");
  return err;
}

}  // namespace cuda
}  // namespace sparq
