// topk: exact top-k of the selection scores by radix select (SparQ step 2's i2), in one
// launch of several blocks per row (docs/cuda-pipeline.md).
//
// Keys are float_to_ordered(score) (sparq/math.h). The first digit is the top
// kTopkDigitBits (12) bits, and its histogram per row was built by approx_logits, so this
// kernel starts from the pivot digit P (the digit holding the row's k-th largest key)
// without a histogram pass of its own:
//   1. every block finds P from the histogram (16 KiB of L2 per block);
//   2. each block scans its chunk of the row once (4 B per position): keys with a digit
//      above P are selected at once (output slots from one per-row counter atomic per warp);
//      keys with digit P are candidates, appended to the row's candidate buffer (8 B each);
//      when every candidate is needed (k falls on the last one) they are selected directly;
//   3. the last block of the row to finish (a per-row done counter) selects the missing keys
//      among the candidates: radix select on the remaining 20 bits in two digits of 10 bits
//      (shared-memory histograms over the candidates only, usually a small fraction of the
//      row), then emits keys above the threshold and the first ties to claim a slot.
// Blocks per row come from the SM count (the host's plan), so the GPU fills up even at
// B * Hkv = 8. Invalid positions hold -inf and are never counted, so the row's k is
// min(k_eff, valid count) from approx_logits' counter. Ties at the threshold key: the first
// to claim a slot wins (any valid choice, docs/design.md). Indices come out unsorted.
// Shared memory: 4 KiB (the refine histogram) + scratch, static; no dynamic shared memory.
#include "sparq/cuda_common.cuh"

