"""Piecewise-linear activations: ReLU and its relatives, Abs, Clip (ReLU6, hard-tanh)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..outcome import Refusal
from .base import Activation, Body, OpForm, attrs_reader, no_params, step
from .patterns import C, DecomposedForm, X, node

FLT_MAX = float(np.finfo(np.float32).max)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _leaky_moments(q: float, alpha: Any) -> tuple[float, float, float, float] | None:
    """Closed-form moments of max(x, αx) for x ~ N(0, q): exact, and positively homogeneous."""
    if np.ndim(alpha):
        return None
    a = float(alpha)
    return (
        math.sqrt(q) * (1.0 - a) * _INV_SQRT_2PI,
        q * (1.0 + a * a) / 2.0,
        (1.0 + a) / 2.0,
        (1.0 + a * a) / 2.0,
    )


def _leaky_forward(x: np.ndarray, alpha: Any) -> np.ndarray:
    return np.where(x >= 0, x, alpha * x)


def _leaky_derivative(x: np.ndarray, alpha: Any) -> np.ndarray:
    return np.where(x > 0, 1.0, alpha * np.ones_like(x, dtype=np.float64))


def _leaky_body(b: Body, x: str) -> str:
    if b.gradient_safe:  # works for scalar and per-channel slopes alike: relu(x) - a·relu(-x)
        neg = b.op("Relu", b.op("Neg", x))
        return b.op("Sub", b.op("Relu", x), b.op("Mul", b.param("alpha"), neg))
    return b.op("LeakyRelu", x, alpha=b.attr("alpha"))


def _leaky_derivative_body(b: Body, x: str) -> str:
    """alpha + (1 − alpha)·1[x > 0]: scalar and per-channel slopes alike."""
    alpha = b.param("alpha")
    return b.op("Add", alpha, b.op("Mul", b.op("Sub", b.const(1.0), alpha), step(b, x)))


def _clip_derivative_body(b: Body, x: str) -> str:
    """1 strictly inside (min, max), else 0."""
    return b.op("Mul", step(b, x, b.param("min")), step(b, x, b.param("max"), "Less"))


def _read_prelu(view: Any) -> dict[str, Any] | Refusal:
    slope = view.const_input(1)
    if slope is None:
        return Refusal("PRelu slope is not a constant")
    slope = np.asarray(slope, dtype=np.float64)
    if slope.size and np.all(slope == slope.flat[0]):
        return {"alpha": float(slope.flat[0])}
    return {"alpha": slope}


def _read_clip(view: Any) -> dict[str, Any] | Refusal:
    if view.opset < 11:
        lo, hi = float(view.attr("min", -FLT_MAX)), float(view.attr("max", FLT_MAX))
    else:
        bounds = []
        for i, default in ((1, -FLT_MAX), (2, FLT_MAX)):
            if not view.has_input(i):
                bounds.append(default)
                continue
            v = view.const_input(i)
            if v is None or np.size(v) != 1:
                return Refusal("Clip bounds are not constant scalars")
            bounds.append(float(np.asarray(v).reshape(())))
        lo, hi = bounds
    if lo <= -FLT_MAX and hi >= FLT_MAX:
        return Refusal("Clip without bounds is the identity")
    if not lo < hi:
        return Refusal("Clip bounds are empty or inverted")
    return {"min": lo, "max": hi}


def _clip_bounds(p: Any) -> tuple[float, float]:
    return (p["min"] if p["min"] > -FLT_MAX else -math.inf, p["max"] if p["max"] < FLT_MAX else math.inf)


def _clip_kinks(p: Any) -> tuple[float, ...]:
    return tuple(v for v in (p["min"], p["max"]) if abs(v) < FLT_MAX)


RELU = Activation(
    kind="relu",
    op_name="NormRelu",
    forward=lambda x: np.where(x < 0, 0.0, x),  # NaN stays NaN (np.maximum would too)
    derivative=lambda x: (x > 0).astype(np.float64),
    body=lambda b, x: b.op("Relu", x),
    ops=(OpForm("Relu", no_params),),
    patterns=(DecomposedForm("Max(x, 0)", node("Max", X, C(0.0), comm=True)),),
    kinks=lambda p: (0.0,),
    homogeneous=True,
    clip_bounds=lambda p: (0.0, math.inf),
    closed_moments=lambda q, p: _leaky_moments(q, 0.0),
    summary="max(x, 0)",
    derivative_body=step,
)

LEAKY_RELU = Activation(
    kind="leaky_relu",
    op_name="NormLeakyRelu",
    params={"alpha": 0.01},
    forward=_leaky_forward,
    derivative=_leaky_derivative,
    body=_leaky_body,
    ops=(OpForm("LeakyRelu", attrs_reader(alpha=0.01)),),
    kinks=lambda p: (0.0,),
    homogeneous=True,
    closed_moments=lambda q, p: _leaky_moments(q, p["alpha"]),
    summary="x if x ≥ 0 else alpha·x",
    derivative_body=_leaky_derivative_body,
)

PRELU = Activation(
    kind="prelu",
    op_name="NormPRelu",
    params={"alpha": 0.25},
    forward=_leaky_forward,
    derivative=_leaky_derivative,
    body=_leaky_body,
    ops=(OpForm("PRelu", _read_prelu),),
    kinks=lambda p: (0.0,),
    homogeneous=True,
    closed_moments=lambda q, p: _leaky_moments(q, p["alpha"]),
    summary="x if x ≥ 0 else slope·x, slope learned (scalar or per channel)",
    derivative_body=_leaky_derivative_body,
)

ABS = Activation(
    kind="abs",
    op_name="NormAbs",
    forward=np.abs,
    derivative=np.sign,
    body=lambda b, x: b.op("Abs", x),
    ops=(OpForm("Abs", no_params),),
    kinks=lambda p: (0.0,),
    homogeneous=True,
    closed_moments=lambda q, p: (math.sqrt(2.0 * q / math.pi), q, 0.0, 1.0),
    summary="|x|",
    derivative_body=lambda b, x: b.op("Sign", x),
)

CLIP = Activation(
    kind="clip",
    op_name="NormClip",
    params={"min": -FLT_MAX, "max": FLT_MAX},
    forward=lambda x, min, max: np.clip(x, min, max),
    derivative=lambda x, min, max: ((x > min) & (x < max)).astype(np.float64),
    body=lambda b, x: b.op("Clip", x, b.param("min"), b.param("max")),
    ops=(OpForm("Clip", _read_clip),),
    patterns=(
        DecomposedForm(
            "Min(Relu(x), 6)", node("Min", node("Relu", X), C(6.0), comm=True), fixed={"min": 0.0, "max": 6.0}
        ),
    ),
    kinks=_clip_kinks,
    clip_bounds=_clip_bounds,
    summary="min(max(x, min), max): ReLU6 is Clip(0, 6)",
    derivative_body=_clip_derivative_body,
)

ENTRIES = (RELU, LEAKY_RELU, PRELU, ABS, CLIP)
