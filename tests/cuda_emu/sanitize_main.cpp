// CPU "memcheck" and "racecheck" of the CUDA kernels: the emulated pipeline (emu.h) under
// AddressSanitizer or ThreadSanitizer. Inputs are exact-size heap buffers and every
// workspace region is followed by a poisoned guard zone (SPARQ_WORKSPACE_GUARD_BYTES), so
// ASan reports any out-of-bounds access of a kernel; TSan reports unsynchronised accesses
// between blocks (they run on concurrent workers: global atomics, the last-block-done
// counters of topk and attend) and, through the emulator's fiber annotations, between the
// threads of a block (__shared__ memory, thread_local statics here; tsan_selfcheck.cpp shows
// such a race is reported).
// Not part of pytest (sanitizer builds are slow). From the repository root:
//
//   SAN=address   # or thread
//   for f in prep approx_logits topk attend; do
//     g++ -std=c++20 -O1 -g -fsanitize=$SAN -fno-strict-aliasing -Wno-unknown-pragmas \
//       -x c++ -include tests/cuda_emu/emu.h -DSPARQ_CUDA_EMULATION -Icsrc/include \
//       -I/usr/local/cuda/include -c csrc/cuda/$f.cu -o /tmp/san_$f.o; done
//   g++ -std=c++20 -O1 -g -fsanitize=$SAN -DSPARQ_WORKSPACE_GUARD_BYTES=256 -Icsrc/include \
//     -I/usr/local/cuda/include tests/cuda_emu/sanitize_main.cpp /tmp/san_*.o \
//     -o /tmp/sparq_san && /tmp/sparq_san
//
// Prints one line per case; exits non-zero if an output is not finite.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "sparq/cuda_pipeline.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

using namespace sparq::cuda;

static int64_t g_topk_blocks = 0;  // 0: from the SM count; more: rows split over blocks

template <typename T>
static T cast(float x);
template <>
float cast<float>(float x) { return x; }
template <>
__half cast<__half>(float x) { return __float2half_rn(x); }
template <>
__nv_bfloat16 cast<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
static float to_f(T x);
template <>
float to_f<float>(float x) { return x; }
template <>
float to_f<__half>(__half x) { return __half2float(x); }
template <>
float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// The 8-bit selection cache of n_pos positions of one head of `key` (component d of position
// p at key[start + p * s_pos + d]) as sparq_ext.quantize_key_t makes it: key_t8[pos_t(p) + d *
// t_d] and one scale per position at scale[pos_s(p)].
template <typename T, typename PosT, typename PosS>
static void quantize(const std::vector<T>& key, int64_t start, int64_t n_pos, int64_t D,
                     int64_t s_pos, std::vector<int8_t>& key_t8, PosT pos_t, int64_t t_d,
                     std::vector<float>& scale, PosS pos_s) {
  for (int64_t p = 0; p < n_pos; ++p) {
    const T* row = key.data() + start + p * s_pos;
    float amax = 0.f;
    for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(to_f(row[d])));
    const float sc = amax / 127.0f, div = sc > 0.f ? sc : 1.f;
    scale[pos_s(p)] = sc;
    for (int64_t d = 0; d < D; ++d)
      key_t8[pos_t(p) + d * t_d] =
          static_cast<int8_t>(std::clamp(std::nearbyint(to_f(row[d]) / div), -127.f, 127.f));
  }
}

// The workspace with poisoned gaps between the plan's regions (and after the last one),
// filled with 0xFF bytes: prep must clear what the later kernels accumulate into.
struct Workspace {
  char* base = nullptr;
  size_t bytes = 0;
  explicit Workspace(const AttentionPlan& plan) {
    bytes = plan.workspace_bytes;
    base = static_cast<char*>(std::aligned_alloc(256, bytes + 256));
    std::memset(base, 0xFF, bytes + 256);
    POISON(base, bytes + 256);
    for (int i = 0; i < plan.n_regions; ++i)
      UNPOISON(base + plan.region_off[i], plan.region_bytes[i]);
  }
  ~Workspace() {
    UNPOISON(base, bytes + 256);
    std::free(base);
  }
};

