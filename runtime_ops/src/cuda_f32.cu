// CUDA launchers for storage type float (see cuda_kernels.cuh).
#include "cuda_kernels.cuh"
#define NORMACT_CUDA_T float
NORMACT_CUDA_COLUMN(float, f32)
