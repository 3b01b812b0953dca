// The CUDA backend's launch sequence, free of torch: sizes every workspace from the shapes
// alone (so the op can be captured in a CUDA graph) and enqueues the stages of
// sparq/cuda_launchers.h. csrc/cuda/attention_cuda.cpp calls it with ATen-allocated buffers;
// tests/cuda_emu/ calls the very same code with host buffers to run the kernels on the CPU.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "sparq/cuda_launchers.h"
#include "sparq/math.h"

namespace sparq {
namespace cuda {

// One call, in the layouts the kernels read: query and value_mean contiguous; key / value
// rows with unit D-stride and 16-byte aligned rows; key_t with unit S-stride. Element
// strides. Optional pointers are nullptr when absent.
struct AttentionProblem {
  DType dtype;
  int64_t B, Hq, Hkv, S, D, r, k, window;
  bool reallocate;
  float scale;
  int64_t sm_count;  // multiprocessors of the device (sizes the flash-decoding splits)
  int64_t topk_row_max_keys;  // 0: kTopkRowMaxKeys (tests lower it to reach both top-k paths)
  const void* query;
  const void* key;
  int64_t k_sb, k_sh, k_ss;
  const void* value;
  int64_t v_sb, v_sh, v_ss;
  const void* key_t;
  int64_t kt_sb, kt_sh, kt_sd;
  bool kt_vec;
  const void* value_mean;
  const int64_t* seq_lens;
  const uint8_t* mask;  // (B, S)
  void* out;            // (B, Hq, 1, D) contiguous
};

// Static sizes and the workspace layout: one zero-filled block (histograms, emit counters,
// V sum) and one scratch block, carved at 256-byte boundaries.
struct AttentionPlan {
  int64_t rows, G, k_eff, n_tiles, S_pad, topk_chunks, value_chunks, n_splits, split_len;
  bool need_value_sum;
  size_t hist_off, counters_off, value_sum_off, zeroed_bytes;
  size_t row_info_off, i1_off, coef_off, coef_sum_off, head_scale_off, sel_off, tile_off,
      topk_off, part_acc_off, part_stats_off, scratch_bytes;
  // Every carved region as (offset, bytes), zeroed block first: lets the CPU emulation
  // poison the gaps between regions and catch out-of-bounds workspace accesses.
  size_t region_off[16], region_bytes[16];
  int n_zeroed_regions, n_regions;
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
  p.topk_chunks = (a.S + kTopkChunk - 1) / kTopkChunk;
  p.value_chunks = (a.S + kValueSumChunk - 1) / kValueSumChunk;
  // Flash-decoding splits: about two blocks per SM in all, at least 128 positions a split.
  const int64_t blocks_per_split = p.rows * group_chunks(p.G);
  const int64_t want = (2 * std::max<int64_t>(a.sm_count, 1) + blocks_per_split - 1) /
                       blocks_per_split;
  p.n_splits = std::clamp<int64_t>(want, 1, (p.k_eff + 127) / 128);
  p.split_len = (p.k_eff + p.n_splits - 1) / p.n_splits;
  p.n_splits = (p.k_eff + p.split_len - 1) / p.split_len;
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
  p.hist_off = take(sizeof(uint32_t) * p.rows * kRadixPasses * kRadixBuckets);
  p.counters_off = take(sizeof(uint32_t) * p.rows * 2);
  p.value_sum_off = take(p.need_value_sum ? sizeof(float) * p.rows * a.D : 0);
  p.zeroed_bytes = off;
  p.n_zeroed_regions = p.n_regions;

