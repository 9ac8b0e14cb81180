// ops.cc -- registration of the ai.normact custom ops with ONNX Runtime.
//
// Plain ONNX Runtime C API (no C++ wrapper exceptions crossing the ABI): one
// OrtCustomOp per (op, storage type, execution provider), all generated from
// NORMACT_OP_TABLE.  ONNX Runtime groups ops of the same name into one schema
// with one kernel per type, and prefers a registered kernel over a model-local
// function of the same domain/name, so a model in the `function` form runs the
// fused kernel when this library is registered and the function body when not.
//
// Minimum ONNX Runtime: 1.17 (C API 17: KernelContext_ParallelFor, the
// OrtCustomOp fields up to GetStartVersion/GetEndVersion/InferOutputShapeFn).
// RegisterCustomOps checks the runtime's version first and returns an error
// status -- it never calls an API function the runtime lacks.  On runtimes
// >= 1.18 the ops also declare that Y may reuse X's buffer (GetMayInplace).
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mutex>
#include <string>
#include <vector>

#include "kernels.h"
#include "onnxruntime_c_api.h"

#if defined(__x86_64__) || defined(_M_X64)
#define NORMACT_X86 1
#endif

#define NORMACT_EXPORT extern "C" __attribute__((visibility("default")))

namespace normact {
namespace {

constexpr uint32_t kMinApiVersion = 17;
constexpr const char* kDomain = "ai.normact";
constexpr const char* kCudaEp = "CUDAExecutionProvider";

// ------------------------------------------------------------ the op table
struct OpDesc {
  const char* name;
  const char* a_name;
  float a_default;
  const char* b_name;
  float b_default;
};

#define NORMACT_DESC(name, functor, an, ad, bn, bd) {#name, an, ad, bn, bd},
const OpDesc kOps[kNumOps] = {NORMACT_OP_TABLE(NORMACT_DESC)};
#undef NORMACT_DESC

const ONNXTensorElementDataType kOrtType[kNumDTypes] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16};

// ------------------------------------------------------------ CPU dispatch
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

const char* cpu_isa_name() {
  const auto t = select_cpu_table();
  return t == cpu_avx512::kTable ? "avx512" : t == cpu_avx2::kTable ? "avx2" : "generic";
}

// ------------------------------------------------------------ the kernel
struct NormOp : OrtCustomOp {
  int op;
  int dtype;
  bool cuda;
};

struct Kernel {
  const OrtApi* api;
  Params params;
  CpuFn cpu;
#if defined(NORMACT_WITH_CUDA)
  CudaFn gpu;
#endif
  bool cuda;
};

// Elements per ParallelFor task.  Small enough to balance the pool, large
// enough that the per-task cost (an atomic, a call) is noise; tensors below
// two tasks run on the calling thread.
constexpr size_t kMinChunk = 16384;
constexpr size_t kMaxTasks = 256;

struct CpuJob {
  CpuFn fn;
  const char* x;
  char* y;
  size_t n, chunk, esize;
  const Params* params;
};

void cpu_task(void* data, size_t i) {
  const CpuJob& j = *static_cast<const CpuJob*>(data);
  const size_t begin = i * j.chunk;
  const size_t end = begin + j.chunk < j.n ? begin + j.chunk : j.n;
  j.fn(j.x + begin * j.esize, j.y + begin * j.esize, end - begin, *j.params);
}

OrtStatusPtr make_error(const OrtApi* api, OrtErrorCode code, const std::string& msg) {
  return api->CreateStatus(code, msg.c_str());
}

// Reads a float attribute; absent -> the default; present with another type
// (e.g. alpha=1 written as an int) -> an error rather than silently ignoring it.
OrtStatusPtr read_float(const OrtApi* api, const OrtKernelInfo* info, const char* op, const char* name,
                        float fallback, float* out) {
  *out = fallback;
  if (!name) return nullptr;
  OrtStatusPtr st = api->KernelInfoGetAttribute_float(info, name, out);
  if (!st) return nullptr;
  api->ReleaseStatus(st);
  *out = fallback;
  int64_t iv = 0;
  st = api->KernelInfoGetAttribute_int64(info, name, &iv);
  if (!st) {
    return make_error(api, ORT_INVALID_ARGUMENT,
                      std::string("ai.normact::") + op + ": attribute '" + name + "' must be a float, got an int");
  }
  api->ReleaseStatus(st);
  return nullptr;
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
  k->params = p;
  k->cuda = o.cuda;
  k->cpu = select_cpu_table()[o.op][o.dtype];
#if defined(NORMACT_WITH_CUDA)
  k->gpu = cuda::kernel(o.op, o.dtype);
#endif
  *kernel = k;
  return nullptr;
}

#define NORMACT_RETURN_IF_ERROR(expr) \
  do {                                \
    OrtStatusPtr _st = (expr);        \
    if (_st) return _st;              \
  } while (0)

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
    const char* err = k.gpu(x, y, n, k.params, stream);
    if (err) return make_error(api, ORT_EP_FAIL, std::string("ai.normact CUDA kernel launch failed: ") + err);
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

// ------------------------------------------------------------ the statistics ops
// ai.normact::Norm<Act>Stats (NormReluStats, ...): calibration's per-site
// reductions in one pass (see src/normact_onnx/calibration/instrument.py).
//   inputs   X (T), optional F (T): the activation's output; without it f(X) is
//            computed from the header's functor
//   attrs    the activation's own float attributes (as Norm<Act>), optional int
//            `axis`: per-channel statistics along it (else the whole tensor)
//   outputs  count (int64 scalar, elements of X), then float64 tensors shaped as
//            a keepdims reduction over every axis but `axis` (all axes without):
//            mean x, sum (x - mean x)^2, mean f, sum (f - mean f)^2, sum f'(x)^2
// CPU only (under the CUDA EP, ONNX Runtime copies X and F to the host).
constexpr int kNumStatsOutputs = 6;

struct StatsOp : OrtCustomOp {
  int op;
  int dtype;
};

struct StatsKernel {
  const OrtApi* api;
  Params params;
  CpuStatsFn fn;
  bool per_channel;
  int64_t axis;
  int op;
};

std::string stats_name(int op) { return std::string(kOps[op].name) + "Stats"; }

OrtStatusPtr ORT_API_CALL create_stats_kernel(const OrtCustomOp* base, const OrtApi* api, const OrtKernelInfo* info,
                                              void** kernel) {
  const StatsOp& o = *static_cast<const StatsOp*>(base);
  const OpDesc& d = kOps[o.op];
  const std::string name = stats_name(o.op);
  Params p{1.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  OrtStatusPtr st = nullptr;
  if ((st = read_float(api, info, name.c_str(), d.a_name, d.a_default, &p.a))) return st;
  if ((st = read_float(api, info, name.c_str(), d.b_name, d.b_default, &p.b))) return st;
  int64_t axis = 0;
  st = api->KernelInfoGetAttribute_int64(info, "axis", &axis);
  const bool per_channel = st == nullptr;
  if (st) api->ReleaseStatus(st);
  *kernel = new StatsKernel{api, p, select_stats_table()[o.op][o.dtype], per_channel, axis, o.op};
  return nullptr;
}

struct StatsJob {
  CpuStatsFn fn;
  const void* x;
  const void* f;
  StatsShape shape;
  const Params* params;
  std::vector<Moments6>* acc;  // tasks x channels
  size_t step;                 // elements per task
  size_t n;
};

void stats_task(void* data, size_t t) {
  const StatsJob& j = *static_cast<const StatsJob*>(data);
  thread_local std::vector<double> scratch;
  if (stats_row_mode(j.shape) && scratch.size() < 7 * j.shape.channels * j.shape.inner)
    scratch.resize(7 * j.shape.channels * j.shape.inner);
  const size_t begin = t * j.step;
  const size_t end = begin + j.step < j.n ? begin + j.step : j.n;
  j.fn(j.x, j.f, begin, end, j.shape, *j.params, j.acc->data() + t * j.shape.channels, scratch.data());
}

OrtStatusPtr tensor_info(const OrtApi* api, const OrtValue* v, std::vector<int64_t>* dims, size_t* n,
                         ONNXTensorElementDataType* type) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  NORMACT_RETURN_IF_ERROR(api->GetTensorTypeAndShape(v, &info));
  size_t rank = 0;
  OrtStatusPtr st = api->GetDimensionsCount(info, &rank);
  if (!st) {
    dims->resize(rank);
    st = api->GetDimensions(info, dims->data(), rank);
  }
  if (!st) st = api->GetTensorShapeElementCount(info, n);
  if (!st) st = api->GetTensorElementType(info, type);
  api->ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

OrtStatusPtr ORT_API_CALL compute_stats(void* kernel, OrtKernelContext* ctx) {
  const StatsKernel& k = *static_cast<const StatsKernel*>(kernel);
  const OrtApi* api = k.api;
  const std::string name = "ai.normact::" + stats_name(k.op);
  const OrtValue* xin = nullptr;
  const OrtValue* fin = nullptr;
  size_t inputs = 0;
  NORMACT_RETURN_IF_ERROR(api->KernelContext_GetInputCount(ctx, &inputs));
  NORMACT_RETURN_IF_ERROR(api->KernelContext_GetInput(ctx, 0, &xin));
  if (inputs > 1) NORMACT_RETURN_IF_ERROR(api->KernelContext_GetInput(ctx, 1, &fin));
  std::vector<int64_t> dims, fdims;
  size_t n = 0, fn_count = 0;
  ONNXTensorElementDataType type{}, ftype{};
  NORMACT_RETURN_IF_ERROR(tensor_info(api, xin, &dims, &n, &type));
  if (fin) {
    NORMACT_RETURN_IF_ERROR(tensor_info(api, fin, &fdims, &fn_count, &ftype));
    if (fn_count != n || ftype != type)
      return make_error(api, ORT_INVALID_ARGUMENT, name + ": F must have X's element type and element count");
  }
  const int64_t rank = (int64_t)dims.size();
  StatsShape shape{1, n ? n : 1};
  std::vector<int64_t> out_dims(dims.size(), 1);
  if (k.per_channel) {
    const int64_t axis = k.axis < 0 ? k.axis + rank : k.axis;
    if (axis < 0 || axis >= rank)
      return make_error(api, ORT_INVALID_ARGUMENT,
                        name + ": axis " + std::to_string(k.axis) + " is out of range for rank " + std::to_string(rank));
    size_t inner = 1;
    for (int64_t d = axis + 1; d < rank; ++d) inner *= (size_t)dims[d];
    shape = StatsShape{(size_t)dims[axis], inner ? inner : 1};
    out_dims[axis] = dims[axis];
  }
  const size_t channels = shape.channels;

  OrtValue* count_out = nullptr;
  NORMACT_RETURN_IF_ERROR(api->KernelContext_GetOutput(ctx, 0, nullptr, 0, &count_out));
  int64_t* count = nullptr;
  NORMACT_RETURN_IF_ERROR(api->GetTensorMutableData(count_out, reinterpret_cast<void**>(&count)));
  *count = (int64_t)n;
  double* outs[kNumStatsOutputs - 1];
  for (int i = 1; i < kNumStatsOutputs; ++i) {
    OrtValue* v = nullptr;
    NORMACT_RETURN_IF_ERROR(api->KernelContext_GetOutput(ctx, i, out_dims.data(), out_dims.size(), &v));
    NORMACT_RETURN_IF_ERROR(api->GetTensorMutableData(v, reinterpret_cast<void**>(&outs[i - 1])));
  }
  if (n == 0 || channels == 0) {
    for (int i = 0; i < kNumStatsOutputs - 1; ++i)
      for (size_t c = 0; c < channels; ++c) outs[i][c] = 0.0;
    return nullptr;
  }
  void* x = nullptr;
  void* f = nullptr;
  NORMACT_RETURN_IF_ERROR(api->GetTensorMutableData(const_cast<OrtValue*>(xin), &x));
  if (fin) NORMACT_RETURN_IF_ERROR(api->GetTensorMutableData(const_cast<OrtValue*>(fin), &f));

  // Tasks: whole rows in row mode, else equal element ranges; each task has its
  // own per-channel accumulators (so at most ~8 MB of them), merged in order.
  const size_t unit = stats_row_mode(shape) ? channels * shape.inner : 64;
  const size_t units = (n + unit - 1) / unit;
  size_t tasks = n / kMinChunk;
  if (tasks > 64) tasks = 64;
  if (tasks > (size_t(1) << 17) / channels) tasks = (size_t(1) << 17) / channels;
  if (tasks > units) tasks = units;
  if (tasks < 1) tasks = 1;
  const size_t step = (units + tasks - 1) / tasks * unit;
  tasks = (n + step - 1) / step;
  std::vector<Moments6> acc(tasks * channels, Moments6{0, 0, 0, 0, 0, 0});
  StatsJob job{k.fn, x, f, shape, &k.params, &acc, step, n};
  if (tasks == 1) {
    stats_task(&job, 0);
  } else {
    NORMACT_RETURN_IF_ERROR(api->KernelContext_ParallelFor(ctx, stats_task, tasks, 0, &job));
  }
  for (size_t c = 0; c < channels; ++c) {
    Moments6 a = acc[c];
    for (size_t t = 1; t < tasks; ++t) {
      const Moments6& b = acc[t * channels + c];
      if (b.n == 0) continue;
      const double total = a.n + b.n;
      const double w = b.n / total, dx = b.mx - a.mx, df = b.mf - a.mf;
      a.m2x += b.m2x + dx * dx * a.n * w;
      a.m2f += b.m2f + df * df * a.n * w;
      a.mx += dx * w;
      a.mf += df * w;
      a.d2 += b.d2;
      a.n = total;
    }
    outs[0][c] = a.mx;
    outs[1][c] = a.m2x;
    outs[2][c] = a.mf;
    outs[3][c] = a.m2f;
    outs[4][c] = a.d2;
  }
  return nullptr;
}

void ORT_API_CALL destroy_stats_kernel(void* kernel) { delete static_cast<StatsKernel*>(kernel); }

// The API table of the runtime that loaded us (set once the ops are initialized).
const OrtApi* g_api = nullptr;

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
OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL mem_default(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL arity_one(const OrtCustomOp*) { return 1; }
int ORT_API_CALL homogeneous(const OrtCustomOp*) { return 1; }
int ORT_API_CALL version_one(const OrtCustomOp*) { return 1; }

#if defined(NORMACT_WITH_CUDA)
constexpr int kNumEps = 2;
#else
constexpr int kNumEps = 1;
#endif

NormOp g_ops[kNumEps][kNumOps][kNumDTypes];
StatsOp g_stats_ops[kNumOps][kNumDTypes];

std::string g_stats_names[kNumOps];
const char* ORT_API_CALL get_stats_name(const OrtCustomOp* op) {
  return g_stats_names[static_cast<const StatsOp*>(op)->op].c_str();
}
const char* ORT_API_CALL cpu_ep(const OrtCustomOp*) { return nullptr; }
ONNXTensorElementDataType ORT_API_CALL get_stats_input_type(const OrtCustomOp* op, size_t) {
  return kOrtType[static_cast<const StatsOp*>(op)->dtype];
}
ONNXTensorElementDataType ORT_API_CALL get_stats_output_type(const OrtCustomOp*, size_t i) {
  return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE;
}
size_t ORT_API_CALL two(const OrtCustomOp*) { return 2; }
size_t ORT_API_CALL stats_outputs(const OrtCustomOp*) { return kNumStatsOutputs; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL x_required_f_optional(const OrtCustomOp*, size_t i) {
  return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}
std::mutex g_mutex;
std::vector<OrtCustomOpDomain*> g_domains;  // see RegisterCustomOps

// The OrtCustomOp fields every op of the library sets the same way (single-tensor inputs and
// outputs, opset version 1, default memory); each op kind then fills in its own callbacks.
void init_common(OrtCustomOp& o, uint32_t version) {
  memset(&o, 0, sizeof(OrtCustomOp));
  // The struct layout is this header's (API 21); `version` tells the
  // runtime which trailing fields it may read, capped at its own API.
  o.version = version;
  o.GetOutputCharacteristic = required;
  o.GetInputMemoryType = mem_default;
  o.GetVariadicInputMinArity = arity_one;
  o.GetVariadicInputHomogeneity = homogeneous;
  o.GetVariadicOutputMinArity = arity_one;
  o.GetVariadicOutputHomogeneity = homogeneous;
  o.GetStartVersion = version_one;
  o.GetEndVersion = version_one;
}

void init_ops(uint32_t version) {
  for (int ep = 0; ep < kNumEps; ++ep)
    for (int i = 0; i < kNumOps; ++i)
      for (int t = 0; t < kNumDTypes; ++t) {
        NormOp& o = g_ops[ep][i][t];
        init_common(o, version);
        o.GetName = get_name;
        o.GetExecutionProviderType = get_ep;
        o.GetInputType = get_type;
        o.GetInputTypeCount = one;
        o.GetOutputType = get_type;
        o.GetOutputTypeCount = one;
        o.KernelDestroy = destroy_kernel;
        o.GetInputCharacteristic = required;
        o.CreateKernelV2 = create_kernel;
        o.KernelComputeV2 = compute;
        // No InferOutputShapeFn: ONNX Runtime's shape-inference context cannot
        // tell a scalar input from one of unknown rank, so copying the input
        // shape would declare unknown-rank outputs as scalars.  The schema's
        // type constraint still gives the output its element type.
        o.GetMayInplace = may_inplace;  // read by runtimes >= 1.18 only
        o.ReleaseMayInplace = release_index_pair;
        o.op = i;
        o.dtype = t;
        o.cuda = ep == 1;
      }
  for (int i = 0; i < kNumOps; ++i) {
    g_stats_names[i] = stats_name(i);
    for (int t = 0; t < kNumDTypes; ++t) {
      StatsOp& o = g_stats_ops[i][t];
      init_common(o, version);
      o.GetName = get_stats_name;
      o.GetExecutionProviderType = cpu_ep;
      o.GetInputType = get_stats_input_type;
      o.GetInputTypeCount = two;
      o.GetOutputType = get_stats_output_type;
      o.GetOutputTypeCount = stats_outputs;
      o.KernelDestroy = destroy_stats_kernel;
      o.GetInputCharacteristic = x_required_f_optional;
      o.CreateKernelV2 = create_stats_kernel;
      o.KernelComputeV2 = compute_stats;
      o.op = i;
      o.dtype = t;
    }
  }
}

// "1.19.2" -> 19 (for ONNX Runtime 1.x the C API version equals the minor).
uint32_t runtime_api_version(const char* s) {
  unsigned major = 0, minor = 0;
  if (!s || sscanf(s, "%u.%u", &major, &minor) != 2) return 0;
  if (major != 1) return major > 1 ? ORT_API_VERSION : 0;
  return minor;
}

}  // namespace
}  // namespace normact

using namespace normact;

// Entry point called by SessionOptions.register_custom_ops_library().
NORMACT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const char* have = api_base->GetVersionString();
  uint32_t level = runtime_api_version(have);
  if (level == 0) level = kMinApiVersion;  // unparsable version: let GetApi decide
  if (level > ORT_API_VERSION) level = ORT_API_VERSION;
  const OrtApi* api = level >= kMinApiVersion ? api_base->GetApi(level) : nullptr;
  if (!api) {
    // API version 1 always exists and CreateStatus is its first entry.
    const OrtApi* api1 = api_base->GetApi(1);
    char msg[256];
    snprintf(msg, sizeof msg,
             "normact kernel library: ONNX Runtime %s is too old; this library needs onnxruntime >= 1.%u "
             "(C API version %u). Upgrade onnxruntime, or run the model without the library (the "
             "ai.normact function bodies work on any runtime).",
             have ? have : "(unknown)", kMinApiVersion, kMinApiVersion);
    return api1 ? api1->CreateStatus(ORT_FAIL, msg) : nullptr;
  }

  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_api) init_ops(level);
  g_api = api;
  OrtCustomOpDomain* domain = nullptr;
  OrtStatusPtr st = api->CreateCustomOpDomain(kDomain, &domain);
  if (st) return st;
  for (int ep = 0; ep < kNumEps && !st; ++ep)
    for (int i = 0; i < kNumOps && !st; ++i)
      for (int t = 0; t < kNumDTypes && !st; ++t) st = api->CustomOpDomain_Add(domain, &g_ops[ep][i][t]);
  for (int i = 0; i < kNumOps && !st; ++i)
    for (int t = 0; t < kNumDTypes && !st; ++t) st = api->CustomOpDomain_Add(domain, &g_stats_ops[i][t]);
  if (!st) st = api->AddCustomOpDomain(options, domain);
  if (st) {
    api->ReleaseCustomOpDomain(domain);
    return st;
  }
  // The domain must outlive every session created from these options, which
  // we cannot observe; it is a few hundred bytes, so it lives until exit.
  g_domains.push_back(domain);
  return nullptr;
}

