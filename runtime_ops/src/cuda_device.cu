// cuda_device.cu -- host-side CUDA checks (see cuda_device.h).  A .cu file only
// so that it compiles with the runtime's headers and flags; it has no kernel.
#include <cuda_runtime.h>
#include <stdio.h>

#include "cuda_device.h"

#ifndef NORMACT_CUDA_ARCHITECTURES
#error "NORMACT_CUDA_ARCHITECTURES must be defined by the build (CMAKE_CUDA_ARCHITECTURES)"
#endif

namespace normact {
namespace cuda {

const char* const kArchitectures = NORMACT_CUDA_ARCHITECTURES;

int runtime_version() { return CUDART_VERSION; }

int installed_driver_version() {
  int v = 0;
  // Does not initialize the runtime; answers 0 when libcuda.so is absent.
  if (cudaDriverGetVersion(&v) != cudaSuccess) v = 0;
  (void)cudaGetLastError();
  return v;
}

namespace {

// The oldest Linux driver of each CUDA major version (NVIDIA's CUDA Toolkit
// release notes, "CUDA Toolkit and Corresponding Driver Versions", GA release).
const char* min_linux_driver(int major) {
  switch (major) {
    case 11: return "450.80.02";
    case 12: return "525.60.13";
    case 13: return "580.65.06";
    default: return nullptr;
  }
}

std::string cuda_version_text(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

// Errors a launch cannot cause itself: kernels run asynchronously, so these were
// raised by an earlier kernel on the same context (ours or anyone's) and stick.
bool is_sticky(int err) {
  switch (err) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchTimeout:
    case cudaErrorAssert:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorLaunchFailure:
    case cudaErrorECCUncorrectable:
      return true;
    default:
      return false;
  }
}

std::string error_name(int err) {
  const cudaError_t e = static_cast<cudaError_t>(err);
  return std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")";
}

// "sm_86" for the current device, or "an unknown architecture".
std::string current_arch() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return "an unknown architecture";
  }
  return "sm_" + std::to_string(major) + std::to_string(minor) + " (device " + std::to_string(dev) + ")";
}

}  // namespace

std::string driver_problem(int driver_version) {
  const int need = CUDART_VERSION / 1000;
  if (driver_version <= 0 || driver_version / 1000 >= need) return std::string();
  // Within one major version the runtime runs on an older minor driver (CUDA
  // minor version compatibility); across major versions it cannot.
  const char* min = min_linux_driver(need);
  return "normact kernel library libnormact_cuda.so: the installed NVIDIA driver supports CUDA " +
         cuda_version_text(driver_version) + ", but this library was built with the CUDA " +
         cuda_version_text(CUDART_VERSION) + " runtime (linked statically) and needs a driver for CUDA " +
         std::to_string(need) + ".x (Linux driver >= " + (min ? min : "the one of that release") +
         "). Upgrade the driver, or rebuild the package with a CUDA " +
         std::to_string(driver_version / 1000) + " toolkit's nvcc, or run on the CPU provider.";
}

std::string image_problem(int device, ProbeFn probe) {
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
  int err = device >= 0 && device != previous ? cudaSetDevice(device) : cudaSuccess;
  if (err == cudaSuccess) err = probe();
  if (device >= 0 && previous >= 0 && previous != device) (void)cudaSetDevice(previous);
  (void)cudaGetLastError();
  return err == cudaSuccess ? std::string() : launch_error(err);
}

std::string launch_error(int err) {
  if (err == kNotDeviceMemory)
    return "the input tensor is not in CUDA device memory (a CUDA kernel was given a host pointer)";
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction)
    return "libnormact_cuda.so has no code for this GPU, " + current_arch() + "; it carries CUDA architectures " +
           kArchitectures + " (N: SASS and PTX, N-real: SASS only). Rebuild the package with " +
           "CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=<this GPU's, e.g. 86> pip install ., or run on the CPU provider. [" +
           error_name(err) + "]";
  if (err == cudaErrorInsufficientDriver) {
    const std::string why = driver_problem(installed_driver_version());
    return why.empty() ? "CUDA driver too old for this library: " + error_name(err) : why;
  }
  if (is_sticky(err))
    return "the CUDA context already holds an error from an earlier kernel, not from this launch (another "
           "op or library on the same device; CUDA_LAUNCH_BLOCKING=1 or compute-sanitizer names the "
           "culprit): " +
           error_name(err);
  return "ai.normact CUDA kernel launch failed: " + error_name(err);
}

}  // namespace cuda
}  // namespace normact
