// attend (with the merge folded in) and value_sum: SparQ step 2's exact attention over the
// selected positions and step 3's reallocation (docs/cuda-pipeline.md).
//
// value_sum (only when value_mean is None; grid (S / 1024, B*Hkv), 128 threads) reads every
//   valid V row once (D*e B per valid position; this is the dense cost the caller avoids by
//   passing value_mean) and adds D fp32 per warp into value_sum with atomics.
// attend (grid (partitions, B*Hkv, ceil(G / GC)), 128 threads) reads, per selected position,
//   its index (4 B), its K row and its V row (2*D*e B: the 2*k*D*e of the byte budget), in
//   16-byte loads, software-pipelined: while a warp reduces one group of rows, the K/V rows
//   of the next group are in flight (raw 16-byte vectors in registers) and the indices of
//   the group after that are already loaded, so the index -> row dependency costs one
//   latency per partition instead of one per group. With G > 8 the further group chunks
//   re-read the rows through L2. It forms all heads' exact logits and, from the same K row,
//   their approximate logits (the dot product restricted to the i1 components, times the
//   head's scale), so alpha needs no per-head logits from approx_logits; with softcap both
//   logits are capped (tanhf) before they enter the softmaxes. The query slice of each lane
//   (prep's aligned fp32 copy) lives in registers.
//   With the 8-bit selection cache (an int8 key_t) and reallocate, alpha's approximate logits
//   are step 1's: the i1 components of key_t's column at each selected position (r bytes per
//   position, one byte load per component, over the row's lanes; in L2 in practice, as
//   approx_logits has just streamed those r rows) times the position's scale (4 B), loaded
//   in the same pipeline step as the K/V rows.
//   Writes per partition and head (D + 4) fp32: the unnormalised p.V sum and (m, l) for the
//   exact and approximate softmax (flash-decoding partials).
// merge: the last block of each (row, group chunk) to finish (a done counter per chunk)
//   reads the partials ((D + 4) * 4 B per partition and head), the approx_logits tile
//   statistics (8 B per tile and head) and v_mean (D values), and writes the output (D*e B
//   per head): no separate merge launch. A head's sink (4 B) joins its exact softmax (the
//   denominator of y) and both sides of alpha, as one more always-selected entry.
// Paged caches (PagedPositions): each selected position's block is looked up with its index,
// two pipeline steps ahead of the rows (one 4-byte table read per position, shared by K and
// V), so the extra dependency costs no latency on the critical path; value_sum looks up each
// valid position it reads.
#include "sparq/cuda_common.cuh"

