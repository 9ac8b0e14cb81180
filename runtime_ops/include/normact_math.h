// normact_math.h -- the activation math of every Norm<Act> kernel, one include.
//
// Shared by the CPU loops (cpu_kernels.inc), the CUDA kernels
// (cuda_kernels.cuh) and runtime_ops/tools/measure_error.cc.  Every function
// is `__host__ __device__` under nvcc and plain inline C++ otherwise, so the
// CPU tests exercise the arithmetic the GPU runs.  One header per job:
//
//   normact_bits.h         NA_HD, float bit casts, abs / copysign / NaN / Inf
//   normact_half.h         fp16 / bf16 storage types and their conversions
//   normact_approx.h       exp, expm1, log, sigmoid, tanh, Phi: own minimax fits
//   normact_activations.h  the act:: functors (f, df), Params, norm_act
#pragma once

#include "normact_activations.h"
#include "normact_approx.h"
#include "normact_bits.h"
#include "normact_half.h"
