// CPU kernels compiled with -mavx2 -mfma -mf16c (set in CMakeLists.txt); only
// called when the processor reports those features.  On non-x86 builds this
// file is compiled without extra flags and never selected.
#define NORMACT_CPU_NS cpu_avx2
#include "cpu_kernels.inc"