namespace sparq {
namespace cuda {
namespace {

constexpr int kAttendThreads = kAttendWarps * 32;
constexpr int kAttendUnroll = 2;  // rows per lane group and pipeline step

// A lane's slice of one K or V row as raw 16-byte vectors: held in registers while in flight,
// converted to fp32 only when the row is used.
template <typename T, int N>
struct RawSlice {
  static constexpr int kChunks = N * static_cast<int>(sizeof(T)) / 16;
  static_assert(N * static_cast<int>(sizeof(T)) % 16 == 0, "16-byte slices");
  uint4 v[kChunks];
};

template <typename T, int N>
__device__ __forceinline__ void load_raw(const T* __restrict__ p, RawSlice<T, N>& out) {
#pragma unroll
  for (int c = 0; c < RawSlice<T, N>::kChunks; ++c) {
    SPARQ_EMU_CHECK_ALIGNED(p + c * (16 / sizeof(T)), 16);
    out.v[c] = *reinterpret_cast<const uint4*>(p + c * (16 / sizeof(T)));
  }
}

template <typename T, int N>
__device__ __forceinline__ void raw_to_float(const RawSlice<T, N>& in, float (&out)[N]) {
  const T* e = reinterpret_cast<const T*>(in.v);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float<T>(e[i]);
}

// A lane's bytes of an int8 key_t column at one selected position (its components in i1,
// zeros elsewhere; four per word) and the position's scale: with the 8-bit selection cache,
// alpha's approximate logit is step 1's, from these, not from the K row. No registers
// otherwise.
template <int EPL, bool kInt8Alpha>
struct KeyTColumn {
  static_assert(EPL % 4 == 0, "whole words of bytes");
  uint32_t bytes[EPL / 4];
  float scale;
};
template <int EPL>
struct KeyTColumn<EPL, false> {};

template <int EPL>
__device__ __forceinline__ float key_t_component(const KeyTColumn<EPL, true>& c, int e) {
  const uint8_t byte = static_cast<uint8_t>(c.bytes[e / 4] >> (8 * (e % 4)));
  return static_cast<float>(static_cast<int8_t>(byte));
}

// Merge one softmax state per thread over the block; every thread gets the result.
__device__ SoftmaxState block_merge(SoftmaxState s) {
  __shared__ SoftmaxState partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  s = warp_merge(s);
  __syncthreads();  // `partial` may still be read by an earlier call
  if (lane == 0) partial[warp] = s;
  __syncthreads();
  SoftmaxState all = softmax_empty();
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) all = softmax_merge(all, partial[w]);
  return all;
}

template <typename T, int KD, typename Pos>
__global__ void __launch_bounds__(kAttendThreads) value_sum_kernel(const ValueSumParams p) {
  using Layout = RowLayout<T, KD>;
  constexpr int LPR = Layout::kLanesPerRow, EPL = Layout::kElemsPerLane;
  constexpr int RPW = Layout::kRowsPerWarp;
  const int64_t row = blockIdx.y, b = row / p.Hkv, h = row % p.Hkv;
  const int64_t len = [&] {
    const int64_t l = static_cast<int64_t>(p.row_len[b]);
    const int64_t e = (static_cast<int64_t>(blockIdx.x) + 1) * kValueSumChunk;
    return l < e ? l : e;
  }();
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kValueSumChunk;
  if (start >= len) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane / LPR, d0 = (lane % LPR) * EPL;
  const bool has_d = d0 < p.D;
  const Pos pos = Pos::of(p.pages, b);
  const T* v_base = static_cast<const T*>(p.value) + pos.row_offset(p.v_sb) + h * p.v_sh + d0;
  float acc[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) acc[e] = 0.f;
#pragma unroll 4
  for (int64_t s = start + warp * RPW + sub; s < len; s += kAttendWarps * RPW) {
    if (has_d && (p.mask == nullptr || p.mask[b * p.S + s] != 0)) {
      float v[EPL];
      load_as_float<T, EPL>(v_base + pos.slot_offset(pos.slot(s), p.v_sb, p.v_ss), v);
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[e] += v[e];
    }
  }
#pragma unroll
  for (int off = LPR; off < 32; off <<= 1)
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[e] += __shfl_xor_sync(kFullMask, acc[e], off);
  if (lane < LPR && has_d) {
#pragma unroll
    for (int e = 0; e < EPL; ++e) atomicAdd(&p.value_sum[row * p.D + d0 + e], acc[e]);
  }
}

// The merge of one group chunk's partitions, by the last attend block of (row, chunk) to
// finish: alpha against the approx_logits statistics, alpha * y + (1 - alpha) * v_mean.
template <typename T, int GC>
__device__ void merge_chunk(const AttendParams& p, int64_t row, int64_t g0, int64_t n_valid) {
  const int64_t G = p.G, D = p.D;
  for (int gi = 0; gi < GC && g0 + gi < G; ++gi) {  // uniform over the block
    const int64_t g = g0 + gi;
    SoftmaxState full = softmax_empty();  // approximate softmax over all valid positions
    const float* tiles = p.tile_stats + (row * G + g) * p.n_tiles * 2;
    for (int64_t t = threadIdx.x; t < p.n_tiles; t += blockDim.x)
      full = softmax_merge(full, {tiles[2 * t], tiles[2 * t + 1]});
    full = block_merge(full);

    SoftmaxState exact = softmax_empty(), selected = softmax_empty();
    for (int64_t s = threadIdx.x; s < p.n_splits; s += blockDim.x) {
      const float* st = p.part_stats + ((row * p.n_splits + s) * G + g) * 4;
      exact = softmax_merge(exact, {SPARQ_LOAD_PUBLISHED(&st[0]), SPARQ_LOAD_PUBLISHED(&st[1])});
      selected =
          softmax_merge(selected, {SPARQ_LOAD_PUBLISHED(&st[2]), SPARQ_LOAD_PUBLISHED(&st[3])});
    }
    exact = block_merge(exact);
    selected = block_merge(selected);
    if (p.sinks != nullptr && n_valid > 0) {
      // The sink, one more entry of the head's softmaxes with no value: in the exact softmax's
      // denominator, and in alpha as selected mass (docs/design.md): k >= the valid length
      // stays dense attention with the sink. An empty row stays zeros.
      const float sink = p.sinks[(row % p.Hkv) * G + g];
      exact = softmax_push(exact, sink);
      selected = softmax_push(selected, sink);
      full = softmax_push(full, sink);
    }
    const float alpha = softmax_mass_ratio(selected, full);

    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      float y = 0.f;
      if (!(exact.l <= 0.f)) {  // a NaN l (NaN in a selected row) must reach the output
        for (int64_t s = 0; s < p.n_splits; ++s) {
          const int64_t part = (row * p.n_splits + s) * G + g;
          y += SPARQ_LOAD_PUBLISHED(&p.part_acc[part * D + d]) *
               softmax_rescale(SPARQ_LOAD_PUBLISHED(&p.part_stats[part * 4]), exact.m);
        }
        y /= exact.l;
      }
      float o = y;
      if (p.reallocate) {
        const float v_mean =
            p.value_mean != nullptr
                ? to_float<T>(static_cast<const T*>(p.value_mean)[row * D + d])
                : p.value_sum[row * D + d] / static_cast<float>(n_valid > 0 ? n_valid : 1);
        o = n_valid > 0 ? reallocate_mix(alpha, y, v_mean) : 0.f;
      }
      static_cast<T*>(p.out)[(row * G + g) * D + d] = from_float<T>(o);
    }
  }
}

// kInt8Alpha: alpha's approximate logits from an int8 key_t (p.key_t) and its scales.
template <typename T, int KD, int GC, typename Pos, bool kInt8Alpha>
__global__ void __launch_bounds__(kAttendThreads) attend_kernel(const AttendParams p) {
  using Layout = RowLayout<T, KD>;
  constexpr int LPR = Layout::kLanesPerRow, EPL = Layout::kElemsPerLane;
  constexpr int RPW = Layout::kRowsPerWarp;
  constexpr int kRowsPerStep = kAttendWarps * RPW;
  constexpr int64_t kStep = kAttendUnroll * kRowsPerStep;  // rows per pipeline step
  static_assert(EPL <= 32, "the i1 bitmask holds one bit per element of a lane");
  __shared__ uint8_t in_i1[KD];
  __shared__ float4 warp_stats[kAttendWarps][GC];
  __shared__ float acc_smem[GC][KD];
  __shared__ bool last_block;
  static_assert(sizeof(in_i1) + sizeof(warp_stats) + sizeof(acc_smem) + 32 * sizeof(float4) <=
                    kSharedMemoryBudget,
                "attend's static shared memory (and block_merge's) must fit 48 KiB");

  const int64_t row = blockIdx.y, b = row / p.Hkv, h = row % p.Hkv;
  const int64_t G = p.G, D = p.D;
  const int64_t g0 = static_cast<int64_t>(blockIdx.z) * GC;
  uint32_t* counters = p.counters + row * p.counter_stride;
  for (int i = threadIdx.x; i < KD; i += blockDim.x) in_i1[i] = 0;
  for (int i = threadIdx.x; i < GC * KD; i += blockDim.x) (&acc_smem[0][0])[i] = 0.f;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < p.r; j += blockDim.x) in_i1[p.i1[row * p.r + j]] = 1;
  const int64_t n_valid = counters[kValidCount];  // from approx_logits, an earlier launch
  const int64_t k_row = p.k_eff < n_valid ? p.k_eff : n_valid;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * p.split_len;
  const int64_t end = begin + p.split_len < k_row ? begin + p.split_len : k_row;
  __syncthreads();  // in_i1 complete

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane / LPR, d0 = (lane % LPR) * EPL;
  const bool has_d = d0 < D;

