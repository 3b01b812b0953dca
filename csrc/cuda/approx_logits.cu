// approx_logits: approximate logits from the r selected components (SparQ step 1;
// docs/cuda-pipeline.md).
//
// Grid (S tiles, B*Hkv, ceil(G / GC)); 256 threads, each a run of VEC = 16/e consecutive
// positions. Per (b, KV head) and valid position it reads r elements of K: from key_t,
// r * e B per position in 16-byte loads (the S*r*e of the byte budget), or, without key_t,
// gathered from key rows (r scattered elements per row; whole 32-byte sectors in practice).
// Plus the mask byte per position when attn_mask is given. Writes 4 B per valid position
// (the group-summed logit, the radix-select key source; only from grid.z == 0), 8 B per
// (tile, head) of softmax statistics, and the tile's first-digit histogram for topk (the top
// kTopkDigitBits of each valid position's ordered key, counted in shared memory and flushed
// with one global atomic per non-empty bucket) plus its valid count (one atomic per warp):
// topk starts from these without another pass over the scores, and attend's k clamp and
// v_mean's count need no pass over the mask. Positions at or beyond the row's length are
// neither read nor written.
//
// The 8-bit selection cache (an int8 key_t, docs/design.md): the same VEC positions per
// thread, r bytes per position in 4-byte (fp32 cache) or 8-byte (16-bit cache) loads, plus the
// 4-byte scale of each position (read once per tile, not per component), which multiplies
// every head's dot product and the group sum before anything else sees them.
//
// Paged caches (PagedPositions): the same, with each run's positions looked up in the block
// table (VEC table reads per thread, L1 hits: a run lies in one block but for odd block
// sizes). key_t is read with 16-byte loads where a run is VEC consecutive elements (unit
// position stride, block_size a multiple of VEC; the host's kt_vec), elementwise otherwise.
//
// All G query heads of a group are formed in registers from the same loads (GC at a time;
// with G > 8 the further chunks re-read the tile through L2, never DRAM twice in practice).
// The group sum uses the summed coefficients, so it costs one FMA per component and position.
// With softcap each head's logit is capped before it enters the statistics and the group sum
// (docs/design.md section 1), so the group sum is formed from the capped heads instead, and
// one block forms every chunk of its tile (grid.z = 1; the chunks run in turn, the tile's
// rows re-read through L1/L2).
#include <type_traits>

#include "sparq/cuda_common.cuh"

