// stats_op.h -- the ai.normact::Norm<Act>Stats ops (NormReluStats, ...):
// calibration's per-site reductions in one pass (see
// src/normact_onnx/calibration/instrument.py).
//   inputs   X (T), optional F (T): the activation's output; without it f(X) is
//            computed from the header's functor
//   attrs    the activation's own float attributes (as Norm<Act>), optional int
//            `axis`: per-channel statistics along it (else the whole tensor)
//   outputs  count (int64 scalar, elements of X), then float64 tensors shaped as
//            a keepdims reduction over every axis but `axis` (all axes without):
//            mean x, sum (x - mean x)^2, mean f, sum (f - mean f)^2, sum f'(x)^2
// CPU only (under the CUDA EP, ONNX Runtime copies X and F to the host).
#pragma once

#include "onnxruntime_c_api.h"

namespace normact {

struct StatsOp : OrtCustomOp {
  int op;
  int dtype;
};

// Sets o's statistics-op callbacks and identity over the fields every op of
// the library shares (init_common in register.cc).
void init_stats_op(StatsOp& o, int op, int dtype);

}  // namespace normact
