// C entry point of the CPU emulation build (tests/cuda_emu/emu.h): runs the CUDA backend's
// launch sequence (sparq/cuda_pipeline.h, the same code attention_cuda.cpp calls) on host
// buffers. Inputs contiguous; key_t optional. Scratch memory is filled with 0xFF bytes
// (NaN floats, -1 ints) so a read of anything a kernel should have written shows up.
#include <cstdlib>
#include <cstring>

#include "sparq/cuda_pipeline.h"

extern "C" int sparq_emu_attention(int dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t S,
                                   int64_t D, int64_t r, int64_t k, int64_t window,
                                   int reallocate, float scale, int64_t sm_count,
                                   const void* query, const void* key, const void* value,
                                   const void* key_t, const void* value_mean,
                                   const int64_t* seq_lens, const uint8_t* mask, void* out) {
  using namespace sparq::cuda;
  AttentionProblem a{};
  a.dtype = static_cast<DType>(dtype);
  const int64_t e = dtype == 0 ? 4 : 2;
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.S = S;
  a.D = D;
  a.r = r;
  a.k = k;
  a.window = window;
  a.reallocate = reallocate != 0;
  a.scale = scale;
  a.sm_count = sm_count;
  // Tests reach the chunked top-k path at small S by lowering the one-block threshold.
  if (const char* env = std::getenv("SPARQ_EMU_TOPK_ROW_MAX_KEYS"))
    a.topk_row_max_keys = std::atoll(env);
  a.query = query;
  a.key = key;
  a.k_sb = Hkv * S * D;
  a.k_sh = S * D;
  a.k_ss = D;
  a.value = value;
  a.v_sb = a.k_sb;
  a.v_sh = a.k_sh;
  a.v_ss = a.k_ss;
  if (key_t != nullptr) {
    a.key_t = key_t;
    a.kt_sb = Hkv * D * S;
    a.kt_sh = D * S;
    a.kt_sd = S;
    a.kt_vec = reinterpret_cast<uintptr_t>(key_t) % 16 == 0 && (S * e) % 16 == 0;
  }
  a.value_mean = value_mean;
  a.seq_lens = seq_lens;
  a.mask = mask;
  a.out = out;
  const AttentionPlan plan = plan_attention(a);
  void* zeroed = std::aligned_alloc(256, plan.zeroed_bytes + 256);
  void* scratch = std::aligned_alloc(256, plan.scratch_bytes + 256);
  std::memset(zeroed, 0, plan.zeroed_bytes + 256);
  std::memset(scratch, 0xFF, plan.scratch_bytes + 256);
  const char* stage = "";
  const cudaError_t err = enqueue_attention(a, plan, zeroed, scratch, nullptr, &stage);
  std::free(zeroed);
  std::free(scratch);
  return static_cast<int>(err);
}

// The plan's split count, for tests that want several flash-decoding splits.
extern "C" int64_t sparq_emu_splits(int dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t S,
                                    int64_t D, int64_t k, int64_t sm_count) {
  using namespace sparq::cuda;
  AttentionProblem a{};
  a.dtype = static_cast<DType>(dtype);
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.S = S;
  a.D = D;
  a.r = 1;
  a.k = k;
  a.sm_count = sm_count;
  return plan_attention(a).n_splits;
}
