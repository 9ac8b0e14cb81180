// launch_test.cc -- host test of the CUDA launch arithmetic (src/cuda_launch.h,
// the header the launcher in cuda_kernels.cuh uses).  Built and run by
// tests/test_cuda_build.py with the host C++ compiler; no GPU or CUDA needed.
//
// For every element size, pair of start offsets within 16 bytes (x and y), and
// size n, it replays the kernel's index plan over the grid grid_blocks() gives
// (head by threads < head, grid-stride packs, tail by threads < lanes) and
// checks that every element is written exactly once, every pack is 16-byte
// aligned in x and y, and the grid fits one wave; plus the size arithmetic of
// tensors beyond 2^31 elements.  Exit 0 = all passed; else the first failure.
#include <stdio.h>
#include <stdlib.h>

#include <vector>

#include "cuda_launch.h"

using namespace normact::cuda;

static int failures = 0;
#define CHECK(cond, ...)                                     \
  do {                                                       \
    if (!(cond)) {                                           \
      if (failures++ < 10) {                                 \
        fprintf(stderr, "%s:%d: %s: ", __FILE__, __LINE__, #cond); \
        fprintf(stderr, __VA_ARGS__);                        \
        fputc('\n', stderr);                                 \
      }                                                      \
    }                                                        \
  } while (0)

// Replays norm_kernel's indexing for one launch and checks the coverage.
static void replay(size_t esize, uintptr_t x, uintptr_t y, size_t n, int sms, int per_sm) {
  const Split s = split_elements(x, y, n, esize);
  const size_t lanes = static_cast<size_t>(s.lanes);
  const unsigned blocks = grid_blocks(s.packs, sms, per_sm);
  CHECK(blocks >= 1 && blocks <= static_cast<unsigned>(sms * per_sm), "blocks %u", blocks);
  const size_t threads = static_cast<size_t>(blocks) * kThreads;
  CHECK(s.lanes == 1 || threads >= lanes, "too few threads for head/tail");
  std::vector<unsigned char> hits(n, 0);
  size_t max_rounds = 0;
  for (size_t tid = 0; tid < threads; ++tid) {
    size_t rounds = 0;
    for (size_t i = tid; i < s.packs; i += threads, ++rounds) {
      const size_t first = s.head + i * lanes;
      if (lanes > 1) {
        CHECK((x + first * esize) % kVectorBytes == 0 && (y + first * esize) % kVectorBytes == 0,
              "pack %zu misaligned (esize %zu, x%%16=%zu, y%%16=%zu, n=%zu)", i, esize, size_t(x % 16),
              size_t(y % 16), n);
      }
      for (size_t k = 0; k < lanes; ++k) {
        CHECK(first + k < n, "pack element %zu past n=%zu", first + k, n);
        if (first + k < n) ++hits[first + k];
      }
    }
    if (rounds > max_rounds) max_rounds = rounds;
    if (lanes > 1) {
      if (tid < s.head) ++hits[tid];
      const size_t t = s.head + s.packs * lanes + tid;
      if (t < n) ++hits[t];
    }
  }
  CHECK(max_rounds == (s.packs ? grid_passes(s.packs, blocks) : 0), "passes %zu vs %zu", max_rounds,
        grid_passes(s.packs, blocks));
  for (size_t i = 0; i < n; ++i)
    CHECK(hits[i] == 1, "element %zu written %d times (esize %zu, x%%16=%zu, y%%16=%zu, n=%zu)", i, hits[i], esize,
          size_t(x % 16), size_t(y % 16), n);
}

int main() {
  const size_t sizes[] = {0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 255, 256, 257, 1023, 1024, 1025, 4099, 20000};
  size_t cases = 0;
  for (size_t esize : {size_t(2), size_t(4)})
    for (uintptr_t ox = 0; ox < 16; ++ox)
      for (uintptr_t oy = 0; oy < 16; ++oy)
        for (size_t n : sizes) {
          // A tiny "GPU" (1 SM, 2 resident blocks) so the larger sizes loop several times.
          replay(esize, 0x10000 + ox, 0x20000 + oy, n, 1, 2);
          ++cases;
        }
  // Which tensors take the vector path: same offset within 16 bytes, element-aligned.
  CHECK(split_elements(0x1000, 0x2000, 100, 4).lanes == 4, "aligned f32");
  CHECK(split_elements(0x1004, 0x1004, 100, 4).lanes == 4, "in-place misaligned f32 keeps vectors");
  CHECK(split_elements(0x1004, 0x1004, 100, 4).head == 3, "f32 head to the next 16 bytes");
  CHECK(split_elements(0x1002, 0x1002, 100, 2).head == 7, "f16 head");
  CHECK(split_elements(0x1004, 0x2008, 100, 4).lanes == 1, "different offsets go scalar");
  CHECK(split_elements(0x1002, 0x1002, 100, 4).lanes == 1, "not element-aligned goes scalar");
  CHECK(split_elements(0x100c, 0x100c, 2, 4).head == 1 && split_elements(0x1004, 0x1004, 2, 4).head == 2,
        "head never passes n");
  // Grid: one block per 256 items up to one wave of resident blocks; never 0 blocks.
  CHECK(grid_blocks(0, 132, 8) == 1, "empty work still gets a block");
  CHECK(grid_blocks(1000, 132, 8) == 4, "small work");
  CHECK(grid_blocks(size_t(1) << 30, 132, 8) == 1056, "H100 f32 wave (132 SMs x 8 blocks)");
  CHECK(grid_blocks(size_t(1) << 30, 84, 6) == 504, "sm_86: 1536 threads/SM = 6 blocks of 256");
  CHECK(grid_blocks(size_t(1) << 30, 0, 0) == 1, "a failed query still launches");
  // Beyond 2^31 elements: 64-bit counts end to end.
  const size_t big = (size_t(3) << 30) + 5;
  const Split b = split_elements(0x7f0000000004, 0x7f0000000004, big, 2);
  CHECK(b.lanes == 8 && b.head == 6 && b.head + b.packs * 8 <= big && big - (b.head + b.packs * 8) < 8,
        "3*2^30+5 halves");
  CHECK(grid_passes(b.packs, grid_blocks(b.packs, 132, 8)) == 1490, "passes for 3*2^30 halves on an H100: %zu",
        grid_passes(b.packs, grid_blocks(b.packs, 132, 8)));
  if (failures) {
    fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  printf("launch arithmetic: %zu coverage cases passed\n", cases);
  return 0;
}