  // This lane's slice of every head's query, in registers, and which of its components
  // are in i1: l_hat_g = head_scale_g * (q_g[i1] . K[i1]) is the exact dot restricted to
  // those components, so one pass over the K row yields both logits.
  float q[GC][EPL];
  float head_scale[GC];
  uint32_t i1_bits = 0;
#pragma unroll
  for (int e = 0; e < EPL; ++e) i1_bits |= (has_d && in_i1[d0 + e]) ? (1u << e) : 0u;
#pragma unroll
  for (int g = 0; g < GC; ++g) {
    const bool head = g0 + g < G;
    head_scale[g] = head ? p.head_scale[row * G + g0 + g] : 0.f;
    if (head && has_d) {
      load_as_float<float, EPL>(p.q32 + (row * G + g0 + g) * D + d0, q[g]);
    } else {
#pragma unroll
      for (int e = 0; e < EPL; ++e) q[g][e] = 0.f;
    }
  }

  const Pos pos = Pos::of(p.pages, b);
  const T* k_base = static_cast<const T*>(p.key) + pos.row_offset(p.k_sb) + h * p.k_sh + d0;
  const T* v_base = static_cast<const T*>(p.value) + pos.row_offset(p.v_sb) + h * p.v_sh + d0;
  const int32_t* idx = p.topk_idx + row * p.k_eff;
  const bool capped = p.softcap > 0.f;