template <typename T>
static bool run_case(DType dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
                     int64_t r, int64_t k, int64_t window, bool with_key_t, bool with_mask,
                     bool reallocate, bool with_mean, float softcap = 0.0f,
                     bool with_sinks = false, bool int8_key_t = false) {
  std::mt19937 gen(static_cast<unsigned>(S * 31 + D));
  std::normal_distribution<float> normal;
  std::vector<T> q(B * Hq * D), key(B * Hkv * S * D), value(key.size()), key_t(key.size());
  std::vector<T> out(B * Hq * D, cast<T>(NAN)), mean(B * Hkv * D);
  std::vector<float> sinks(Hq);
  for (auto& x : sinks) x = 2.0f * normal(gen) + 4.0f;
  for (auto& x : q) x = cast<T>(normal(gen));
  for (auto& x : key) x = cast<T>(normal(gen));
  for (auto& x : value) x = cast<T>(normal(gen));
  for (auto& x : mean) x = cast<T>(normal(gen));
  for (int64_t bh = 0; bh < B * Hkv; ++bh)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t d = 0; d < D; ++d) key_t[(bh * D + d) * S + s] = key[(bh * S + s) * D + d];
  std::vector<int8_t> key_t8(int8_key_t ? key.size() : 0);  // (B, Hkv, D, S)
  std::vector<float> key_t_scale(int8_key_t ? B * Hkv * S : 0);  // (B, Hkv, S)
  if (int8_key_t)
    for (int64_t bh = 0; bh < B * Hkv; ++bh)
      quantize(key, bh * S * D, S, D, D, key_t8, [&](int64_t s) { return bh * D * S + s; }, S,
               key_t_scale, [&](int64_t s) { return bh * S + s; });
  std::vector<int64_t> lens(B);
  std::vector<uint8_t> mask(B * S);
  for (int64_t b = 0; b < B; ++b) lens[b] = b == B - 1 ? S / 3 : S;
  for (auto& m : mask) m = gen() % 4 != 0;

  AttentionProblem a{};
  a.dtype = dtype;
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.S = S;
  a.D = D;
  a.r = r;
  a.k = k;
  a.window = window;
  a.reallocate = reallocate;
  a.scale = 1.0f / std::sqrt(static_cast<float>(D));
  a.softcap = softcap;
  a.sinks = with_sinks ? sinks.data() : nullptr;
  a.sm_count = 132;
  a.topk_blocks = g_topk_blocks;
  a.query = q.data();
  a.key = key.data();
  a.k_sb = Hkv * S * D;
  a.k_sh = S * D;
  a.k_ss = D;
  a.value = value.data();
  a.v_sb = a.k_sb;
  a.v_sh = a.k_sh;
  a.v_ss = D;
  if (with_key_t) {
    a.key_t = int8_key_t ? static_cast<const void*>(key_t8.data()) : key_t.data();
    a.kt_sb = Hkv * D * S;
    a.kt_sh = D * S;
    a.kt_sd = S;
    a.kt_ss = 1;
    a.kt_vec = key_t_vec(a.key_t, dtype, int8_key_t ? 1 : sizeof(T), a.kt_sb, a.kt_sh, a.kt_sd);
  }
  if (with_key_t && int8_key_t) {
    a.key_t_int8 = true;
    a.key_t_scale = key_t_scale.data();
    a.kts_sb = Hkv * S;
    a.kts_sh = S;
    a.kts_ss = 1;
  }
  a.value_mean = with_mean ? mean.data() : nullptr;
  a.seq_lens = lens.data();
  a.mask = with_mask ? mask.data() : nullptr;
  a.out = out.data();
  const AttentionPlan plan = plan_attention(a);
  Workspace workspace(plan);
  const char* stage = "";
  const cudaError_t err = enqueue_attention(a, plan, workspace.base, nullptr, &stage);
  bool finite = err == cudaSuccess;
  for (T x : out) finite = finite && std::isfinite(to_f(x));
  std::printf("dtype=%d B=%ld Hq=%ld Hkv=%ld S=%ld D=%ld r=%ld k=%ld w=%ld key_t=%s mask=%d "
              "softcap=%g sinks=%d: %s\n",
              static_cast<int>(dtype), static_cast<long>(B), static_cast<long>(Hq),
              static_cast<long>(Hkv), static_cast<long>(S), static_cast<long>(D),
              static_cast<long>(r), static_cast<long>(k), static_cast<long>(window),
              with_key_t ? (int8_key_t ? "int8" : "1") : "0", with_mask,
              static_cast<double>(softcap), with_sinks, finite ? "ok" : "NOT FINITE");
  return finite;
}

