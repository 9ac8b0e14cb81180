// cuda_check.cu -- the CUDA kernels of libnormact_cuda.so on a GPU, without ONNX
// Runtime: the same launchers (cuda::kernel, the cuda_*.cu translation units)
// and the same CPU loops (select_cpu_table) the library registers, linked into
// one program (CMake target normact_cuda_check, -DNORMACT_CUDA_CHECK=ON; run by
// scripts/gpu_check.sh, also under compute-sanitizer).
//
//   normact_cuda_check            every op x storage type x size x pointer
//                                 offset (and in-place) against the CPU kernel
//   normact_cuda_check --quick    fewer sizes and ops (for compute-sanitizer)
//   normact_cuda_check --bench    GB/s at 64M elements vs a device-to-device copy
//
// Exit 0: all checks passed (or the benchmark ran); 1: a check failed; 2: no GPU.
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "cpu_dispatch.h"
#include "cuda_device.h"
#include "cuda_launch.h"
#include "kernels.h"
#include "op_table.h"

using namespace normact;

namespace {

#define CUDA_OK(expr)                                                                              \
  do {                                                                                             \
    cudaError_t _e = (expr);                                                                       \
    if (_e != cudaSuccess) {                                                                       \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(_e));       \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

const char* kTypeName[kNumDTypes] = {"f32", "f16", "bf16"};
const size_t kSize[kNumDTypes] = {4, 2, 2};
// Agreement with the CPU kernel, relative to the magnitude of the terms: the
// same float32 math, up to FMA contraction, then one rounding to storage.
const double kRtol[kNumDTypes] = {4e-6, 1.0 / 1024, 1.0 / 128};

double to_double(const unsigned char* p, int dtype) {
  if (dtype == kFloat32) {
    float f;
    memcpy(&f, p, 4);
    return f;
  }
  uint16_t h;
  memcpy(&h, p, 2);
  if (dtype == kFloat16) {
    f16 v;
    v.bits = h;
    return to_float(v);
  }
  bf16 v;
  v.bits = h;
  return to_float(v);
}

void from_double(unsigned char* p, int dtype, double d) {
  const float f = static_cast<float>(d);
  if (dtype == kFloat32) {
    memcpy(p, &f, 4);
  } else if (dtype == kFloat16) {
    const f16 v = from_float<f16>(f);
    memcpy(p, &v.bits, 2);
  } else {
    const bf16 v = from_float<bf16>(f);
    memcpy(p, &v.bits, 2);
  }
}

struct Checker {
  cudaStream_t stream;
  int failures = 0;
  long cases = 0;

  // One launch: x at element offset xo, y at yo (same buffer when inplace), n elements.
  void one(int op, int dtype, size_t n, size_t xo, size_t yo, bool inplace, const Params& p, unsigned seed) {
    const size_t es = kSize[dtype], pad = 16;
    std::vector<unsigned char> x((n + pad) * es), want(n * es), got((n + pad) * es), sentinel((n + pad) * es);
    std::mt19937 rng(seed);
    std::normal_distribution<double> normal(0.0, 3.0);
    const double special[] = {NAN, INFINITY, -INFINITY, 0.0, -0.0, 1e30, -1e30, 60.0, -60.0};
    for (size_t i = 0; i < n + pad; ++i) {
      const double v = (i % 97 < 9) ? special[i % 97] : normal(rng);
      from_double(&x[i * es], dtype, (i >= xo && i < xo + n) ? v : 7.0);
      from_double(&sentinel[i * es], dtype, 7.0);
    }
    select_cpu_table()[op][dtype](&x[xo * es], want.data(), n, p);
    unsigned char *dx = nullptr, *dy = nullptr;
    CUDA_OK(cudaMalloc(&dx, (n + pad) * es));
    CUDA_OK(cudaMemcpy(dx, x.data(), (n + pad) * es, cudaMemcpyHostToDevice));
    if (inplace) {
      dy = dx;
    } else {
      CUDA_OK(cudaMalloc(&dy, (n + pad) * es));
      CUDA_OK(cudaMemcpy(dy, sentinel.data(), (n + pad) * es, cudaMemcpyHostToDevice));
    }
    const int err = cuda::kernel(op, dtype)(dx + xo * es, dy + yo * es, n, p, stream);
    if (err) {
      fail(op, dtype, n, xo, yo, inplace, ("launch: " + cuda::launch_error(err)).c_str());
    } else {
      CUDA_OK(cudaStreamSynchronize(stream));
      CUDA_OK(cudaMemcpy(got.data(), dy, (n + pad) * es, cudaMemcpyDeviceToHost));
      compare(op, dtype, n, xo, yo, inplace, p, x, want, got);
    }
    CUDA_OK(cudaFree(dx));
    if (!inplace) CUDA_OK(cudaFree(dy));
    ++cases;
  }

  void compare(int op, int dtype, size_t n, size_t xo, size_t yo, bool inplace, const Params& p,
               const std::vector<unsigned char>& x, const std::vector<unsigned char>& want,
               const std::vector<unsigned char>& got) {
    const size_t es = kSize[dtype];
    char msg[256];
    for (size_t i = 0; i < n; ++i) {
      const double c = to_double(&want[i * es], dtype), g = to_double(&got[(yo + i) * es], dtype);
      const double xv = to_double(&x[(xo + i) * es], dtype);
      if (std::isnan(c) != std::isnan(g)) {
        snprintf(msg, sizeof msg, "element %zu: x=%g cpu=%g cuda=%g (NaN mismatch)", i, xv, c, g);
        return fail(op, dtype, n, xo, yo, inplace, msg);
      }
      if (std::isnan(c) || c == g) continue;
      // |scale|·(|f| + |shift| + |slope·x|), with f recovered from the CPU result.
      const double sx = std::isinf(xv) ? 0.0 : std::fabs(p.slope * xv);
      const double f = std::fabs(c / p.scale) + std::fabs(p.shift) + sx;
      const double mag = std::fabs(p.scale) * (f + std::fabs(p.shift) + sx);
      if (!(std::fabs(g - c) <= kRtol[dtype] * mag + 1e-37)) {
        snprintf(msg, sizeof msg, "element %zu: x=%.9g cpu=%.9g cuda=%.9g (bound %.3g)", i, xv, c, g,
                 kRtol[dtype] * mag);
        return fail(op, dtype, n, xo, yo, inplace, msg);
      }
    }
    if (!inplace) {  // nothing written outside y (the x buffer is compared as the input for in-place)
      for (size_t i = 0; i < n + 16; ++i) {
        if (i >= yo && i < yo + n) continue;
        if (to_double(&got[i * es], dtype) != 7.0) {
          snprintf(msg, sizeof msg, "wrote outside y at padding element %zu", i);
          return fail(op, dtype, n, xo, yo, inplace, msg);
        }
      }
    }
  }

  void fail(int op, int dtype, size_t n, size_t xo, size_t yo, bool inplace, const char* what) {
    if (failures++ < 20)
      fprintf(stderr, "FAIL %s %s n=%zu x+%zu y+%zu%s: %s\n", kOps[op].name, kTypeName[dtype], n, xo, yo,
              inplace ? " in-place" : "", what);
  }
};

Params params_of(int op, bool custom) {
  const OpDesc& d = kOps[op];
  Params p{1.0f, 0.0f, 0.0f, d.a_default, d.b_default};
  if (custom) {
    p.scale = 1.7f;
    p.shift = 0.3f;
    p.slope = 0.2f;
  }
  return p;
}

int check(bool quick) {
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  Checker c{stream};
  // Every kernel has code for this device (what kernel creation checks).
  for (int op = 0; op < kNumOps; ++op)
    for (int t = 0; t < kNumDTypes; ++t) {
      const std::string why = cuda::image_problem(-1, cuda::probe(op, t));
      if (!why.empty()) c.fail(op, t, 0, 0, 0, false, why.c_str());
    }
  // --quick (for compute-sanitizer, which slows every launch down): fewer sizes and three ops;
  // the index plan does not depend on the op (the functor is the only template argument that differs).
  std::vector<size_t> sizes = {0, 1, 2, 7, 8, 9, 255, 3 * 5 * 17, 1025, 4099};
  if (quick) sizes = {0, 1, 7, 9, 1025};
  else sizes.push_back((size_t(1) << 20) + 3);
  std::vector<int> ops;
  for (int op = 0; op < kNumOps; ++op)
    if (!quick || op == 0 || op == kOp_NormGelu || op == kNumOps - 1) ops.push_back(op);
  struct Off {
    size_t x, y;
    bool inplace;
  };
  const Off offsets[] = {{0, 0, false}, {1, 1, false}, {3, 3, false}, {1, 2, false},
                         {0, 1, false}, {0, 0, true},  {1, 1, true},  {5, 5, true}};
  unsigned seed = 1;
  for (int op : ops)
    for (int t = 0; t < kNumDTypes; ++t)
      for (bool custom : {false, true})
        for (size_t n : sizes)
          for (const Off& o : offsets) c.one(op, t, n, o.x, o.y, o.inplace, params_of(op, custom), seed++);
  // A size whose grid-stride loop goes round many times on any GPU, per storage type.
  const size_t loop_n = quick ? (size_t(1) << 22) + 5 : (size_t(1) << 25) + 5;
  int sms = 0, dev = 0;
  CUDA_OK(cudaGetDevice(&dev));
  CUDA_OK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  for (int t = 0; t < kNumDTypes; ++t) {
    const size_t packs = loop_n / (cuda::kVectorBytes / kSize[t]);
    printf("loop case %s: %zu elements, >= %zu grid-stride passes on %d SMs\n", kTypeName[t], loop_n,
           cuda::grid_passes(packs, cuda::grid_blocks(packs, sms, 2048 / cuda::kThreads)), sms);
    c.one(kOp_NormGelu, t, loop_n, 1, 1, false, params_of(kOp_NormGelu, true), seed++);
  }
  // A host pointer is refused with a message, not launched.
  std::vector<float> host(64, 1.0f);
  const int err = cuda::kernel(0, kFloat32)(host.data(), host.data(), host.size(), params_of(0, false), stream);
  if (err != cuda::kNotDeviceMemory || cuda::launch_error(err).find("not in CUDA device memory") == std::string::npos)
    c.fail(0, kFloat32, 64, 0, 0, false, ("host pointer: " + cuda::launch_error(err)).c_str());
  CUDA_OK(cudaStreamDestroy(stream));
  printf("%ld cases, %d failures\n", c.cases, c.failures);
  return c.failures ? 1 : 0;
}

int bench() {
  const size_t n = size_t(1) << 26;
  cudaStream_t s;
  CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  void *x, *y;
  CUDA_OK(cudaMalloc(&x, n * 4));
  CUDA_OK(cudaMalloc(&y, n * 4));
  CUDA_OK(cudaMemset(x, 0, n * 4));
  cudaEvent_t a, b;
  CUDA_OK(cudaEventCreate(&a));
  CUDA_OK(cudaEventCreate(&b));
  const int reps = 50;
  auto time_ms = [&](auto&& fn) {
    for (int i = 0; i < 3; ++i) fn();
    CUDA_OK(cudaEventRecord(a, s));
    for (int i = 0; i < reps; ++i) fn();
    CUDA_OK(cudaEventRecord(b, s));
    CUDA_OK(cudaEventSynchronize(b));
    float ms = 0;
    CUDA_OK(cudaEventElapsedTime(&ms, a, b));
    return ms / reps;
  };
  printf("64M elements, %d reps, GB/s counting bytes read and written (CUDA events)\n", reps);
  for (int t = 0; t < kNumDTypes; ++t) {
    const size_t bytes = n * kSize[t];
    const float copy = time_ms([&] { CUDA_OK(cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice, s)); });
    printf("%-5s copy          %8.3f ms %7.0f GB/s\n", kTypeName[t], copy, 2.0 * bytes / copy / 1e6);
    for (int op = 0; op < kNumOps; ++op) {
      const Params p = params_of(op, true);
      const CudaFn fn = cuda::kernel(op, t);
      const float ms = time_ms([&] {
        if (int e = fn(x, y, n, p, s)) {
          fprintf(stderr, "%s\n", cuda::launch_error(e).c_str());
          exit(1);
        }
      });
      printf("%-5s %-16s %7.3f ms %7.0f GB/s  %.2f of copy\n", kTypeName[t], kOps[op].name, ms, 2.0 * bytes / ms / 1e6,
             copy / ms);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    fprintf(stderr, "normact_cuda_check: no usable CUDA device (%s; driver supports CUDA %d, 0 = no driver)\n",
            cudaGetErrorString(cudaGetLastError()), cuda::installed_driver_version());
    return 2;
  }
  const std::string driver = cuda::driver_problem(cuda::installed_driver_version());
  if (!driver.empty()) {
    fprintf(stderr, "%s\n", driver.c_str());
    return 1;
  }
  cudaDeviceProp prop;
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  printf("device: %s, sm_%d%d, %d SMs; driver CUDA %d, runtime %d; library architectures %s; CPU loops %s\n",
         prop.name, prop.major, prop.minor, prop.multiProcessorCount, cuda::installed_driver_version(),
         cuda::runtime_version(), cuda::kArchitectures, cpu_isa_name());
  const bool quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
  if (argc > 1 && strcmp(argv[1], "--bench") == 0) return bench();
  return check(quick);
}
