// CPU-only helpers of the native SparQ kernel: a thin layer over ATen's at::vec::Vectorized so
// that the same source compiles to AVX-512, AVX2 or plain C++ (whatever -march allows).
//
// ATen picks its vector width from CPU_CAPABILITY_* macros, which its own build sets per
// dispatch target and an extension does not. We set them from the compiler's target flags
// before any ATen header, and give the inline namespace a name of our own so that these
// instantiations can never collide (ODR) with ATen's or another extension's.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY sparq_avx512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY sparq_avx2
#else
#define CPU_CAPABILITY sparq_default
#endif
#endif

// ATen's vector headers use clang/OpenMP pragmas GCC does not know; keep our build log clean.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace sparq::cpu {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kVec = fVec::size();

// Load kVec elements of T as fp32 (bf16/fp16/int8 converted in registers).
template <typename T>
inline fVec load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else if constexpr (std::is_same_v<T, int8_t>) {  // the 8-bit selection cache
#if defined(CPU_CAPABILITY_AVX512)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(CPU_CAPABILITY_AVX2)
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
    alignas(64) float tmp[kVec];
    for (int64_t i = 0; i < kVec; ++i) tmp[i] = static_cast<float>(p[i]);
    return fVec::loadu(tmp);
#endif
  } else {
    fVec out;
    at::vec::load_to_float(p, out);
    return out;
  }
}

// Load n < kVec elements as fp32; the remaining lanes are 0.
template <typename T>
inline fVec load_f(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p, n);
  } else {
    alignas(64) float tmp[kVec] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
    return fVec::loadu(tmp);
  }
}

// Horizontal reductions in registers (attend does one per head per selected row). GCC 12's
// AVX-512 intrinsics self-initialise their "undefined" vectors, which -Wuninitialized (-O0)
// and -Wmaybe-uninitialized (-O2+) report wherever they are inlined: a known false positive,
// silenced for this TU at the top of attention_cpu.cpp.
inline float hsum(const fVec& v) { return at::vec::vec_reduce_all<float>(std::plus<fVec>(), v); }
inline float hmax(const fVec& v) {
  return at::vec::vec_reduce_all<float>(
      [](const fVec& a, const fVec& b) { return at::vec::maximum(a, b); }, v);
}

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }
// Into the outer caches only (prefetcht2): for many short runs at once, which would otherwise
// hold the L1's few fill buffers.
inline void prefetch_outer(const void* p) { __builtin_prefetch(p, 0, 1); }

}  // namespace sparq::cpu
