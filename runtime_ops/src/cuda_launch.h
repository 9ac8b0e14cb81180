// cuda_launch.h -- the launch arithmetic of the CUDA kernel (cuda_kernels.cuh),
// plain C++ with no CUDA include, so that a host program tests the very code
// the launcher runs (runtime_ops/tests/launch_test.cc, run by
// tests/test_cuda_build.py): how a tensor splits into a scalar head, 16-byte
// packs and a scalar tail, and how many blocks the grid has.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace normact {
namespace cuda {

constexpr int kThreads = 256;  // threads per block (the kernels' __launch_bounds__)
constexpr size_t kVectorBytes = 16;

// How one launch covers n elements of `esize` bytes at x (read) and y (write):
//   [0, head)                     scalar, by threads 0 .. head-1
//   [head, head + packs * lanes)  16-byte packs of `lanes` elements, grid-stride
//   [head + packs * lanes, n)     scalar tail (fewer than `lanes` elements)
// lanes == 1 (no vector path) when x and y are not at the same offset within
// 16 bytes, or an address is not a multiple of the element size; then
// packs == n and head == 0.
struct Split {
  size_t head, packs;
  int lanes;
};

inline Split split_elements(uintptr_t x, uintptr_t y, size_t n, size_t esize) {
  const size_t lanes = kVectorBytes / esize;
  const size_t mx = x % kVectorBytes, my = y % kVectorBytes;
  if (mx != my || mx % esize != 0) return Split{0, n, 1};
  size_t head = ((kVectorBytes - mx) % kVectorBytes) / esize;
  if (head > n) head = n;
  return Split{head, (n - head) / lanes, static_cast<int>(lanes)};
}

// Blocks for `work` grid-stride items (at least one, to run the head and the
// tail): enough to give each thread one item, capped at one full wave of
// resident blocks (`blocks_per_sm` from the occupancy API times the SM count);
// beyond that each thread loops.  The result fits a grid's x dimension.
inline unsigned grid_blocks(size_t work, int sm_count, int blocks_per_sm) {
  size_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks == 0) blocks = 1;
  const size_t wave = static_cast<size_t>(sm_count > 0 ? sm_count : 1) *
                      static_cast<size_t>(blocks_per_sm > 0 ? blocks_per_sm : 1);
  if (blocks > wave) blocks = wave;
  return static_cast<unsigned>(blocks);
}

// How many times the busiest thread goes round the grid-stride loop.
inline size_t grid_passes(size_t work, unsigned blocks) {
  const size_t threads = static_cast<size_t>(blocks) * kThreads;
  return (work + threads - 1) / threads;
}

}  // namespace cuda
}  // namespace normact
