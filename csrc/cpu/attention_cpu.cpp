// Native CPU kernel of torch.ops.sparq_ext.attention and torch.ops.sparq_ext.paged_attention
// (SparQ Attention, arXiv 2312.04985). One kernel body serves both: the stages reach cache rows
// through a position policy (StridedPositions, PagedPositions below), so the paged operator
// computes exactly what attention computes on the same cache laid out contiguously. Paged, with
// key_t, a block of positions that crosses a page has its r rows copied first (r*kSub*e bytes per
// thread, L1/L2-resident); the bytes below are otherwise the same.
//
// Bytes per (batch b, KV head h), e = element size, L = valid span of row b (<= S, bounded by
// seq_lens / the first and last True of attn_mask), k' = min(k, valid count), G = Hq / Hkv:
//   reads   L*r*e      the r selected rows of key_t (contiguous runs; without key_t: the
//                      L rows of key, L*D*e, because the r columns share their cache lines);
//                      with the 8-bit selection cache L*r bytes + L*4 bytes of key_t_scale
//         + 2*k'*D*e   the selected rows of key and value
//         + D*e        value_mean (without it: L*D*e, the mean of value over valid positions)
//         + G*D*e      the query heads of the group, and L bytes of attn_mask
//   writes  G*D*e      the output
//   workspace (fp32/int64, from one at::empty per call): L*4 bytes of selection scores,
//   written once, read twice while L2-resident and then at the k' selected positions
//   (per-thread buffer when B*Hkv >= threads, else a (B*Hkv, S) buffer), k'*8 bytes of
//   indices, per-tile softmax statistics (2*G floats per 4096 positions) and per-partition
//   partials ((D+3)*G floats per 512 selected rows); with rows of <= 256 bytes, a per-thread
//   copy of one partition's 512 value rows (L2-resident, see kBufferedValueRowBytes).
//   Against the budget S*r*e + 2*k*D*e that is 4/(r*e) extra (1/8 at r = 16, bf16).
//
// Stages (docs/design.md; threads in place of thread blocks), per task = (b, KV head h):
//   prep           i1 = top-r of sum_g |q_g|; q_hat_g = q_g[i1] * scale / sqrt(gamma_g).
//   approx_logits  (paper step 1) per 4096-position tile: approximate logits of all G heads
//                  from the r rows of key_t in registers, per-head online-softmax statistics
//                  (max, sum exp) for alpha, and only the group sum written out (+inf in the
//                  local window, -inf where invalid).
//   topk           (step 2) exact top-k of the group sums (topk_cpu.h).
//   attend         (step 2) per partition of 512 selected rows: exact scores of all G heads
//                  and their approximate logits from the same key row, softmax, weighted sum
//                  of value rows.
//   merge          (step 3) the partitions merged in order; alpha_g from the approx_logits
//                  statistics; output alpha*y + (1-alpha)*v_mean.
// softcap caps the logits where they are made (approx_logits, attend); a sink joins each head's
// approximate softmax statistics (topk) and the exact softmax (merge), docs/design.md. An int8
// key_t (the 8-bit selection cache) is read by approx_logits and, for alpha, attend (the
// stages templated on the key_t element type KT); its position's scale multiplies the logit.
// Work items are whole tasks when there are at least as many as threads, else (task, tile) for
// approx_logits and (task, partition) for attend. Tiles and partitions are the same either way,
// so the result does not depend on the thread count (bit for bit). Why the kernel is organised
// this way, and what was measured: docs/cpu-performance.md.
//
// GCC 12's AVX-512 intrinsics self-initialise `__Y` (undefined vectors) and trip these
// warnings wherever they are inlined (-Wuninitialized at -O0, as in the plain CMake build;
// -Wmaybe-uninitialized at -O2+); they say nothing about this file. Before any include.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "cpu/cpu_simd.h"  // first: sets ATen's CPU_CAPABILITY macros for the vector width
#include "cpu/topk_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "sparq/math.h"
#include "sparq_ops.h"

