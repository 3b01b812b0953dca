// C entry points of the CPU emulation build (tests/cuda_emu/emu.h): run the CUDA backend's
// launch sequence (sparq/cuda_pipeline.h, the same code attention_cuda.cpp calls) on host
// buffers. Key, value and key_t come with element strides; the query at any address (the
// tests pass storage offsets). Key / value rows that fail the 16-byte rule are copied, as the
// host glue does; key_t then takes scalar loads. The workspace is filled with 0xFF bytes
// (NaN floats, -1 ints) so a read of anything a kernel should have written shows up.
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "emu.h"  // the emulated device state the tests set and read
#include "sparq/cuda_pipeline.h"

namespace {

// A contiguous copy of a strided (B, H, S, D) tensor, for rows the kernels cannot vector-load.
std::vector<unsigned char>* contiguous_copy(const void* src, int64_t e, int64_t B, int64_t H,
                                            int64_t S, int64_t D, int64_t sb, int64_t sh,
                                            int64_t ss, int64_t sd) {
  auto* out = new std::vector<unsigned char>(static_cast<size_t>(B * H * S * D * e) + 16);
  const auto* in = static_cast<const unsigned char*>(src);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t d = 0; d < D; ++d)
          std::memcpy(out->data() + (((b * H + h) * S + s) * D + d) * e,
                      in + (b * sb + h * sh + s * ss + d * sd) * e, static_cast<size_t>(e));
  return out;
}

// A K or V cache (n0, H, n2, D) with element strides st (4) as the host glue passes it to the
// kernels: in place when its rows meet the 16-byte rule, else a contiguous copy (kept in `copy`).
// Sets the row strides the kernels read.
const void* rows_for_kernels(const void* src, const int64_t* st, int64_t e, int64_t n0, int64_t H,
                             int64_t n2, int64_t D,
                             std::unique_ptr<std::vector<unsigned char>>& copy, int64_t* sb,
                             int64_t* sh, int64_t* ss) {
  if ((D > 1 && st[3] != 1) || !sparq::cuda::rows_aligned16(src, e, st[0], st[1], st[2])) {
    copy.reset(contiguous_copy(src, e, n0, H, n2, D, st[0], st[1], st[2], st[3]));
    *sb = H * n2 * D;
    *sh = n2 * D;
    *ss = D;
    return copy->data();
  }
  *sb = st[0];
  *sh = st[1];
  *ss = st[2];
  return src;
}

// An int8 key_t's scales (key_t_scale non-null), read in place with strides kts_strides (3).
void set_key_t_scale(sparq::cuda::AttentionProblem& a, const float* key_t_scale,
                     const int64_t* kts_strides) {
  if (key_t_scale == nullptr) return;
  a.key_t_int8 = true;
  a.key_t_scale = key_t_scale;
  a.kts_sb = kts_strides[0];
  a.kts_sh = kts_strides[1];
  a.kts_ss = kts_strides[2];
}

// Plans `a` and enqueues it `repeats` times on one workspace filled with 0xFF bytes; copies the
// top-k indices to topk_idx_out (when non-null and the launches succeeded).
cudaError_t run_problem(const sparq::cuda::AttentionProblem& a, int repeats,
                        int32_t* topk_idx_out) {
  using namespace sparq::cuda;
  const AttentionPlan plan = plan_attention(a);
  void* workspace = std::aligned_alloc(256, plan.workspace_bytes + 256);
  std::memset(workspace, 0xFF, plan.workspace_bytes + 256);
  const char* stage = "";
  cudaError_t err = cudaSuccess;
  for (int i = 0; i < repeats && err == cudaSuccess; ++i)
    err = enqueue_attention(a, plan, workspace, nullptr, &stage);
  if (topk_idx_out != nullptr && err == cudaSuccess)
    std::memcpy(topk_idx_out, static_cast<char*>(workspace) + plan.topk_off,
                sizeof(int32_t) * plan.rows * plan.k_eff);
  std::free(workspace);
  return err;
}

}  // namespace

// strides: key (4), value (4), key_t (4), each (batch, head, dim 2, dim 3) in elements.
// topk_idx_out: (B*Hkv, min(k, S)) int32 or nullptr, the positions topk selected (the
// first min(k, valid count) of each row are meaningful; the rest stay -1).
// repeats > 1 enqueues the call again on the same, now dirty, workspace (as a CUDA-graph
// replay does): the output must not change. softcap 0: none; sinks (Hq,) fp32 or nullptr.
// key_t_scale non-null: key_t is int8 (the 8-bit selection cache), key_t_scale (B, Hkv, S)
// fp32 with strides kts_strides (3). component_weights: (B, Hkv, D) contiguous fp32 or nullptr.
extern "C" int sparq_emu_attention(int dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t S,
                                   int64_t D, int64_t r, int64_t k, int64_t window,
                                   int reallocate, float scale, float softcap, const float* sinks,
                                   int64_t sm_count,
                                   int64_t topk_blocks, const void* query, const void* key,
                                   const int64_t* k_strides, const void* value,
                                   const int64_t* v_strides, const void* key_t,
                                   const int64_t* kt_strides, const float* key_t_scale,
                                   const int64_t* kts_strides, const void* value_mean,
                                   const int64_t* seq_lens, const uint8_t* mask, void* out,
                                   int32_t* topk_idx_out, int repeats,
                                   const float* component_weights) {
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
  a.softcap = softcap;
  a.sinks = sinks;
  a.sm_count = sm_count;
  a.topk_blocks = topk_blocks;
  a.query = query;
  std::unique_ptr<std::vector<unsigned char>> k_copy, v_copy;
  a.key = rows_for_kernels(key, k_strides, e, B, Hkv, S, D, k_copy, &a.k_sb, &a.k_sh, &a.k_ss);
  a.value = rows_for_kernels(value, v_strides, e, B, Hkv, S, D, v_copy, &a.v_sb, &a.v_sh,
                             &a.v_ss);
  if (key_t != nullptr) {  // unit S-stride required (the host glue makes it so)
    a.key_t = key_t;
    a.kt_sb = kt_strides[0];
    a.kt_sh = kt_strides[1];
    a.kt_sd = kt_strides[2];
    a.kt_ss = 1;  // unit S-stride (the tests pass it so)
    a.kt_vec = key_t_vec(key_t, a.dtype, key_t_scale != nullptr ? 1 : e, a.kt_sb, a.kt_sh,
                         a.kt_sd);
  }
  set_key_t_scale(a, key_t_scale, kts_strides);
  a.value_mean = value_mean;
  a.component_weights = component_weights;
  a.seq_lens = seq_lens;
  a.mask = mask;
  a.out = out;
  return static_cast<int>(run_problem(a, repeats, topk_idx_out));
}

