// insitu_op.cc -- NormInSitu (see insitu_op.h): per-channel float32 constants
// from the batch's float64 statistics, then one pass Y = (F - shift) * scale.
// Compiled with -ffp-contract=off: every product and sum is rounded on its own,
// as the standard ops round them.
#include "insitu_op.h"

#include <math.h>

#include <string>
#include <vector>

#include "cpu_dispatch.h"
#include "normact_ort_f.h"
#include "op_table.h"
#include "ort_util.h"

namespace normact {
namespace {

constexpr size_t kNumStats = 5;  // mean x, ss x, mean f, ss f, ss f'
constexpr size_t kApplyChunk = size_t(1) << 18;  // elements per ParallelFor task (1 MiB of float32)
constexpr size_t kXInput = 2 + kNumStats;         // X, when F is absent
constexpr size_t kFBlock = 1024;                  // f computed from x a block at a time

// Whether the library computes ONNX Runtime's own f for op i (normact_ort_f.h).
#define NORMACT_INSITU_EXACT(name, functor, kind, an, ad, bn, bd) ortf::OrtF<act::functor>::kExact,
constexpr bool kOrtFExact[kNumOps] = {NORMACT_OP_TABLE(NORMACT_INSITU_EXACT)};
#undef NORMACT_INSITU_EXACT

struct InSituKernel {
  const OrtApi* api;
  int64_t rule;
  bool centered;
  float eps;
  bool per_channel;
  int64_t axis;
  CpuOrtFFn ort_f;  // with attribute `activation`: f from X when F is absent
  Params params;
};

// The `activation` attribute (an op name such as NormSilu) and its parameters, when given.
OrtStatusPtr read_activation(const OrtApi* api, const OrtKernelInfo* info, CpuOrtFFn* fn, Params* p) {
  size_t size = 0;
  OrtStatusPtr st = api->KernelInfoGetAttribute_string(info, "activation", nullptr, &size);
  if (st) {  // absent: the op reads F
    api->ReleaseStatus(st);
    return nullptr;
  }
  std::string name(size, '\0');
  NORMACT_RETURN_IF_ERROR(api->KernelInfoGetAttribute_string(info, "activation", &name[0], &size));
  name.resize(size ? size - 1 : 0);
  for (int i = 0; i < kNumOps; ++i) {
    if (name != kOps[i].name) continue;
    if (!kOrtFExact[i])
      return make_error(api, ORT_INVALID_ARGUMENT,
                        std::string(kInSituOpName) + ": the library does not compute ONNX Runtime's f for " + name);
    NORMACT_RETURN_IF_ERROR(read_float(api, info, kInSituOpName, kOps[i].a_name, kOps[i].a_default, &p->a));
    NORMACT_RETURN_IF_ERROR(read_float(api, info, kInSituOpName, kOps[i].b_name, kOps[i].b_default, &p->b));
    *fn = select_ort_f_table()[i];
    return nullptr;
  }
  return make_error(api, ORT_INVALID_ARGUMENT, std::string(kInSituOpName) + ": unknown activation " + name);
}

OrtStatusPtr ORT_API_CALL create_insitu_kernel(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info,
                                               void** kernel) {
  int64_t rule = 0, centered = 0, axis = 0;
  OrtStatusPtr st = api->KernelInfoGetAttribute_int64(info, "rule", &rule);
  if (st) return st;
  if (rule < 0 || rule > 2)
    return make_error(api, ORT_INVALID_ARGUMENT, std::string(kInSituOpName) + ": rule must be 0, 1 or 2");
  st = api->KernelInfoGetAttribute_int64(info, "centered", &centered);
  if (st) api->ReleaseStatus(st);
  float eps = 0.0f;
  NORMACT_RETURN_IF_ERROR(read_float(api, info, kInSituOpName, "epsilon", 1e-12f, &eps));
  st = api->KernelInfoGetAttribute_int64(info, "axis", &axis);
  const bool per_channel = st == nullptr;
  if (st) api->ReleaseStatus(st);
  CpuOrtFFn fn = nullptr;
  Params p{1.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  NORMACT_RETURN_IF_ERROR(read_activation(api, info, &fn, &p));
  *kernel = new InSituKernel{api, rule, centered != 0, eps, per_channel, axis, fn, p};
  return nullptr;
}

// The batch's constants for one channel, in the standard-op graph's order of operations.
void constants(const InSituKernel& k, float n, double x_ss, double f_mean, double f_ss, double d_ss, float* scale,
               float* shift) {
  const float var_x = (float)x_ss / n;
  const float var_f = (float)f_ss / n;
  const float mean_f = (float)f_mean;
  const float eps = k.eps, two = 2.0f;
  if (k.rule == 2) {
    *scale = 1.0f / sqrtf(var_f + eps);
  } else {
    const float m2 = k.centered ? var_f : var_f + mean_f * mean_f;
    const float rho = m2 / (var_x + eps);
    const float drho = (float)d_ss / n;
    if (k.rule == 0) {
      const float num = (rho + drho) + eps;
      const float den = two * (rho * drho) + eps;
      *scale = sqrtf(num / den);
    } else {
      *scale = sqrtf(two / ((rho + drho) + eps));
    }
  }
  *shift = mean_f;
}

struct ApplyJob {
  const float* f;
  float* y;
  const float* scale;
  const float* shift;
  size_t channels, inner, step, n;
  const float* x;   // with f null: f = ort_f(x)
  CpuOrtFFn ort_f;
  const Params* params;
};

// y[begin, end) from f[0, end - begin) (f's elements begin..end).
void apply_range(const ApplyJob& j, const float* f, size_t begin, size_t end);

// F absent: f = ONNX Runtime's f(x) a block at a time into a local buffer, then the same pass over it.
void apply_from_x(const ApplyJob& j, size_t begin, size_t end) {
  alignas(64) float buf[kFBlock];
  for (size_t b = begin; b < end; b += kFBlock) {
    const size_t e = b + kFBlock < end ? b + kFBlock : end;
    j.ort_f(j.x + b, buf, e - b, *j.params);
    apply_range(j, buf, b, e);
  }
}

void apply_task(void* data, size_t t) {
  const ApplyJob& j = *static_cast<const ApplyJob*>(data);
  const size_t begin = t * j.step;
  const size_t end = begin + j.step < j.n ? begin + j.step : j.n;
  if (j.f == nullptr) {
    apply_from_x(j, begin, end);
  } else {
    apply_range(j, j.f + begin, begin, end);
  }
}

void apply_range(const ApplyJob& j, const float* f, size_t begin, size_t end) {
  if (j.channels == 1) {
    const float s = j.scale[0], h = j.shift[0];
    for (size_t i = begin; i < end; ++i) j.y[i] = (f[i - begin] - h) * s;
    return;
  }
  size_t i = begin;
  while (i < end) {  // runs of one channel
    const size_t c = (i / j.inner) % j.channels;
    const size_t stop = (i / j.inner + 1) * j.inner < end ? (i / j.inner + 1) * j.inner : end;
    const float s = j.scale[c], h = j.shift[c];
    for (; i < stop; ++i) j.y[i] = (f[i - begin] - h) * s;
  }
}

OrtStatusPtr ORT_API_CALL compute_insitu(void* kernel, OrtKernelContext* ctx) {
  const InSituKernel& k = *static_cast<const InSituKernel*>(kernel);
  const OrtApi* api = k.api;
  const std::string name = std::string("ai.normact::") + kInSituOpName;
  const OrtValue* fin = nullptr;
  NORMACT_RETURN_IF_ERROR(api->KernelContext_GetInput(ctx, 0, &fin));
  size_t inputs = 0;
  NORMACT_RETURN_IF_ERROR(api->KernelContext_GetInputCount(ctx, &inputs));
  const OrtValue* xin = nullptr;
  if (inputs > kXInput) NORMACT_RETURN_IF_ERROR(api->KernelContext_GetInput(ctx, kXInput, &xin));
  if (!fin && !(xin && k.ort_f))
    return make_error(api, ORT_INVALID_ARGUMENT, name + ": needs F, or X with the activation attribute");
  if (!fin) fin = xin;  // the shape is X's; f is computed from it
  std::vector<int64_t> dims;
  size_t n = 0;
  ONNXTensorElementDataType type{};
  NORMACT_RETURN_IF_ERROR(tensor_info(api, fin, &dims, &n, &type));
  const int64_t rank = (int64_t)dims.size();
  size_t channels = 1, inner = 1;
  if (k.per_channel) {
    const int64_t axis = k.axis < 0 ? k.axis + rank : k.axis;
    if (axis < 0 || axis >= rank)
      return make_error(api, ORT_INVALID_ARGUMENT,
                        name + ": axis " + std::to_string(k.axis) + " is out of range for rank " + std::to_string(rank));
    channels = (size_t)dims[axis];
    for (int64_t d = axis + 1; d < rank; ++d) inner *= (size_t)dims[d];
  }
  const OrtValue* cin = nullptr;
  NORMACT_RETURN_IF_ERROR(api->KernelContext_GetInput(ctx, 1, &cin));
  void* count_data = nullptr;
  NORMACT_RETURN_IF_ERROR(api->GetTensorMutableData(const_cast<OrtValue*>(cin), &count_data));
  const double* stats[kNumStats];
  size_t stat_size = 0;
  for (size_t s = 0; s < kNumStats; ++s) {
    const OrtValue* v = nullptr;
    NORMACT_RETURN_IF_ERROR(api->KernelContext_GetInput(ctx, 2 + s, &v));
    std::vector<int64_t> sd;
    size_t count = 0;
    ONNXTensorElementDataType st{};
    NORMACT_RETURN_IF_ERROR(tensor_info(api, v, &sd, &count, &st));
    if (count != channels)
      return make_error(api, ORT_INVALID_ARGUMENT,
                        name + ": statistic " + std::to_string(s) + " has " + std::to_string(count) +
                            " values, F has " + std::to_string(channels) + " channels");
    if (s == 0) stat_size = count;
    void* p = nullptr;
    NORMACT_RETURN_IF_ERROR(api->GetTensorMutableData(const_cast<OrtValue*>(v), &p));
    stats[s] = static_cast<const double*>(p);
  }
  OrtValue* yout = nullptr;
  NORMACT_RETURN_IF_ERROR(api->KernelContext_GetOutput(ctx, 0, dims.data(), dims.size(), &yout));
  float* y = nullptr;
  NORMACT_RETURN_IF_ERROR(api->GetTensorMutableData(yout, reinterpret_cast<void**>(&y)));
  if (n == 0) return nullptr;
  // n = Cast(count) / Cast(Size(mean x)), as the graph divides
  const float per = (float)*static_cast<const int64_t*>(count_data) / (float)stat_size;
  std::vector<float> scale(channels), shift(channels);
  for (size_t c = 0; c < channels; ++c)
    constants(k, per, stats[1][c], stats[2][c], stats[3][c], stats[4][c], &scale[c], &shift[c]);
  void* f = nullptr;
  NORMACT_RETURN_IF_ERROR(api->GetTensorMutableData(const_cast<OrtValue*>(fin), &f));
  const float* x = nullptr;
  if (fin == xin) {  // F absent: the data is X's
    x = static_cast<const float*>(f);
    f = nullptr;
  }
  // One pass of a read and a write is memory-bound: only large tensors are worth waking the pool's threads
  // for (on a busy machine a wake-up costs more than a small tensor's whole pass).
  size_t tasks = n / kApplyChunk;
  if (tasks > 64) tasks = 64;
  if (tasks < 1) tasks = 1;
  const size_t step = (n + tasks - 1) / tasks;
  tasks = (n + step - 1) / step;
  ApplyJob job{static_cast<const float*>(f), y, scale.data(), shift.data(), channels, inner, step, n, x, k.ort_f,
               &k.params};
  if (tasks == 1) {
    apply_task(&job, 0);
  } else {
    NORMACT_RETURN_IF_ERROR(api->KernelContext_ParallelFor(ctx, apply_task, tasks, 0, &job));
  }
  return nullptr;
}

void ORT_API_CALL destroy_insitu_kernel(void* kernel) { delete static_cast<InSituKernel*>(kernel); }
const char* ORT_API_CALL get_insitu_name(const OrtCustomOp*) { return kInSituOpName; }
const char* ORT_API_CALL cpu_ep(const OrtCustomOp*) { return nullptr; }
size_t ORT_API_CALL inputs(const OrtCustomOp*) { return kXInput + 1; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_kind(const OrtCustomOp*, size_t i) {
  return i == 0 || i == kXInput ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
size_t ORT_API_CALL one(const OrtCustomOp*) { return 1; }
ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp*, size_t i) {
  if (i == 0 || i == kXInput) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE;
}
ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

}  // namespace

void init_insitu_op(InSituOp& o) {
  o.GetName = get_insitu_name;
  o.GetExecutionProviderType = cpu_ep;
  o.GetInputType = input_type;
  o.GetInputTypeCount = inputs;
  o.GetOutputType = output_type;
  o.GetOutputTypeCount = one;
  o.KernelDestroy = destroy_insitu_kernel;
  o.GetInputCharacteristic = input_kind;
  o.CreateKernelV2 = create_insitu_kernel;
  o.KernelComputeV2 = compute_insitu;
}

}  // namespace normact
