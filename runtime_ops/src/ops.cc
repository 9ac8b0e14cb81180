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
std::mutex g_mutex;
std::vector<OrtCustomOpDomain*> g_domains;  // see RegisterCustomOps

void init_ops(uint32_t version) {
  for (int ep = 0; ep < kNumEps; ++ep)
    for (int i = 0; i < kNumOps; ++i)
      for (int t = 0; t < kNumDTypes; ++t) {
        NormOp& o = g_ops[ep][i][t];
        memset(static_cast<OrtCustomOp*>(&o), 0, sizeof(OrtCustomOp));
        // The struct layout is this header's (API 21); `version` tells the
        // runtime which trailing fields it may read, capped at its own API.
        o.version = version;
        o.GetName = get_name;
        o.GetExecutionProviderType = get_ep;
        o.GetInputType = get_type;
        o.GetInputTypeCount = one;
        o.GetOutputType = get_type;
        o.GetOutputTypeCount = one;
        o.KernelDestroy = destroy_kernel;
        o.GetInputCharacteristic = required;
        o.GetOutputCharacteristic = required;
        o.GetInputMemoryType = mem_default;
        o.GetVariadicInputMinArity = arity_one;
        o.GetVariadicInputHomogeneity = homogeneous;
        o.GetVariadicOutputMinArity = arity_one;
        o.GetVariadicOutputHomogeneity = homogeneous;
        o.CreateKernelV2 = create_kernel;
        o.KernelComputeV2 = compute;
        // No InferOutputShapeFn: ONNX Runtime's shape-inference context cannot
        // tell a scalar input from one of unknown rank, so copying the input
        // shape would declare unknown-rank outputs as scalars.  The schema's
        // type constraint still gives the output its element type.
        o.GetStartVersion = version_one;
        o.GetEndVersion = version_one;
        o.GetMayInplace = may_inplace;  // read by runtimes >= 1.18 only
        o.ReleaseMayInplace = release_index_pair;
        o.op = i;
        o.dtype = t;
        o.cuda = ep == 1;
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
