// Stage 3: exact top-k of the selection scores by radix select (SparQ step 2's i2).
// Rows of up to 32K positions take the one-block-per-row kernel at the end of this file
// (keys in shared memory, one launch); longer rows the chunked passes described here.
//
// Keys are float_to_ordered(score) (sparq/math.h), digits of kRadixBits = 8 bits from the
// top. The pass-0 histogram comes from approx_logits; passes 1..3 each read the row's scores
// below its valid length once (4 B per position) and add a 1 KiB histogram per block; the
// emit pass reads them once more and writes k indices (4 B each). Every block of a pass
// re-derives the row's state (prefix, count still wanted) from the earlier histograms
// (<= 3 KiB, L2), so there is no host round trip and no extra launch between passes.
// Grid (chunks of 4096 positions, B*Hkv): S = 128K gives 32 blocks per row, so rows split
// over many blocks when B*Hkv is small. Invalid positions hold -inf and are never counted,
// so the per-row k is min(k_eff, valid count) without reading seq_lens or the mask here.
// Ties at the threshold key: the first (k - above) to claim a slot win (any valid choice).
#include "sparq/cuda_common.cuh"

namespace sparq {
namespace cuda {
namespace {

constexpr uint32_t kNegInfKey = 0x007fffffu;  // float_to_ordered(-inf): never selected
static_assert(kTopkThreads == kRadixBuckets, "one histogram bucket per thread");

struct RadixState {
  uint32_t prefix;  // key bits fixed so far
  int64_t want;     // keys still to take among those matching `prefix`
  int64_t above;    // keys known to be selected (strictly above every candidate)
};

// The radix-select state after `passes_done` passes, from the row's histograms. The
// parallel form of radix_find_bucket: bucket t's count as a suffix sum from the top bucket.
// Every thread of the block must call it (block-wide scans); all get the same state.
__device__ RadixState radix_state(const uint32_t* row_hist, int passes_done, int64_t k_eff) {
  __shared__ uint32_t scratch[32];
  __shared__ uint32_t found_bucket, found_higher;
  RadixState st{0u, 0, 0};
  if (threadIdx.x == 0) found_bucket = found_higher = 0;  // defined even if no bucket matched
  uint32_t total = 0;
  block_inclusive_scan(row_hist[threadIdx.x], scratch, &total);
  st.want = k_eff < static_cast<int64_t>(total) ? k_eff : static_cast<int64_t>(total);
  for (int pass = 0; pass < passes_done && st.want > 0; ++pass) {
    const int bucket = kRadixBuckets - 1 - static_cast<int>(threadIdx.x);  // descending
    const uint32_t count = row_hist[pass * kRadixBuckets + bucket];
    uint32_t pass_total = 0;
    const uint32_t incl = block_inclusive_scan(count, scratch, &pass_total);
    const int64_t excl = static_cast<int64_t>(incl - count);
    if (excl < st.want && st.want <= static_cast<int64_t>(incl)) {
      found_bucket = static_cast<uint32_t>(bucket);
      found_higher = static_cast<uint32_t>(excl);
    }
    __syncthreads();
    st.above += found_higher;
    st.want -= found_higher;
    st.prefix |= found_bucket << (32 - kRadixBits * (pass + 1));
    __syncthreads();  // found_* are rewritten by the next pass
  }
  return st;
}

// Histogram pass `pass` (1..3) over the candidates matching the prefix of passes < pass.
__global__ void __launch_bounds__(kTopkThreads)
    radix_hist_kernel(const TopkParams p, int pass) {
  __shared__ uint32_t hist[kRadixBuckets];
  const int64_t row = blockIdx.y;
  const int64_t len = p.row_len[row / p.Hkv];
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kTopkChunk;
  if (start >= len) return;
  uint32_t* row_hist = p.hist + row * kRadixPasses * kRadixBuckets;
  const RadixState st = radix_state(row_hist, pass, p.k_eff);
  if (st.want == 0) return;  // uniform over the block
  hist[threadIdx.x] = 0;
  __syncthreads();
  const uint32_t mask = radix_prefix_mask(pass);
  const float* score = p.sel_score + row * p.S_pad;
#pragma unroll 4
  for (int i = 0; i < kTopkKeysPerThread; ++i) {
    const int64_t s = start + static_cast<int64_t>(i) * kTopkThreads + threadIdx.x;
    const uint32_t key = s < len ? float_to_ordered(score[s]) : kNegInfKey;
    const bool candidate = key != kNegInfKey && (key & mask) == st.prefix;
    warp_hist_add(hist, radix_digit(key, pass), candidate);
  }
  __syncthreads();
  if (hist[threadIdx.x] != 0)
    atomicAdd(&row_hist[pass * kRadixBuckets + threadIdx.x], hist[threadIdx.x]);
}

// Emit: every key above the threshold, and the first `want` keys equal to it.
__global__ void __launch_bounds__(kTopkThreads) radix_emit_kernel(const TopkParams p) {
  const int64_t row = blockIdx.y;
  const int64_t len = p.row_len[row / p.Hkv];
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kTopkChunk;
  if (start >= len) return;
  const RadixState st = radix_state(p.hist + row * kRadixPasses * kRadixBuckets, kRadixPasses,
                                    p.k_eff);
  if (st.want == 0 && st.above == 0) return;
  const uint32_t threshold = st.prefix;
  const float* score = p.sel_score + row * p.S_pad;
  int32_t* out = p.topk_idx + row * p.k_eff;
  uint32_t* counters = p.counters + row * 2;
  const int lane = threadIdx.x & 31;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int i = 0; i < kTopkKeysPerThread; ++i) {
    const int64_t s = start + static_cast<int64_t>(i) * kTopkThreads + threadIdx.x;
    const uint32_t key = s < len ? float_to_ordered(score[s]) : kNegInfKey;
    const bool valid = key != kNegInfKey;
    const bool above = valid && key > threshold;
    const bool tie = valid && key == threshold;
    // One atomic per warp and kind; lanes take consecutive slots.
    const unsigned above_lanes = __ballot_sync(kFullMask, above);
    const unsigned tie_lanes = __ballot_sync(kFullMask, tie);
    uint32_t above_base = 0, tie_base = 0;
    if (lane == 0 && above_lanes != 0) above_base = atomicAdd(&counters[0], __popc(above_lanes));
    if (lane == 0 && tie_lanes != 0) tie_base = atomicAdd(&counters[1], __popc(tie_lanes));
    above_base = __shfl_sync(kFullMask, above_base, 0);
    tie_base = __shfl_sync(kFullMask, tie_base, 0);
    // The slot bounds hold by construction (the histograms count exactly these keys); the
    // checks keep a broken invariant from ever writing outside the row's k slots.
    if (above) {
      const int64_t slot = static_cast<int64_t>(above_base) + __popc(above_lanes & lanes_below);
      if (slot < st.above) out[slot] = static_cast<int32_t>(s);
    } else if (tie) {
      const int64_t slot = static_cast<int64_t>(tie_base) + __popc(tie_lanes & lanes_below);
      if (slot < st.want) out[st.above + slot] = static_cast<int32_t>(s);
    }
  }
}

// Whole radix select of one row in one block, the row's keys in shared memory: for rows of
// up to kTopkRowMaxKeys positions, where the four launches of the chunked path would cost
// more than their work. Reads the scores once (4 B per position), writes k indices, in
// position order (block-wide scans assign the slots).
__global__ void __launch_bounds__(kTopkRowThreads) radix_topk_row_kernel(const TopkParams p) {
  SPARQ_DYNAMIC_SMEM(uint32_t, keys);
  __shared__ uint32_t hist[kRadixBuckets];
  __shared__ uint32_t scratch[32];
  __shared__ uint32_t found_bucket, found_higher;
  const int64_t row = blockIdx.x;
  const int64_t len = p.row_len[row / p.Hkv];
  const float* score = p.sel_score + row * p.S_pad;
  uint32_t valid_here = 0;
  for (int64_t s = threadIdx.x; s < len; s += blockDim.x) {
    const uint32_t key = float_to_ordered(score[s]);
    keys[s] = key;
    valid_here += key != kNegInfKey;
  }
  if (threadIdx.x == 0) found_bucket = found_higher = 0;
  uint32_t total = 0;
  block_inclusive_scan(valid_here, scratch, &total);  // its barriers also publish `keys`
  int64_t want = p.k_eff < static_cast<int64_t>(total) ? p.k_eff : static_cast<int64_t>(total);
  if (want == 0) return;  // uniform
  int64_t above = 0;
  uint32_t prefix = 0;
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    for (int i = threadIdx.x; i < kRadixBuckets; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    const uint32_t mask = radix_prefix_mask(pass);
    for (int64_t base = 0; base < len; base += blockDim.x) {  // uniform trip count
      const int64_t s = base + threadIdx.x;
      const uint32_t key = s < len ? keys[s] : kNegInfKey;
      warp_hist_add(hist, radix_digit(key, pass), key != kNegInfKey && (key & mask) == prefix);
    }
    __syncthreads();
    const int bucket = kRadixBuckets - 1 - static_cast<int>(threadIdx.x);  // descending
    const uint32_t count = bucket >= 0 ? hist[bucket] : 0u;
    uint32_t pass_total = 0;
    const uint32_t incl = block_inclusive_scan(count, scratch, &pass_total);
    const int64_t excl = static_cast<int64_t>(incl - count);
    if (bucket >= 0 && excl < want && want <= static_cast<int64_t>(incl)) {
      found_bucket = static_cast<uint32_t>(bucket);
      found_higher = static_cast<uint32_t>(excl);
    }
    __syncthreads();
    above += found_higher;
    want -= found_higher;
    prefix |= found_bucket << (32 - kRadixBits * (pass + 1));
    __syncthreads();  // found_* and hist are rewritten by the next pass
  }
  int32_t* out = p.topk_idx + row * p.k_eff;
  int64_t above_done = 0, ties_done = 0;
  for (int64_t base = 0; base < len && (above_done < above || ties_done < want);
       base += blockDim.x) {  // uniform: the counts are block totals
    const int64_t s = base + threadIdx.x;
    const uint32_t key = s < len ? keys[s] : kNegInfKey;
    const bool is_above = key != kNegInfKey && key > prefix;
    const bool is_tie = key != kNegInfKey && key == prefix;
    uint32_t n_above = 0, n_tie = 0;
    const uint32_t above_incl = block_inclusive_scan(is_above ? 1u : 0u, scratch, &n_above);
    const uint32_t tie_incl = block_inclusive_scan(is_tie ? 1u : 0u, scratch, &n_tie);
    if (is_above) {
      const int64_t slot = above_done + above_incl - 1;
      if (slot < above) out[slot] = static_cast<int32_t>(s);
    } else if (is_tie) {
      const int64_t slot = ties_done + tie_incl - 1;
      if (slot < want) out[above + slot] = static_cast<int32_t>(s);
    }
    above_done += n_above;
    ties_done += n_tie;
  }
}

}  // namespace

cudaError_t launch_radix_topk(const TopkParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.n_chunks == 0) return cudaSuccess;
  if (p.rows > 65535) return cudaErrorInvalidValue;
  if (p.S_pad <= p.row_max_keys && p.S_pad <= kTopkRowMaxKeys) {
    const size_t smem = static_cast<size_t>(p.S_pad) * sizeof(uint32_t);
    if (smem > 48 * 1024) {  // opt in to more than the default 48 KiB (no stream work)
      const cudaError_t err = cudaFuncSetAttribute(
          radix_topk_row_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
          static_cast<int>(smem));
      if (err != cudaSuccess) return err;
    }
    SPARQ_LAUNCH_SMEM(radix_topk_row_kernel, static_cast<unsigned>(p.rows), kTopkRowThreads,
                      smem, stream, p);
    return cudaGetLastError();
  }
  const dim3 grid(static_cast<unsigned>(p.n_chunks), static_cast<unsigned>(p.rows));
  for (int pass = 1; pass < kRadixPasses; ++pass) {
    SPARQ_LAUNCH(radix_hist_kernel, grid, kTopkThreads, stream, p, pass);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  SPARQ_LAUNCH(radix_emit_kernel, grid, kTopkThreads, stream, p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sparq
