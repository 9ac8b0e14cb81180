// norm_op.h -- the ai.normact::Norm<Act> ops: one OrtCustomOp per (op, storage
// type, execution provider); the kernel reads the node's attributes once and
// runs the CPU loops (ParallelFor) or launches the CUDA kernel on ONNX
// Runtime's compute stream.
#pragma once

#include "onnxruntime_c_api.h"

namespace normact {

struct NormOp : OrtCustomOp {
  int op;
  int dtype;
  bool cuda;
};

// Sets o's Norm<Act> callbacks and identity; the fields every op of the library
// shares are set by the caller (init_common in register.cc).
void init_norm_op(NormOp& o, int op, int dtype, bool cuda);

}  // namespace normact