namespace sparq {
namespace cpu {
namespace {

constexpr int64_t kTileLen = 4096;      // positions per approx_logits work item (sets the statistics grid)
constexpr int64_t kSub = 256;           // positions per L1-resident block of per-head logits
constexpr int64_t kPartitionLen = 512;  // selected rows per attend work item (fixed: results
                                        // independent of the thread count)
// Rows ahead to prefetch in the gathers. The gathers are latency-bound: attend's key pass
// prefetches the whole K and V rows into the outer caches (prefetcht2), which does not hold the
// L1's few fill buffers; a hint into the L1 stalls on them, which is why the value pass over
// unbuffered rows prefetches only a row's first line (docs/cpu-performance.md).
constexpr int64_t kPrefetch = 8;
constexpr int64_t kLine = 64;  // bytes per cache line
// Value rows of at most this many bytes are copied to a per-thread buffer during attend's key
// pass (demand loads of a position's K and V rows back to back: twice the misses in flight of
// a prefetch hint), and the value pass then reads that L2-resident buffer. Larger rows (fp32 at
// D = 128) were slower buffered: their lines exceed the misses a core keeps in flight.
constexpr int64_t kBufferedValueRowBytes = 256;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The valid span of one batch row.
struct RowInfo {
  int64_t begin, end;  // first valid position, one past the last
  int64_t win_start;   // valid positions >= win_start are the forced local window
  int64_t n_valid;     // valid positions in [begin, end)
};

// Where the cache rows of a position are: the policy every stage is templated on, so one kernel
// body serves the contiguous cache (attention) and the paged one (paged_attention). A policy
// gives, per task (b, h), a Row whose offset(s) is the element offset of position s (a key or
// value row, or position s of component 0 of key_t), and run(s), how many positions from s on
// are consecutive in memory (stride 1).
//
// The contiguous cache (B, H, S, ...): position s at b * sb + h * sh + s * ss.
struct StridedPositions {
  int64_t sb, sh, ss;
  struct Row {
    int64_t base, ss;
    int64_t offset(int64_t s) const { return base + s * ss; }
    int64_t run(int64_t) const { return ss == 1 ? std::numeric_limits<int64_t>::max() : 1; }
  };
  Row row(int64_t b, int64_t h) const { return {b * sb + h * sh, ss}; }
};

// The paged cache (num_blocks, H, block_size, ...), any strides: position s of batch row b in
// block block_table[b, s / block_size] at offset s % block_size.
struct PagedPositions {
  const int32_t* block_table;
  int64_t bt_sr, bt_sc;  // block_table strides (row, column)
  int64_t block_size, s_block, s_head, s_pos;
  struct Row {
    const int32_t* blocks;  // the batch row's entries of block_table
    int64_t bt_sc, block_size, head_offset, s_block, s_pos;
    int64_t offset(int64_t s) const {
      return int64_t{blocks[s / block_size * bt_sc]} * s_block + head_offset +
             s % block_size * s_pos;
    }
    int64_t run(int64_t s) const { return s_pos == 1 ? block_size - s % block_size : 1; }
  };
  Row row(int64_t b, int64_t h) const {
    return {block_table + b * bt_sr, bt_sc, block_size, h * s_head, s_block, s_pos};
  }
};

template <typename Pos>
struct Problem {
  int64_t B, Hq, Hkv, G, S, D, r, k, rpad, kpad, n_tiles;
  float scale;
  bool reallocate;
  float softcap;       // logit softcapping; 0 when absent
  const float* sinks;  // (Hq,) sink logits, or nullptr
  const void* query;  // contiguous (B, Hq, D)
  const void* key;    // rows of D contiguous elements
  Pos key_pos;
  const void* value;  // rows of D contiguous elements
  Pos value_pos;
  const void* key_t;  // nullptr when absent
  Pos key_t_pos;      // position s of component 0; component d is kt_sd further
  int64_t kt_sd;
  const float* key_t_scale;  // int8 key_t: each position's scale (nullptr otherwise)
  Pos key_t_scale_pos;
  const void* value_mean;  // contiguous (B, Hkv, D) or nullptr
  const float* component_weights;  // contiguous (B, Hkv, D) step-1 weights, or nullptr (all 1)
  // Paged caches: per-block fp32 value sums, rows of D contiguous floats (or nullptr); position s
  // of a row reads its block's sum at value_sums_pos.row(b, h).offset(s), one per block_size.
  const float* value_sums;
  Pos value_sums_pos;
  int64_t value_sums_step;  // the block size
  const bool* mask;        // contiguous (B, S) or nullptr
  const RowInfo* rows;
  void* out;  // contiguous (B, Hq, D)
  // Per-task arrays (task = b * Hkv + h).
  int64_t* i1;         // (tasks, r), ascending
  float* q_f32;        // (tasks, G, D)
  float* q_hat;        // (tasks, G, rpad), zero-padded, step-1 scale folded in
  float* tile_stats;  // (tasks, n_tiles, G, 2): softmax (max, sum) of approx logits
  float* tile_range;  // (tasks, n_tiles, 2): min, max of finite selection scores
  int64_t n_partitions;  // ceil(min(k, S) / kPartitionLen): partitions of the selected rows
  int64_t* sel_idx;    // (tasks, kpad): selected positions, ascending
  int64_t* n_sel;      // (tasks,)
  float* head_stats;   // (tasks, G, 2): softmax (max, sum) of approx logits over all of S
  float* partials;     // (tasks, n_partitions, G, D + 3) when partitions run as separate work items
};

// Per-thread scratch, carved from one allocation.
struct Scratch {
  float* scores;                    // S: selection scores (per-task mode)
  float* logits;                    // G * kSub: per-head approximate logits of a block
  float* gathered;                  // r * kSub: key columns when there is no key_t
  float* sel_exact;                 // G * kPartitionLen: exact logits -> softmax weights
  float* sel_approx;                // G * kPartitionLen: approximate logits of the selected rows
  float* key_cols;                  // rpad: one key row's i1 columns
  float* v_mean;                    // D
  float* partials;                  // n_partitions * G * (D + 3) (per-task mode)
  void* value_buffer;                // kPartitionLen value rows (when D * e <= kBufferedValueRowBytes)
  void* key_t_rows;  // r * kSub elements: key_t rows copied where a block of positions is not
                     // consecutive in memory (paged caches)
  float* key_t_scales;  // kSub: a block's key_t_scale copied where not consecutive in memory
};

// ---------------------------------------------------------------------------------------
// prep for one task.
// ---------------------------------------------------------------------------------------
template <typename T, typename Pos>
void prep_query(const Problem<Pos>& P, int64_t task) {
  const int64_t b = task / P.Hkv, h = task % P.Hkv, G = P.G, D = P.D, r = P.r;
  const T* q = static_cast<const T*>(P.query) + (b * P.Hq + h * G) * D;
  float* qf = P.q_f32 + task * G * D;
  for (int64_t i = 0; i < G * D; ++i) qf[i] = static_cast<float>(q[i]);
  // i1 = top-r of w * sum_g |q_g| (w = component_weights, else 1; ties: lowest index; any
  // choice is valid, docs/design.md).
  const float* w = P.component_weights ? P.component_weights + task * D : nullptr;
  int64_t* i1 = P.i1 + task * r;
  std::vector<std::pair<float, int64_t>> mag(D);
  for (int64_t d = 0; d < D; ++d) {
    float s = 0.0f;
    for (int64_t g = 0; g < G; ++g) s += std::fabs(qf[g * D + d]);
    mag[d] = {w ? s * w[d] : s, d};
  }
  auto larger = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  if (r < D) std::nth_element(mag.begin(), mag.begin() + (r - 1), mag.end(), larger);
  for (int64_t j = 0; j < r; ++j) i1[j] = mag[j].second;
  std::sort(i1, i1 + r);  // ascending: the r key_t rows are then read in address order
  float* qh = P.q_hat + task * G * P.rpad;
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = qf + g * D;
    float l1 = 0.0f, l1_hat = 0.0f;  // of |q_g| weighted by w, as i1's magnitudes
    for (int64_t d = 0; d < D; ++d) l1 += w ? std::fabs(qg[d]) * w[d] : std::fabs(qg[d]);
    for (int64_t j = 0; j < r; ++j)
      l1_hat += w ? std::fabs(qg[i1[j]]) * w[i1[j]] : std::fabs(qg[i1[j]]);
    const float s = approx_logit_scale(l1_hat, l1, P.scale);
    for (int64_t j = 0; j < P.rpad; ++j) qh[g * P.rpad + j] = j < r ? qg[i1[j]] * s : 0.0f;
  }
}

// f(NH, g0) over the G heads of a group in blocks of NH = 8, 4, 2, 1 heads (NH a compile-time
// std::integral_constant), so that each block's accumulators stay in registers.
template <typename F>
inline void for_head_blocks(int64_t G, const F& f) {
  int64_t g0 = 0;
  while (g0 < G) {
    const int64_t rem = G - g0;
    if (rem >= 8) {
      f(std::integral_constant<int, 8>{}, g0);
      g0 += 8;
    } else if (rem >= 4) {
      f(std::integral_constant<int, 4>{}, g0);
      g0 += 4;
    } else if (rem >= 2) {
      f(std::integral_constant<int, 2>{}, g0);
      g0 += 2;
    } else {
      f(std::integral_constant<int, 1>{}, g0);
      g0 += 1;
    }
  }
}

// ---------------------------------------------------------------------------------------
// approx_logits kernel: logits[hh][i] = sum_j q_hat[hh][j] * rows[j][i] for NH heads at once, each
// row element loaded once; U vectors of positions per step keep enough FMAs in flight.
// Stores whole vectors: `logits` rows hold round_up(n, kVec) floats.
// ---------------------------------------------------------------------------------------
template <typename T, int NH, int U>
void approx_logits_block(const T* const* rows, int64_t r, const float* qh, int64_t rpad,
                         int64_t n, float* logits) {
  int64_t i = 0;
  for (; i + U * kVec <= n; i += U * kVec) {
    fVec acc[NH][U];
    for (int hh = 0; hh < NH; ++hh)
      for (int u = 0; u < U; ++u) acc[hh][u] = fVec(0.0f);
    for (int64_t j = 0; j < r; ++j) {
      fVec kv[U];
      for (int u = 0; u < U; ++u) kv[u] = load_f(rows[j] + i + u * kVec);
      for (int hh = 0; hh < NH; ++hh) {
        const fVec qb(qh[hh * rpad + j]);
        for (int u = 0; u < U; ++u) acc[hh][u] = at::vec::fmadd(qb, kv[u], acc[hh][u]);
      }
    }
    for (int hh = 0; hh < NH; ++hh)
      for (int u = 0; u < U; ++u) acc[hh][u].store(logits + hh * kSub + i + u * kVec);
  }
  for (; i < n; i += kVec) {
    const int64_t m = std::min<int64_t>(kVec, n - i);
    fVec acc[NH];
    for (int hh = 0; hh < NH; ++hh) acc[hh] = fVec(0.0f);
    for (int64_t j = 0; j < r; ++j) {
      const fVec kv = m == kVec ? load_f(rows[j] + i) : load_f(rows[j] + i, m);
      for (int hh = 0; hh < NH; ++hh)
        acc[hh] = at::vec::fmadd(fVec(qh[hh * rpad + j]), kv, acc[hh]);
    }
    for (int hh = 0; hh < NH; ++hh) acc[hh].store(logits + hh * kSub + i);
  }
}

// All G heads; U = 2 position vectors per step for blocks of 4 or 8 heads, else 4.
template <typename T>
void approx_logits_all_heads(const T* const* rows, int64_t r, const float* qh, int64_t rpad,
                             int64_t G, int64_t n, float* logits) {
  for_head_blocks(G, [&](auto nh, int64_t g0) {
    constexpr int NH = decltype(nh)::value;
    approx_logits_block<T, NH, (NH >= 4 ? 2 : 4)>(rows, r, qh + g0 * rpad, rpad, n, logits + g0 * kSub);
  });
}

inline float vec_max(const float* x, int64_t n) {
  fVec m(-INFINITY);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) m = at::vec::maximum(m, fVec::loadu(x + i));
  float out = hmax(m);
  for (; i < n; ++i) out = std::max(out, x[i]);
  return out;
}

// sum_i exp(x[i] - m) (m finite); with `write`, x[i] becomes exp(x[i] - m). FastExp: the
// ~20-ulp polynomial, used for the S*G statistics of approx_logits.
template <bool FastExp, bool Write>
inline float exp_sum(float* x, int64_t n, float m) {
  const fVec mv(m);
  fVec acc(0.0f);
  int64_t i = 0;
  for (; i < n; i += kVec) {
    const int64_t c = std::min<int64_t>(kVec, n - i);
    fVec v = fVec::loadu(x + i, c) - mv;
    v = FastExp ? v.exp_u20() : v.exp();
    if (c < kVec) v = fVec::set(fVec(0.0f), v, c);
    if (Write) v.store(x + i, c);
    acc = acc + v;
  }
  return hsum(acc);
}

// Softcapping of `rows` rows of n logits each (x[row * stride + i], n a whole number of vectors):
// sparq::softcap_logit, vectorised.
inline void softcap_rows(float* x, int64_t rows, int64_t stride, int64_t n, float cap) {
  const fVec c(cap), inv(1.0f / cap);
  for (int64_t g = 0; g < rows; ++g)
    for (int64_t i = 0; i < n; i += kVec) {
      float* p = x + g * stride + i;
      (c * (fVec::loadu(p) * inv).tanh()).store(p);
    }
}

// Whether each run of consecutive positions in [s0, s0 + n) after the first starts a whole
// number of vectors into the block (always, for a contiguous key_t: one run).
template <typename Row>
bool runs_vector_aligned(const Row& row, int64_t s0, int64_t n) {
  for (int64_t i = row.run(s0); i < n; i += row.run(s0 + i))
    if (i % kVec != 0) return false;
  return true;
}

// The scales of positions [s0, s0 + n) of an int8 key_t: in place where consecutive in memory,
// else copied a run at a time into `copy` (paged caches).
template <typename Row>
const float* block_scales(const float* key_t_scale, const Row& row, int64_t s0, int64_t n,
                          float* copy) {
  if (row.run(s0) >= n) return key_t_scale + row.offset(s0);
  for (int64_t i = 0; i < n;) {
    const int64_t len = std::min(row.run(s0 + i), n - i);
    const float* src = key_t_scale + row.offset(s0 + i);
    if (len > 1) {
      std::memcpy(copy + i, src, len * sizeof(float));
    } else {
      copy[i] = *src;
    }
    i += len;
  }
  return copy;
}

// Each of the G rows of a block's logits (n of them, whole vectors stored) times its
// position's scale: the 8-bit selection cache's logit.
inline void scale_logits(float* logits, int64_t G, const float* scales, int64_t n) {
  for (int64_t i = 0; i < n; i += kVec) {
    const int64_t c = std::min<int64_t>(kVec, n - i);
    const fVec sv = c == kVec ? fVec::loadu(scales + i) : fVec::loadu(scales + i, c);
    for (int64_t g = 0; g < G; ++g) (fVec::loadu(logits + g * kSub + i) * sv).store(logits + g * kSub + i);
  }
}

// approx_logits for one (task, tile): selection scores into scores[lo, hi) and the tile's
// statistics. `scores` is indexed by position. KT: key_t's element type (T, or int8_t for the
// 8-bit selection cache, whose logits are then scaled per position).
template <typename T, typename KT, typename Pos>
void approx_logits_tile(const Problem<Pos>& P, int64_t task, int64_t tile, float* scores,
                  const Scratch& ws) {
  const int64_t b = task / P.Hkv, h = task % P.Hkv, G = P.G, r = P.r;
  const RowInfo ri = P.rows[b];
  float* stats = P.tile_stats + (task * P.n_tiles + tile) * G * 2;
  float* range = P.tile_range + (task * P.n_tiles + tile) * 2;
  for (int64_t g = 0; g < G; ++g) {
    stats[2 * g] = -INFINITY;
    stats[2 * g + 1] = 0.0f;
  }
  float lo_score = INFINITY, hi_score = -INFINITY;
  const int64_t lo = std::max(ri.begin, tile * kTileLen);
  const int64_t hi = std::min(ri.end, (tile + 1) * kTileLen);
  const int64_t* i1 = P.i1 + task * r;
  const float* qh = P.q_hat + task * G * P.rpad;
  const bool* mask = P.mask ? P.mask + b * P.S : nullptr;
  const KT* rows[256];  // r <= D; D > 256 handled by the heap vector below
  std::vector<const KT*> rows_heap;
  const KT** row_ptr = rows;
  if (r > 256) {
    rows_heap.resize(r);
    row_ptr = rows_heap.data();
  }
  std::vector<const float*> gathered_rows;
  if (!P.key_t) {
    gathered_rows.resize(r);
    for (int64_t j = 0; j < r; ++j) gathered_rows[j] = ws.gathered + j * kSub;
  }
  float* logits = ws.logits;
  const T* key = static_cast<const T*>(P.key);
  const KT* key_t = static_cast<const KT*>(P.key_t);
  const auto key_row = P.key_pos.row(b, h);
  const auto kt_row = P.key_t_pos.row(b, h);
  constexpr bool kInt8 = std::is_same_v<KT, int8_t>;

  for (int64_t s0 = lo; s0 < hi; s0 += kSub) {
    const int64_t n = std::min(kSub, hi - s0), npad = round_up(n, kVec);
    if (P.key_t && runs_vector_aligned(kt_row, s0, n)) {
      // The r rows read in place, a run of consecutive positions at a time: one run, unless
      // the block spans pages. A run's whole-vector stores past its end land where the next
      // run writes (runs start at whole vectors), so each logit is what one call computes.
      constexpr int64_t kLineElems = kLine / int64_t{sizeof(KT)};
      if (kt_row.run(s0) >= n) {
        // The next block of each of the r rows, ahead of the hardware prefetcher, which sees
        // r short interleaved runs (kSub positions each).
        const KT* next = key_t + kt_row.offset(s0) + kSub;
        const int64_t ahead = std::min({kSub, hi - s0 - kSub, kt_row.run(s0) - n});
        for (int64_t j = 0; j < r; ++j)
          for (int64_t i = 0; i < ahead; i += kLineElems) prefetch(next + i1[j] * P.kt_sd + i);
      } else {
        // Pages: each of the r rows is a run of a page's block_size positions somewhere in
        // memory, too short for the hardware prefetcher to follow. The next block's runs, all
        // of their lines, into the outer caches (r * kSub * e bytes; the L1 could not keep
        // that many misses in flight). Up to the row's end, not the tile's: tiles follow.
        const int64_t p1 = std::min(ri.end, s0 + 2 * kSub);
        for (int64_t p = s0 + kSub; p < p1;) {
          const int64_t len = std::min(kt_row.run(p), p1 - p);
          const KT* base = key_t + kt_row.offset(p);
          for (int64_t j = 0; j < r; ++j)
            for (int64_t i = 0; i < len; i += kLineElems) prefetch_outer(base + i1[j] * P.kt_sd + i);
          p += len;
        }
      }
      for (int64_t i = 0; i < n;) {
        const int64_t len = std::min(kt_row.run(s0 + i), n - i);
        const KT* base = key_t + kt_row.offset(s0 + i);
        for (int64_t j = 0; j < r; ++j) row_ptr[j] = base + i1[j] * P.kt_sd;
        approx_logits_all_heads<KT>(row_ptr, r, qh, P.rpad, G, len, logits + i);
        i += len;
      }
    } else if (P.key_t) {  // other page layouts: the block's r rows copied, then the same kernel
      KT* copied = static_cast<KT*>(ws.key_t_rows);
      for (int64_t i = 0; i < n;) {
        const int64_t len = std::min(kt_row.run(s0 + i), n - i);
        const KT* src = key_t + kt_row.offset(s0 + i);
        for (int64_t j = 0; j < r; ++j)
          for (int64_t e = 0; e < len; ++e) copied[j * kSub + i + e] = src[i1[j] * P.kt_sd + e];
        i += len;
      }
      for (int64_t j = 0; j < r; ++j) row_ptr[j] = copied + j * kSub;
      approx_logits_all_heads<KT>(row_ptr, r, qh, P.rpad, G, n, logits);
    } else {  // gather the r columns of n key rows, then the same kernel on fp32 rows
      for (int64_t i = 0; i < n; ++i) {
        const T* row = key + key_row.offset(s0 + i);
        for (int64_t j = 0; j < r; ++j) ws.gathered[j * kSub + i] = static_cast<float>(row[i1[j]]);
      }
      approx_logits_all_heads<float>(gathered_rows.data(), r, qh, P.rpad, G, n, logits);
    }
    if constexpr (kInt8) {
      const float* scales =
          block_scales(P.key_t_scale, P.key_t_scale_pos.row(b, h), s0, n, ws.key_t_scales);
      scale_logits(logits, G, scales, n);
    }
    if (P.softcap > 0.0f) softcap_rows(logits, G, kSub, npad, P.softcap);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = n; i < npad; ++i) logits[g * kSub + i] = -INFINITY;

    float* sc = scores + s0;
    bool saw_nan = false;  // a NaN logit in this block (the exp below would not keep it)
    const bool all_valid = !mask || std::find(mask + s0, mask + s0 + n, false) == mask + s0 + n;
    if (all_valid && s0 + n <= ri.win_start) {  // common case: no masking, no window
      fVec vmin(INFINITY), vmax(-INFINITY);
      for (int64_t i = 0; i < npad; i += kVec) {
        fVec sum = fVec::loadu(logits + i);
        for (int64_t g = 1; g < G; ++g) sum = sum + fVec::loadu(logits + g * kSub + i);
        const fVec nan_lanes = sum.isnan();  // sparq/math.h's NaN rule
        saw_nan = saw_nan || nan_lanes.zero_mask() != (1 << kVec) - 1;
        sum = fVec::blendv(sum, fVec(kNaNScore), nan_lanes);
        const int64_t c = std::min<int64_t>(kVec, n - i);
        if (c < kVec) {
          sum.store(sc + i, c);
          sum = fVec::set(fVec(-INFINITY), sum, c);  // tail lanes out of min/max
          vmax = at::vec::maximum(vmax, sum);
          vmin = at::vec::minimum(vmin, fVec::set(fVec(INFINITY), sum, c));
        } else {
          sum.store(sc + i);
          vmax = at::vec::maximum(vmax, sum);
          vmin = at::vec::minimum(vmin, sum);
        }
      }
      hi_score = std::max(hi_score, hmax(vmax));
      lo_score = std::min(lo_score, -hmax(fVec(0.0f) - vmin));
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t s = s0 + i;
        if (mask && !mask[s]) {
          for (int64_t g = 0; g < G; ++g) logits[g * kSub + i] = -INFINITY;
          sc[i] = kInvalidScore;
          continue;
        }
        if (s >= ri.win_start) {
          sc[i] = kWindowScore;
          continue;
        }
        float sum = 0.0f;
        for (int64_t g = 0; g < G; ++g) sum += logits[g * kSub + i];
        saw_nan = saw_nan || std::isnan(sum);
        sum = selection_score(sum);
        sc[i] = sum;
        if (std::isfinite(sum)) {
          lo_score = std::min(lo_score, sum);
          hi_score = std::max(hi_score, sum);
        }
      }
    }
    // Per-head softmax statistics of this block, merged into the tile's.
    for (int64_t g = 0; g < G; ++g) {
      float* x = logits + g * kSub;
      if (saw_nan && std::any_of(x, x + n, [](float v) { return std::isnan(v); })) {
        const SoftmaxState s = softmax_nan({stats[2 * g], stats[2 * g + 1]});
        stats[2 * g] = s.m;
        stats[2 * g + 1] = s.l;
        continue;
      }
      const float m = vec_max(x, npad);
      if (m == -INFINITY) continue;
      const float l = exp_sum<true, false>(x, npad, m);
      const SoftmaxState s = softmax_merge({stats[2 * g], stats[2 * g + 1]}, {m, l});
      stats[2 * g] = s.m;
      stats[2 * g + 1] = s.l;
    }
  }
  range[0] = lo_score;
  range[1] = hi_score;
}

