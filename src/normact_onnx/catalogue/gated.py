"""Self-gated activations x·g(x): SiLU/Swish, HardSwish, Mish, GELU (erf and tanh).

Exporters rarely write these as one op (older opsets have none), so each entry
lists the decomposed spellings that real exporters emit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..outcome import Refusal
from .base import Activation, Body, OpForm, erf, no_params, one_minus_square, sigmoid, softplus, step
from .exponential import softplus_body
from .patterns import Attr, C, DecomposedForm, N, Pattern, X, alt, node

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _half_x_times(one_plus: Pattern) -> tuple[N, ...]:
    """0.5·x·(1 + g) in the orders exporters write it: ((x·A)·0.5), ((x·0.5)·A), x·(A·0.5), (x·A)/2."""
    return (
        node("Mul", node("Mul", X, one_plus, comm=True), C(0.5), comm=True),
        node("Mul", node("Mul", X, C(0.5), comm=True), one_plus, comm=True),
        node("Mul", X, node("Mul", one_plus, C(0.5), comm=True), comm=True),
        node("Div", node("Mul", X, one_plus, comm=True), C(2.0)),
    )


_ERF_ARG = alt(node("Div", X, C(SQRT2)), node("Mul", X, C(1.0 / SQRT2), comm=True))
_ERF_ONE_PLUS = node("Add", node("Erf", _ERF_ARG), C(1.0), comm=True)

_CUBE = alt(
    node("Pow", X, C(3.0)),
    node("Mul", X, node("Mul", X, X), comm=True),
)
_JAX_CUBIC = node("Mul", X, C(GELU_CUBIC), comm=True)
_TANH_INNER = alt(
    node("Add", X, node("Mul", _CUBE, C(GELU_CUBIC), comm=True), comm=True),
    # jax (via jax2tf/tf2onnx): x + x·(x·(0.044715·x))
    node("Add", X, node("Mul", X, node("Mul", X, _JAX_CUBIC, comm=True), comm=True), comm=True),
)
_TANH_ONE_PLUS = node("Add", node("Tanh", node("Mul", _TANH_INNER, C(SQRT_2_OVER_PI), comm=True)), C(1.0), comm=True)

_CLIP_0_6 = alt(  # Clip(x+3, 0, 6): bounds as inputs (opset ≥ 11) or attributes (older)
    node("Clip", node("Add", X, C(3.0), comm=True), C(0.0), C(6.0)),
    node("Clip", node("Add", X, C(3.0), comm=True), min=Attr(0.0), max=Attr(6.0)),
)
_HARD_SWISH_FORMS = (
    DecomposedForm("Add→Clip→Div→Mul", node("Div", node("Mul", X, _CLIP_0_6, comm=True), C(6.0))),
    DecomposedForm("Add→Clip→Div→Mul", node("Mul", X, node("Div", _CLIP_0_6, C(6.0)), comm=True)),
    DecomposedForm("Add→Clip→Mul→Mul", node("Mul", X, node("Mul", _CLIP_0_6, C(1 / 6.0), comm=True), comm=True)),
    DecomposedForm(
        "x·HardSigmoid(x)",
        node("Mul", X, node("HardSigmoid", X, alpha=Attr(1 / 6.0, 0.2), beta=Attr(0.5, 0.5)), comm=True),
    ),
)


def _read_gelu(approximate: str) -> Any:
    def read(view: Any) -> dict[str, Any] | Refusal:
        got = view.attr("approximate", "none")
        return {} if got == approximate else Refusal(f"Gelu approximate={got!r}")

    return read


def _gelu_body(b: Body, x: str) -> str:
    if b.opset >= 20:
        return b.op("Gelu", x)
    one_plus = b.op("Add", b.op("Erf", b.op("Div", x, b.const(SQRT2))), b.const(1.0))
    return b.op("Mul", b.op("Mul", x, b.const(0.5)), one_plus)


def _gelu_tanh_body(b: Body, x: str) -> str:
    if b.opset >= 20 and not b.gradient_safe:
        return b.op("Gelu", x, approximate="tanh")
    cube = b.op("Mul", x, b.op("Mul", x, x))
    inner = b.op("Add", x, b.op("Mul", cube, b.const(GELU_CUBIC)))
    one_plus = b.op("Add", b.op("Tanh", b.op("Mul", inner, b.const(SQRT_2_OVER_PI))), b.const(1.0))
    return b.op("Mul", b.op("Mul", x, b.const(0.5)), one_plus)


def _hard_swish_body(b: Body, x: str) -> str:
    if b.opset >= 14 and not b.gradient_safe:
        return b.op("HardSwish", x)
    if not b.gradient_safe:  # x·HardSigmoid(x) with α = 1/6, β = 1/2: two ops where the exporters write four
        return b.op("Mul", x, b.op("HardSigmoid", x, alpha=1 / 6.0, beta=0.5))
    gate = b.op("Add", b.op("Mul", x, b.const(1 / 6.0)), b.const(0.5))
    return b.op("Mul", x, b.op("Max", b.op("Min", gate, b.const(1.0)), b.const(0.0)))


def _mish_body(b: Body, x: str) -> str:
    if b.opset >= 18 and not b.gradient_safe:
        return b.op("Mish", x)
    return b.op("Mul", x, b.op("Tanh", softplus_body(b, x)))


def _silu_derivative_body(b: Body, x: str) -> str:
    """σ(x)·(1 + x·(1 − σ(x)))."""
    s = b.op("Sigmoid", x)
    return b.op("Mul", s, b.op("Add", b.const(1.0), b.op("Mul", x, b.op("Sub", b.const(1.0), s))))


def _hard_swish_derivative_body(b: Body, x: str) -> str:
    """0 | (2x + 3)/6 | 1 on x < −3 | [−3, 3] | x > 3, as 1[x > −3]·g − 1[x > 3]·(g − 1) with g = x/3 + 1/2."""
    ramp = b.op("Add", b.op("Mul", x, b.const(1 / 3.0)), b.const(0.5))
    low = b.op("Mul", step(b, x, b.const(-3.0)), ramp)
    return b.op("Sub", low, b.op("Mul", step(b, x, b.const(3.0)), b.op("Sub", ramp, b.const(1.0))))


def _mish_derivative_body(b: Body, x: str) -> str:
    """tanh(sp) + x·σ(x)·(1 − tanh²(sp)), sp = softplus(x)."""
    t = b.op("Tanh", softplus_body(b, x))
    return b.op("Add", t, b.op("Mul", b.op("Mul", x, b.op("Sigmoid", x)), one_minus_square(b, t)))


def _gelu_derivative_body(b: Body, x: str) -> str:
    """Φ(x) + x·φ(x)."""
    cdf = b.op("Mul", b.op("Add", b.op("Erf", b.op("Div", x, b.const(SQRT2))), b.const(1.0)), b.const(0.5))
    gauss = b.op("Exp", b.op("Mul", b.op("Mul", x, x), b.const(-0.5)))
    return b.op("Add", cdf, b.op("Mul", x, b.op("Mul", gauss, b.const(INV_SQRT_2PI))))


def _gelu_tanh_derivative_body(b: Body, x: str) -> str:
    """0.5·(1 + t) + 0.5·x·(1 − t²)·√(2/π)·(1 + 3c·x²), t = tanh(√(2/π)·(x + c·x³))."""
    x2 = b.op("Mul", x, x)
    cubic = b.op("Add", x, b.op("Mul", b.op("Mul", x2, x), b.const(GELU_CUBIC)))
    t = b.op("Tanh", b.op("Mul", cubic, b.const(SQRT_2_OVER_PI)))
    slope = b.op("Add", b.op("Mul", x2, b.const(3.0 * GELU_CUBIC * SQRT_2_OVER_PI)), b.const(SQRT_2_OVER_PI))
    tail = b.op("Mul", b.op("Mul", x, one_minus_square(b, t)), slope)
    return b.op("Mul", b.op("Add", b.op("Add", b.const(1.0), t), tail), b.const(0.5))


def _phi(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x**3)))


def _gelu_tanh_derivative(x: np.ndarray) -> np.ndarray:
    t = np.tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x**3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x)


def _mish_derivative(x: np.ndarray) -> np.ndarray:
    t = np.tanh(softplus(x))
    return t + x * sigmoid(x) * (1.0 - t * t)


def _read_fast_gelu(view: Any) -> dict[str, Any] | Refusal:
    return {} if not view.has_input(1) else Refusal("FastGelu with bias")


def _read_swish(view: Any) -> dict[str, Any] | Refusal:
    alpha = float(view.attr("alpha", 1.0))
    return {} if alpha == 1.0 else Refusal(f"Swish alpha={alpha} (only alpha=1 is SiLU)")


def _swish_beta(params: Mapping[str, float]) -> str:
    """Why x·Sigmoid(β·x) is not SiLU: the catalogue has no Swish-β (its moments and kernel assume β = 1)."""
    return f"x·Sigmoid(β·x) with β = {params['beta']:g}: a Swish with β ≠ 1 is not in the catalogue"


SILU = Activation(
    kind="silu",
    op_name="NormSilu",
    forward=lambda x: x * sigmoid(x),
    derivative=lambda x: sigmoid(x) * (1.0 + x * (1.0 - sigmoid(x))),
    body=lambda b, x: b.op("Mul", x, b.op("Sigmoid", x)),
    ops=(OpForm("Swish", _read_swish, min_opset=24),),
    patterns=(
        DecomposedForm("x·Sigmoid(x)", node("Mul", X, node("Sigmoid", X), comm=True)),
        # exporters of Swish(β) write the β even when it is 1 (a Swish with β ≠ 1 stays a Sigmoid gate)
        DecomposedForm("x·Sigmoid(1·x)", node("Mul", X, node("Sigmoid", node("Mul", X, C(1.0), comm=True)), comm=True)),
        DecomposedForm(
            "x·Sigmoid(β·x)",
            node("Mul", X, node("Sigmoid", node("Mul", X, C(capture="beta"), comm=True)), comm=True),
            refuse=_swish_beta,
        ),
    ),
    summary="x·sigmoid(x) (Swish)",
    derivative_body=_silu_derivative_body,
)

HARD_SWISH = Activation(
    kind="hard_swish",
    op_name="NormHardSwish",
    forward=lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    derivative=lambda x: np.where(x < -3, 0.0, np.where(x > 3, 1.0, (2.0 * x + 3.0) / 6.0)),
    body=_hard_swish_body,
    ops=(OpForm("HardSwish", no_params, min_opset=14),),
    patterns=_HARD_SWISH_FORMS,
    kinks=lambda p: (-3.0, 3.0),
    summary="x·max(0, min(1, x/6 + 1/2))",
    derivative_body=_hard_swish_derivative_body,
)

MISH = Activation(
    kind="mish",
    op_name="NormMish",
    forward=lambda x: x * np.tanh(softplus(x)),
    derivative=_mish_derivative,
    body=_mish_body,
    ops=(OpForm("Mish", no_params, min_opset=18),),
    patterns=(DecomposedForm("x·Tanh(Softplus(x))", node("Mul", X, node("Tanh", node("Softplus", X)), comm=True)),),
    summary="x·tanh(softplus(x))",
    derivative_body=_mish_derivative_body,
)

GELU = Activation(
    kind="gelu",
    op_name="NormGelu",
    forward=lambda x: 0.5 * x * (1.0 + erf(x / SQRT2)),
    derivative=lambda x: 0.5 * (1.0 + erf(x / SQRT2)) + x * _phi(x),
    body=_gelu_body,
    ops=(
        OpForm("Gelu", _read_gelu("none"), min_opset=20),
        OpForm("Gelu", no_params, domain="com.microsoft"),
    ),
    patterns=tuple(DecomposedForm("Erf chain", p) for p in _half_x_times(_ERF_ONE_PLUS)),
    summary="x·Φ(x) (exact, erf)",
    derivative_body=_gelu_derivative_body,
)

GELU_TANH = Activation(
    kind="gelu_tanh",
    op_name="NormGeluTanh",
    forward=_gelu_tanh,
    derivative=_gelu_tanh_derivative,
    body=_gelu_tanh_body,
    ops=(
        OpForm("Gelu", _read_gelu("tanh"), min_opset=20),
        OpForm("FastGelu", _read_fast_gelu, domain="com.microsoft"),
    ),
    patterns=tuple(DecomposedForm("tanh chain", p) for p in _half_x_times(_TANH_ONE_PLUS)),
    summary="0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))",
    derivative_body=_gelu_tanh_derivative_body,
)

ENTRIES = (SILU, HARD_SWISH, MISH, GELU, GELU_TANH)
