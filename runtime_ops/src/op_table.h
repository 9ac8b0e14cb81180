// op_table.h -- the descriptors of the ai.normact ops: name and activation
// attributes with their defaults, one row per NORMACT_OP_TABLE entry, and the
// constants the registration shares (domain, execution provider, API level).
// NORMACT_OP_TABLE and NORMACT_DOMAIN come from the catalogue (normact_op_table.h).
#pragma once

#include <stdint.h>

#include "normact_ops.h"
#include "onnxruntime_c_api.h"

namespace normact {

// Minimum ONNX Runtime C API (1.17: KernelContext_ParallelFor, the OrtCustomOp
// fields up to GetStartVersion/GetEndVersion/InferOutputShapeFn).
constexpr uint32_t kMinApiVersion = 17;
constexpr const char* kDomain = NORMACT_DOMAIN;
constexpr const char* kCudaEp = "CUDAExecutionProvider";
// Every op X also has a statistics op X + kStatsSuffix (calibration).
constexpr const char* kStatsSuffix = "Stats";

struct OpDesc {
  const char* name;
  const char* kind;    // the catalogue entry (normact_onnx.catalogue) it computes
  const char* a_name;  // the activation's first float attribute, or null
  float a_default;
  const char* b_name;  // its second, or null
  float b_default;
};

extern const OpDesc kOps[kNumOps];
// The ONNX element type of each storage type (DType).
extern const ONNXTensorElementDataType kOrtType[kNumDTypes];

}  // namespace normact
