// insitu_op.cc -- NormInSitu (see insitu_op.h): per-channel float32 constants
// from the batch's float64 statistics, then one pass Y = (F - shift) * scale.
// Compiled with -ffp-contract=off: every product and sum is rounded on its own,
// as the standard ops round them.
#include "insitu_op.h"

#include <math.h>

#include <string>
#include <vector>

#include "cpu_dispatch.h"
#include "ort_util.h"

namespace normact {
namespace {

constexpr size_t kNumStats = 5;  // mean x, ss x, mean f, ss f, ss f'
constexpr size_t kApplyChunk = size_t(1) << 18;  // elements per ParallelFor task (1 MiB of float32)

struct InSituKernel {
  const OrtApi* api;
  int64_t rule;
  bool centered;
  float eps;
  bool per_channel;
  int64_t axis;
};

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
  *kernel = new InSituKernel{api, rule, centered != 0, eps, per_channel, axis};
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
};

void apply_task(void* data, size_t t) {
  const ApplyJob& j = *static_cast<const ApplyJob*>(data);
  const size_t begin = t * j.step;
  const size_t end = begin + j.step < j.n ? begin + j.step : j.n;
  if (j.channels == 1) {
    const float s = j.scale[0], h = j.shift[0];
    for (size_t i = begin; i < end; ++i) j.y[i] = (j.f[i] - h) * s;
    return;
  }
  size_t i = begin;
  while (i < end) {  // runs of one channel
    const size_t c = (i / j.inner) % j.channels;
    const size_t stop = (i / j.inner + 1) * j.inner < end ? (i / j.inner + 1) * j.inner : end;
    const float s = j.scale[c], h = j.shift[c];
    for (; i < stop; ++i) j.y[i] = (j.f[i] - h) * s;
  }
}

OrtStatusPtr ORT_API_CALL compute_insitu(void* kernel, OrtKernelContext* ctx) {
  const InSituKernel& k = *static_cast<const InSituKernel*>(kernel);
  const OrtApi* api = k.api;
  const std::string name = std::string("ai.normact::") + kInSituOpName;
  const OrtValue* fin = nullptr;
  NORMACT_RETURN_IF_ERROR(api->KernelContext_GetInput(ctx, 0, &fin));
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
  // One pass of a read and a write is memory-bound: only large tensors are worth waking the pool's threads
  // for (on a busy machine a wake-up costs more than a small tensor's whole pass).
  size_t tasks = n / kApplyChunk;
  if (tasks > 64) tasks = 64;
  if (tasks < 1) tasks = 1;
  const size_t step = (n + tasks - 1) / tasks;
  tasks = (n + step - 1) / step;
  ApplyJob job{static_cast<const float*>(f), y, scale.data(), shift.data(), channels, inner, step, n};
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
size_t ORT_API_CALL inputs(const OrtCustomOp*) { return 2 + kNumStats; }
size_t ORT_API_CALL one(const OrtCustomOp*) { return 1; }
ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp*, size_t i) {
  if (i == 0) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
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
  o.CreateKernelV2 = create_insitu_kernel;
  o.KernelComputeV2 = compute_insitu;
}

}  // namespace normact
