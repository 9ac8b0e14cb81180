// cpu_dispatch.h -- which compiled copy of the CPU loops (baseline, AVX2,
// AVX-512; see kernels.h) the kernels created now use.
#pragma once

#include "kernels.h"

namespace normact {

// Elements per ParallelFor task.  Small enough to balance the pool, large
// enough that the per-task cost (an atomic, a call) is noise; tensors below
// two tasks run on the calling thread (the statistics ops use kMinChunk
// the same way).
constexpr size_t kMinChunk = 16384;
constexpr size_t kMaxTasks = 256;

// The [op][dtype] tables for the best instruction set of this processor,
// capped by NORMACT_CPU_ISA=generic|avx2 (read at every call: the tests run the
// baseline loops too by setting it before creating a session).
const CpuFn (*select_cpu_table())[kNumDTypes];
const CpuStatsFn (*select_stats_table())[kNumDTypes];
const CpuOrtFFn* select_ort_f_table();
// "avx512", "avx2" or "generic": what select_cpu_table picks now.
const char* cpu_isa_name();

}  // namespace normact