namespace sparq {
namespace cuda {
namespace {

constexpr uint32_t kNegInfKey = 0x007fffffu;  // float_to_ordered(-inf)

// Element offsets of a thread's run of N positions s0 .. s0 + N - 1 (those below len): start,
// added to the row's base pointer once, and at(v), position s0 + v relative to it. Contiguous:
// start = s0 * s_pos and at(v) = v * s_pos, no per-position state (the base pointer and loads
// are the ones a kernel without policies would form); paged: each position looked up.
template <typename Pos, int N>
struct PositionRun;

template <int N>
struct PositionRun<StridedPositions, N> {
  int64_t start;
  const int64_t& s_pos;  // the stride where it lives (kernel parameter space), not a copy
  __device__ __forceinline__ PositionRun(const StridedPositions&, int64_t s0, int64_t,
                                         int64_t, const int64_t& s_pos_)
      : start(s0 * s_pos_), s_pos(s_pos_) {}
  __device__ __forceinline__ int64_t at(int v) const { return v * s_pos; }
};

template <int N>
struct PositionRun<PagedPositions, N> {
  static constexpr int64_t start = 0;
  int64_t off[N];
  __device__ __forceinline__ PositionRun(const PagedPositions& pos, int64_t s0, int64_t len,
                                         int64_t s_outer, int64_t s_pos) {
#pragma unroll
    for (int v = 0; v < N; ++v)
      off[v] = s0 + v < len ? PagedPositions::slot_offset(pos.slot(s0 + v), s_outer, s_pos) : 0;
  }
  __device__ __forceinline__ int64_t at(int v) const { return off[v]; }
};

// KT: key_t's element type, T or int8_t (the 8-bit selection cache: each logit times its
// position's scale); unused without key_t (kKeyT false: gathered from key).
template <typename T, int GC, bool kKeyT, typename KT, typename Pos>
__global__ void __launch_bounds__(kApproxThreads)
    approx_logits_kernel(const ApproxParams p) {
  constexpr bool kInt8 = kKeyT && std::is_same_v<KT, int8_t>;
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  constexpr int TILE = kApproxThreads * VEC;
  __shared__ float coef[GC][kMaxHeadDim];
  __shared__ float coef_sum[kMaxHeadDim];
  __shared__ int32_t comp[kMaxHeadDim];
  __shared__ uint32_t hist[kTopkDigitBuckets];
  __shared__ SoftmaxState warp_stats[GC][kApproxThreads / 32];
  static_assert(sizeof(coef) + sizeof(coef_sum) + sizeof(comp) + sizeof(hist) +
                        sizeof(warp_stats) <= kSharedMemoryBudget,
                "approx_logits' static shared memory must fit the default 48 KiB");

  const int64_t row = blockIdx.y;
  const int64_t b = row / p.Hkv, h = row % p.Hkv;
  const int64_t tile = blockIdx.x;
  const int64_t len = p.row_len[b];
  const int64_t tile_start = tile * TILE;
  const int64_t G = p.G, r = p.r;
  // The head chunks this block forms: its own (grid.z = group chunks), or with softcap all of
  // them (grid.z = 1): the selection score then sums the capped logits of every head, which
  // the summed coefficients cannot give (tanh is not linear), so one block forms them all.
  const bool capped = p.softcap > 0.f;
  const int64_t chunk_first = blockIdx.z;
  const int64_t chunk_end = capped ? ceil_div(G, GC) : chunk_first + 1;
  const int64_t heads_end = chunk_end * GC < G ? chunk_end * GC : G;

  if (tile_start >= len) {  // beyond the valid length: empty statistics only
    for (int64_t g = chunk_first * GC + threadIdx.x; g < heads_end; g += blockDim.x) {
      float* st = p.tile_stats + ((row * G + g) * p.n_tiles + tile) * 2;
      st[0] = -INFINITY;
      st[1] = 0.f;
    }
    return;
  }

  for (int64_t j = threadIdx.x; j < r; j += blockDim.x) {
    comp[j] = p.i1[row * r + j];
    coef_sum[j] = p.coef_sum[row * r + j];
  }
  for (int i = threadIdx.x; i < kTopkDigitBuckets; i += blockDim.x) hist[i] = 0;

  const int64_t s0 = tile_start + static_cast<int64_t>(threadIdx.x) * VEC;
  const bool full_run = s0 + VEC <= len;
  const int64_t win_start = p.win_start[b];
  bool valid[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const int64_t s = s0 + v;
    valid[v] = s < len && (p.mask == nullptr || p.mask[b * p.S + s] != 0);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float group_sum[VEC];  // the selection score before masking: sum_g of the heads' logits
#pragma unroll
  for (int v = 0; v < VEC; ++v) group_sum[v] = 0.f;
  float position_scale[VEC];  // the 8-bit selection cache's scale of each position of the run
#pragma unroll
  for (int v = 0; v < VEC; ++v) position_scale[v] = 1.f;
  if constexpr (kInt8) {
    const Pos pos = Pos::of(p.pages, b);
    const PositionRun<Pos, VEC> run(pos, s0, len, p.kts_sb, p.kts_ss);
    const float* scales = p.key_t_scale + pos.row_offset(p.kts_sb) + h * p.kts_sh + run.start;
#pragma unroll
    for (int v = 0; v < VEC; ++v) position_scale[v] = s0 + v < len ? scales[run.at(v)] : 0.f;
  }

  for (int64_t chunk = chunk_first; chunk < chunk_end; ++chunk) {
    // Barriers of the previous chunk order the reuse of coef and warp_stats: its coef reads
    // precede its warp_stats barrier, its warp_stats reads precede the coef barrier below.
    const int64_t g0 = chunk * GC;
    for (int64_t j = threadIdx.x; j < r; j += blockDim.x) {
#pragma unroll
      for (int g = 0; g < GC; ++g)
        coef[g][j] = g0 + g < G ? p.coef[((row * G) + g0 + g) * r + j] : 0.f;
    }
    __syncthreads();

    float acc[GC][VEC];
    float acc_sum[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      acc_sum[v] = 0.f;
#pragma unroll
      for (int g = 0; g < GC; ++g) acc[g][v] = 0.f;
    }

    if (s0 < len) {
      const Pos pos = Pos::of(p.pages, b);
      // A contiguous key_t has unit position stride (the host makes it so): a constant here,
      // so the contiguous instantiation addresses key_t with no stride arithmetic at all.
      const int64_t kt_ss = std::is_same_v<Pos, StridedPositions> ? 1 : p.kt_ss;
      const PositionRun<Pos, VEC> run(pos, s0, len, kKeyT ? p.kt_sb : p.k_sb,
                                      kKeyT ? kt_ss : p.k_ss);
      using Elem = std::conditional_t<kKeyT, KT, T>;  // what the loop below reads
      const Elem* base;
      if constexpr (kKeyT) {
        base = static_cast<const Elem*>(p.key_t) + pos.row_offset(p.kt_sb) + h * p.kt_sh +
               run.start;
      } else {
        base = static_cast<const Elem*>(p.key) + pos.row_offset(p.k_sb) + h * p.k_sh +
               run.start;
      }
#pragma unroll 4
      for (int64_t j = 0; j < r; ++j) {
        float x[VEC];
        if constexpr (kKeyT) {  // VEC positions: 16 bytes in T, 4 or 8 in int8
          const Elem* src = base + comp[j] * p.kt_sd;
          if (full_run && p.kt_vec) {
            load_as_float<Elem, VEC>(src + run.at(0), x);
          } else {
#pragma unroll
            for (int v = 0; v < VEC; ++v)
              x[v] = s0 + v < len ? to_float<Elem>(src[run.at(v)]) : 0.f;
          }
        } else {
          const T* src = base + comp[j];
#pragma unroll
          for (int v = 0; v < VEC; ++v) x[v] = s0 + v < len ? to_float<T>(src[run.at(v)]) : 0.f;
        }
        const float cs = coef_sum[j];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          acc_sum[v] = fmaf(cs, x[v], acc_sum[v]);
#pragma unroll
          for (int g = 0; g < GC; ++g) acc[g][v] = fmaf(coef[g][j], x[v], acc[g][v]);
        }
      }
    }

    if constexpr (kInt8) {  // scale[s] * (q[i1] . key_t[i1, s]), then as any logit
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        acc_sum[v] *= position_scale[v];
#pragma unroll
        for (int g = 0; g < GC; ++g) acc[g][v] *= position_scale[v];
      }
    }
    if (capped) {  // each head's logit capped, then summed (heads past G have logit 0: cap 0)
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
#pragma unroll
        for (int g = 0; g < GC; ++g) {
          acc[g][v] = softcap_logit(acc[g][v], p.softcap);
          group_sum[v] += acc[g][v];
        }
      }
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) group_sum[v] = acc_sum[v];
    }

#pragma unroll
    for (int g = 0; g < GC; ++g) {
      SoftmaxState st = softmax_empty();
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        if (valid[v]) st = softmax_push(st, acc[g][v]);
      st = warp_merge(st);
      if (lane == 0) warp_stats[g][warp] = st;
    }
    __syncthreads();
    if (threadIdx.x < GC && g0 + threadIdx.x < G) {
      SoftmaxState st = softmax_empty();
      for (int w = 0; w < kApproxThreads / 32; ++w)
        st = softmax_merge(st, warp_stats[threadIdx.x][w]);
      float* out = p.tile_stats + (((row * G) + g0 + threadIdx.x) * p.n_tiles + tile) * 2;
      out[0] = st.m;
      out[1] = st.l;
    }
  }

