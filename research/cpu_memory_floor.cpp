// The memory traffic of one SparQ decode step on CPU, and nothing else: how fast can any
// kernel be on this machine? (README, "Why 10x the seed is out of reach for fp32 MHA".)
//
// Shape of `make bench`'s fp32 MHA row: 32 heads, S positions, D = 128, r = 16, k = S/16, fp32
// (D = 64 gives 256-byte rows, the bytes of a bf16 row at D = 128).
//   stream   step 1's reads: the r rows of key_t per head, S floats each (contiguous)
//   gather   step 2's reads: k sorted random K rows, then the same V rows, 4*D B each, in the
//            variants below (software prefetch 8 rows ahead of all lines / the first line /
//            none; K and V of a position back to back; V rows copied to a buffer during the K
//            pass, then read from it: the kernel's staging, kStageRowBytes)
//   serial   stream, then gather (first-line prefetch: the kernel's order and choice), per head
//   overlap  the gather of head h with the stream of the next head of the thread, in slices
//            of 32 positions after every 4 gathered rows
// Caches are flushed (a 1 GiB read) before every timed call; best of 15 calls per variant,
// variants interleaved. The loads feed a sum so that they cannot be dropped.
//
// Build and run (not part of the package or its tests):
//   g++ -O2 -march=native -fopenmp benchmarks/cpu_memory_floor.cpp -o /tmp/cpu_memory_floor
//   OMP_NUM_THREADS=2 /tmp/cpu_memory_floor [S [D]]
// GCC 12's AVX-512 intrinsics self-initialise undefined vectors (false -Wuninitialized in
// _mm512_reduce_add_ps), as in csrc/cpu/attention_cpu.cpp. Before any include.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace {

constexpr int kHeads = 32, kR = 16, kPrefetch = 8;
int S = 16384, K = 1024, kD = 128;
float *key, *value, *keyt, *flush_buf;
constexpr size_t kFlushFloats = size_t{1} << 28;  // 1 GiB
std::vector<std::vector<int>> sel(kHeads);        // per head: k sorted positions

const float* krow(int h, int t) { return key + (size_t(h) * S + sel[h][t]) * kD; }
const float* vrow(int h, int t) { return value + (size_t(h) * S + sel[h][t]) * kD; }

__m512 sum_row(const float* row, __m512 acc) {
  for (int d = 0; d < kD; d += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(row + d));
  return acc;
}

void prefetch(const float* row, bool all_lines) {
  for (int d = 0; d < (all_lines ? kD : 16); d += 16)
    _mm_prefetch(reinterpret_cast<const char*>(row + d), _MM_HINT_T0);
}

// Positions [lo, lo + n) of the r key_t rows of head h (rows 0, 8, 16, ...: r of D, ascending).
__m512 stream(int h, int lo, int n, __m512 acc) {
  for (int j = 0; j < kR; ++j) {
    const float* p = keyt + (size_t(h) * kD + j * (kD / kR)) * S + lo;
    for (int i = 0; i < n; i += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(p + i));
  }
  return acc;
}

enum Prefetch { kAllLines, kFirstLine, kNone };

__m512 gather_two_pass(int h, Prefetch pf, __m512 acc) {
  for (const auto row : {krow, vrow})
    for (int t = 0; t < K; ++t) {
      if (pf != kNone) prefetch(row(h, std::min(t + kPrefetch, K - 1)), pf == kAllLines);
      acc = sum_row(row(h, t), acc);
    }
  return acc;
}

__m512 gather_paired(int h, __m512 acc) {  // K and V rows of a position back to back
  for (int t = 0; t < K; ++t) {
    const int ahead = std::min(t + kPrefetch, K - 1);
    prefetch(krow(h, ahead), false);
    prefetch(vrow(h, ahead), false);
    acc = sum_row(vrow(h, t), sum_row(krow(h, t), acc));
  }
  return acc;
}

// K pass with the V rows demand-loaded into a per-thread buffer, then the V pass over it.
__m512 gather_staged(int h, float* stage, __m512 acc) {
  for (int t = 0; t < K; ++t) {
    const int ahead = std::min(t + kPrefetch, K - 1);
    prefetch(krow(h, ahead), false);
    prefetch(vrow(h, ahead), false);
    acc = sum_row(krow(h, t), acc);
    const float* v = vrow(h, t);
    for (int d = 0; d < kD; d += 16) _mm512_storeu_ps(stage + size_t(t) * kD + d, _mm512_loadu_ps(v + d));
  }
  for (int t = 0; t < K; ++t) acc = sum_row(stage + size_t(t) * kD, acc);
  return acc;
}

enum Gather { kTwoPass, kPaired, kStaged };

struct Variant {
  const char* name;
  int kind;  // 0 stream, 1 gather, 2 serial, 3 overlap
  Prefetch pf;
  Gather gather;
};

