// stats_op.cc -- the statistics kernel (see stats_op.h): per-task moments from
// the CPU loops, merged in order, and its OrtCustomOp callbacks.
#include "stats_op.h"

#include <string>
#include <vector>

#include "cpu_dispatch.h"
#include "kernels.h"
#include "op_table.h"
#include "ort_util.h"

namespace normact {
namespace {

constexpr int kNumStatsOutputs = 6;

struct StatsKernel {
  const OrtApi* api;
  Params params;
  CpuStatsFn fn;
  bool per_channel;
  int64_t axis;
  int op;
};

std::string stats_name(int op) { return std::string(kOps[op].name) + kStatsSuffix; }

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
    for (size_t t = 1; t < tasks; ++t) merge_moments(a, acc[t * channels + c]);
    outs[0][c] = a.mx;
    outs[1][c] = a.m2x;
    outs[2][c] = a.mf;
    outs[3][c] = a.m2f;
    outs[4][c] = a.d2;
  }
  return nullptr;
}

void ORT_API_CALL destroy_stats_kernel(void* kernel) { delete static_cast<StatsKernel*>(kernel); }

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

}  // namespace

void init_stats_op(StatsOp& o, int op, int dtype) {
  g_stats_names[op] = stats_name(op);
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
  o.op = op;
  o.dtype = dtype;
}

}  // namespace normact