// paged_attention: exact-size caches (num_blocks, Hkv, block_size, D) in an engine's layout
// (positions outer to heads, as passed through transpose(1, 2)), key_t_cache contiguous
// (num_blocks, Hkv, D, block_size) or absent, a shuffled block table whose unused entries hold
// an out-of-range id (never followed), lengths with an empty row and partial last blocks.
template <typename T>
static bool run_paged_case(DType dtype, int64_t block_size, int64_t D, bool with_key_t,
                           float softcap = 0.0f, bool with_sinks = false,
                           bool int8_key_t = false) {
  const int64_t R = 3, Hq = 4, Hkv = 2, r = 8, k = 60;
  const int32_t lens[R] = {700, 0, 229};
  const int64_t max_blocks = (700 + block_size - 1) / block_size + 1;
  int64_t num_blocks = 0;
  for (int32_t n : lens) num_blocks += (n + block_size - 1) / block_size;
  std::mt19937 gen(static_cast<unsigned>(block_size * 7 + D));
  std::normal_distribution<float> normal;
  std::vector<int32_t> ids(num_blocks);
  for (int64_t i = 0; i < num_blocks; ++i) ids[i] = static_cast<int32_t>(i);
  std::shuffle(ids.begin(), ids.end(), gen);
  std::vector<int32_t> table(R * max_blocks, 1 << 30);
  int64_t next = 0;
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < (lens[i] + block_size - 1) / block_size; ++j)
      table[i * max_blocks + j] = ids[next++];
  const int64_t cache_elems = num_blocks * block_size * Hkv * D;
  std::vector<T> q(R * Hq * D), key(cache_elems), value(cache_elems), key_t(cache_elems);
  std::vector<T> out(R * Hq * D, cast<T>(NAN));
  std::vector<float> sinks(Hq);
  for (auto& x : sinks) x = 2.0f * normal(gen) + 4.0f;
  for (auto& x : q) x = cast<T>(normal(gen));
  for (auto& x : key) x = cast<T>(normal(gen));
  for (auto& x : value) x = cast<T>(normal(gen));
  // key_t_cache[blk, h, d, s] = key_cache[blk, h, s, d], key_cache stored (blk, s, h, d)
  for (int64_t blk = 0; blk < num_blocks; ++blk)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t d = 0; d < D; ++d)
        for (int64_t s = 0; s < block_size; ++s)
          key_t[((blk * Hkv + h) * D + d) * block_size + s] =
              key[((blk * block_size + s) * Hkv + h) * D + d];
  // int8: key_t8 (num_blocks, Hkv, D, block_size) contiguous; the scales in an engine's layout
  // (num_blocks, block_size, Hkv), passed with those strides
  std::vector<int8_t> key_t8(int8_key_t ? cache_elems : 0);
  std::vector<float> key_t_scale(int8_key_t ? num_blocks * block_size * Hkv : 0);
  if (int8_key_t)
    for (int64_t h = 0; h < Hkv; ++h)
      quantize(  // position p = block * block_size + offset; key stored (block, offset, h, d)
          key, h * D, num_blocks * block_size, D, Hkv * D, key_t8,
          [&](int64_t p) { return ((p / block_size) * Hkv + h) * D * block_size + p % block_size; },
          block_size, key_t_scale, [&](int64_t p) { return p * Hkv + h; });

  AttentionProblem a{};
  a.dtype = dtype;
  a.B = R;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.S = max_blocks * block_size;
  a.D = D;
  a.r = r;
  a.k = k;
  a.window = 5;
  a.reallocate = true;
  a.scale = 1.0f / std::sqrt(static_cast<float>(D));
  a.softcap = softcap;
  a.sinks = with_sinks ? sinks.data() : nullptr;
  a.sm_count = 132;
  a.topk_blocks = g_topk_blocks;
  a.pages = {table.data(), max_blocks, 1, static_cast<int32_t>(block_size),
             static_cast<int32_t>(num_blocks)};
  a.query = q.data();
  a.key = key.data();
  a.k_sb = block_size * Hkv * D;
  a.k_sh = D;
  a.k_ss = Hkv * D;
  a.value = value.data();
  a.v_sb = a.k_sb;
  a.v_sh = a.k_sh;
  a.v_ss = a.k_ss;
  if (with_key_t) {
    a.key_t = int8_key_t ? static_cast<const void*>(key_t8.data()) : key_t.data();
    a.kt_sb = Hkv * D * block_size;
    a.kt_sh = D * block_size;
    a.kt_sd = block_size;
    a.kt_ss = 1;
    a.kt_vec = paged_key_t_vec(a.key_t, dtype, int8_key_t ? 1 : sizeof(T), a.kt_sb, a.kt_sh,
                               a.kt_sd, a.kt_ss, block_size);
  }
  if (with_key_t && int8_key_t) {
    a.key_t_int8 = true;
    a.key_t_scale = key_t_scale.data();
    a.kts_sb = block_size * Hkv;
    a.kts_sh = 1;
    a.kts_ss = Hkv;
  }
  a.seq_lens_i32 = lens;
  a.seq_lens_i32_stride = 1;
  a.out = out.data();
  const AttentionPlan plan = plan_attention(a);
  Workspace workspace(plan);
  const char* stage = "";
  const cudaError_t err = enqueue_attention(a, plan, workspace.base, nullptr, &stage);
  bool finite = err == cudaSuccess;
  for (T x : out) finite = finite && std::isfinite(to_f(x));
  std::printf("paged dtype=%d block_size=%ld D=%ld key_t=%s softcap=%g sinks=%d: %s\n",
              static_cast<int>(dtype), static_cast<long>(block_size), static_cast<long>(D),
              with_key_t ? (int8_key_t ? "int8" : "1") : "0", static_cast<double>(softcap),
              with_sinks, finite ? "ok" : "NOT FINITE");
  return finite;
}

