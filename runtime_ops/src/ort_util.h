// ort_util.h -- small helpers over the ONNX Runtime C API that both kernels
// (norm_op.cc, stats_op.cc) use: error statuses, float attributes, tensor shapes.
// Plain C API: no C++ wrapper exceptions cross the ABI.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <string>
#include <vector>

#include "onnxruntime_c_api.h"

#define NORMACT_RETURN_IF_ERROR(expr) \
  do {                                \
    OrtStatusPtr _st = (expr);        \
    if (_st) return _st;              \
  } while (0)

namespace normact {

OrtStatusPtr make_error(const OrtApi* api, OrtErrorCode code, const std::string& msg);

// Reads a float attribute; absent -> the default; present with another type
// (e.g. alpha=1 written as an int) -> an error rather than silently ignoring it.
// A null `name` (an unused attribute slot) just yields the default.
OrtStatusPtr read_float(const OrtApi* api, const OrtKernelInfo* info, const char* op, const char* name,
                        float fallback, float* out);

// Dimensions, element count and element type of a tensor value.
OrtStatusPtr tensor_info(const OrtApi* api, const OrtValue* v, std::vector<int64_t>* dims, size_t* n,
                         ONNXTensorElementDataType* type);

}  // namespace normact