// ---------------------------------------------------------------------------------------
// attend kernels over the selected rows.
// ---------------------------------------------------------------------------------------

// Exact logits of NH heads for one key row.
template <typename T, int NH>
inline void exact_logits_row(const T* row, const float* qf, int64_t D, float scale,
                             float* out, int64_t out_stride) {
  fVec acc[NH];
  for (int hh = 0; hh < NH; ++hh) acc[hh] = fVec(0.0f);
  int64_t d = 0;
  for (; d + kVec <= D; d += kVec) {
    const fVec kv = load_f(row + d);
    for (int hh = 0; hh < NH; ++hh)
      acc[hh] = at::vec::fmadd(fVec::loadu(qf + hh * D + d), kv, acc[hh]);
  }
  if (d < D) {
    const int64_t c = D - d;
    const fVec kv = load_f(row + d, c);
    for (int hh = 0; hh < NH; ++hh)
      acc[hh] = at::vec::fmadd(fVec::loadu(qf + hh * D + d, c), kv, acc[hh]);
  }
  for (int hh = 0; hh < NH; ++hh) out[hh * out_stride] = hsum(acc[hh]) * scale;
}

// y[hh][:] = sum_t p[hh][t] * V[idx[t]][:] for NH heads. Each value row is read once, whole
// (the gather is latency-bound: touching a row in several passes costs a miss per pass), and
// the NH x D fp32 accumulators live in L1. Row t is value + rows.offset(idx[t]); Buffered: it
// is value + t * D (the value buffer).
template <typename T, int NH, bool Buffered, typename Row>
void accumulate_values(const T* value, Row rows, const int64_t* idx, int64_t n_sel,
                       const float* p, int64_t kpad, int64_t D, float* y, int64_t y_stride) {
  for (int hh = 0; hh < NH; ++hh)
    for (int64_t d = 0; d < D; ++d) y[hh * y_stride + d] = 0.0f;
  const int64_t d_full = D / kVec * kVec;
  for (int64_t t = 0; t < n_sel; ++t) {
    if (!Buffered && t + kPrefetch < n_sel) prefetch(value + rows.offset(idx[t + kPrefetch]));
    const T* row = Buffered ? value + t * D : value + rows.offset(idx[t]);
    fVec pb[NH];
    for (int hh = 0; hh < NH; ++hh) pb[hh] = fVec(p[hh * kpad + t]);
    for (int64_t d = 0; d < d_full; d += kVec) {
      const fVec v = load_f(row + d);
      for (int hh = 0; hh < NH; ++hh) {
        float* acc = y + hh * y_stride + d;
        at::vec::fmadd(pb[hh], v, fVec::loadu(acc)).store(acc);
      }
    }
    if (d_full < D) {
      const int64_t c = D - d_full;
      const fVec v = load_f(row + d_full, c);
      for (int hh = 0; hh < NH; ++hh) {
        float* acc = y + hh * y_stride + d_full;
        at::vec::fmadd(pb[hh], v, fVec::loadu(acc, c)).store(acc, c);
      }
    }
  }
}