  // Validity and the local window: the selection score, the histogram and the valid count.
  if (blockIdx.z == 0) {
    float score[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      score[v] = !valid[v] ? kInvalidScore
                 : (s0 + v >= win_start ? kWindowScore : selection_score(group_sum[v]));
    }
    float* out = p.sel_score + row * p.S_pad + s0;
    if (full_run) {  // S_pad and s0 are multiples of 4: aligned float4 stores
#pragma unroll
      for (int v = 0; v < VEC; v += 4) {
        SPARQ_EMU_CHECK_ALIGNED(out + v, 16);
        *reinterpret_cast<float4*>(out + v) = make_float4(score[v], score[v + 1], score[v + 2],
                                                          score[v + 3]);
      }
    } else if (s0 < len) {
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        if (s0 + v < len) out[v] = score[v];
    }
    uint32_t n_valid = 0;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const uint32_t key = float_to_ordered(score[v]);
      const bool counted = valid[v] && key != kNegInfKey;
      n_valid += counted ? 1u : 0u;
      warp_hist_add(hist, key >> (32 - kTopkDigitBits), counted);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) n_valid += __shfl_xor_sync(kFullMask, n_valid, off);
    if ((threadIdx.x & 31) == 0 && n_valid != 0)
      atomicAdd(&p.counters[row * p.counter_stride + kValidCount], n_valid);
    __syncthreads();  // the tile's histogram complete
    uint32_t* global_hist = p.hist + row * kTopkDigitBuckets;
    for (int i = threadIdx.x; i < kTopkDigitBuckets; i += blockDim.x)
      if (hist[i] != 0) atomicAdd(&global_hist[i], hist[i]);
  }
}
}  // namespace

cudaError_t launch_approx_logits(const ApproxParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.r > kMaxHeadDim || p.rows > 65535) return cudaErrorInvalidValue;
  // With softcap one block forms every head of its tile (the kernel's comment says why).
  const dim3 grid(static_cast<unsigned>(p.n_tiles), static_cast<unsigned>(p.rows),
                  static_cast<unsigned>(p.softcap > 0.f ? 1 : group_chunks(p.G)));
  SPARQ_DISPATCH_DTYPE(dtype, T, {
    SPARQ_DISPATCH_GROUP_CHUNK(p.G, GC, {
      SPARQ_DISPATCH_POSITIONS(p.pages, Pos, {
        if (p.key_t == nullptr) {
          SPARQ_LAUNCH((approx_logits_kernel<T, GC, false, T, Pos>), grid, kApproxThreads,
                       stream, p);
        } else if (p.key_t_int8) {
          SPARQ_LAUNCH((approx_logits_kernel<T, GC, true, int8_t, Pos>), grid, kApproxThreads,
                       stream, p);
        } else {
          SPARQ_LAUNCH((approx_logits_kernel<T, GC, true, T, Pos>), grid, kApproxThreads,
                       stream, p);
        }
      });
    });
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sparq
