// A small CPU emulator of the CUDA execution model, just enough to run csrc/cuda/*.cu as
// host code (g++ -x c++ -include emu.h -DSPARQ_CUDA_EMULATION) in the CPU test-suite.
//
// Blocks run concurrently, one OS thread ("worker") per block in flight, so inter-block
// protocols (global atomics, the last-block-done counters of topk and attend, fences) really
// race, and ThreadSanitizer sees them. Inside a block every CUDA thread is a fiber (ucontext)
// of the block's worker, scheduled cooperatively: __syncthreads and the warp intrinsics
// (shfl, ballot, match_any: rendezvous of exactly the lanes in their mask) are the points
// where a fiber yields. __shared__ variables become `static thread_local`: one copy per
// worker, i.e. per block in flight, shared by that block's fibers. A barrier or warp
// collective that can never complete (a divergence bug) is detected at once and aborts.
//
// Also emulated: the 48 KiB default limit on dynamic shared memory (a larger launch fails
// with cudaErrorInvalidValue unless cudaFuncSetAttribute raised the kernel's limit, up to
// the emulated device's opt-in maximum), cudaGetLastError, and the device attribute queries
// the launchers use. Slow and only for small shapes, but it executes the kernels' real
// indexing, synchronisation and arithmetic without a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cuda_runtime_api.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__SANITIZE_THREAD__)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_ignore_thread_begin(void);
void __tsan_ignore_thread_end(void);
}
#define SPARQ_EMU_TSAN 1
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define SPARQ_EMU_ASAN 1
#endif

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static thread_local
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace sparq_emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "sparq_emu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// The emulated device: an H100-like SM count and sm_90's opt-in shared memory limit. Tests
// lower the opt-in maximum (sm_86/89/120: 99 KiB) through set_device().
struct Device {
  int sm_count = 132;
  int max_smem_optin = 227 * 1024;
};
inline Device& device() {
  static Device d;
  return d;
}
constexpr size_t kDefaultSmemLimit = 48 * 1024;

inline std::mutex& attr_mutex() {
  static std::mutex mu;
  return mu;
}
inline std::map<const void*, int>& smem_attr() {  // kernel -> max dynamic smem opted in
  static std::map<const void*, int> m;
  return m;
}
inline std::atomic<int>& attr_calls() {  // cudaFuncSetAttribute calls (tests count them)
  static std::atomic<int> n{0};
  return n;
}
// Under ThreadSanitizer the fibers of a block are separate TSan threads that switch without
// synchronising, so races between CUDA threads of a block are reported; the emulator's own
// bookkeeping (block state, collectives, barrier counters) is hidden from TSan by this guard,
// and barriers / collectives publish happens-before edges explicitly (sync_release/acquire,
// per block and per warp). A fiber's first switch-in synchronises with the scheduler (what it
// set up), and the scheduler acquires every exited fiber's work when the block is done (so
// shared memory reused by the next block on the worker, and the launch's results, are ordered).
struct TsanIgnore {
#ifdef SPARQ_EMU_TSAN
  TsanIgnore() { __tsan_ignore_thread_begin(); }
  ~TsanIgnore() { __tsan_ignore_thread_end(); }
#else
  TsanIgnore() {}  // user-provided: no unused-variable warning at the call sites
#endif
};

inline cudaError_t& last_error() {
  thread_local cudaError_t e = cudaSuccess;
  return e;
}

// ---- fibers ------------------------------------------------------------------------------
constexpr size_t kFiberStack = 256 * 1024;

struct Block;

struct Fiber {
  ucontext_t ctx{};
  void* stack = nullptr;
  bool finished = false;
  bool started = false;
  uint3 thread_idx{};
#ifdef SPARQ_EMU_TSAN
  void* tsan_fiber = nullptr;
#endif
};

// Rendezvous of the lanes in `mask`: each deposits a 64-bit value and gets all of them.
struct Collective {
  unsigned mask = 0, joined = 0;
  int left = 0;
  bool done = false;
  uint64_t vals[32] = {};
};

struct Warp {
  std::list<std::shared_ptr<Collective>> open;
  char tsan_token = 0;  // happens-before token of this warp's collectives
};