// accumulate_values for all G heads; p: G rows of kPartitionLen weights; head g's sum goes to
// partial + g * pstride + 3.
template <typename T, bool Buffered, typename Row>
void accumulate_values_all_heads(const T* value, Row rows, const int64_t* idx, int64_t n,
                                 const float* p, int64_t G, int64_t D, float* partial,
                                 int64_t pstride) {
  for_head_blocks(G, [&](auto nh, int64_t g0) {
    accumulate_values<T, decltype(nh)::value, Buffered>(value, rows, idx, n, p + g0 * kPartitionLen, kPartitionLen, D,
                                                      partial + g0 * pstride + 3, pstride);
  });
}

// topk for one task: merge its approx_logits statistics and select its rows.
template <typename T, typename Pos>
void topk_task(const Problem<Pos>& P, int64_t task, const float* scores, const Scratch& ws) {
  const int64_t b = task / P.Hkv, G = P.G;
  const RowInfo ri = P.rows[b];
  float* head_stats = P.head_stats + task * G * 2;
  float lo_score = INFINITY, hi_score = -INFINITY;
  for (int64_t g = 0; g < G; ++g) {
    head_stats[2 * g] = -INFINITY;
    head_stats[2 * g + 1] = 0.0f;
  }
  for (int64_t c = 0; c < P.n_tiles; ++c) {  // in tile order: deterministic
    const float* st = P.tile_stats + (task * P.n_tiles + c) * G * 2;
    for (int64_t g = 0; g < G; ++g) {
      const SoftmaxState s =
          softmax_merge({head_stats[2 * g], head_stats[2 * g + 1]}, {st[2 * g], st[2 * g + 1]});
      head_stats[2 * g] = s.m;
      head_stats[2 * g + 1] = s.l;
    }
    const float* rg = P.tile_range + (task * P.n_tiles + c) * 2;
    lo_score = std::min(lo_score, rg[0]);
    hi_score = std::max(hi_score, rg[1]);
  }
  if (P.sinks && ri.n_valid > 0) {  // the sink: one more entry of each head's softmax
    const float* sink = P.sinks + (task % P.Hkv) * G;
    for (int64_t g = 0; g < G; ++g) {
      const SoftmaxState s = softmax_push({head_stats[2 * g], head_stats[2 * g + 1]}, sink[g]);
      head_stats[2 * g] = s.m;
      head_stats[2 * g + 1] = s.l;
    }
  }
  const int64_t want = std::min(P.k, ri.n_valid);  // k clamped to the valid count
  P.n_sel[task] = ri.n_valid == 0 ? 0
                : select_topk(scores, ri.begin, ri.end, want, lo_score, hi_score,
                              P.sel_idx + task * P.kpad);
}

