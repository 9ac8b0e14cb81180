// norm_op.cc -- the Norm<Act> kernel: attributes, CPU ParallelFor / CUDA stream
// dispatch, and its OrtCustomOp callbacks.
#include "norm_op.h"

#include <stdlib.h>

#include <string>
#include <vector>

#include "cpu_dispatch.h"
#if defined(NORMACT_WITH_CUDA)
#include "cuda_device.h"
#endif
#include "kernels.h"
#include "op_table.h"
#include "ort_util.h"

namespace normact {
namespace {

struct Kernel {
  const OrtApi* api;
  const char* name;
  Params params;
  CpuFn cpu;
#if defined(NORMACT_WITH_CUDA)
  CudaFn gpu;
#endif
  bool cuda;
};

struct CpuJob {
  CpuFn fn;
  const char* x;
  char* y;
  size_t n, chunk, esize;
  const Params* params;
};

#if defined(NORMACT_WITH_CUDA)
// The CUDA device a kernel of the CUDA provider will run on: the id of the
// provider's allocator (runtimes >= 1.18, KernelInfoGetAllocator), else -1
// (the calling thread's current device).
int kernel_device(const OrtApi* api, const OrtKernelInfo* info, uint32_t api_level) {
  int device = -1;
  if (api_level >= 18) {
    OrtAllocator* alloc = nullptr;
    if (OrtStatusPtr st = api->KernelInfoGetAllocator(info, OrtMemTypeDefault, &alloc)) {
      api->ReleaseStatus(st);
    } else if (alloc) {
      const OrtMemoryInfo* mem = nullptr;
      OrtStatusPtr st2 = api->AllocatorGetInfo(alloc, &mem);
      if (!st2) st2 = api->MemoryInfoGetId(mem, &device);
      if (st2) {
        api->ReleaseStatus(st2);
        device = -1;
      }
      api->ReleaseAllocator(alloc);
    }
  }
  return device;
}
#endif

void cpu_task(void* data, size_t i) {
  const CpuJob& j = *static_cast<const CpuJob*>(data);
  const size_t begin = i * j.chunk;
  const size_t end = begin + j.chunk < j.n ? begin + j.chunk : j.n;
  j.fn(j.x + begin * j.esize, j.y + begin * j.esize, end - begin, *j.params);
}

OrtStatusPtr ORT_API_CALL create_kernel(const OrtCustomOp* base, const OrtApi* api, const OrtKernelInfo* info,
                                        void** kernel) {
  const NormOp& o = *static_cast<const NormOp*>(base);
  const OpDesc& d = kOps[o.op];
  Params p{};
  OrtStatusPtr st = nullptr;
  if ((st = read_float(api, info, d.name, "scale", 1.0f, &p.scale))) return st;
  if ((st = read_float(api, info, d.name, "shift", 0.0f, &p.shift))) return st;
  if ((st = read_float(api, info, d.name, "slope", 0.0f, &p.slope))) return st;
  if ((st = read_float(api, info, d.name, d.a_name, d.a_default, &p.a))) return st;
  if ((st = read_float(api, info, d.name, d.b_name, d.b_default, &p.b))) return st;
  Kernel* k = new Kernel{};
  k->api = api;
  k->name = d.name;
  k->params = p;
  k->cuda = o.cuda;
  k->cpu = select_cpu_table()[o.op][o.dtype];
#if defined(NORMACT_WITH_CUDA)
  k->gpu = cuda::kernel(o.op, o.dtype);
  if (o.cuda) {
    // A GPU without code in this library would otherwise fail at every Run;
    // say so when the session is created, naming the architectures we carry.
    const int device = kernel_device(api, info, base->version);
    const std::string why = cuda::image_problem(device, cuda::probe(o.op, o.dtype));
    if (!why.empty()) {
      delete k;
      return make_error(api, ORT_EP_FAIL, std::string("ai.normact::") + d.name + ": " + why);
    }
  }
#endif
  *kernel = k;
  return nullptr;
}

OrtStatusPtr ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx) {
  const Kernel& k = *static_cast<const Kernel*>(kernel);
  const OrtApi* api = k.api;
  const OrtValue* in = nullptr;
  NORMACT_RETURN_IF_ERROR(api->KernelContext_GetInput(ctx, 0, &in));
  OrtTensorTypeAndShapeInfo* info = nullptr;
  NORMACT_RETURN_IF_ERROR(api->GetTensorTypeAndShape(in, &info));
  size_t rank = 0, n = 0;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  // Shapes up to rank 16 live on the stack (no allocation per call).
  int64_t small_dims[16];
  std::vector<int64_t> big_dims;
  int64_t* dims = small_dims;
  OrtStatusPtr st = api->GetDimensionsCount(info, &rank);
  if (!st && rank > 16) {
    big_dims.resize(rank);
    dims = big_dims.data();
  }
  if (!st) st = api->GetDimensions(info, dims, rank);
  if (!st) st = api->GetTensorShapeElementCount(info, &n);
  if (!st) st = api->GetTensorElementType(info, &type);
  api->ReleaseTensorTypeAndShapeInfo(info);
  if (st) return st;

  OrtValue* out = nullptr;
  NORMACT_RETURN_IF_ERROR(api->KernelContext_GetOutput(ctx, 0, dims, rank, &out));
  if (n == 0) return nullptr;
  void* x = nullptr;
  void* y = nullptr;
  NORMACT_RETURN_IF_ERROR(api->GetTensorMutableData(const_cast<OrtValue*>(in), &x));
  NORMACT_RETURN_IF_ERROR(api->GetTensorMutableData(out, &y));
  const size_t esize = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? 4 : 2;

#if defined(NORMACT_WITH_CUDA)
  if (k.cuda) {
    void* stream = nullptr;
    NORMACT_RETURN_IF_ERROR(api->KernelContext_GetGPUComputeStream(ctx, &stream));
    const int err = k.gpu(x, y, n, k.params, stream);
    if (err) return make_error(api, ORT_EP_FAIL, std::string("ai.normact::") + k.name + ": " + cuda::launch_error(err));
    return nullptr;
  }
#endif

  if (n < 2 * kMinChunk) {
    k.cpu(x, y, n, k.params);
    return nullptr;
  }
  size_t chunk = (n + kMaxTasks - 1) / kMaxTasks;
  if (chunk < kMinChunk) chunk = kMinChunk;
  chunk = (chunk + 63) & ~size_t(63);  // keep task boundaries cache-line aligned
  CpuJob job{k.cpu, static_cast<const char*>(x), static_cast<char*>(y), n, chunk, esize, &k.params};
  return api->KernelContext_ParallelFor(ctx, cpu_task, (n + chunk - 1) / chunk, 0, &job);
}

void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }

