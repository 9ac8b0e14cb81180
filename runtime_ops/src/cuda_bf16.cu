// CUDA launchers for storage type bf16 (see cuda_kernels.cuh).
#include "cuda_kernels.cuh"
#define NORMACT_CUDA_T bf16
NORMACT_CUDA_COLUMN(bf16, bf16)