struct Block {
  uint3 block_idx{};
  dim3 block_dim{}, grid_dim{};
  std::vector<Fiber>* fibers = nullptr;
  std::vector<Warp> warps;
  unsigned char* dynamic_smem = nullptr;
  int alive = 0, arrived = 0;
  uint64_t barrier_gen = 0;
  uint64_t epoch = 0;  // bumped on every state change: detects a round without progress
  Fiber* current = nullptr;
  ucontext_t sched_ctx{};
  char sync_addr = 0;   // ThreadSanitizer's happens-before token of the block's barriers
  char exit_token = 0;  // released by exiting fibers, acquired once the block is done
#ifdef SPARQ_EMU_TSAN
  void* sched_tsan = nullptr;
#endif
};

inline Block*& current_block() {
  thread_local Block* b = nullptr;
  return b;
}

struct ThreadCtx {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim, grid_dim;
};

inline uint3 thread_idx() {
  TsanIgnore guard;
  return current_block()->current->thread_idx;
}
inline uint3 block_idx() {
  TsanIgnore guard;
  return current_block()->block_idx;
}
inline dim3 block_dim() {
  TsanIgnore guard;
  return current_block()->block_dim;
}
inline dim3 grid_dim() {
  TsanIgnore guard;
  return current_block()->grid_dim;
}

// Back to the block's scheduler; returns when the scheduler resumes this fiber.
inline void yield() {
  Block* b = current_block();
  Fiber* f = b->current;
#ifdef SPARQ_EMU_TSAN
  __tsan_switch_to_fiber(b->sched_tsan, 1);
#endif
#ifdef SPARQ_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, nullptr, 0);
#endif
  swapcontext(&f->ctx, &b->sched_ctx);
#ifdef SPARQ_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

inline void sync_release(void* token) {
#ifdef SPARQ_EMU_TSAN
  __tsan_release(token);
#else
  (void)token;
#endif
}
inline void sync_acquire(void* token) {
#ifdef SPARQ_EMU_TSAN
  __tsan_acquire(token);
#else
  (void)token;
#endif
}

inline int lane_id() { return static_cast<int>(thread_idx().x & 31u); }

inline void exchange(unsigned mask, uint64_t val, uint64_t (&out)[32]) {
  TsanIgnore guard;
  Block* b = current_block();
  const int lane = lane_id();
  if (!(mask >> lane & 1u)) fail("warp intrinsic called by a lane outside its mask");
  Warp& w = b->warps[thread_idx().x / 32];
  std::shared_ptr<Collective> c;
  for (auto& o : w.open)
    if (o->mask == mask && !o->done && !(o->joined >> lane & 1u)) {
      c = o;
      break;
    }
  if (!c) {
    c = std::make_shared<Collective>();
    c->mask = mask;
    w.open.push_back(c);
  }
  c->vals[lane] = val;
  c->joined |= 1u << lane;
  ++b->epoch;
  sync_release(&w.tsan_token);
  if (c->joined == mask) c->done = true;
  while (!c->done) yield();
  sync_acquire(&w.tsan_token);
  std::memcpy(out, c->vals, sizeof(out));
  if (++c->left == __builtin_popcount(mask)) w.open.remove(c);
}

inline void syncthreads() {
  TsanIgnore guard;
  Block* b = current_block();
  const uint64_t gen = b->barrier_gen;
  ++b->epoch;
  sync_release(&b->sync_addr);
  if (++b->arrived == b->alive) {
    b->arrived = 0;
    ++b->barrier_gen;
  }
  while (b->barrier_gen == gen) yield();
  sync_acquire(&b->sync_addr);
}

template <typename Fn>
struct FiberStart {
  Fn* fn;
  Fiber* fiber;
};

template <typename Fn>
void fiber_entry(unsigned lo, unsigned hi) {
  auto* start = reinterpret_cast<FiberStart<Fn>*>((static_cast<uintptr_t>(hi) << 32) | lo);
#ifdef SPARQ_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  (*start->fn)();
#ifdef SPARQ_EMU_TSAN
  __tsan_ignore_thread_begin();  // ended right before the last switch
#endif
  Block* b = current_block();
  start->fiber->finished = true;
  ++b->epoch;
  sync_release(&b->exit_token);
  // An exited thread no longer holds barriers up (CUDA: exited threads do not count).
  if (--b->alive > 0 && b->arrived == b->alive) {
    b->arrived = 0;
    ++b->barrier_gen;
  }
#ifdef SPARQ_EMU_TSAN
  void* sched = b->sched_tsan;
  __tsan_ignore_thread_end();
  // Not synchronising: the fibers still running must not inherit this one's accesses (the
  // block's end acquires exit_token instead).
  __tsan_switch_to_fiber(sched, 1);
#endif
#ifdef SPARQ_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, nullptr, 0);
#endif
  setcontext(&b->sched_ctx);
}

// One block on the calling worker: its threads as fibers, round-robin until all exit.
template <typename Fn>
void run_block(Block& b, std::vector<Fiber>& fibers, Fn& body) {
  const int n = static_cast<int>(b.block_dim.x);
  b.fibers = &fibers;
  b.alive = n;
  b.warps.assign((n + 31) / 32, Warp{});
  current_block() = &b;
#ifdef SPARQ_EMU_TSAN
  b.sched_tsan = __tsan_get_current_fiber();
#endif
  std::vector<FiberStart<Fn>> starts(n);
  for (int t = 0; t < n; ++t) {
    Fiber& f = fibers[t];
    f.finished = false;
    f.started = false;
    f.thread_idx = make_uint3(static_cast<unsigned>(t), 0, 0);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kFiberStack;
    f.ctx.uc_link = nullptr;
    starts[t] = {&body, &f};
    const uintptr_t p = reinterpret_cast<uintptr_t>(&starts[t]);
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_entry<Fn>), 2,
                static_cast<unsigned>(p & 0xffffffffu), static_cast<unsigned>(p >> 32));
#ifdef SPARQ_EMU_TSAN
    f.tsan_fiber = __tsan_create_fiber(0);
#endif
  }
  int running = n;
  while (running > 0) {
    const uint64_t before = b.epoch;
    int waiting_on_progress = 0;
    for (int t = 0; t < n; ++t) {
      Fiber& f = fibers[t];
      if (f.finished) continue;
      b.current = &f;
      const bool first = !f.started;
      f.started = true;
#ifdef SPARQ_EMU_TSAN
      // Announced right before the switch: later accesses count as the fiber's.
      __tsan_switch_to_fiber(f.tsan_fiber, first ? 0 : 1);  // the first switch-in syncs
#else
      (void)first;
#endif
#ifdef SPARQ_EMU_ASAN
      void* fake = nullptr;
      __sanitizer_start_switch_fiber(&fake, f.stack, kFiberStack);
#endif
      swapcontext(&b.sched_ctx, &f.ctx);
#ifdef SPARQ_EMU_ASAN
      __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
      if (f.finished) --running;
      else ++waiting_on_progress;
    }
    if (running > 0 && b.epoch == before && waiting_on_progress == running)
      fail("deadlock: a barrier or warp collective can never complete (divergent lanes or "
           "threads that exited)");
  }
