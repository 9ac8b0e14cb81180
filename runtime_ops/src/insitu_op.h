// insitu_op.h -- ai.normact::NormInSitu, calibration's in-situ normalization of
// one site in one op (see src/normact_onnx/calibration/insitu.py).
//   inputs   F (float32, optional): the activation's output; count (int64 scalar)
//            and the five float64 statistics of the site's Norm<Act>Stats op (mean
//            x, sum (x - mean x)^2, mean f, sum (f - mean f)^2, sum f'^2), shaped
//            as that op's outputs (one value, or one per channel along `axis`);
//            X (float32, optional, last): the pre-activation, read when F is absent
//   attrs    rule (int): 0 ANAct's lambda, 1 the xavier lambda sqrt(2/(rho+rho')),
//            2 static center-scale; centered (int): rho from Var f instead of E f^2;
//            epsilon (float); axis (int, optional): the statistics' channel axis;
//            activation (string, optional): the op name (NormSilu) whose ONNX
//            Runtime f (normact_ort_f.h) is computed from X when F is absent, with
//            that op's own attributes (alpha, ...).  Then ORT need not compute f
//            at all, nor reorder it out of its NCHWc layout.
//   outputs  Y (float32, F's shape) = (F - shift) * scale with this batch's
//            constants, computed in float32 in the order of the standard-op graph
//            insitu.batch_normalized writes, so Y is bit-identical to it.
// CPU only.
#pragma once

#include "onnxruntime_c_api.h"

namespace normact {

constexpr const char* kInSituOpName = "NormInSitu";

struct InSituOp : OrtCustomOp {};

// Sets o's callbacks over the fields every op of the library shares (init_common in register.cc).
void init_insitu_op(InSituOp& o);

}  // namespace normact