  float acc[GC][EPL];
  SoftmaxState exact[GC], approx[GC];
#pragma unroll
  for (int g = 0; g < GC; ++g) {
    exact[g] = softmax_empty();
    approx[g] = softmax_empty();
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[g][e] = 0.f;
  }

  // The pipeline: position indices (as the policy's slots, -1 for none) two steps ahead,
  // K/V rows one step ahead. Indices are clamped although topk writes only positions below
  // the row's length: an index must never address outside the cache.
  auto load_index = [&](int64_t base, int u) -> int64_t {
    const int64_t i = base + u * kRowsPerStep + sub;
    if (i >= end) return -1;
    return pos.slot(min(max(static_cast<int64_t>(idx[i]), int64_t{0}), p.S - 1));
  };
  using Column = KeyTColumn<EPL, kInt8Alpha>;
  auto load_rows = [&](const int64_t (&slot)[kAttendUnroll],
                       RawSlice<T, EPL> (&kr)[kAttendUnroll],
                       RawSlice<T, EPL> (&vr)[kAttendUnroll], Column (&col)[kAttendUnroll]) {
#pragma unroll
    for (int u = 0; u < kAttendUnroll; ++u) {
      if (slot[u] >= 0 && has_d) {
        load_raw<T, EPL>(k_base + pos.slot_offset(slot[u], p.k_sb, p.k_ss), kr[u]);
        load_raw<T, EPL>(v_base + pos.slot_offset(slot[u], p.v_sb, p.v_ss), vr[u]);
      } else {
#pragma unroll
        for (int c = 0; c < RawSlice<T, EPL>::kChunks; ++c) kr[u].v[c] = vr[u].v[c] = uint4{};
      }
      if constexpr (kInt8Alpha) {  // r bytes per position over the row's lanes, and its scale
#pragma unroll
        for (int c = 0; c < EPL / 4; ++c) col[u].bytes[c] = 0u;
        col[u].scale = 0.f;
        if (slot[u] >= 0) {
          const int8_t* column = p.key_t + pos.row_offset(p.kt_sb) + h * p.kt_sh +
                                 pos.slot_offset(slot[u], p.kt_sb, p.kt_ss) + d0 * p.kt_sd;
#pragma unroll
          for (int e = 0; e < EPL; ++e) {
            if ((i1_bits >> e) & 1u) {
              const uint8_t byte = static_cast<uint8_t>(column[e * p.kt_sd]);
              col[u].bytes[e / 4] |= static_cast<uint32_t>(byte) << (8 * (e % 4));
            }
          }
          col[u].scale = p.key_t_scale[pos.row_offset(p.kts_sb) + h * p.kts_sh +
                                       pos.slot_offset(slot[u], p.kts_sb, p.kts_ss)];
        }
      }
    }
  };
  const int64_t first = begin + warp * RPW;
  int64_t slot_cur[kAttendUnroll], slot_next[kAttendUnroll];
  RawSlice<T, EPL> k_cur[kAttendUnroll], v_cur[kAttendUnroll];
  Column col_cur[kAttendUnroll];
#pragma unroll
  for (int u = 0; u < kAttendUnroll; ++u) {
    slot_cur[u] = load_index(first, u);
    slot_next[u] = load_index(first + kStep, u);
  }
  load_rows(slot_cur, k_cur, v_cur, col_cur);

