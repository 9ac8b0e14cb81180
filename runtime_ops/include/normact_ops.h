// normact_ops.h -- the single table of Norm<Act> ops.
//
// Every op takes one input X and returns Y = scale * (f(X) - shift - slope * X)
// with float attributes scale (1), shift (0), slope (0) plus up to two of the
// activation's own float attributes (names as in the matching ONNX op).  The
// CPU and CUDA registration code and the kernel dispatch tables are all
// generated from this X-macro, so adding an op is one line here plus its
// functor in normact_math.h.
//
//   X(op name, functor in normact::act, attr a name, a default, attr b name, b default)
//
// Unused attribute slots have a null name.  This table must agree with the
// Python catalogue (normact_onnx.catalogue): the tests check that it does.
#pragma once

#define NORMACT_SELU_ALPHA 1.67326319217681884765625f
#define NORMACT_SELU_GAMMA 1.05070102214813232421875f
#define NORMACT_FLT_MAX 3.402823466e+38f

#define NORMACT_OP_TABLE(X)                                                   \
  X(NormRelu, Relu, nullptr, 0.0f, nullptr, 0.0f)                             \
  X(NormLeakyRelu, LeakyRelu, "alpha", 0.01f, nullptr, 0.0f)                  \
  X(NormPRelu, LeakyRelu, "alpha", 0.25f, nullptr, 0.0f)                      \
  X(NormElu, Elu, "alpha", 1.0f, nullptr, 0.0f)                               \
  X(NormSelu, Selu, "alpha", NORMACT_SELU_ALPHA, "gamma", NORMACT_SELU_GAMMA) \
  X(NormCelu, Celu, "alpha", 1.0f, nullptr, 0.0f)                             \
  X(NormSigmoid, Sigmoid, nullptr, 0.0f, nullptr, 0.0f)                       \
  X(NormHardSigmoid, HardSigmoid, "alpha", 0.2f, "beta", 0.5f)                \
  X(NormTanh, Tanh, nullptr, 0.0f, nullptr, 0.0f)                             \
  X(NormSoftplus, Softplus, nullptr, 0.0f, nullptr, 0.0f)                     \
  X(NormSoftsign, Softsign, nullptr, 0.0f, nullptr, 0.0f)                     \
  X(NormSilu, Silu, nullptr, 0.0f, nullptr, 0.0f)                             \
  X(NormHardSwish, HardSwish, nullptr, 0.0f, nullptr, 0.0f)                   \
  X(NormMish, Mish, nullptr, 0.0f, nullptr, 0.0f)                             \
  X(NormGelu, Gelu, nullptr, 0.0f, nullptr, 0.0f)                             \
  X(NormGeluTanh, GeluTanh, nullptr, 0.0f, nullptr, 0.0f)                     \
  X(NormClip, Clip, "min", -NORMACT_FLT_MAX, "max", NORMACT_FLT_MAX)          \
  X(NormAbs, Abs, nullptr, 0.0f, nullptr, 0.0f)

namespace normact {

// Index of each op in the table (kOp_NormRelu, ...) and the op count.
enum OpIndex {
#define NORMACT_ENUM(name, functor, an, ad, bn, bd) kOp_##name,
  NORMACT_OP_TABLE(NORMACT_ENUM)
#undef NORMACT_ENUM
  kNumOps
};

// Storage types a kernel is instantiated for (math is always float32).
enum DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kNumDTypes = 3 };

}  // namespace normact
