// Stages 4 and 5: exact attention over the selected positions, and the merge.
//
// value_sum (only when value_mean is None; grid (S / 1024, B*Hkv), 128 threads) reads every
//   valid V row once (D*e B per valid position; this is the dense cost the caller avoids by
//   passing value_mean) and adds D fp32 per warp into value_sum with atomics.
// attend (grid (splits, B*Hkv, ceil(G / GC)), 128 threads) reads, per selected position,
//   its index (4 B), its K row and its V row (2*D*e B: the 2*k*D*e of the byte budget), in
//   16-byte loads; with G > 8 the further group chunks re-read them through L2. It forms all
//   heads' exact logits and, from the same K row, their approximate logits (the dot product
//   restricted to the i1 components, times the head's scale), so alpha needs no per-head
//   logits from stage 2. The query slice of each lane lives in registers.
//   Writes per split and head (D + 4) fp32: the unnormalised p.V sum and (m, l) for the exact
//   and approximate softmax (flash-decoding partials).
// merge (grid B*Hq, 128 threads) reads the partials ((D + 4) * 4 B per split and head), the
//   stage-2 tile statistics (8 B per tile and head) and v_mean (D values), and writes the
//   output (D*e B per head).
#include "sparq/cuda_common.cuh"

namespace sparq {
namespace cuda {
namespace {

constexpr int kAttendThreads = kAttendWarps * 32;
constexpr int kAttendUnroll = 2;  // positions in flight per lane group (loads before math)

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

__device__ __forceinline__ uint32_t hist_total(const uint32_t* row_hist) {
  __shared__ uint32_t scratch[32];
  uint32_t part = 0;
  for (int i = threadIdx.x; i < kRadixBuckets; i += blockDim.x) part += row_hist[i];
  uint32_t total = 0;
  block_inclusive_scan(part, scratch, &total);
  return total;
}

template <typename T, int KD>
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
  const T* v_base = static_cast<const T*>(p.value) + b * p.v_sb + h * p.v_sh + d0;
  float acc[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) acc[e] = 0.f;
#pragma unroll 4
  for (int64_t s = start + warp * RPW + sub; s < len; s += kAttendWarps * RPW) {
    if (has_d && (p.mask == nullptr || p.mask[b * p.S + s] != 0)) {
      float v[EPL];
      load_as_float<T, EPL>(v_base + s * p.v_ss, v);
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

template <typename T, int KD, int GC>
__global__ void __launch_bounds__(kAttendThreads) attend_kernel(const AttendParams p) {
  using Layout = RowLayout<T, KD>;
  constexpr int LPR = Layout::kLanesPerRow, EPL = Layout::kElemsPerLane;
  constexpr int RPW = Layout::kRowsPerWarp;
  constexpr int kRowsPerStep = kAttendWarps * RPW;
  static_assert(EPL <= 32, "the i1 bitmask holds one bit per element of a lane");
  __shared__ uint8_t in_i1[KD];
  __shared__ float4 warp_stats[kAttendWarps][GC];
  __shared__ float acc_smem[GC][KD];

  const int64_t row = blockIdx.y, b = row / p.Hkv, h = row % p.Hkv;
  const int64_t G = p.G, D = p.D;
  const int64_t g0 = static_cast<int64_t>(blockIdx.z) * GC;
  for (int i = threadIdx.x; i < KD; i += blockDim.x) in_i1[i] = 0;
  for (int i = threadIdx.x; i < GC * KD; i += blockDim.x) (&acc_smem[0][0])[i] = 0.f;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < p.r; j += blockDim.x) in_i1[p.i1[row * p.r + j]] = 1;
  const int64_t valid_count = hist_total(p.hist + row * kRadixPasses * kRadixBuckets);
  const int64_t k_row = p.k_eff < valid_count ? p.k_eff : valid_count;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * p.split_len;
  const int64_t end = begin + p.split_len < k_row ? begin + p.split_len : k_row;
  __syncthreads();  // in_i1 complete (hist_total synchronised too; keep it explicit)

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
      load_as_float<T, EPL>(static_cast<const T*>(p.query) + (row * G + g0 + g) * D + d0, q[g]);
    } else {
#pragma unroll
      for (int e = 0; e < EPL; ++e) q[g][e] = 0.f;
    }
  }

  const T* k_base = static_cast<const T*>(p.key) + b * p.k_sb + h * p.k_sh + d0;
  const T* v_base = static_cast<const T*>(p.value) + b * p.v_sb + h * p.v_sh + d0;
  const int32_t* idx = p.topk_idx + row * p.k_eff;

  float acc[GC][EPL];
  SoftmaxState exact[GC], approx[GC];
#pragma unroll
  for (int g = 0; g < GC; ++g) {
    exact[g] = softmax_empty();
    approx[g] = softmax_empty();
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[g][e] = 0.f;
  }