  // The trip count depends on the warp only, so whole warps run the shuffles together.
  for (int64_t base = first; base < end; base += kStep) {
    RawSlice<T, EPL> k_next[kAttendUnroll], v_next[kAttendUnroll];
    Column col_next[kAttendUnroll];
    int64_t slot_after[kAttendUnroll];
    load_rows(slot_next, k_next, v_next, col_next);  // in flight while this step is reduced
#pragma unroll
    for (int u = 0; u < kAttendUnroll; ++u) slot_after[u] = load_index(base + 2 * kStep, u);
#pragma unroll
    for (int u = 0; u < kAttendUnroll; ++u) {
      const bool active = slot_cur[u] >= 0;
      float kv[EPL], vv[EPL];
      raw_to_float<T, EPL>(k_cur[u], kv);
      raw_to_float<T, EPL>(v_cur[u], vv);
      float x[GC], xa[GC];
#pragma unroll
      for (int g = 0; g < GC; ++g) {
        float dot = 0.f, dot_i1 = 0.f;
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
          const float prod = q[g][e] * kv[e];
          dot += prod;
          if constexpr (kInt8Alpha) {
            dot_i1 += (i1_bits >> e) & 1u ? q[g][e] * key_t_component(col_cur[u], e) : 0.f;
          } else {
            dot_i1 += (i1_bits >> e) & 1u ? prod : 0.f;
          }
        }
        x[g] = dot;
        xa[g] = dot_i1;
      }
#pragma unroll
      for (int off = LPR / 2; off > 0; off >>= 1) {
#pragma unroll
        for (int g = 0; g < GC; ++g) {
          x[g] += __shfl_xor_sync(kFullMask, x[g], off);
          xa[g] += __shfl_xor_sync(kFullMask, xa[g], off);
        }
      }
      if (!active) continue;
#pragma unroll
      for (int g = 0; g < GC; ++g) {
        float logit = x[g] * p.scale, approx_logit = xa[g] * head_scale[g];
        if constexpr (kInt8Alpha) approx_logit *= col_cur[u].scale;
        if (capped) {
          logit = softcap_logit(logit, p.softcap);
          approx_logit = softcap_logit(approx_logit, p.softcap);
        }
        approx[g] = softmax_push(approx[g], approx_logit);
        if (logit == -INFINITY) continue;  // only with -inf in the inputs; keeps m finite
        const float m_new = fmaxf(exact[g].m, logit);
        const float c = softmax_rescale(exact[g].m, m_new);
        const float w = expf(logit - m_new);
        exact[g] = {m_new, exact[g].l * c + w};
#pragma unroll
        for (int e = 0; e < EPL; ++e) acc[g][e] = fmaf(acc[g][e], c, w * vv[e]);
      }
    }
#pragma unroll
    for (int u = 0; u < kAttendUnroll; ++u) {
      k_cur[u] = k_next[u];
      v_cur[u] = v_next[u];
      col_cur[u] = col_next[u];
      slot_cur[u] = slot_next[u];
      slot_next[u] = slot_after[u];
    }
  }

  // Merge the lane groups of each warp (same d-slice, different positions).
