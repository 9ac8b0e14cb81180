// cuda_device.h -- the host-side CUDA checks of libnormact_cuda.so, with no CUDA
// include (norm_op.cc and register.cc are plain C++): whether the installed
// driver can run the library's CUDA runtime (registration), whether the library
// carries code for a device (kernel creation), and what a failed launch means
// (whose error it is).  Defined in cuda_device.cu.
#pragma once

#include <string>

namespace normact {
namespace cuda {

// The architectures compiled in (CMAKE_CUDA_ARCHITECTURES, e.g. "75;80-real;90-real":
// N = SASS for sm_N plus PTX for compute_N, N-real = SASS only).
extern const char* const kArchitectures;
// CUDART_VERSION of the statically linked runtime, e.g. 13000.
int runtime_version();

// cudaDriverGetVersion's answer; 0 when no driver is installed (or it cannot be asked).
int installed_driver_version();

// Empty, or one sentence on why a driver supporting CUDA `driver_version` (1000*major +
// 10*minor; 0 = no driver) cannot run this library's CUDA kernels.  No driver is not an
// error: the library's CPU kernels still work, and no CUDA session can start anyway.
std::string driver_problem(int driver_version);

// cudaFuncGetAttributes of one op's kernels on the current device (0 or a cudaError_t).
using ProbeFn = int (*)();

// Empty, or why the op's kernels cannot run on `device` (-1: the calling thread's
// current one): no code for its architecture (names the device's and the
// library's architectures), or the error the probe met.
std::string image_problem(int device, ProbeFn probe);

// The error text for a launcher's result `err` (a cudaError_t, or kNotDeviceMemory):
// says whether the launch itself failed or the CUDA context already held an error
// from an earlier kernel (another op or library), and how to fix a missing image
// or an old driver.
constexpr int kNotDeviceMemory = -1;
std::string launch_error(int err);

}  // namespace cuda
}  // namespace normact
