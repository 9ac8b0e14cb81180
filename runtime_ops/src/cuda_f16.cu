// CUDA launchers for storage type f16 (see cuda_kernels.cuh).
#include "cuda_kernels.cuh"
#define NORMACT_CUDA_T f16
NORMACT_CUDA_COLUMN(f16, f16)
