// register.cc -- registration of the ai.normact custom ops with ONNX Runtime
// (RegisterCustomOps) and the library's self-description (NormactLibraryInfo).
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
#include <stdio.h>
#include <string.h>

#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "cpu_dispatch.h"
#include "insitu_op.h"
#include "normact_ort_f.h"
#if defined(NORMACT_WITH_CUDA)
#include "cuda_device.h"
#endif
#include "kernels.h"
#include "norm_op.h"
#include "onnxruntime_c_api.h"
#include "op_table.h"
#include "stats_op.h"

#define NORMACT_EXPORT extern "C" __attribute__((visibility("default")))

// The package version (CMake reads it from src/normact_onnx/__init__.py, its one place).
#ifndef NORMACT_VERSION
#define NORMACT_VERSION "unknown"
#endif

namespace normact {
namespace {

// The API table of the runtime that loaded us (set once the ops are initialized).
const OrtApi* g_api = nullptr;

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
InSituOp g_insitu_op;
std::mutex g_mutex;
std::vector<OrtCustomOpDomain*> g_domains;  // see RegisterCustomOps

// The OrtCustomOp fields every op of the library sets the same way (single-tensor inputs and
// outputs, all required, opset version 1, default memory); each op kind then fills in its own
// callbacks (init_norm_op, init_stats_op).
void init_common(OrtCustomOp& o, uint32_t version) {
  memset(&o, 0, sizeof(OrtCustomOp));
  // The struct layout is this header's (API 21); `version` tells the
  // runtime which trailing fields it may read, capped at its own API.
  o.version = version;
  o.GetInputCharacteristic = required;
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
        init_common(g_ops[ep][i][t], version);
        init_norm_op(g_ops[ep][i][t], i, t, ep == 1);
      }
  for (int i = 0; i < kNumOps; ++i)
    for (int t = 0; t < kNumDTypes; ++t) {
      init_common(g_stats_ops[i][t], version);
      init_stats_op(g_stats_ops[i][t], i, t);
    }
  init_common(g_insitu_op, version);
  init_insitu_op(g_insitu_op);
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

#if defined(NORMACT_WITH_CUDA)
  // A driver older than the static CUDA runtime fails every launch with "CUDA
  // driver version is insufficient"; refuse here, once, naming the driver needed.
  const std::string driver = cuda::driver_problem(cuda::installed_driver_version());
  if (!driver.empty()) return api->CreateStatus(ORT_FAIL, driver.c_str());
#endif

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
  if (!st) st = api->CustomOpDomain_Add(domain, &g_insitu_op);
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
    std::string s = std::string("{\"version\": \"") + NORMACT_VERSION + "\", \"domain\": \"" + kDomain;
    s += "\", \"opset\": ";
    s += std::to_string(NORMACT_DOMAIN_VERSION) + ", \"min_ort_api\": " + std::to_string(kMinApiVersion);
    s += ", \"header_api\": " + std::to_string(ORT_API_VERSION);
#if defined(NORMACT_WITH_CUDA)
    s += ", \"cuda\": true, \"cuda_runtime\": " + std::to_string(cuda::runtime_version());
    s += ", \"cuda_architectures\": \"" + std::string(cuda::kArchitectures) + "\"";
#else
    s += ", \"cuda\": false";
#endif
    s += ", \"cpu_isa\": \"";
    s += cpu_isa_name();
    // Every op X also has a statistics op X + stats_suffix (calibration).
    s += "\", \"stats_suffix\": \"";
    s += kStatsSuffix;
    // Calibration's in-situ normalization of one float32 site (insitu_op.h).
    s += "\", \"insitu_op\": \"";
    s += kInSituOpName;
    // Statistics ops that, given x alone, compute ONNX Runtime's own f
    // (normact_ort_f.h): calibration may then skip reading f (after a check).
    s += "\", \"ort_f\": [";
    bool any = false;
#define NORMACT_ORT_F_NAME(name, functor, kind, an, ad, bn, bd) \
    if (ortf::OrtF<act::functor>::kExact) {                     \
      s += any ? ", \"" #name "\"" : "\"" #name "\"";           \
      any = true;                                               \
    }
    NORMACT_OP_TABLE(NORMACT_ORT_F_NAME)
#undef NORMACT_ORT_F_NAME
    s += "], \"ops\": {";
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
    // The catalogue kind of each op (the table is generated from the catalogue).
    s += "}, \"kinds\": {";
    for (int i = 0; i < kNumOps; ++i)
      s += (i ? ", \"" : "\"") + std::string(kOps[i].name) + "\": \"" + kOps[i].kind + "\"";
    s += "}}";
    return s;
  }();
  return json.c_str();
}

#if defined(NORMACT_WITH_CUDA)
// What RegisterCustomOps says about a driver supporting CUDA `driver_version`
// (cudaDriverGetVersion's encoding, 0 = none): "" when it can run the library.
// Exported so the tests check the message on machines without (an old) driver.
NORMACT_EXPORT const char* NormactCudaDriverCheck(int driver_version) {
  thread_local std::string why;
  why = cuda::driver_problem(driver_version);
  return why.c_str();
}
#endif