// attend: one partition of the selected rows -> per head (max, sum p, sum of approx softmax
// numerators, sum p * v[D]) at `partial` (G blocks of D + 3 floats). `scores`: the task's
// approx_logits selection scores, indexed by position. KT: key_t's element type, as in
// approx_logits.
template <typename T, typename KT, typename Pos>
void attend_partition(const Problem<Pos>& P, int64_t task, int64_t partition, const float* scores,
                  float* partial, const Scratch& ws) {
  const int64_t b = task / P.Hkv, h = task % P.Hkv, G = P.G, D = P.D, r = P.r;
  const int64_t t0 = partition * kPartitionLen, n = std::min(P.n_sel[task] - t0, kPartitionLen);
  const int64_t pstride = D + 3;
  if (n <= 0) {
    for (int64_t g = 0; g < G; ++g) {
      float* part = partial + g * pstride;
      part[0] = -INFINITY;
      for (int64_t i = 1; i < pstride; ++i) part[i] = 0.0f;
    }
    return;
  }
  const int64_t* idx = P.sel_idx + task * P.kpad + t0;
  const T* key = static_cast<const T*>(P.key);
  const auto key_row = P.key_pos.row(b, h);
  const float* qf = P.q_f32 + task * G * D;
  const float* qh = P.q_hat + task * G * P.rpad;
  const int64_t* i1 = P.i1 + task * r;
  const int64_t rpad = P.rpad;
  float* ex = ws.sel_exact;
  float* ap = ws.sel_approx;
  float* cols = ws.key_cols;
  for (int64_t j = r; j < rpad; ++j) cols[j] = 0.0f;
  const T* value = static_cast<const T*>(P.value);
  const auto value_row = P.value_pos.row(b, h);
  T* buffer = static_cast<T*>(ws.value_buffer);  // nullptr: value rows are not buffered

  // Exact logits of the selected rows, all heads per key row read (and the value row buffered).
  const int64_t row_bytes = D * int64_t{sizeof(T)};
  for (int64_t t = 0; t < n; ++t) {
    if (t + kPrefetch < n) {
      const char* key_ahead = reinterpret_cast<const char*>(key + key_row.offset(idx[t + kPrefetch]));
      const char* value_ahead =
          reinterpret_cast<const char*>(value + value_row.offset(idx[t + kPrefetch]));
      for (int64_t l = 0; l < row_bytes; l += kLine) {
        prefetch_outer(key_ahead + l);
        prefetch_outer(value_ahead + l);
      }
    }
    if (buffer) std::memcpy(buffer + t * D, value + value_row.offset(idx[t]), D * sizeof(T));
    const T* row = key + key_row.offset(idx[t]);
    for_head_blocks(G, [&](auto nh, int64_t g0) {
      exact_logits_row<T, decltype(nh)::value>(row, qf + g0 * D, D, P.scale, ex + g0 * kPartitionLen + t, kPartitionLen);
    });
  }

  if (P.softcap > 0.0f) softcap_rows(ex, G, kPartitionLen, round_up(n, kVec), P.softcap);

  // Approximate logits l_hat_g of the selected rows (for alpha), out of the gather loop above:
  // extra instructions per row there cut the misses in flight. With one head per group, a position's approx_logits selection score is
  // that head's approximate logit, read back from the L2-resident scores; in the local window
  // (whose score is a marker) and with G > 1 it is recomputed from the i1 columns of the key
  // rows just read, now in L2. With the 8-bit selection cache the columns are key_t's (the
  // logits step 1 ranked), read at the selected positions, times the position's scale.
  if (P.reallocate) {
    const int64_t win_start = P.rows[b].win_start;
    constexpr bool kInt8 = std::is_same_v<KT, int8_t>;
    for (int64_t t = 0; t < n; ++t) {
      if (G == 1 && idx[t] < win_start) {
        ap[t] = scores[idx[t]];
        continue;
      }
      float position_scale = 1.0f;
      if constexpr (kInt8) {
        const KT* column = static_cast<const KT*>(P.key_t) + P.key_t_pos.row(b, h).offset(idx[t]);
        for (int64_t j = 0; j < r; ++j) cols[j] = static_cast<float>(column[i1[j] * P.kt_sd]);
        position_scale = P.key_t_scale[P.key_t_scale_pos.row(b, h).offset(idx[t])];
      } else {
        const T* row = key + key_row.offset(idx[t]);
        for (int64_t j = 0; j < r; ++j) cols[j] = static_cast<float>(row[i1[j]]);
      }
      for (int64_t g = 0; g < G; ++g) {
        fVec acc(0.0f);
        for (int64_t j = 0; j < rpad; j += kVec)
          acc = at::vec::fmadd(fVec::loadu(qh + g * rpad + j), fVec::loadu(cols + j), acc);
        float logit = hsum(acc);
        if constexpr (kInt8) logit *= position_scale;
        ap[g * kPartitionLen + t] = P.softcap > 0.0f ? softcap_logit(logit, P.softcap) : logit;
      }
    }
  }

  // Per head: local softmax weights (in place) and the approximate score mass of the partition.
  const float* head_stats = P.head_stats + task * G * 2;
  for (int64_t g = 0; g < G; ++g) {
    float* x = ex + g * kPartitionLen;
    float* part = partial + g * pstride;
    const float m = vec_max(x, n);
    part[0] = m;
    part[1] = exp_sum<false, true>(x, n, m);
    const float hm = head_stats[2 * g], hl = head_stats[2 * g + 1];
    part[2] = (P.reallocate && hl > 0.0f) ? exp_sum<false, false>(ap + g * kPartitionLen, n, hm) : 0.0f;
  }

  if (buffer)
    accumulate_values_all_heads<T, true>(buffer, value_row, idx, n, ex, G, D, partial, pstride);
  else
    accumulate_values_all_heads<T, false>(value, value_row, idx, n, ex, G, D, partial, pstride);
}

