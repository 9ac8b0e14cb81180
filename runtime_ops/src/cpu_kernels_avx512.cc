// CPU kernels compiled for AVX-512 (F/VL/BW/DQ, 512-bit vectors; flags in
// CMakeLists.txt); only called when the processor reports those features.
// Compute-bound activations (exp, division) run ~1.5-2x faster than AVX2.
#define NORMACT_CPU_NS cpu_avx512
#include "cpu_kernels.inc"