float run(const Variant& v) {
  float total = 0.0f;
#pragma omp parallel reduction(+ : total)
  {
    __m512 acc = _mm512_setzero_ps();
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    std::vector<float> stage(v.gather == kStaged ? size_t(K) * kD : 0);
    for (int h = tid; h < kHeads; h += nt) {
      if (v.kind == 0 || v.kind == 2) acc = stream(h, 0, S, acc);
      if (v.kind == 1 || v.kind == 2)
        acc = v.gather == kPaired   ? gather_paired(h, acc)
              : v.gather == kStaged ? gather_staged(h, stage.data(), acc)
                                    : gather_two_pass(h, v.pf, acc);
      if (v.kind == 3) {  // 2k gathered rows; after every 4, 4/(2k) of the next head's stream
        if (h == tid) acc = stream(h, 0, S, acc);
        const int next = h + nt, slice = 4 * S / (2 * K);  // 32 floats: whole vectors
        for (int t = 0; t < 2 * K; ++t) {
          acc = sum_row(t < K ? krow(h, t) : vrow(h, t - K), acc);
          if (next < kHeads && t % 4 == 3) acc = stream(next, t / 4 * slice, slice, acc);
        }
      }
    }
    total += _mm512_reduce_add_ps(acc);
  }
  return total;
}

void flush() {
  float s = 0.0f;
#pragma omp parallel for reduction(+ : s)
  for (size_t i = 0; i < kFlushFloats; i += 16) s += flush_buf[i];
  if (s == 1.0f) std::puts("");  // keep the sum alive
}

double seconds() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) S = std::atoi(argv[1]);
  if (argc > 2) kD = std::atoi(argv[2]);
  if (S < 2048 || S % 2048 != 0) {
    std::fprintf(stderr, "S must be a positive multiple of 2048, got %d\n", S);
    return 2;
  }
  if (kD < kR || kD % kR != 0 || kD % 16 != 0) {  // r = 16 rows of key_t; whole vectors
    std::fprintf(stderr, "D must be a positive multiple of 16, got %d\n", kD);
    return 2;
  }
  K = S / 16;
  const size_t n = size_t(kHeads) * S * kD;
  key = static_cast<float*>(std::aligned_alloc(64, n * 4));
  value = static_cast<float*>(std::aligned_alloc(64, n * 4));
  keyt = static_cast<float*>(std::aligned_alloc(64, n * 4));
  flush_buf = static_cast<float*>(std::aligned_alloc(64, kFlushFloats * 4));
  if (!key || !value || !keyt || !flush_buf) {
    std::fprintf(stderr, "out of memory (needs %.1f GiB)\n", (3.0 * n * 4 + kFlushFloats * 4) / (1 << 30));
    return 1;
  }
  std::mt19937 rng(1);  // distinct values: no page the hypervisor could merge
  for (size_t i = 0; i < n; ++i) {
    key[i] = float(rng() & 1023);
    value[i] = float(rng() & 1023);
    keyt[i] = float(rng() & 1023);
  }
  for (size_t i = 0; i < kFlushFloats; ++i) flush_buf[i] = 1.0f;
  for (int h = 0; h < kHeads; ++h) {
    std::vector<int> all(S);
    for (int i = 0; i < S; ++i) all[i] = i;
    std::shuffle(all.begin(), all.end(), rng);
    sel[h].assign(all.begin(), all.begin() + K);
    std::sort(sel[h].begin(), sel[h].end());
  }

  const Variant variants[] = {
      {"stream (step 1)", 0, kNone, kTwoPass},
      {"gather, prefetch all lines", 1, kAllLines, kTwoPass},
      {"gather, prefetch first line", 1, kFirstLine, kTwoPass},
      {"gather, no prefetch", 1, kNone, kTwoPass},
      {"gather, K and V paired", 1, kFirstLine, kPaired},
      {"gather, V staged in K pass", 1, kFirstLine, kStaged},
      {"serial: stream + gather", 2, kFirstLine, kTwoPass},
      {"overlap: gather || next stream", 3, kNone, kTwoPass},
  };
  constexpr int nv = sizeof(variants) / sizeof(variants[0]);
  std::vector<double> best(nv, 1e30);
  float sink = 0.0f;
  for (int rep = 0; rep < 15; ++rep)
    for (int i = 0; i < nv; ++i) {
      flush();
      const double t0 = seconds();
      sink += run(variants[i]);
      best[i] = std::min(best[i], seconds() - t0);
    }
  const double stream_bytes = double(kHeads) * kR * S * 4, gather_bytes = double(kHeads) * 2 * K * kD * 4;
  std::printf("S = %d, k = %d, %d heads, D = %d, r = %d, fp32, %d threads (checksum %g)\n", S, K,
              kHeads, kD, kR, omp_get_max_threads(), sink);
  for (int i = 0; i < nv; ++i) {
    const double bytes = variants[i].kind == 0 ? stream_bytes
                         : variants[i].kind == 1 ? gather_bytes
                                                 : stream_bytes + gather_bytes;
    std::printf("%-32s %7.3f ms  %5.1f GB/s\n", variants[i].name, best[i] * 1e3, bytes / best[i] / 1e9);
  }
  return 0;
}