  off = 0;
  p.row_info_off = take(sizeof(int32_t) * 3 * a.B);
  p.i1_off = take(sizeof(int32_t) * p.rows * a.r);
  p.coef_off = take(sizeof(float) * p.rows * p.G * a.r);
  p.coef_sum_off = take(sizeof(float) * p.rows * a.r);
  p.head_scale_off = take(sizeof(float) * p.rows * p.G);
  p.sel_off = take(sizeof(float) * p.rows * p.S_pad);
  p.tile_off = take(sizeof(float) * p.rows * p.G * p.n_tiles * 2);
  p.topk_off = take(sizeof(int32_t) * p.rows * p.k_eff);
  p.part_acc_off = take(sizeof(float) * p.rows * p.n_splits * p.G * a.D);
  p.part_stats_off = take(sizeof(float) * p.rows * p.n_splits * p.G * 4);
  p.scratch_bytes = off;
  return p;
}

// Enqueues every stage on `stream`. `zeroed` (plan.zeroed_bytes) must be zero-filled on
// the stream before; `scratch` (plan.scratch_bytes) may hold anything. Returns the first
// launch error and the name of its stage through `failed_stage`.
inline cudaError_t enqueue_attention(const AttentionProblem& a, const AttentionPlan& plan,
                                     void* zeroed, void* scratch, cudaStream_t stream,
                                     const char** failed_stage) {
  char* z = static_cast<char*>(zeroed);
  char* w = static_cast<char*>(scratch);
  auto* hist = reinterpret_cast<uint32_t*>(z + plan.hist_off);
  auto* counters = reinterpret_cast<uint32_t*>(z + plan.counters_off);
  float* value_sum = plan.need_value_sum ? reinterpret_cast<float*>(z + plan.value_sum_off)
                                         : nullptr;
  auto* row_len = reinterpret_cast<int32_t*>(w + plan.row_info_off);
  auto* i1 = reinterpret_cast<int32_t*>(w + plan.i1_off);
  auto* coef = reinterpret_cast<float*>(w + plan.coef_off);
  auto* coef_sum = reinterpret_cast<float*>(w + plan.coef_sum_off);
  auto* head_scale = reinterpret_cast<float*>(w + plan.head_scale_off);
  auto* sel_score = reinterpret_cast<float*>(w + plan.sel_off);
  auto* tile_stats = reinterpret_cast<float*>(w + plan.tile_off);
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

  RowPrepParams rp{};
  rp.seq_lens = a.seq_lens;
  rp.mask = a.mask;
  rp.B = a.B;
  rp.S = a.S;
  rp.window = a.window;
  rp.row_len = row_len;
  rp.n_valid = row_len + a.B;
  rp.win_start = row_len + 2 * a.B;
  if (!check(launch_row_prep(rp, stream), "row_prep")) return err;

  QueryPrepParams qp{};
  qp.query = a.query;
  qp.rows = plan.rows;
  qp.G = plan.G;
  qp.D = a.D;
  qp.r = a.r;
  qp.scale = a.scale;
  qp.i1 = i1;
  qp.coef = coef;
  qp.coef_sum = coef_sum;
  qp.head_scale = head_scale;
  if (!check(launch_query_prep(qp, a.dtype, stream), "query_prep")) return err;

  ApproxParams ap{};
  ap.key_t = a.key_t;
  ap.kt_sb = a.kt_sb;
  ap.kt_sh = a.kt_sh;
  ap.kt_sd = a.kt_sd;
  ap.kt_vec = a.kt_vec;
  ap.key = a.key;
  ap.k_sb = a.k_sb;
  ap.k_sh = a.k_sh;
  ap.k_ss = a.k_ss;
  ap.i1 = i1;
  ap.coef = coef;
  ap.coef_sum = coef_sum;
  ap.row_len = row_len;
  ap.win_start = rp.win_start;
  ap.mask = a.mask;
  ap.rows = plan.rows;
  ap.Hkv = a.Hkv;
  ap.G = plan.G;
  ap.S = a.S;
  ap.r = a.r;
  ap.S_pad = plan.S_pad;
  ap.n_tiles = plan.n_tiles;
  ap.sel_score = sel_score;
  ap.tile_stats = tile_stats;
  ap.hist = hist;
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
  tp.topk_idx = topk_idx;
  tp.n_chunks = plan.topk_chunks;
  tp.row_max_keys = a.topk_row_max_keys > 0 ? a.topk_row_max_keys : kTopkRowMaxKeys;
  if (!check(launch_radix_topk(tp, stream), "radix_topk")) return err;

  if (plan.need_value_sum) {
    ValueSumParams vp{};
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

  AttendParams attend{};
  attend.key = a.key;
  attend.k_sb = a.k_sb;
  attend.k_sh = a.k_sh;
  attend.k_ss = a.k_ss;
  attend.value = a.value;
  attend.v_sb = a.v_sb;
  attend.v_sh = a.v_sh;
  attend.v_ss = a.v_ss;
  attend.query = a.query;
  attend.i1 = i1;
  attend.head_scale = head_scale;
  attend.scale = a.scale;
  attend.r = a.r;
  attend.topk_idx = topk_idx;
  attend.hist = hist;
  attend.rows = plan.rows;
  attend.Hkv = a.Hkv;
  attend.G = plan.G;
  attend.S = a.S;
  attend.D = a.D;
  attend.k_eff = plan.k_eff;
  attend.n_splits = plan.n_splits;
  attend.split_len = plan.split_len;
  attend.part_acc = part_acc;
  attend.part_stats = part_stats;
  if (!check(launch_attend(attend, a.dtype, head_bucket, stream), "attend")) return err;

  MergeParams mp{};
  mp.part_acc = part_acc;
  mp.part_stats = part_stats;
  mp.tile_stats = tile_stats;
  mp.value_sum = value_sum;
  mp.value_mean = a.value_mean;
  mp.n_valid = rp.n_valid;
  mp.rows = plan.rows;
  mp.Hkv = a.Hkv;
  mp.G = plan.G;
  mp.D = a.D;
  mp.n_splits = plan.n_splits;
  mp.n_tiles = plan.n_tiles;
  mp.reallocate = a.reallocate;
  mp.out = a.out;
  check(launch_merge(mp, a.dtype, stream), "merge");
  return err;
}

}  // namespace cuda
}  // namespace sparq
