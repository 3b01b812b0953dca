// prep: one block per row (b, KV head), the first kernel of every call (docs/cuda-pipeline.md).
//
// Fuses what would otherwise be a memset and two small launches:
//   - zeroes the row's first-digit histogram (16 KiB), counters and, without value_mean,
//     its V sum (4D B): the workspace the later kernels accumulate into, cleared on the
//     stream so CUDA-graph replays start from zero as well;
//   - the block of KV head 0 of each batch row: the valid length (seq_lens, 8 B; the paged
//     operator's int32 seq_lens is read in place, 4 B) and the local-window start (with
//     attn_mask: a backward scan of the mask bytes that stops after the window, so at most
//     a few blocks of bytes; the valid count itself comes from approx_logits, never from a
//     byte-wise pass over the mask);
//   - reads the group's query (G*D*e B, with scalar loads: the caller's query may start at
//     any address) and its component weights when given (4D B), writes i1 (4r B), coefficients (4(G+1)r B), per-head scales (4G B) and
//     the fp32 query copy attend reads with 16-byte loads (4GD B, aligned workspace).
#include "sparq/cuda_common.cuh"

namespace sparq {
namespace cuda {
namespace {

// The batch row's valid length and local-window start; every thread of the block calls it.
__device__ void row_prep(const PrepParams& p, int64_t b) {
  __shared__ uint32_t scratch[32];
  __shared__ int32_t window_start;
  int64_t len = p.S;
  if (p.seq_lens != nullptr || p.seq_lens_i32 != nullptr) {
    const int64_t l = p.seq_lens != nullptr ? p.seq_lens[b]
                                            : p.seq_lens_i32[b * p.seq_lens_i32_stride];
    len = l < 0 ? 0 : (l > p.S ? p.S : l);
  }
  if (p.mask == nullptr) {
    if (threadIdx.x == 0) {
      p.row_len[b] = static_cast<int32_t>(len);
      p.win_start[b] = static_cast<int32_t>(len - (p.window < len ? p.window : len));
    }
    return;
  }
  const uint8_t* mask = p.mask + b * p.S;
  // The window starts at the `window`-th valid position counted from the end; with fewer
  // valid positions than that, every valid position is in it (start 0). Scan backwards in
  // chunks of one position per thread (thread 0 takes the highest) until it is found.
  if (threadIdx.x == 0) window_start = p.window == 0 ? static_cast<int32_t>(len) : 0;
  __syncthreads();
  if (p.window > 0) {
    int64_t seen = 0;  // valid positions above the current chunk
    for (int64_t top = len; top > 0; top -= blockDim.x) {
      const int64_t s = top - 1 - threadIdx.x;
      const bool valid = s >= 0 && mask[s] != 0;
      uint32_t chunk_total = 0;
      const uint32_t from_top = block_inclusive_scan(valid ? 1u : 0u, scratch, &chunk_total);
      if (valid && seen + from_top == p.window) window_start = static_cast<int32_t>(s);
      seen += chunk_total;
      if (seen >= p.window) break;  // uniform: every thread has the same `seen`
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    p.row_len[b] = static_cast<int32_t>(len);
    p.win_start[b] = window_start;
  }
}

// i1 by rank: component d is the rank(d)-th largest of w_d * sum_g |q_g| (w: the optional
// component weights, else 1; ties broken by index;
// compared as ordered keys, a total order even with NaN in the query, so ranks are always a
// permutation and exactly r in-range components are chosen). D <= 256 makes the
// O(D^2) comparison trivially cheap and needs no sort.
template <typename T>
__global__ void __launch_bounds__(kPrepThreads) prep_kernel(const PrepParams p) {
  __shared__ uint32_t magnitude[kMaxHeadDim];  // order-preserving keys of w * sum_g |q_g|
  __shared__ float weight[kMaxHeadDim];         // w (1 without component weights)
  __shared__ uint8_t selected[kMaxHeadDim];
  __shared__ int32_t i1[kMaxHeadDim];
  const int64_t row = blockIdx.x;
  const int64_t G = p.G, D = p.D, r = p.r;
  const T* q = static_cast<const T*>(p.query) + row * G * D;

  // The row's accumulators, zeroed before approx_logits (the next launch) adds into them.
  for (int64_t i = threadIdx.x; i < kTopkDigitBuckets; i += blockDim.x)
    p.hist[row * kTopkDigitBuckets + i] = 0;
  for (int64_t i = threadIdx.x; i < p.counter_stride; i += blockDim.x)
    p.counters[row * p.counter_stride + i] = 0;
  if (p.value_sum != nullptr)
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) p.value_sum[row * D + i] = 0.f;
  if (row % p.Hkv == 0) row_prep(p, row / p.Hkv);

  // The query in fp32 for attend's vector loads (scalar reads here: any alignment).
  for (int64_t i = threadIdx.x; i < G * D; i += blockDim.x)
    p.q32[row * G * D + i] = to_float<T>(q[i]);

  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float a = 0.f;
    for (int64_t g = 0; g < G; ++g) a += fabsf(to_float<T>(q[g * D + d]));
    const float w = p.component_weights != nullptr ? p.component_weights[row * D + d] : 1.f;
    weight[d] = w;
    magnitude[d] = float_to_ordered(p.component_weights != nullptr ? a * w : a);
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const uint32_t a = magnitude[d];
    int64_t rank = 0;
    for (int64_t e = 0; e < D; ++e) {
      const uint32_t other = magnitude[e];
      rank += (other > a) || (other == a && e < d);
    }
    selected[d] = rank < r;
    if (rank < r) i1[rank] = static_cast<int32_t>(d);
  }
  __syncthreads();

  // gamma_g = |w q_g[i1]|_1 / |w q_g|_1 and the per-head scale, one warp per head.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  for (int64_t g = warp; g < G; g += n_warps) {
    float l1 = 0.f, hat_l1 = 0.f;
    for (int64_t d = lane; d < D; d += 32) {
      const float a = fabsf(to_float<T>(q[g * D + d])) * weight[d];
      l1 += a;
      hat_l1 += selected[d] ? a : 0.f;
    }
    l1 = warp_sum(l1);
    hat_l1 = warp_sum(hat_l1);
    if (lane == 0) p.head_scale[row * G + g] = approx_logit_scale(hat_l1, l1, p.scale);
  }
  __syncthreads();  // makes the head_scale writes visible to the whole block
  const float* approx_scale = p.head_scale + row * G;

  for (int64_t j = threadIdx.x; j < r; j += blockDim.x) {
    const int32_t d = i1[j];
    p.i1[row * r + j] = d;
    float sum = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const float c = to_float<T>(q[g * D + d]) * approx_scale[g];
      p.coef[(row * G + g) * r + j] = c;
      sum += c;
    }
    p.coef_sum[row * r + j] = sum;
  }
}

}  // namespace

cudaError_t launch_prep(const PrepParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.D > kMaxHeadDim) return cudaErrorInvalidValue;
  SPARQ_DISPATCH_DTYPE(dtype, T, {
    SPARQ_LAUNCH(prep_kernel<T>, static_cast<unsigned>(p.rows), kPrepThreads, stream, p);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sparq