// paged_attention on the emulated pipeline, with the host glue of attention_cuda.cpp: caches
// (num_blocks, Hkv, block_size, D) and key_t_cache (num_blocks, Hkv, D, block_size) with
// element strides (4 each); K / V rows failing the 16-byte rule are copied, key_t_cache is read
// in place whatever its strides (int8 when key_t_scale, (num_blocks, Hkv, block_size) fp32 with
// strides kts_strides (3), is given). block_table int32 with strides (2), seq_lens int32 with an
// element stride. topk_idx_out: (R*Hkv, min(k, max_blocks * block_size)) or nullptr.
// component_weights: (R, Hkv, D) contiguous fp32 or nullptr.
extern "C" int sparq_emu_paged_attention(
    int dtype, int64_t R, int64_t Hq, int64_t Hkv, int64_t num_blocks, int64_t block_size,
    int64_t max_blocks, int64_t D, int64_t r, int64_t k, int64_t window, int reallocate,
    float scale, float softcap, const float* sinks, int64_t sm_count, int64_t topk_blocks,
    const void* query, const void* key, const int64_t* k_strides, const void* value,
    const int64_t* v_strides, const void* key_t, const int64_t* kt_strides,
    const float* key_t_scale, const int64_t* kts_strides, const void* value_mean,
    const int32_t* block_table, const int64_t* bt_strides, const int32_t* seq_lens,
    int64_t seq_lens_stride, void* out, int32_t* topk_idx_out, int repeats,
    const float* component_weights) {
  using namespace sparq::cuda;
  AttentionProblem a{};
  a.dtype = static_cast<DType>(dtype);
  const int64_t e = dtype == 0 ? 4 : 2;
  a.B = R;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.S = max_blocks * block_size;
  a.D = D;
  a.r = r;
  a.k = k;
  a.window = window;
  a.reallocate = reallocate != 0;
  a.scale = scale;
  a.softcap = softcap;
  a.sinks = sinks;
  a.sm_count = sm_count;
  a.topk_blocks = topk_blocks;
  a.pages = {block_table, bt_strides[0], bt_strides[1], static_cast<int32_t>(block_size),
             static_cast<int32_t>(num_blocks)};
  a.query = query;
  std::unique_ptr<std::vector<unsigned char>> k_copy, v_copy;
  a.key = rows_for_kernels(key, k_strides, e, num_blocks, Hkv, block_size, D, k_copy, &a.k_sb,
                           &a.k_sh, &a.k_ss);
  a.value = rows_for_kernels(value, v_strides, e, num_blocks, Hkv, block_size, D, v_copy, &a.v_sb,
                             &a.v_sh, &a.v_ss);
  if (key_t != nullptr) {
    a.key_t = key_t;
    a.kt_sb = kt_strides[0];
    a.kt_sh = kt_strides[1];
    a.kt_sd = kt_strides[2];
    a.kt_ss = kt_strides[3];
    a.kt_vec = paged_key_t_vec(key_t, a.dtype, key_t_scale != nullptr ? 1 : e, a.kt_sb, a.kt_sh,
                               a.kt_sd, a.kt_ss, block_size);
  }
  set_key_t_scale(a, key_t_scale, kts_strides);
  a.value_mean = value_mean;
  a.component_weights = component_weights;
  a.seq_lens_i32 = seq_lens;
  a.seq_lens_i32_stride = seq_lens_stride;
  a.out = out;
  return static_cast<int>(run_problem(a, repeats, topk_idx_out));
}

// The plan's partition and topk block counts, for tests that want several of each.
extern "C" void sparq_emu_plan(int dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t S,
                               int64_t D, int64_t k, int64_t sm_count, int64_t* n_splits,
                               int64_t* topk_blocks) {
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
  const AttentionPlan plan = plan_attention(a);
  *n_splits = plan.n_splits;
  *topk_blocks = plan.topk_blocks;
}

// The emulated device's opt-in shared-memory limit, and how many cudaFuncSetAttribute calls
// the kernels made (none: every kernel fits the default 48 KiB).
extern "C" void sparq_emu_set_smem_optin(int bytes) { sparq_emu::device().max_smem_optin = bytes; }
extern "C" int sparq_emu_attribute_calls() { return sparq_emu::attr_calls().load(); }

// A launch of an empty kernel with `bytes` of dynamic shared memory, after opting in to
// `optin` bytes (0: no cudaFuncSetAttribute call): the emulator's launch check itself.
static void empty_kernel() {}
extern "C" int sparq_emu_probe_smem_launch(int bytes, int optin) {
  if (optin > 0) {
    const cudaError_t e =
        cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  sparq_emu::launch_smem(empty_kernel, dim3(1), dim3(32), static_cast<size_t>(bytes), nullptr);
  return static_cast<int>(cudaGetLastError());
}
