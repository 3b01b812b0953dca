// Device helpers shared by the CUDA kernels: dtype conversion, vector loads, warp and block
// reductions, the warp-aggregated histogram update, and the dtype / head-dim dispatch.
// Free of torch headers on purpose (fast nvcc builds); nvcc only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "sparq/cuda_launchers.h"
#include "sparq/math.h"

namespace sparq {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- dtype conversion -----------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>  // the 8-bit selection cache (exact: every int8 is an fp32)
__device__ __forceinline__ float to_float<int8_t>(int8_t x) { return static_cast<float>(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// In the CPU emulation (tests/cuda_emu), alignment the GPU would fault on is checked.
#ifdef SPARQ_CUDA_EMULATION
#define SPARQ_EMU_CHECK_ALIGNED(ptr, bytes)                                  \
  do {                                                                       \
    if (reinterpret_cast<uintptr_t>(ptr) % (bytes) != 0)                     \
      ::sparq_emu::fail("misaligned vector access (the GPU would fault)");  \
  } while (0)
#else
#define SPARQ_EMU_CHECK_ALIGNED(ptr, bytes) \
  do {                                      \
  } while (0)
#endif

// Loads of data another block of the same launch published (fence + counter atomic): the L2
// copy, never a stale L1 line.
#ifdef SPARQ_CUDA_EMULATION
#define SPARQ_LOAD_PUBLISHED(ptr) sparq_emu_load_acquire(ptr)
#else
#define SPARQ_LOAD_PUBLISHED(ptr) __ldcg(ptr)
#endif

// ---- vector loads ---------------------------------------------------------------------
// N consecutive elements of T as fp32, in 16-byte (or, for short runs, 4/8-byte) loads.
// `p` must be aligned to min(16, N * sizeof(T)) bytes.
template <int Bytes>
struct RawVec;
template <>
struct RawVec<4> { using type = uint32_t; };
template <>
struct RawVec<8> { using type = uint2; };
template <>
struct RawVec<16> { using type = uint4; };

template <typename T, int N>
__device__ __forceinline__ void load_as_float(const T* __restrict__ p, float (&out)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  constexpr int kChunk = kBytes >= 16 ? 16 : kBytes;
  constexpr int kPerChunk = kChunk / static_cast<int>(sizeof(T));
  static_assert(kBytes % kChunk == 0 && (kChunk == 4 || kChunk == 8 || kChunk == 16),
                "vector load of an unsupported size");
  using Raw = typename RawVec<kChunk>::type;
#pragma unroll
  for (int c = 0; c < N / kPerChunk; ++c) {
    SPARQ_EMU_CHECK_ALIGNED(p + c * kPerChunk, kChunk);
    const Raw raw = *reinterpret_cast<const Raw*>(p + c * kPerChunk);
    const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kPerChunk; ++i) out[c * kPerChunk + i] = to_float<T>(elems[i]);
  }
}

// ---- reductions ------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

__device__ __forceinline__ SoftmaxState shfl_xor_state(SoftmaxState s, int off) {
  return {__shfl_xor_sync(kFullMask, s.m, off), __shfl_xor_sync(kFullMask, s.l, off)};
}

__device__ __forceinline__ SoftmaxState warp_merge(SoftmaxState s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s = softmax_merge(s, shfl_xor_state(s, off));
  return s;
}

__device__ __forceinline__ uint32_t warp_inclusive_scan(uint32_t x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t y = __shfl_up_sync(kFullMask, x, off);
    if (lane >= off) x += y;
  }
  return x;
}

// Inclusive prefix sum over the threads of a block (blockDim.x a multiple of 32, at most
// 1024) and the block total: a shuffle scan within each warp, then every warp scans the
// warp totals with shuffles too (no serial loop over warps). `scratch` holds 32 entries.
// Contains __syncthreads: every thread of the block must call it.
__device__ __forceinline__ uint32_t block_inclusive_scan(uint32_t x, uint32_t* scratch,
                                                         uint32_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  x = warp_inclusive_scan(x);
  __syncthreads();  // scratch may still be read by an earlier call
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  const uint32_t warp_incl = warp_inclusive_scan(lane < n_warps ? scratch[lane] : 0u);
  const uint32_t before = __shfl_sync(kFullMask, warp_incl, (warp + 31) & 31);
  *total = __shfl_sync(kFullMask, warp_incl, 31);
  return x + (warp > 0 ? before : 0u);
}

// Add 1 to hist[bucket] for every lane with `active`, one shared atomic per distinct bucket
// in the warp (approximate logits crowd into few buckets; plain atomics would serialise).
// All 32 lanes of the warp must call it.
__device__ __forceinline__ void warp_hist_add(uint32_t* hist, uint32_t bucket, bool active) {
  const unsigned voters = __ballot_sync(kFullMask, active);
  if (!active) return;
  const unsigned peers = __match_any_sync(voters, bucket);
  if (static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1)
    atomicAdd(&hist[bucket], static_cast<uint32_t>(__popc(peers)));
}

// ---- positions ------------------------------------------------------------------------
// Where position s of batch row b lies in a cache of element strides (outer, head, position)
// (sparq/cuda_launchers.h, PageTable): the policy the kernels that read K, V or key_t are
// templated on, so attention and paged_attention run the same kernels and the contiguous
// cache pays nothing for the paged one. A position's location is a `slot` (one int64, so
// attend can look it up two pipeline steps ahead of the rows it addresses); the caller adds
// row_offset(s_outer) + h * s_head once and slot_offset(slot, s_outer, s_pos) per position.
struct StridedPositions {
  int64_t b;
  __device__ __forceinline__ static StridedPositions of(const PageTable&, int64_t b) {
    return {b};
  }
  __device__ __forceinline__ int64_t slot(int64_t s) const { return s; }
  __device__ __forceinline__ int64_t row_offset(int64_t s_outer) const { return b * s_outer; }
  __device__ __forceinline__ static int64_t slot_offset(int64_t slot, int64_t, int64_t s_pos) {
    return slot * s_pos;
  }
};

// Paged: the slot packs (block id << 32) | offset in the block. Positions are below 2^31
// (seq_lens is int32), so 32-bit division; block ids are clamped into the cache (a bad
// table entry, which the host cannot check without a device sync, reads a wrong block,
// never outside the allocation). Slots are never negative, so -1 stays free for "none".
struct PagedPositions {
  const int32_t* blocks;  // the batch row's entries of the block table
  int64_t bt_col;
  int32_t block_size, last_block;
  __device__ __forceinline__ static PagedPositions of(const PageTable& t, int64_t b) {
    return {t.block_table + b * t.bt_row, t.bt_col, t.block_size, t.num_blocks - 1};
  }
  __device__ __forceinline__ int64_t slot(int64_t s) const {
    const int32_t p = static_cast<int32_t>(s);
    const int32_t entry = blocks[static_cast<int64_t>(p / block_size) * bt_col];
    const int32_t block = min(max(entry, 0), last_block);
    return (static_cast<int64_t>(block) << 32) | static_cast<uint32_t>(p % block_size);
  }
  __device__ __forceinline__ int64_t row_offset(int64_t) const { return 0; }
  __device__ __forceinline__ static int64_t slot_offset(int64_t slot, int64_t s_outer,
                                                        int64_t s_pos) {
    return (slot >> 32) * s_outer + (slot & 0xffffffffll) * s_pos;
  }
};

// ---- launch ----------------------------------------------------------------------------
// kernel<<<grid, block, 0, stream>>>(args...), or, when the kernels are compiled as host
// code for the CPU emulation tests (tests/cuda_emu), the emulator's launch.
// SPARQ_DYNAMIC_SMEM(T, name) declares `T* name` pointing at the dynamic shared memory.
#ifdef SPARQ_CUDA_EMULATION
#define SPARQ_LAUNCH(kernel, grid, block, stream, ...) \
  ::sparq_emu::launch(kernel, dim3(grid), dim3(block), stream, __VA_ARGS__)
#define SPARQ_LAUNCH_SMEM(kernel, grid, block, smem, stream, ...) \
  ::sparq_emu::launch_smem(kernel, dim3(grid), dim3(block), smem, stream, __VA_ARGS__)
#define SPARQ_DYNAMIC_SMEM(T, name) T* name = static_cast<T*>(::sparq_emu::dynamic_smem())
#else
#define SPARQ_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define SPARQ_LAUNCH_SMEM(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define SPARQ_DYNAMIC_SMEM(T, name)                         \
  extern __shared__ __align__(16) unsigned char sparq_dynamic_smem[]; \
  T* name = reinterpret_cast<T*>(sparq_dynamic_smem)
#endif

// ---- dispatch --------------------------------------------------------------------------
#define SPARQ_DISPATCH_DTYPE(dtype, T, ...)                      \
  switch (dtype) {                                               \
    case ::sparq::cuda::DType::kFloat32: {                       \
      using T = float;                                           \
      __VA_ARGS__;                                               \
    } break;                                                     \
    case ::sparq::cuda::DType::kFloat16: {                       \
      using T = __half;                                          \
      __VA_ARGS__;                                               \
    } break;                                                     \
    case ::sparq::cuda::DType::kBFloat16: {                      \
      using T = __nv_bfloat16;                                   \
      __VA_ARGS__;                                               \
    } break;                                                     \
    default:                                                     \
      return cudaErrorInvalidValue;                              \
  }

// Pos: the position policy of the call (a block table or not).
#define SPARQ_DISPATCH_POSITIONS(pages, Pos, ...)               \
  if ((pages).block_table != nullptr) {                          \
    using Pos = ::sparq::cuda::PagedPositions;                   \
    __VA_ARGS__;                                                 \
  } else {                                                       \
    using Pos = ::sparq::cuda::StridedPositions;                 \
    __VA_ARGS__;                                                 \
  }

#define SPARQ_DISPATCH_HEAD_DIM(bucket, KD, ...)                 \
  switch (bucket) {                                              \
    case 64: {                                                   \
      constexpr int KD = 64;                                     \
      __VA_ARGS__;                                               \
    } break;                                                     \
    case 128: {                                                  \
      constexpr int KD = 128;                                    \
      __VA_ARGS__;                                               \
    } break;                                                     \
    case 256: {                                                  \
      constexpr int KD = 256;                                    \
      __VA_ARGS__;                                               \
    } break;                                                     \
    default:                                                     \
      return cudaErrorInvalidValue;                              \
  }

#define SPARQ_DISPATCH_GROUP_CHUNK(G, GC, ...)                   \
  switch (::sparq::cuda::group_chunk(G)) {                       \
    case 1: {                                                    \
      constexpr int GC = 1;                                      \
      __VA_ARGS__;                                               \
    } break;                                                     \
    case 4: {                                                    \
      constexpr int GC = 4;                                      \
      __VA_ARGS__;                                               \
    } break;                                                     \
    default: {                                                   \
      constexpr int GC = ::sparq::cuda::kMaxGroupChunk;          \
      __VA_ARGS__;                                               \
    } break;                                                     \
  }

// Lane layout for reading one K or V row of a head-dim bucket KD: 16-byte loads, LPR lanes
// per row, EPL elements per lane, RPW rows per warp at a time.
template <typename T, int KD>
struct RowLayout {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static constexpr int kLanesPerRow = KD / kVec < 32 ? KD / kVec : 32;
  static constexpr int kElemsPerLane = KD / kLanesPerRow;
  static constexpr int kRowsPerWarp = 32 / kLanesPerRow;
  static_assert(kLanesPerRow * kElemsPerLane == KD, "head dim must split evenly over lanes");
};

}  // namespace cuda
}  // namespace sparq