// Diagnostics for the Python side and the tests: the op table and build info
// as JSON, so the tests can check it against the Python catalogue.
NORMACT_EXPORT const char* NormactLibraryInfo() {
  static std::string json = [] {
    std::string s = "{\"domain\": \"ai.normact\", \"opset\": 1, \"min_ort_api\": " + std::to_string(kMinApiVersion);
    s += ", \"header_api\": " + std::to_string(ORT_API_VERSION);
#if defined(NORMACT_WITH_CUDA)
    s += ", \"cuda\": true";
#else
    s += ", \"cuda\": false";
#endif
    s += ", \"cpu_isa\": \"";
    s += cpu_isa_name();
    // Every op X also has a statistics op X + stats_suffix (calibration).
    s += "\", \"stats_suffix\": \"Stats";
    s += "\", \"ops\": {";
    char buf[64];
    for (int i = 0; i < kNumOps; ++i) {
      const OpDesc& d = kOps[i];
      s += (i ? ", \"" : "\"") + std::string(d.name) + "\": {";
      bool first = true;
      for (auto [name, def] : {std::pair<const char*, float>{d.a_name, d.a_default}, {d.b_name, d.b_default}}) {
        if (!name) continue;
        snprintf(buf, sizeof buf, "%.9g", def);
        s += (first ? "\"" : ", \"") + std::string(name) + "\": " + buf;
        first = false;
      }
      s += "}";
    }
    s += "}}";
    return s;
  }();
  return json.c_str();
}