// merge: combine the partitions (in order) and write alpha * y + (1 - alpha) * v_mean.
template <typename T, typename Pos>
void merge_task(const Problem<Pos>& P, int64_t task, const float* partials, const Scratch& ws) {
  const int64_t b = task / P.Hkv, h = task % P.Hkv, G = P.G, D = P.D;
  const RowInfo ri = P.rows[b];
  T* out = static_cast<T*>(P.out) + (b * P.Hq + h * G) * D;
  if (ri.n_valid == 0) {  // nothing to attend: zeros, never NaN
    for (int64_t i = 0; i < G * D; ++i) out[i] = static_cast<T>(0.0f);
    return;
  }
  const int64_t pstride = D + 3;
  const int64_t n_used = ceil_div(P.n_sel[task], kPartitionLen);
  float* vm = ws.v_mean;
  if (P.reallocate) {
    if (P.value_mean) {
      const T* src = static_cast<const T*>(P.value_mean) + task * D;
      for (int64_t d = 0; d < D; ++d) vm[d] = static_cast<float>(src[d]);
    } else if (P.value_sums) {  // the sums of the row's blocks (ceil(S / block_size) * D reads)
      const auto sums_row = P.value_sums_pos.row(b, h);
      for (int64_t d = 0; d < D; ++d) vm[d] = 0.0f;
      for (int64_t s = 0; s < ri.end; s += P.value_sums_step) {
        const float* sum = P.value_sums + sums_row.offset(s);
        int64_t d = 0;
        for (; d + kVec <= D; d += kVec) (fVec::loadu(vm + d) + fVec::loadu(sum + d)).store(vm + d);
        if (d < D) (fVec::loadu(vm + d, D - d) + fVec::loadu(sum + d, D - d)).store(vm + d, D - d);
      }
      const float inv = 1.0f / static_cast<float>(ri.end);
      for (int64_t d = 0; d < D; ++d) vm[d] *= inv;
    } else {  // mean of value over the valid positions
      const T* value = static_cast<const T*>(P.value);
      const auto value_row = P.value_pos.row(b, h);
      for (int64_t d = 0; d < D; ++d) vm[d] = 0.0f;
      const bool* mask = P.mask ? P.mask + b * P.S : nullptr;
      for (int64_t s = ri.begin; s < ri.end; ++s) {
        if (mask && !mask[s]) continue;
        const T* row = value + value_row.offset(s);
        int64_t d = 0;
        for (; d + kVec <= D; d += kVec) (fVec::loadu(vm + d) + load_f(row + d)).store(vm + d);
        if (d < D) (fVec::loadu(vm + d, D - d) + load_f(row + d, D - d)).store(vm + d, D - d);
      }
      const float inv = 1.0f / static_cast<float>(ri.n_valid);
      for (int64_t d = 0; d < D; ++d) vm[d] *= inv;
    }
  }
  const float* head_stats = P.head_stats + task * G * 2;
  for (int64_t g = 0; g < G; ++g) {
    float m = -INFINITY;
    for (int64_t sp = 0; sp < n_used; ++sp) m = std::max(m, partials[(sp * G + g) * pstride]);
    float l = 0.0f, alpha_num = 0.0f;
    float* y = ws.sel_exact;  // D floats of scratch
    for (int64_t d = 0; d < D; ++d) y[d] = 0.0f;
    for (int64_t sp = 0; sp < n_used; ++sp) {
      const float* part = partials + (sp * G + g) * pstride;
      const float w = softmax_rescale(part[0], m);
      l += part[1] * w;
      alpha_num += part[2];
      for (int64_t d = 0; d < D; ++d) y[d] += part[3 + d] * w;
    }
    const float hl = head_stats[2 * g + 1];
    float y_scale = 1.0f;
    if (P.sinks) {
      // The sink joins the exact softmax's denominator (no value), and counts as selected in
      // alpha (docs/design.md): k >= the valid length stays dense attention with the sink.
      const float sink = P.sinks[h * G + g], m_all = std::max(m, sink);
      y_scale = softmax_rescale(m, m_all);
      l = l * y_scale + std::exp(sink - m_all);
      if (P.reallocate && hl > 0.0f) alpha_num += std::exp(sink - head_stats[2 * g]);
    }
    const float inv_l = y_scale / std::max(l, kTiny);
    const float alpha = !(hl <= 0.0f) ? alpha_num / hl : 0.0f;  // NaN stays NaN (math.h)
    for (int64_t d = 0; d < D; ++d) {
      const float yv = y[d] * inv_l;
      out[g * D + d] = static_cast<T>(P.reallocate ? reallocate_mix(alpha, yv, vm[d]) : yv);
    }
  }
}

// f(item, thread) for item in [0, n), items handed out one at a time from a shared counter:
// balances uneven items (ragged rows) and keeps going when one thread is descheduled on a
// busy machine, where a static partitioning would wait for it. `thread` indexes per-thread scratch.
template <typename F>
void dynamic_for(int64_t n, const F& f) {
  if (n <= 0) return;
  const int64_t nt = std::min<int64_t>(std::max(1, at::get_num_threads()), n);
  if (nt == 1 || at::in_parallel_region()) {  // nested call: serial, on this call's scratch 0
    for (int64_t i = 0; i < n; ++i) f(i, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    const int tid = static_cast<int>(std::clamp<int64_t>(at::get_thread_num(), 0, nt - 1));
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed))
      f(i, tid);
  });
}