#pragma unroll
  for (int off = LPR; off < 32; off <<= 1) {
#pragma unroll
    for (int g = 0; g < GC; ++g) {
      const SoftmaxState other = shfl_xor_state(exact[g], off);
      const float m = fmaxf(exact[g].m, other.m);
      const float ca = softmax_rescale(exact[g].m, m), cb = softmax_rescale(other.m, m);
#pragma unroll
      for (int e = 0; e < EPL; ++e) {
        const float o = __shfl_xor_sync(kFullMask, acc[g][e], off);
        acc[g][e] = acc[g][e] * ca + o * cb;
      }
      exact[g] = {m, exact[g].l * ca + other.l * cb};
      approx[g] = softmax_merge(approx[g], shfl_xor_state(approx[g], off));
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < GC; ++g)
      warp_stats[warp][g] = make_float4(exact[g].m, exact[g].l, approx[g].m, approx[g].l);
  }
  __syncthreads();  // warp_stats complete

  // The warps' accumulators rescaled to the block's max per head, summed in shared memory.
  if (lane < LPR && has_d) {
#pragma unroll
    for (int g = 0; g < GC; ++g) {
      float block_m = -INFINITY;
      for (int w = 0; w < kAttendWarps; ++w) block_m = fmaxf(block_m, warp_stats[w][g].x);
      const float c = softmax_rescale(exact[g].m, block_m);
#pragma unroll
      for (int e = 0; e < EPL; ++e) atomicAdd(&acc_smem[g][d0 + e], acc[g][e] * c);
    }
  }
  __syncthreads();

  const int64_t part = (row * p.n_splits + blockIdx.x) * G;
  for (int i = threadIdx.x; i < GC * KD; i += blockDim.x) {
    const int g = i / KD, d = i % KD;
    if (g0 + g < G && d < D) p.part_acc[(part + g0 + g) * D + d] = acc_smem[g][d];
  }
  if (threadIdx.x < GC && g0 + threadIdx.x < G) {
    const int g = threadIdx.x;
    SoftmaxState ex = softmax_empty(), ap = softmax_empty();
    for (int w = 0; w < kAttendWarps; ++w) {
      const float4 st = warp_stats[w][g];
      ex = softmax_merge(ex, {st.x, st.y});
      ap = softmax_merge(ap, {st.z, st.w});
    }
    // ex.m is the max over warps, the scale acc_smem was summed at.
    float* out = p.part_stats + (part + g0 + g) * 4;
    out[0] = ex.m;
    out[1] = ex.l;
    out[2] = ap.m;
    out[3] = ap.l;
  }

  // merge: the last partition of this (row, group chunk) to finish combines all of them.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const uint32_t ticket = atomicAdd(&counters[kAttendDone + blockIdx.z], 1u);
    last_block = ticket == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  merge_chunk<T, GC>(p, row, g0, n_valid);
}

}  // namespace

cudaError_t launch_value_sum(const ValueSumParams& p, DType dtype, int head_dim_bucket,
                             cudaStream_t stream) {
  if (p.rows == 0 || p.n_chunks == 0) return cudaSuccess;
  if (p.rows > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(p.n_chunks), static_cast<unsigned>(p.rows));
  SPARQ_DISPATCH_DTYPE(dtype, T, {
    SPARQ_DISPATCH_HEAD_DIM(head_dim_bucket, KD, {
      SPARQ_DISPATCH_POSITIONS(p.pages, Pos, {
        SPARQ_LAUNCH((value_sum_kernel<T, KD, Pos>), grid, kAttendThreads, stream, p);
      });
    });
  });
  return cudaGetLastError();
}

cudaError_t launch_attend(const AttendParams& p, DType dtype, int head_dim_bucket,
                          cudaStream_t stream) {
  if (p.rows == 0 || p.n_splits == 0) return cudaSuccess;
  if (p.rows > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(p.n_splits), static_cast<unsigned>(p.rows),
                  static_cast<unsigned>(group_chunks(p.G)));
  SPARQ_DISPATCH_DTYPE(dtype, T, {
    SPARQ_DISPATCH_HEAD_DIM(head_dim_bucket, KD, {
      SPARQ_DISPATCH_GROUP_CHUNK(p.G, GC, {
        SPARQ_DISPATCH_POSITIONS(p.pages, Pos, {
          if (p.key_t != nullptr && p.reallocate) {  // alpha from the 8-bit selection cache
            SPARQ_LAUNCH((attend_kernel<T, KD, GC, Pos, true>), grid, kAttendThreads, stream, p);
          } else {
            SPARQ_LAUNCH((attend_kernel<T, KD, GC, Pos, false>), grid, kAttendThreads, stream,
                         p);
          }
        });
      });
    });
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sparq