  // The trip count depends on the warp only, so whole warps run the shuffles together.
  for (int64_t base = begin + warp * RPW; base < end; base += kAttendUnroll * kRowsPerStep) {
    float kv[kAttendUnroll][EPL], vv[kAttendUnroll][EPL];
    bool active[kAttendUnroll];
#pragma unroll
    for (int u = 0; u < kAttendUnroll; ++u) {
      const int64_t i = base + u * kRowsPerStep + sub;
      active[u] = i < end;
      if (active[u] && has_d) {
        // Clamped although the top-k writes only positions below the row's length: an
        // index must never address outside the cache.
        const int64_t s = min(max(static_cast<int64_t>(idx[i]), int64_t{0}), p.S - 1);
        load_as_float<T, EPL>(k_base + s * p.k_ss, kv[u]);
        load_as_float<T, EPL>(v_base + s * p.v_ss, vv[u]);
      } else {
#pragma unroll
        for (int e = 0; e < EPL; ++e) kv[u][e] = vv[u][e] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < kAttendUnroll; ++u) {
      float x[GC], xa[GC];
#pragma unroll
      for (int g = 0; g < GC; ++g) {
        float dot = 0.f, dot_i1 = 0.f;
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
          const float prod = q[g][e] * kv[u][e];
          dot += prod;
          dot_i1 += (i1_bits >> e) & 1u ? prod : 0.f;
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
      if (!active[u]) continue;
#pragma unroll
      for (int g = 0; g < GC; ++g) {
        const float logit = x[g] * p.scale;
        if (logit == -INFINITY) continue;  // only with -inf in the inputs; keeps m finite
        const float m_new = fmaxf(exact[g].m, logit);
        const float c = softmax_rescale(exact[g].m, m_new);
        const float w = expf(logit - m_new);
        exact[g] = {m_new, exact[g].l * c + w};
#pragma unroll
        for (int e = 0; e < EPL; ++e) acc[g][e] = fmaf(acc[g][e], c, w * vv[u][e]);
        approx[g] = softmax_push(approx[g], xa[g] * head_scale[g]);
      }
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
}

template <typename T>
__global__ void __launch_bounds__(kAttendThreads) merge_kernel(const MergeParams p) {
  const int64_t G = p.G, D = p.D;
  const int64_t head = blockIdx.x;  // b * Hq + h * G + g
  const int64_t row = head / G, g = head % G, b = row / p.Hkv;

  SoftmaxState full = softmax_empty();  // approximate softmax over all valid positions
  const float* tiles = p.tile_stats + (row * G + g) * p.n_tiles * 2;
  for (int64_t t = threadIdx.x; t < p.n_tiles; t += blockDim.x)
    full = softmax_merge(full, {tiles[2 * t], tiles[2 * t + 1]});
  full = block_merge(full);

  SoftmaxState exact = softmax_empty(), selected = softmax_empty();
  for (int64_t s = threadIdx.x; s < p.n_splits; s += blockDim.x) {
    const float* st = p.part_stats + ((row * p.n_splits + s) * G + g) * 4;
    exact = softmax_merge(exact, {st[0], st[1]});
    selected = softmax_merge(selected, {st[2], st[3]});
  }
  exact = block_merge(exact);
  selected = block_merge(selected);
  const float alpha = softmax_mass_ratio(selected, full);
  const int32_t n_valid = p.n_valid[b];

  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float y = 0.f;
    if (exact.l > 0.f) {
      for (int64_t s = 0; s < p.n_splits; ++s) {
        const int64_t part = (row * p.n_splits + s) * G + g;
        y += p.part_acc[part * D + d] * softmax_rescale(p.part_stats[part * 4], exact.m);
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
    static_cast<T*>(p.out)[head * D + d] = from_float<T>(o);
  }
}

}  // namespace

cudaError_t launch_value_sum(const ValueSumParams& p, DType dtype, int head_dim_bucket,
                             cudaStream_t stream) {
  if (p.rows == 0 || p.n_chunks == 0) return cudaSuccess;
  if (p.rows > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(p.n_chunks), static_cast<unsigned>(p.rows));
  SPARQ_DISPATCH_DTYPE(dtype, T, {
    SPARQ_DISPATCH_HEAD_DIM(head_dim_bucket, KD, {
      SPARQ_LAUNCH((value_sum_kernel<T, KD>), grid, kAttendThreads, stream, p);
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
        SPARQ_LAUNCH((attend_kernel<T, KD, GC>), grid, kAttendThreads, stream, p);
      });
    });
  });
  return cudaGetLastError();
}

cudaError_t launch_merge(const MergeParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(p.rows * p.G);
  SPARQ_DISPATCH_DTYPE(dtype, T, {
    SPARQ_LAUNCH(merge_kernel<T>, blocks, kAttendThreads, stream, p);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sparq
