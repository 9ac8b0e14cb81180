"""Exponential-family activations: ELU, SELU, CELU, Softplus.

Their ONNX ops have no gradient in ONNX Runtime training, so each body also knows
a decomposition into ops that do (Relu, Exp, Min, Log …) that never evaluates an
exponential of a large positive number (the unselected branch of a Where would
still poison gradients with inf·0).
"""

from __future__ import annotations

import numpy as np

from .base import Activation, Body, OpForm, attrs_reader, no_params, sigmoid, softplus, step
from .patterns import C, DecomposedForm, X, node

SELU_ALPHA = 1.67326319217681884765625  # ONNX's defaults (float32-exact)
SELU_GAMMA = 1.05070102214813232421875


def _neg_part_exp(b: Body, x: str, alpha: str, divide: bool = False) -> str:
    """alpha·(exp(min(x,0)[/alpha]) − 1): the negative branch, finite for every x."""
    m = b.op("Min", x, b.const(0.0))
    if divide:
        m = b.op("Div", m, alpha)
    return b.op("Mul", alpha, b.op("Sub", b.op("Exp", m), b.const(1.0)))


def _elu_body(b: Body, x: str) -> str:
    if b.gradient_safe:
        return b.op("Add", b.op("Relu", x), _neg_part_exp(b, x, b.param("alpha")))
    return b.op("Elu", x, alpha=b.attr("alpha"))


def _selu_body(b: Body, x: str) -> str:
    if b.gradient_safe:
        inner = b.op("Add", b.op("Relu", x), _neg_part_exp(b, x, b.param("alpha")))
        return b.op("Mul", b.param("gamma"), inner)
    return b.op("Selu", x, alpha=b.attr("alpha"), gamma=b.attr("gamma"))


def _celu_body(b: Body, x: str) -> str:
    # Always decomposed: ONNX's Celu op accepts float32 only, and the Norm function is type-generic.
    return b.op("Add", b.op("Relu", x), _neg_part_exp(b, x, b.param("alpha"), divide=True))


def softplus_body(b: Body, x: str) -> str:
    """Softplus, or relu(x) + log(1 + exp(−|x|)) where gradients are needed."""
    if b.gradient_safe:
        tail = b.op("Log", b.op("Add", b.op("Exp", b.op("Neg", b.op("Abs", x))), b.const(1.0)))
        return b.op("Add", b.op("Relu", x), tail)
    return b.op("Softplus", x)


def _elu_derivative_body(b: Body, x: str) -> str:
    """1 for x > 0, else alpha·eˣ (exp of min(x, 0): never overflows)."""
    s = step(b, x)
    neg = b.op("Mul", b.param("alpha"), b.op("Exp", b.op("Min", x, b.const(0.0))))
    return b.op("Add", s, b.op("Mul", b.op("Sub", b.const(1.0), s), neg))


def _elu(x: np.ndarray, alpha: float) -> np.ndarray:
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))


ELU = Activation(
    kind="elu",
    op_name="NormElu",
    params={"alpha": 1.0},
    forward=_elu,
    derivative=lambda x, alpha: np.where(x > 0, 1.0, alpha * np.exp(np.minimum(x, 0.0))),
    body=_elu_body,
    ops=(OpForm("Elu", attrs_reader(alpha=1.0)),),
    kinks=lambda p: (0.0,),
    summary="x if x > 0 else alpha·(eˣ − 1)",
    derivative_body=_elu_derivative_body,
)

SELU = Activation(
    kind="selu",
    op_name="NormSelu",
    params={"alpha": SELU_ALPHA, "gamma": SELU_GAMMA},
    forward=lambda x, alpha, gamma: gamma * _elu(x, alpha),
    derivative=lambda x, alpha, gamma: gamma * np.where(x > 0, 1.0, alpha * np.exp(np.minimum(x, 0.0))),
    body=_selu_body,
    ops=(OpForm("Selu", attrs_reader(alpha=SELU_ALPHA, gamma=SELU_GAMMA)),),
    kinks=lambda p: (0.0,),
    summary="gamma·(x if x > 0 else alpha·(eˣ − 1))",
    derivative_body=lambda b, x: b.op("Mul", b.param("gamma"), _elu_derivative_body(b, x)),
)

CELU = Activation(
    kind="celu",
    op_name="NormCelu",
    params={"alpha": 1.0},
    forward=lambda x, alpha: np.maximum(x, 0.0) + np.minimum(0.0, alpha * np.expm1(np.minimum(x, 0.0) / alpha)),
    derivative=lambda x, alpha: np.where(x > 0, 1.0, np.exp(np.minimum(x, 0.0) / alpha)),
    body=_celu_body,
    ops=(OpForm("Celu", attrs_reader(alpha=1.0), min_opset=12),),
    kinks=lambda p: (0.0,),
    summary="max(0, x) + min(0, alpha·(e^(x/alpha) − 1))",
    derivative_body=lambda b, x: b.op("Exp", b.op("Div", b.op("Min", x, b.const(0.0)), b.param("alpha"))),
)

SOFTPLUS = Activation(
    kind="softplus",
    op_name="NormSoftplus",
    forward=softplus,
    derivative=sigmoid,
    body=softplus_body,
    ops=(OpForm("Softplus", no_params),),
    patterns=(  # torch's Softplus(threshold=t): where(x > t, x, softplus(x)); equal to softplus in float for t ≥ 15
        DecomposedForm(
            "Where(x > t, x, Softplus(x))",
            node("Where", node("Greater", X, C(None, rtol=0)), X, node("Softplus", X)),
        ),
    ),
    summary="log(1 + eˣ)",
    derivative_body=lambda b, x: b.op("Sigmoid", x),
)

ENTRIES = (ELU, SELU, CELU, SOFTPLUS)
