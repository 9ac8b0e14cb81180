// op_table.cc -- the op descriptors, generated from NORMACT_OP_TABLE.
#include "op_table.h"

namespace normact {

#define NORMACT_DESC(name, functor, kind, an, ad, bn, bd) {#name, kind, an, ad, bn, bd},
const OpDesc kOps[kNumOps] = {NORMACT_OP_TABLE(NORMACT_DESC)};
#undef NORMACT_DESC

const ONNXTensorElementDataType kOrtType[kNumDTypes] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16};

}  // namespace normact
