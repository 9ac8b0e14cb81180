// CPU kernels for the x86-64 / aarch64 baseline instruction set.
#define NORMACT_CPU_NS cpu_generic
#include "cpu_kernels.inc"