// ---------------------------------------------------------------------------------------
// Driver.
// ---------------------------------------------------------------------------------------
template <typename T, typename KT, typename Pos>
void run(Problem<Pos>& P, int64_t local_window, const at::Tensor& seq_lens,
         const at::TensorOptions& byte_opts) {
  const int64_t B = P.B, S = P.S, G = P.G, D = P.D, r = P.r;
  const int64_t tasks = B * P.Hkv;

  // Valid span of each batch row (cheap: reads seq_lens and L bytes of mask).
  std::vector<RowInfo> rows(B);
  const int64_t* lens = seq_lens.defined() ? seq_lens.data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    RowInfo ri{0, lens ? std::clamp<int64_t>(lens[b], 0, S) : S, 0, 0};
    if (P.mask) {
      const bool* m = P.mask + b * S;
      while (ri.end > 0 && !m[ri.end - 1]) --ri.end;
      while (ri.begin < ri.end && !m[ri.begin]) ++ri.begin;
      ri.win_start = ri.end;
      int64_t in_window = 0;
      for (int64_t s = ri.end - 1; s >= ri.begin; --s) {
        if (!m[s]) continue;
        ++ri.n_valid;
        if (in_window < local_window) {
          ++in_window;
          ri.win_start = s;
        }
      }
    } else {
      ri.n_valid = ri.end;
      ri.win_start = std::max<int64_t>(0, ri.end - local_window);
    }
    rows[b] = ri;
  }
  P.rows = rows.data();

  // Work items: whole (b, h) tasks when there are enough of them for the threads (selection
  // scores and attend partials then stay in the thread's cache); otherwise the stages run as
  // separate parallel loops over (task, tile) and (task, partition). Same tiles and partitions
  // either way, merged in the same order, so results do not depend on the thread count.
  const int nthreads = std::max(1, at::get_num_threads());
  const bool per_task = tasks >= nthreads || (P.n_tiles == 1 && P.n_partitions == 1);
  const int64_t part_floats = P.n_partitions * G * (D + 3);
  const bool buffer_values = D * int64_t{sizeof(T)} <= kBufferedValueRowBytes;

  // Global arrays and per-thread scratch in one byte buffer (64-byte aligned pieces).
  int64_t bytes = 0;
  auto reserve = [&bytes](int64_t n) {
    const int64_t at = bytes;
    bytes += round_up(n, 64);
    return at;
  };
  const int64_t o_i1 = reserve(tasks * r * 8);
  const int64_t o_qf = reserve(tasks * G * D * 4);
  const int64_t o_qh = reserve(tasks * G * P.rpad * 4);
  const int64_t o_stats = reserve(tasks * P.n_tiles * G * 2 * 4);
  const int64_t o_range = reserve(tasks * P.n_tiles * 2 * 4);
  const int64_t o_sel = reserve(tasks * P.kpad * 8);
  const int64_t o_nsel = reserve(tasks * 8);
  const int64_t o_hstats = reserve(tasks * G * 2 * 4);
  const int64_t o_parts = reserve(per_task ? 0 : tasks * part_floats * 4);
  const int64_t o_scores = reserve(per_task ? 0 : tasks * S * 4);
  const int64_t scratch_begin = bytes;
  const int64_t scratch_sizes[] = {
      per_task ? S * 4 : 0,                          // scores
      G * kSub * 4,                                  // logits
      P.key_t ? 0 : r * kSub * 4,                    // gathered
      std::max(G * kPartitionLen, D) * 4,                   // sel_exact (also merge scratch)
      G * kPartitionLen * 4,                                // sel_approx
      P.rpad * 4,                                    // key_cols
      D * 4,                                         // v_mean
      per_task ? part_floats * 4 : 0,                // partials
      buffer_values ? kPartitionLen * D * int64_t{sizeof(T)} : 0,  // value_buffer
      P.key_t && std::is_same_v<Pos, PagedPositions> ? r * kSub * int64_t{sizeof(KT)} : 0,  // key_t_rows
      P.key_t_scale ? kSub * 4 : 0,  // key_t_scales (paged, or a scale with strided positions)
  };
  for (const int64_t n : scratch_sizes) reserve(n);
  const int64_t scratch_bytes = bytes - scratch_begin;
  bytes += scratch_bytes * (nthreads - 1);
  at::Tensor buffer = at::empty({bytes + 64}, byte_opts);
  char* base = reinterpret_cast<char*>(
      round_up(reinterpret_cast<int64_t>(buffer.data_ptr<uint8_t>()), 64));
  P.i1 = reinterpret_cast<int64_t*>(base + o_i1);
  P.q_f32 = reinterpret_cast<float*>(base + o_qf);
  P.q_hat = reinterpret_cast<float*>(base + o_qh);
  P.tile_stats = reinterpret_cast<float*>(base + o_stats);
  P.tile_range = reinterpret_cast<float*>(base + o_range);
  P.sel_idx = reinterpret_cast<int64_t*>(base + o_sel);
  P.n_sel = reinterpret_cast<int64_t*>(base + o_nsel);
  P.head_stats = reinterpret_cast<float*>(base + o_hstats);
  P.partials = reinterpret_cast<float*>(base + o_parts);
  float* global_scores = reinterpret_cast<float*>(base + o_scores);

  auto scratch_for = [&](int tid) {
    char* p = base + scratch_begin + scratch_bytes * tid;
    constexpr int kPieces = sizeof(scratch_sizes) / sizeof(scratch_sizes[0]);
    char* piece[kPieces];
    for (int i = 0; i < kPieces; ++i) {
      piece[i] = p;
      p += round_up(scratch_sizes[i], 64);
    }
    Scratch ws;
    ws.scores = reinterpret_cast<float*>(piece[0]);
    ws.logits = reinterpret_cast<float*>(piece[1]);
    ws.gathered = reinterpret_cast<float*>(piece[2]);
    ws.sel_exact = reinterpret_cast<float*>(piece[3]);
    ws.sel_approx = reinterpret_cast<float*>(piece[4]);
    ws.key_cols = reinterpret_cast<float*>(piece[5]);
    ws.v_mean = reinterpret_cast<float*>(piece[6]);
    ws.partials = reinterpret_cast<float*>(piece[7]);
    ws.value_buffer = buffer_values ? piece[8] : nullptr;
    ws.key_t_rows = piece[9];
    ws.key_t_scales = reinterpret_cast<float*>(piece[10]);
    return ws;
  };
  const int64_t partition_floats = G * (D + 3);

  if (per_task) {
    dynamic_for(tasks, [&](int64_t task, int tid) {
      const Scratch ws = scratch_for(tid);
      prep_query<T, Pos>(P, task);
      for (int64_t c = 0; c < P.n_tiles; ++c) approx_logits_tile<T, KT, Pos>(P, task, c, ws.scores, ws);
      topk_task<T, Pos>(P, task, ws.scores, ws);
      for (int64_t sp = 0; sp < P.n_partitions; ++sp)
        attend_partition<T, KT, Pos>(P, task, sp, ws.scores, ws.partials + sp * partition_floats, ws);
      merge_task<T, Pos>(P, task, ws.partials, ws);
    });
  } else {  // few (b, h): tiles of the sequence and partitions of the selected rows too
    dynamic_for(tasks, [&](int64_t task, int) { prep_query<T, Pos>(P, task); });
    dynamic_for(tasks * P.n_tiles, [&](int64_t w, int tid) {
      const int64_t task = w / P.n_tiles;
      approx_logits_tile<T, KT, Pos>(P, task, w % P.n_tiles, global_scores + task * S, scratch_for(tid));
    });
    dynamic_for(tasks, [&](int64_t task, int tid) {
      topk_task<T, Pos>(P, task, global_scores + task * S, scratch_for(tid));
    });
    dynamic_for(tasks * P.n_partitions, [&](int64_t w, int tid) {
      const int64_t task = w / P.n_partitions;
      attend_partition<T, KT, Pos>(P, task, w % P.n_partitions, global_scores + task * S,
                      P.partials + w * partition_floats, scratch_for(tid));
    });
    dynamic_for(tasks, [&](int64_t task, int tid) {
      merge_task<T, Pos>(P, task, P.partials + task * P.n_partitions * partition_floats, scratch_for(tid));
    });
  }
}

// A view whose last dim is contiguous (strides elsewhere are followed, so expanded or sliced
// caches are read in place), else a contiguous copy.
at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.stride(-1) == 1 || t.size(-1) == 1) ? t : t.contiguous();
}

}  // namespace
}  // namespace cpu

at::Tensor select_topk_cpu(const at::Tensor& scores, int64_t want, bool histogram_only) {
  TORCH_CHECK(scores.dim() == 1 && scores.scalar_type() == at::kFloat && scores.is_cpu(),
              "scores must be a 1-D float32 CPU tensor");
  TORCH_CHECK(scores.numel() < (int64_t{1} << 31), "scores must hold fewer than 2^31 values");
  TORCH_CHECK(want >= 0, "want must be >= 0, got ", want);
  const at::Tensor x = scores.contiguous();
  const float* data = x.data_ptr<float>();
  const int64_t n = x.numel();
  float lo = INFINITY, hi = -INFINITY;
  for (int64_t i = 0; i < n; ++i)
    if (std::isfinite(data[i])) {
      lo = std::min(lo, data[i]);
      hi = std::max(hi, data[i]);
    }
  at::Tensor out = at::empty({std::min(want, n)}, x.options().dtype(at::kLong));
  const int64_t taken =
      histogram_only ? cpu::select_topk_histogram(data, 0, n, want, lo, hi, out.data_ptr<int64_t>())
                     : cpu::select_topk(data, 0, n, want, lo, hi, out.data_ptr<int64_t>());
  return out.narrow(0, 0, taken);
}

namespace cpu {
namespace {

// The fields both operators fill alike: shapes, budget and the query, value_mean and output.
// `S`: positions addressable per batch row (the contiguous cache's length; the paged cache's
// longest row).
template <typename Pos>
Problem<Pos> make_problem(int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D, int64_t r,
                          int64_t k, bool reallocate, std::optional<double> scale,
                          const at::Tensor& query, const at::Tensor& value_mean, at::Tensor& out) {
  Problem<Pos> P{};
  P.B = B;
  P.Hq = Hq;
  P.Hkv = Hkv;
  P.G = Hq / Hkv;
  P.S = S;
  P.D = D;
  P.r = r;
  P.k = k;
  P.rpad = round_up(r, kVec);
  P.kpad = round_up(std::min(k, S), kVec);
  P.n_tiles = ceil_div(S, kTileLen);
  P.n_partitions = ceil_div(std::min(k, S), kPartitionLen);
  P.scale = static_cast<float>(scale ? *scale : 1.0 / std::sqrt(static_cast<double>(D)));
  P.reallocate = reallocate;
  P.query = query.data_ptr();
  P.value_mean = value_mean.defined() ? value_mean.data_ptr() : nullptr;
  P.out = out.data_ptr();
  return P;
}

// fp32 accumulation for every dtype; one template, no per-dtype copies. key_t in the query's
// dtype, or int8 (the 8-bit selection cache, P.key_t_scale set).
template <typename T, typename Pos>
void run_for_key_t(Problem<Pos>& P, int64_t local_window, const at::Tensor& lens,
                   const at::TensorOptions& byte_opts) {
  if (P.key_t_scale)
    run<T, int8_t>(P, local_window, lens, byte_opts);
  else
    run<T, T>(P, local_window, lens, byte_opts);
}

template <typename Pos>
void dispatch_run(Problem<Pos>& P, int64_t local_window, const at::Tensor& lens,
                  const at::Tensor& query) {
  const auto byte_opts = query.options().dtype(at::kByte);
  AT_DISPATCH_SWITCH(query.scalar_type(), "sparq_attention_cpu",
                     AT_DISPATCH_CASE(at::kFloat, [&] { run_for_key_t<scalar_t>(P, local_window, lens, byte_opts); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { run_for_key_t<scalar_t>(P, local_window, lens, byte_opts); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { run_for_key_t<scalar_t>(P, local_window, lens, byte_opts); }));
}

// Strides of a (blocks or batch, heads, positions, ...) tensor as a position policy.
StridedPositions strided_positions(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2)};
}

}  // namespace
}  // namespace cpu

