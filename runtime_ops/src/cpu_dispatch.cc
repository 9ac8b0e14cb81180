// cpu_dispatch.cc -- the instruction set of the CPU loops, picked at kernel creation.
#include "cpu_dispatch.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define NORMACT_X86 1
#endif

namespace normact {

const CpuFn (*select_cpu_table())[kNumDTypes] {
  // NORMACT_CPU_ISA=generic|avx2 caps the instruction set (the tests run the
  // baseline loops too); the default is the best the processor supports.
  const char* env = getenv("NORMACT_CPU_ISA");
  const bool cap_generic = env && strcmp(env, "generic") == 0;
  const bool cap_avx2 = env && strcmp(env, "avx2") == 0;
#if defined(NORMACT_X86)
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                               __builtin_cpu_supports("f16c");
  static const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                                 __builtin_cpu_supports("avx512dq");
  if (has_avx512 && !cap_generic && !cap_avx2) return cpu_avx512::kTable;
  if (has_avx2 && !cap_generic) return cpu_avx2::kTable;
#else
  (void)cap_generic;
  (void)cap_avx2;
#endif
  return cpu_generic::kTable;
}

const CpuStatsFn (*select_stats_table())[kNumDTypes] {
  const auto t = select_cpu_table();
  return t == cpu_avx512::kTable ? cpu_avx512::kStatsTable
         : t == cpu_avx2::kTable ? cpu_avx2::kStatsTable
                                 : cpu_generic::kStatsTable;
}

const CpuOrtFFn* select_ort_f_table() {
  const auto t = select_cpu_table();
  return t == cpu_avx512::kTable ? cpu_avx512::kOrtFTable
         : t == cpu_avx2::kTable ? cpu_avx2::kOrtFTable
                                 : cpu_generic::kOrtFTable;
}

const char* cpu_isa_name() {
  const auto t = select_cpu_table();
  return t == cpu_avx512::kTable ? "avx512" : t == cpu_avx2::kTable ? "avx2" : "generic";
}

}  // namespace normact