int main() {
  bool ok = true;
  ok &= run_case<float>(DType::kFloat32, 2, 4, 1, 600, 64, 8, 50, 7, true, true, true, false);
  ok &= run_case<__half>(DType::kFloat16, 1, 12, 1, 1500, 128, 16, 700, 20, false, false, true,
                         false);
  ok &= run_case<__nv_bfloat16>(DType::kBFloat16, 1, 2, 2, 5003, 256, 32, 300, 0, true, false,
                                false, false);
  ok &= run_case<float>(DType::kFloat32, 3, 2, 2, 333, 256, 4, 400, 9, true, true, true, true);
  ok &= run_case<__nv_bfloat16>(DType::kBFloat16, 2, 8, 2, 4500, 80, 10, 1000, 5, true, true,
                                true, false);
  std::printf("topk rows split over 5 blocks:\n");
  g_topk_blocks = 5;
  ok &= run_case<float>(DType::kFloat32, 2, 4, 1, 600, 64, 8, 50, 7, true, true, true, false);
  ok &= run_case<__nv_bfloat16>(DType::kBFloat16, 2, 8, 2, 4500, 80, 10, 1000, 5, true, true,
                                true, false);
  ok &= run_paged_case<float>(DType::kFloat32, 48, 64, true);
  ok &= run_paged_case<__nv_bfloat16>(DType::kBFloat16, 20, 128, true);
  ok &= run_paged_case<__half>(DType::kFloat16, 16, 64, false);
  std::printf("softcap and sinks:\n");
  ok &= run_case<float>(DType::kFloat32, 2, 24, 2, 1500, 64, 8, 200, 7, true, true, true, false,
                        2.0f, true);  // G = 12: one approx_logits block forms both head chunks
  ok &= run_case<__nv_bfloat16>(DType::kBFloat16, 2, 8, 2, 4500, 128, 16, 300, 5, true, false,
                                false, false, 30.0f, true);
  ok &= run_paged_case<__nv_bfloat16>(DType::kBFloat16, 20, 64, true, 1.0f, true);
  std::printf("the 8-bit selection cache (int8 key_t):\n");
  ok &= run_case<float>(DType::kFloat32, 2, 4, 1, 600, 64, 8, 50, 7, true, true, true, false,
                        0.0f, false, true);
  ok &= run_case<__nv_bfloat16>(DType::kBFloat16, 2, 24, 2, 1503, 128, 28, 200, 5, true, true,
                                true, false, 5.0f, true, true);  // S % 8 != 0: scalar loads
  ok &= run_paged_case<__nv_bfloat16>(DType::kBFloat16, 16, 64, true, 0.0f, false, true);
  ok &= run_paged_case<float>(DType::kFloat32, 20, 128, true, 2.0f, true, true);
  return ok ? 0 : 1;
}
