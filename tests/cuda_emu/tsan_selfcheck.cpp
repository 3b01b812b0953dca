// Shows that the emulator under ThreadSanitizer sees races between the threads of a block: a
// kernel that reads shared memory another thread wrote without a barrier must be reported,
// the same kernel with __syncthreads must not. From the repository root:
//
//   g++ -std=c++20 -O1 -g -fsanitize=thread -x c++ -include tests/cuda_emu/emu.h \
//     -I/usr/local/cuda/include tests/cuda_emu/tsan_selfcheck.cpp -o /tmp/tsan_selfcheck
//   /tmp/tsan_selfcheck          # clean: no report
//   /tmp/tsan_selfcheck racy     # one "data race" report
#include <cstdio>

__global__ void read_after_write(int* out, bool barrier) {
  __shared__ int x;
  if (threadIdx.x == 0) x = 1;
  if (barrier) __syncthreads();
  if (threadIdx.x == 1) out[0] = x;
}

int main(int argc, char**) {
  int out = 0;
  sparq_emu::launch(read_after_write, dim3(1), dim3(32), nullptr, &out, argc == 1);
  std::printf("out=%d\n", out);
  return 0;
}