#ifdef SPARQ_EMU_TSAN
  __tsan_acquire(&b.exit_token);  // the block's work happens before whatever follows it
  for (int t = 0; t < n; ++t) __tsan_destroy_fiber(fibers[t].tsan_fiber);
#endif
  current_block() = nullptr;
}

inline int worker_count() {
  static const int n = [] {
    if (const char* env = std::getenv("SPARQ_EMU_WORKERS")) return std::max(1, std::atoi(env));
    return 4;
  }();
  return n;
}

template <typename Kernel, typename... Args>
void launch_smem(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t,
                 Args... args) {
  if (block.y != 1 || block.z != 1 || block.x % 32 != 0 || block.x > 1024 || block.x == 0)
    fail("the emulator supports 1-D blocks of whole warps");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem_bytes > kDefaultSmemLimit) {  // the GPU refuses this without the opt-in attribute
    std::lock_guard<std::mutex> lock(attr_mutex());
    const auto it = smem_attr().find(reinterpret_cast<const void*>(kernel));
    if (it == smem_attr().end() || static_cast<size_t>(it->second) < smem_bytes) {
      last_error() = cudaErrorInvalidValue;
      return;
    }
  }
  const int64_t n_blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  std::atomic<int64_t> next{0};
  auto work = [&] {
    std::vector<Fiber> fibers(block.x);
    for (auto& f : fibers) {
      f.stack = mmap(nullptr, kFiberStack, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (f.stack == MAP_FAILED) fail("cannot map a fiber stack");
    }
    std::vector<std::max_align_t> smem((smem_bytes + sizeof(std::max_align_t) - 1) /
                                       sizeof(std::max_align_t) + 1);
    for (int64_t i; (i = next.fetch_add(1)) < n_blocks;) {
      Block b;
      b.block_idx = make_uint3(static_cast<unsigned>(i % grid.x),
                               static_cast<unsigned>(i / grid.x % grid.y),
                               static_cast<unsigned>(i / grid.x / grid.y));
      b.block_dim = block;
      b.grid_dim = grid;
      b.dynamic_smem = reinterpret_cast<unsigned char*>(smem.data());
      auto body = [&] { kernel(args...); };
      run_block(b, fibers, body);
    }
    for (auto& f : fibers) munmap(f.stack, kFiberStack);
  };
  const int workers = static_cast<int>(std::min<int64_t>(worker_count(), n_blocks));
  std::vector<std::thread> pool;
  for (int w = 1; w < workers; ++w) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, cudaStream_t stream, Args... args) {
  launch_smem(kernel, grid, block, 0, stream, args...);
}

