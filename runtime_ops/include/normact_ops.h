// normact_ops.h -- the ai.normact ops: the op table and the indices generated from it.
//
// Every op takes one input X and returns Y = scale * (f(X) - shift - slope * X)
// with float attributes scale (1), shift (0), slope (0) plus up to two of the
// activation's own float attributes (names as in the matching ONNX op).  The
// CPU and CUDA registration code and the kernel dispatch tables are all
// generated from the X-macro NORMACT_OP_TABLE, which is itself generated from
// the Python catalogue (normact_onnx.catalogue) by
// runtime_ops/tools/gen_op_table.py into normact_op_table.h.  Adding an op is a
// catalogue entry, a rerun of that script, and its functor in
// normact_activations.h.
#pragma once

#include "normact_op_table.h"

namespace normact {

// Index of each op in the table (kOp_NormRelu, ...) and the op count.
enum OpIndex {
#define NORMACT_ENUM(name, functor, kind, an, ad, bn, bd) kOp_##name,
  NORMACT_OP_TABLE(NORMACT_ENUM)
#undef NORMACT_ENUM
  kNumOps
};

// Storage types a kernel is instantiated for (math is always float32).
enum DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kNumDTypes = 3 };

}  // namespace normact