// Y may reuse X's buffer (in-place is safe: see cpu_kernels.inc and cuda_kernels.cuh).
size_t ORT_API_CALL may_inplace(int** input_index, int** output_index) {
  *input_index = static_cast<int*>(malloc(sizeof(int)));
  *output_index = static_cast<int*>(malloc(sizeof(int)));
  if (!*input_index || !*output_index) {
    free(*input_index);
    free(*output_index);
    *input_index = *output_index = nullptr;
    return 0;
  }
  **input_index = 0;
  **output_index = 0;
  return 1;
}

void ORT_API_CALL release_index_pair(int* a, int* b) {
  free(a);
  free(b);
}

const char* ORT_API_CALL get_name(const OrtCustomOp* op) { return kOps[static_cast<const NormOp*>(op)->op].name; }
const char* ORT_API_CALL get_ep(const OrtCustomOp* op) {
  return static_cast<const NormOp*>(op)->cuda ? kCudaEp : nullptr;
}

ONNXTensorElementDataType ORT_API_CALL get_type(const OrtCustomOp* op, size_t) {
  return kOrtType[static_cast<const NormOp*>(op)->dtype];
}

size_t ORT_API_CALL one(const OrtCustomOp*) { return 1; }

}  // namespace

void init_norm_op(NormOp& o, int op, int dtype, bool cuda) {
  o.GetName = get_name;
  o.GetExecutionProviderType = get_ep;
  o.GetInputType = get_type;
  o.GetInputTypeCount = one;
  o.GetOutputType = get_type;
  o.GetOutputTypeCount = one;
  o.KernelDestroy = destroy_kernel;
  o.CreateKernelV2 = create_kernel;
  o.KernelComputeV2 = compute;
  // No InferOutputShapeFn: ONNX Runtime's shape-inference context cannot
  // tell a scalar input from one of unknown rank, so copying the input
  // shape would declare unknown-rank outputs as scalars.  The schema's
  // type constraint still gives the output its element type.
  o.GetMayInplace = may_inplace;  // read by runtimes >= 1.18 only
  o.ReleaseMayInplace = release_index_pair;
  o.op = op;
  o.dtype = dtype;
  o.cuda = cuda;
}

}  // namespace normact