inline void* dynamic_smem() {
  TsanIgnore guard;
  return current_block()->dynamic_smem;
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp exchange of a wide type");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

template <typename T>
inline void warp_exchange(unsigned mask, T v, uint64_t (&out)[32]) {
  exchange(mask, to_bits(v), out);
}

}  // namespace sparq_emu

#define threadIdx (::sparq_emu::thread_idx())
#define blockIdx (::sparq_emu::block_idx())
#define blockDim (::sparq_emu::block_dim())
#define gridDim (::sparq_emu::grid_dim())

inline void __syncthreads() { ::sparq_emu::syncthreads(); }
// The emulator's atomics are sequentially consistent read-modify-writes, which already order
// the last-block-done pattern (fence, ticket atomic); a fence is kept outside ThreadSanitizer,
// which does not model fences.
#ifdef SPARQ_EMU_TSAN
inline void __threadfence() {}
#else
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
#endif

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int off) {
  uint64_t all[32];
  ::sparq_emu::warp_exchange(mask, v, all);
  const int src = ::sparq_emu::lane_id() ^ off;
  if (!(mask >> src & 1u)) ::sparq_emu::fail("__shfl_xor_sync from a lane outside the mask");
  return ::sparq_emu::from_bits<T>(all[src]);
}

template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned off) {
  uint64_t all[32];
  ::sparq_emu::warp_exchange(mask, v, all);
  const int lane = ::sparq_emu::lane_id();
  return lane >= static_cast<int>(off) ? ::sparq_emu::from_bits<T>(all[lane - off]) : v;
}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src) {
  uint64_t all[32];
  ::sparq_emu::warp_exchange(mask, v, all);
  return ::sparq_emu::from_bits<T>(all[src & 31]);
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  uint64_t all[32];
  ::sparq_emu::warp_exchange(mask, static_cast<uint32_t>(pred != 0), all);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && all[l]) bits |= 1u << l;
  return bits;
}

inline unsigned __match_any_sync(unsigned mask, unsigned v) {
  uint64_t all[32];
  ::sparq_emu::warp_exchange(mask, v, all);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && all[l] == v) bits |= 1u << l;
  return bits;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }

inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline float atomicAdd(float* p, float v) {
  uint32_t* u = reinterpret_cast<uint32_t*>(p);
  uint32_t old = __atomic_load_n(u, __ATOMIC_SEQ_CST), next;
  do {
    float f;
    std::memcpy(&f, &old, 4);
    f += v;
    std::memcpy(&next, &f, 4);
  } while (!__atomic_compare_exchange_n(u, &old, next, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST));
  float f;
  std::memcpy(&f, &old, 4);
  return f;
}
// Loads of data other blocks publish (after their fence and counter atomic).
template <typename T>
inline T sparq_emu_load_acquire(const T* p) {
  T v;
  __atomic_load(p, &v, __ATOMIC_ACQUIRE);
  return v;
}

using std::max;
using std::min;

inline cudaError_t sparq_emu_get_last_error() {
  const cudaError_t e = ::sparq_emu::last_error();
  ::sparq_emu::last_error() = cudaSuccess;
  return e;
}
#define cudaGetLastError() sparq_emu_get_last_error()

template <typename Kernel>
inline cudaError_t sparq_emu_func_set_attribute(Kernel kernel, cudaFuncAttribute attr, int v) {
  ::sparq_emu::attr_calls().fetch_add(1);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (v > ::sparq_emu::device().max_smem_optin) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(::sparq_emu::attr_mutex());
  ::sparq_emu::smem_attr()[reinterpret_cast<const void*>(kernel)] = v;
  return cudaSuccess;
}
#define cudaFuncSetAttribute(kernel, attr, v) sparq_emu_func_set_attribute(kernel, attr, v)
