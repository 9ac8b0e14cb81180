"""Bounded, sigmoid-shaped activations: Sigmoid, HardSigmoid, Tanh, Softsign.

These are also the usual multiplicative gates (squeeze-excitation, LSTM/GRU,
attention gating), so they are marked ``gate_like``: the site finder reports a
gate but rewrites it only when asked.
"""

from __future__ import annotations

import numpy as np

from .base import Activation, Body, OpForm, attrs_reader, no_params, one_minus_square, sigmoid, step
from .patterns import C, DecomposedForm, X, node


def _hard_sigmoid_body(b: Body, x: str) -> str:
    if b.gradient_safe:
        lin = b.op("Add", b.op("Mul", x, b.param("alpha")), b.param("beta"))
        return b.op("Max", b.op("Min", lin, b.const(1.0)), b.const(0.0))
    return b.op("HardSigmoid", x, alpha=b.attr("alpha"), beta=b.attr("beta"))


def _softsign_body(b: Body, x: str) -> str:
    if b.gradient_safe:
        return b.op("Div", x, b.op("Add", b.op("Abs", x), b.const(1.0)))
    return b.op("Softsign", x)


def _sigmoid_derivative_body(b: Body, x: str) -> str:
    s = b.op("Sigmoid", x)
    return b.op("Mul", s, b.op("Sub", b.const(1.0), s))


def _hard_sigmoid_derivative_body(b: Body, x: str) -> str:
    """alpha strictly inside the linear part (0 < alpha·x + beta < 1), else 0."""
    lin = b.op("Add", b.op("Mul", x, b.param("alpha")), b.param("beta"))
    inside = b.op("Mul", step(b, lin), step(b, lin, b.const(1.0), "Less"))
    return b.op("Mul", b.param("alpha"), inside)


def _softsign_derivative_body(b: Body, x: str) -> str:
    d = b.op("Add", b.op("Abs", x), b.const(1.0))
    return b.op("Reciprocal", b.op("Mul", d, d))


SIGMOID = Activation(
    kind="sigmoid",
    op_name="NormSigmoid",
    forward=sigmoid,
    derivative=lambda x: sigmoid(x) * (1.0 - sigmoid(x)),
    body=lambda b, x: b.op("Sigmoid", x),
    ops=(OpForm("Sigmoid", no_params),),
    gate_like=True,
    summary="1 / (1 + e⁻ˣ)",
    derivative_body=_sigmoid_derivative_body,
)

HARD_SIGMOID = Activation(
    kind="hard_sigmoid",
    op_name="NormHardSigmoid",
    params={"alpha": 0.2, "beta": 0.5},
    forward=lambda x, alpha, beta: np.clip(alpha * x + beta, 0.0, 1.0),
    derivative=lambda x, alpha, beta: np.where((alpha * x + beta > 0) & (alpha * x + beta < 1), alpha, 0.0),
    body=_hard_sigmoid_body,
    ops=(OpForm("HardSigmoid", attrs_reader(alpha=0.2, beta=0.5)),),
    kinks=lambda p: (-p["beta"] / p["alpha"], (1.0 - p["beta"]) / p["alpha"]) if p["alpha"] else (),
    gate_like=True,
    summary="max(0, min(1, alpha·x + beta))",
    derivative_body=_hard_sigmoid_derivative_body,
)

TANH = Activation(
    kind="tanh",
    op_name="NormTanh",
    forward=np.tanh,
    derivative=lambda x: 1.0 - np.tanh(x) ** 2,
    body=lambda b, x: b.op("Tanh", x),
    ops=(OpForm("Tanh", no_params),),
    gate_like=True,
    summary="tanh(x)",
    derivative_body=lambda b, x: one_minus_square(b, b.op("Tanh", x)),
)

SOFTSIGN = Activation(
    kind="softsign",
    op_name="NormSoftsign",
    forward=lambda x: x / (1.0 + np.abs(x)),
    derivative=lambda x: 1.0 / (1.0 + np.abs(x)) ** 2,
    body=_softsign_body,
    ops=(OpForm("Softsign", no_params),),
    patterns=(DecomposedForm("x/(1+|x|)", node("Div", X, node("Add", node("Abs", X), C(1.0), comm=True))),),
    gate_like=True,
    summary="x / (1 + |x|)",
    derivative_body=_softsign_derivative_body,
)

ENTRIES = (SIGMOID, HARD_SIGMOID, TANH, SOFTSIGN)
