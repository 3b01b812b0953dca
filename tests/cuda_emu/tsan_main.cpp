// A CPU "racecheck" of the CUDA kernels: the emulated pipeline (emu.h) under ThreadSanitizer,
// which reports unsynchronised accesses to __shared__ memory (statics here) and to global
// buffers between the threads of a block. Not part of pytest (TSan builds are slow); run:
//
//   for f in prep approx_logits topk attend; do
//     g++ -std=c++20 -O1 -g -fsanitize=thread -fno-strict-aliasing -Wno-unknown-pragmas \
//       -x c++ -include tests/cuda_emu/emu.h -DSPARQ_CUDA_EMULATION -Icsrc/include \
//       -I/usr/local/cuda/include -c csrc/cuda/$f.cu -o /tmp/tsan_$f.o; done
//   g++ -std=c++20 -O1 -g -fsanitize=thread -Icsrc/include -I/usr/local/cuda/include \
//     tests/cuda_emu/tsan_main.cpp /tmp/tsan_*.o -o /tmp/sparq_tsan && /tmp/sparq_tsan
//
// Prints one line per case; exits non-zero if an output is not finite.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "sparq/cuda_pipeline.h"

using namespace sparq::cuda;

static bool run_case(int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D, int64_t r,
                     int64_t k, int64_t window, bool with_key_t, bool with_mask,
                     bool reallocate) {
  std::mt19937 gen(static_cast<unsigned>(S * 31 + D));
  std::normal_distribution<float> normal;
  std::vector<float> q(B * Hq * D), key(B * Hkv * S * D), value(key.size()), key_t(key.size());
  std::vector<float> out(B * Hq * D, NAN);
  for (auto& x : q) x = normal(gen);
  for (auto& x : key) x = normal(gen);
  for (auto& x : value) x = normal(gen);
  for (int64_t bh = 0; bh < B * Hkv; ++bh)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t d = 0; d < D; ++d) key_t[(bh * D + d) * S + s] = key[(bh * S + s) * D + d];
  std::vector<int64_t> lens(B);
  std::vector<uint8_t> mask(B * S);
  for (int64_t b = 0; b < B; ++b) lens[b] = b == B - 1 ? S / 3 : S;
  for (auto& m : mask) m = gen() % 4 != 0;

  AttentionProblem a{};
  a.dtype = DType::kFloat32;
  a.B = B, a.Hq = Hq, a.Hkv = Hkv, a.S = S, a.D = D, a.r = r, a.k = k, a.window = window;
  a.reallocate = reallocate;
  a.scale = 1.0f / std::sqrt(static_cast<float>(D));
  a.sm_count = 132;
  a.query = q.data();
  a.key = key.data(), a.k_sb = Hkv * S * D, a.k_sh = S * D, a.k_ss = D;
  a.value = value.data(), a.v_sb = a.k_sb, a.v_sh = a.k_sh, a.v_ss = D;
  if (with_key_t) {
    a.key_t = key_t.data(), a.kt_sb = Hkv * D * S, a.kt_sh = D * S, a.kt_sd = S;
    a.kt_vec = S % 4 == 0;
  }
  a.seq_lens = lens.data();
  a.mask = with_mask ? mask.data() : nullptr;
  a.out = out.data();
  const AttentionPlan plan = plan_attention(a);
  std::vector<char> zeroed(plan.zeroed_bytes + 256, 0), scratch(plan.scratch_bytes + 256, -1);
  char* z = zeroed.data() + (256 - reinterpret_cast<uintptr_t>(zeroed.data()) % 256) % 256;
  char* w = scratch.data() + (256 - reinterpret_cast<uintptr_t>(scratch.data()) % 256) % 256;
  const char* stage = "";
  const cudaError_t err = enqueue_attention(a, plan, z, w, nullptr, &stage);
  bool finite = err == cudaSuccess;
  for (float x : out) finite = finite && std::isfinite(x);
  std::printf("B=%ld Hq=%ld Hkv=%ld S=%ld D=%ld r=%ld k=%ld w=%ld key_t=%d mask=%d: %s\n",
              static_cast<long>(B), static_cast<long>(Hq), static_cast<long>(Hkv),
              static_cast<long>(S), static_cast<long>(D), static_cast<long>(r),
              static_cast<long>(k), static_cast<long>(window), with_key_t, with_mask,
              finite ? "ok" : "NOT FINITE");
  return finite;
}

int main() {
  bool ok = true;
  ok &= run_case(2, 4, 1, 600, 64, 8, 50, 7, true, true, true);
  ok &= run_case(1, 12, 1, 1500, 128, 16, 700, 20, false, false, true);
  ok &= run_case(1, 2, 2, 5000, 256, 32, 300, 0, true, false, false);
  return ok ? 0 : 1;
}