at::Tensor attention_cpu(SPARQ_ATTENTION_ARGS, SPARQ_SOFTMAX_VARIANT_ARGS,
                         SPARQ_KEY_T_SCALE_ARG, SPARQ_COMPONENT_WEIGHTS_ARG) {
  const AttentionDims d =
      check_attention_args(query, key, value, r, k, key_t, value_mean, seq_lens, attn_mask,
                           local_window, key_t_scale, component_weights);
  check_softmax_variants(query, d.Hq, softcap, sinks);
  TORCH_CHECK(query.device().is_cpu(), "query must be a CPU tensor for the CPU kernel");
  // (paged rows are shorter: seq_lens is int32)
  TORCH_CHECK(d.S < (int64_t{1} << 31), "key must hold fewer than 2^31 positions for the CPU "
              "kernel (its top-k histogram counts are 32-bit), got S = ", d.S);
  const at::Tensor q = query.contiguous();
  const at::Tensor key_rows = cpu::rows_contiguous(key);
  const at::Tensor value_rows = cpu::rows_contiguous(value);
  const at::Tensor key_t_rows = key_t ? cpu::rows_contiguous(*key_t) : at::Tensor();
  const at::Tensor v_mean = value_mean ? value_mean->contiguous() : at::Tensor();
  const at::Tensor lens = seq_lens ? seq_lens->to(at::kLong).contiguous() : at::Tensor();
  const at::Tensor mask = attn_mask ? mask_as_batch_by_seq(*attn_mask, d.B, d.S) : at::Tensor();
  at::Tensor out = at::empty({d.B, d.Hq, 1, d.D}, query.options());

  auto P = cpu::make_problem<cpu::StridedPositions>(d.B, d.Hq, d.Hkv, d.S, d.D, r, k, reallocate,
                                                     scale, q, v_mean, out);
  P.key = key_rows.data_ptr();
  P.key_pos = cpu::strided_positions(key_rows);
  P.value = value_rows.data_ptr();
  P.value_pos = cpu::strided_positions(value_rows);
  if (key_t_rows.defined()) {  // (B, Hkv, D, S): position s of component 0 at b, h, 0, s
    P.key_t = key_t_rows.data_ptr();
    P.key_t_pos = {key_t_rows.stride(0), key_t_rows.stride(1), 1};
    P.kt_sd = key_t_rows.stride(2);
  }
  if (key_t_scale) {  // (B, Hkv, S), read in place whatever its strides
    P.key_t_scale = key_t_scale->data_ptr<float>();
    P.key_t_scale_pos = cpu::strided_positions(*key_t_scale);
  }
  P.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const at::Tensor weights = component_weights ? component_weights->contiguous() : at::Tensor();
  P.component_weights = weights.defined() ? weights.data_ptr<float>() : nullptr;
  const at::Tensor sink_logits = sinks ? sinks->contiguous() : at::Tensor();
  P.softcap = softcap ? static_cast<float>(*softcap) : 0.0f;
  P.sinks = sink_logits.defined() ? sink_logits.data_ptr<float>() : nullptr;
  cpu::dispatch_run(P, local_window, lens, query);
  return out;
}

at::Tensor paged_attention_cpu(SPARQ_PAGED_ATTENTION_ARGS, SPARQ_SOFTMAX_VARIANT_ARGS,
                               SPARQ_KEY_T_SCALE_ARG, SPARQ_VALUE_SUMS_ARG,
                               SPARQ_COMPONENT_WEIGHTS_ARG) {
  const PagedDims d = check_paged_attention_args(query, key_cache, value_cache, block_table,
                                                 seq_lens, r, k, key_t_cache, value_mean,
                                                 local_window, key_t_scale, value_sums_cache,
                                                 component_weights);
  check_softmax_variants(query, d.Hq, softcap, sinks);
  TORCH_CHECK(query.device().is_cpu(), "query must be a CPU tensor for the CPU kernel");
  const at::Tensor lens = seq_lens.to(at::kLong).contiguous();
  const int64_t* len = lens.data_ptr<int64_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int64_t bt_sr = block_table.stride(0), bt_sc = block_table.stride(1);
  // The table entries a row uses must name real blocks: checked here, before any is followed
  // (R * max_blocks reads at most, against the cache rows the step reads).
  const int64_t capacity = d.max_blocks * d.block_size;
  int64_t longest = 0;
  for (int64_t i = 0; i < d.R; ++i) {
    TORCH_CHECK(len[i] >= 0 && len[i] <= capacity,
                "seq_lens must lie in [0, max_blocks * block_size = ", capacity, "], got ", len[i],
                " in row ", i);
    for (int64_t j = 0; j < ceil_div(len[i], d.block_size); ++j) {
      const int32_t id = table[i * bt_sr + j * bt_sc];
      TORCH_CHECK(id >= 0 && id < d.num_blocks, "block_table must hold block ids in [0, "
                  "num_blocks=", d.num_blocks, ") for the blocks within seq_lens, got ", id,
                  " at [", i, ", ", j, "]");
    }
    longest = std::max(longest, len[i]);
  }
  const at::Tensor q = query.contiguous();
  // Rows of D contiguous elements are read in place (any other strides); otherwise a copy.
  const at::Tensor key_rows = cpu::rows_contiguous(key_cache);
  const at::Tensor value_rows = cpu::rows_contiguous(value_cache);
  const at::Tensor v_mean = value_mean ? value_mean->contiguous() : at::Tensor();
  at::Tensor out = at::empty({d.R, d.Hq, d.D}, query.options());

  // Work is bounded by the longest row, not by the table's capacity; an all-empty batch still
  // runs (on one position no row reads) so that every row gets its zeros the usual way.
  auto P = cpu::make_problem<cpu::PagedPositions>(d.R, d.Hq, d.Hkv, std::max<int64_t>(longest, 1),
                                                   d.D, r, k, reallocate, scale, q, v_mean, out);
  auto paged = [&](const at::Tensor& t, int64_t s_pos) {
    return cpu::PagedPositions{table, bt_sr, bt_sc, d.block_size, t.stride(0), t.stride(1), s_pos};
  };
  P.key = key_rows.data_ptr();
  P.key_pos = paged(key_rows, key_rows.stride(2));
  P.value = value_rows.data_ptr();
  P.value_pos = paged(value_rows, value_rows.stride(2));
  if (key_t_cache) {  // (num_blocks, Hkv, D, block_size), read in place whatever its strides
    P.key_t = key_t_cache->data_ptr();
    P.key_t_pos = paged(*key_t_cache, key_t_cache->stride(3));
    P.kt_sd = key_t_cache->stride(2);
  }
  if (key_t_scale) {  // (num_blocks, Hkv, block_size), read in place whatever its strides
    P.key_t_scale = key_t_scale->data_ptr<float>();
    P.key_t_scale_pos = paged(*key_t_scale, key_t_scale->stride(2));
  }
  const at::Tensor value_sums =
      value_sums_cache ? cpu::rows_contiguous(*value_sums_cache) : at::Tensor();
  if (value_sums.defined()) {  // (num_blocks, Hkv, D): one row per block, whatever the offset
    P.value_sums = value_sums.data_ptr<float>();
    P.value_sums_pos = paged(value_sums, 0);
    P.value_sums_step = d.block_size;
  }
  const at::Tensor weights = component_weights ? component_weights->contiguous() : at::Tensor();
  P.component_weights = weights.defined() ? weights.data_ptr<float>() : nullptr;
  const at::Tensor sink_logits = sinks ? sinks->contiguous() : at::Tensor();
  P.softcap = softcap ? static_cast<float>(*softcap) : 0.0f;
  P.sinks = sink_logits.defined() ? sink_logits.data_ptr<float>() : nullptr;
  cpu::dispatch_run(P, local_window, lens, query);
  return out;
}

}  // namespace sparq