namespace sparq {
namespace cuda {
namespace {

constexpr uint32_t kNegInfKey = 0x007fffffu;  // float_to_ordered(-inf): never selected
constexpr int kDigitShift = 32 - kTopkDigitBits;
static_assert(kTopkDigitBits + 2 * kTopkRefineBits == 32, "the digits cover the key");
static_assert(kTopkDigitBuckets % kTopkThreads == 0 && kTopkRefineBuckets == kTopkThreads,
              "whole buckets per thread");

struct Pivot {
  uint32_t bucket;  // the bucket holding the want-th largest
  uint32_t above;   // keys in higher buckets
};

// Scanning counts[0..n) from the top bucket down: the bucket holding the want-th largest
// (want >= 1) and how many lie above it. Each thread owns n / blockDim.x consecutive
// buckets; one block scan finds the owner. Every thread of the block calls it; all get the
// same result (via `result`, shared).
__device__ Pivot find_pivot(const uint32_t* counts, int n, uint32_t want, uint32_t* scratch,
                            Pivot* result) {
  const int per = n / static_cast<int>(blockDim.x);
  const int top = n - 1 - static_cast<int>(threadIdx.x) * per;
  if (threadIdx.x == 0) *result = {0u, 0u};  // fewer than `want` keys: bucket 0 takes all
  uint32_t mine = 0;
  for (int i = 0; i < per; ++i) mine += counts[top - i];
  uint32_t total = 0;
  const uint32_t incl = block_inclusive_scan(mine, scratch, &total);  // publishes *result
  uint32_t acc = incl - mine;
  if (acc < want && want <= incl) {
    for (int i = 0; i < per; ++i) {
      const uint32_t c = counts[top - i];
      if (acc + c >= want) {
        *result = {static_cast<uint32_t>(top - i), acc};
        break;
      }
      acc += c;
    }
  }
  __syncthreads();
  const Pivot p = *result;
  __syncthreads();  // `result` may be rewritten by the next call
  return p;
}

// Slot in a run claimed by one atomic per warp: lanes with `take` get consecutive slots.
// All 32 lanes of the warp must call it.
__device__ __forceinline__ uint32_t claim_slot(uint32_t* counter, bool take) {
  const unsigned lanes = __ballot_sync(kFullMask, take);
  const int lane = threadIdx.x & 31;
  uint32_t base = 0;
  if (lane == 0 && lanes != 0) base = atomicAdd(counter, static_cast<uint32_t>(__popc(lanes)));
  base = __shfl_sync(kFullMask, base, 0);
  return base + static_cast<uint32_t>(__popc(lanes & ((1u << lane) - 1u)));
}

__global__ void __launch_bounds__(kTopkThreads) topk_kernel(const TopkParams p) {
  __shared__ uint32_t scratch[32];
  __shared__ Pivot pivot_result;
  __shared__ uint32_t refine_hist[kTopkRefineBuckets];
  __shared__ uint32_t emitted_above, emitted_ties;
  __shared__ bool last_block;
  static_assert(sizeof(scratch) + sizeof(refine_hist) + 64 <= kSharedMemoryBudget,
                "topk's static shared memory must fit the default 48 KiB");

  const int64_t row = blockIdx.y;
  const int64_t len = p.row_len[row / p.Hkv];
  uint32_t* counters = p.counters + row * p.counter_stride;
  const int64_t n_valid = counters[kValidCount];  // from approx_logits, an earlier launch
  const int64_t k_row = p.k_eff < n_valid ? p.k_eff : n_valid;
  if (k_row == 0) return;  // uniform over the row: no block takes a ticket either
  const uint32_t* hist = p.hist + row * kTopkDigitBuckets;
  const Pivot pivot =
      find_pivot(hist, kTopkDigitBuckets, static_cast<uint32_t>(k_row), scratch, &pivot_result);
  const uint32_t n_cand = hist[pivot.bucket];
  const uint32_t cand_wanted = static_cast<uint32_t>(k_row) - pivot.above;
  const bool take_all = cand_wanted >= n_cand;  // uniform over the row
  const uint32_t first_selected = take_all ? pivot.bucket : pivot.bucket + 1;

  const float* score = p.sel_score + row * p.S_pad;
  int32_t* out = p.topk_idx + row * p.k_eff;
  uint32_t* cand_key = p.cand_key + row * p.S_pad;
  int32_t* cand_pos = p.cand_pos + row * p.S_pad;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * p.chunk_len;
  const int64_t chunk_end = begin + p.chunk_len < len ? begin + p.chunk_len : len;
  // Uniform trip count over the block (whole warps reach the ballots together).
  for (int64_t base = begin; base < chunk_end; base += blockDim.x) {
    const int64_t s = base + threadIdx.x;
    const uint32_t key = s < chunk_end ? float_to_ordered(score[s]) : kNegInfKey;
    const bool valid = key != kNegInfKey;
    const uint32_t digit = key >> kDigitShift;
    const bool selected = valid && digit >= first_selected;
    const bool candidate = valid && !take_all && digit == pivot.bucket;
    const uint32_t slot = claim_slot(&counters[kAboveSlots], selected);
    // The bounds hold by construction (the histogram counts exactly these keys); the checks
    // keep a broken invariant from ever writing outside the row's slots.
    if (selected && slot < static_cast<uint32_t>(k_row)) out[slot] = static_cast<int32_t>(s);
    const uint32_t cslot = claim_slot(&counters[kCandidates], candidate);
    if (candidate && cslot < n_cand) {
      cand_key[cslot] = key;
      cand_pos[cslot] = static_cast<int32_t>(s);
    }
  }
  if (take_all) return;

  // Last block of the row to finish: refine the candidates. Classic threadfence pattern:
  // every block's writes are fenced before its ticket; the last one fences after it.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const uint32_t ticket = atomicAdd(&counters[kTopkDone], 1u);
    last_block = ticket == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();

  uint32_t prefix = pivot.bucket << kDigitShift;
  uint32_t want = cand_wanted;  // candidates still to take, >= 1
  uint32_t above = 0;           // candidates known to be above the remaining ones
  for (int pass = 0; pass < 2; ++pass) {
    const int shift = kDigitShift - kTopkRefineBits * (pass + 1);
    const uint32_t mask = ~((1u << (shift + kTopkRefineBits)) - 1u);  // bits fixed so far
    refine_hist[threadIdx.x] = 0;
    __syncthreads();
    for (uint32_t base = 0; base < n_cand; base += blockDim.x) {
      const uint32_t i = base + threadIdx.x;
      const uint32_t key = i < n_cand ? SPARQ_LOAD_PUBLISHED(&cand_key[i]) : 0u;
      warp_hist_add(refine_hist, (key >> shift) & (kTopkRefineBuckets - 1),
                    i < n_cand && (key & mask) == prefix);
    }
    __syncthreads();
    const Pivot fine = find_pivot(refine_hist, kTopkRefineBuckets, want, scratch, &pivot_result);
    above += fine.above;
    want -= fine.above;
    prefix |= fine.bucket << shift;
  }
  // prefix is now the threshold key: `above` candidates lie above it, `want` ties are taken.
  if (threadIdx.x == 0) emitted_above = emitted_ties = 0;
  __syncthreads();
  const uint32_t above_base = pivot.above, tie_base = pivot.above + above;
  for (uint32_t base = 0; base < n_cand; base += blockDim.x) {
    const uint32_t i = base + threadIdx.x;
    const uint32_t key = i < n_cand ? SPARQ_LOAD_PUBLISHED(&cand_key[i]) : 0u;
    const bool is_above = i < n_cand && key > prefix;
    const bool is_tie = i < n_cand && key == prefix;
    const uint32_t a = claim_slot(&emitted_above, is_above);
    const uint32_t t = claim_slot(&emitted_ties, is_tie);
    if (is_above && a < above) out[above_base + a] = SPARQ_LOAD_PUBLISHED(&cand_pos[i]);
    if (is_tie && t < want) out[tie_base + t] = SPARQ_LOAD_PUBLISHED(&cand_pos[i]);
  }
}

}  // namespace

cudaError_t launch_topk(const TopkParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.k_eff == 0) return cudaSuccess;
  if (p.rows > 65535 || p.blocks_per_row < 1 || p.blocks_per_row > 65535)
    return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(p.blocks_per_row), static_cast<unsigned>(p.rows));
  SPARQ_LAUNCH(topk_kernel, grid, kTopkThreads, stream, p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sparq
