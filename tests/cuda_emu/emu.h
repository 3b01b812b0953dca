// A small CPU emulator of the CUDA execution model, just enough to run csrc/cuda/*.cu as
// host code (g++ -x c++ -include emu.h -DSPARQ_CUDA_EMULATION) in the CPU test-suite:
// every CUDA thread of a block is a std::thread, blocks run one after another, __shared__
// variables become function statics (one block at a time, so one copy suffices),
// __syncthreads is a std::barrier, and the warp intrinsics (shfl, ballot, match_any) are
// rendezvous of exactly the lanes in their mask. Slow and only for small shapes, but it
// executes the kernels' real indexing, synchronisation and arithmetic without a GPU.
// A warp collective or barrier that never completes (a divergence bug) aborts after 20 s.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

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
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace sparq_emu {

using Clock = std::chrono::steady_clock;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "sparq_emu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// Rendezvous of the lanes in `mask`: each deposits a 64-bit value and gets all of them.
struct Collective {
  unsigned mask = 0, joined = 0;
  int left = 0;
  bool done = false;
  uint64_t vals[32] = {};
};

struct Warp {
  std::mutex mu;
  std::condition_variable cv;
  std::list<std::shared_ptr<Collective>> open;

  void exchange(int lane, unsigned mask, uint64_t val, uint64_t (&out)[32]) {
    if (!(mask >> lane & 1u)) fail("warp intrinsic called by a lane outside its mask");
    std::unique_lock<std::mutex> lock(mu);
    std::shared_ptr<Collective> c;
    for (auto& o : open)
      if (o->mask == mask && !o->done && !(o->joined >> lane & 1u)) {
        c = o;
        break;
      }
    if (!c) {
      c = std::make_shared<Collective>();
      c->mask = mask;
      open.push_back(c);
    }
    c->vals[lane] = val;
    c->joined |= 1u << lane;
    if (c->joined == mask) {
      c->done = true;
      cv.notify_all();
    } else if (!cv.wait_until(lock, Clock::now() + std::chrono::seconds(20),
                              [&] { return c->done; })) {
      fail("warp collective never completed (lanes of its mask diverged or exited)");
    }
    std::memcpy(out, c->vals, sizeof(out));
    if (++c->left == __builtin_popcount(mask)) open.remove(c);
  }
};

struct Block {
  Block(int n, size_t smem_words)
      : barrier(n), warps((n + 31) / 32), dynamic_smem(smem_words) {}
  std::barrier<> barrier;
  std::vector<Warp> warps;
  std::vector<std::max_align_t> dynamic_smem;  // extern __shared__ (SPARQ_DYNAMIC_SMEM)
};

struct ThreadCtx {
  uint3 thread_idx{}, block_idx{};
  dim3 block_dim{}, grid_dim{};
  Block* block = nullptr;
};

inline ThreadCtx& tls() {
  thread_local ThreadCtx ctx;
  return ctx;
}

inline int lane_id() { return static_cast<int>(tls().thread_idx.x & 31u); }

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
  ThreadCtx& t = tls();
  t.block->warps[t.thread_idx.x / 32].exchange(lane_id(), mask, to_bits(v), out);
}

template <typename Kernel, typename... Args>
void launch_smem(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t,
                 Args... args) {
  if (block.y != 1 || block.z != 1 || block.x % 32 != 0 || block.x > 1024)
    fail("the emulator supports 1-D blocks of whole warps");
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk(static_cast<int>(block.x),
                  (smem_bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t));
        std::vector<std::thread> threads;
        threads.reserve(block.x);
        for (unsigned tx = 0; tx < block.x; ++tx) {
          threads.emplace_back([&, tx] {
            ThreadCtx& t = tls();
            t.thread_idx = make_uint3(tx, 0, 0);
            t.block_idx = make_uint3(bx, by, bz);
            t.block_dim = block;
            t.grid_dim = grid;
            t.block = &blk;
            kernel(args...);
            blk.barrier.arrive_and_drop();  // exited threads no longer hold barriers up
          });
        }
        for (auto& th : threads) th.join();
      }
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, cudaStream_t stream, Args... args) {
  launch_smem(kernel, grid, block, 0, stream, args...);
}

inline void* dynamic_smem() { return tls().block->dynamic_smem.data(); }

}  // namespace sparq_emu

#define threadIdx (::sparq_emu::tls().thread_idx)
#define blockIdx (::sparq_emu::tls().block_idx)
#define blockDim (::sparq_emu::tls().block_dim)
#define gridDim (::sparq_emu::tls().grid_dim)

inline void __syncthreads() { ::sparq_emu::tls().block->barrier.arrive_and_wait(); }

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

using std::max;
using std::min;

// Launch errors are reported by the emulator itself (it aborts); attributes do not apply.
#define cudaGetLastError() cudaSuccess
#define cudaFuncSetAttribute(...) cudaSuccess
