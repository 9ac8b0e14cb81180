"""The catalogue entry: everything the tool knows about one activation kind, in one place.

Matchers (:mod:`normact_onnx.passes.find`), Gaussian moments
(:mod:`normact_onnx.moments`), function bodies and training graphs
(:mod:`normact_onnx.passes.forms`) and the kernel test tables are all generated
from these entries, so supporting a new activation is one entry, not edits in
five places.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..outcome import Refusal
from .patterns import DecomposedForm

Params = Mapping[str, Any]  # parameter name -> float (or ndarray for per-channel PRelu slopes)


@dataclass(frozen=True)
class Ref:
    """An attribute that, inside a function body, refers to the Norm op's attribute of this name."""

    name: str


class Body(Protocol):
    """What a catalogue body sees while it writes the activation in standard ONNX ops.

    The same body produces the model-local function (parameters are attribute
    references), the gradient-safe training graph (parameters are literals, ops
    without gradients in ONNX Runtime training decomposed) and verification models.
    """

    opset: int
    gradient_safe: bool

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str: ...

    def const(self, value: float) -> str: ...

    def param(self, name: str) -> str: ...

    def attr(self, name: str) -> Any: ...


@dataclass(frozen=True)
class OpForm:
    """A single ONNX op that computes the activation (``read`` returns its params, or why this node is not one)."""

    op_type: str
    read: Callable[[Any], dict[str, Any] | Refusal]
    domain: str = ""
    min_opset: int = 1


@dataclass(frozen=True)
class Activation:
    """One activation kind: its ONNX spellings, numpy math, Gaussian facts and ONNX body."""

    kind: str
    op_name: str  # the fused op / model-local function name in domain ai.normact
    forward: Callable[..., np.ndarray]
    derivative: Callable[..., np.ndarray]
    body: Callable[[Body, str], str]
    params: Mapping[str, float] = field(default_factory=dict)
    ops: tuple[OpForm, ...] = ()
    patterns: tuple[DecomposedForm, ...] = ()
    kinks: Callable[[Params], tuple[float, ...]] = lambda p: ()
    homogeneous: bool = False  # f(c·x) = c·f(x) for c > 0: moments scale analytically with q
    # f(x) = clip(x, lo, hi) (±inf: no bound), so s·(f(x) − h) = clip(s·x − s·h, …) for s > 0: fold backward
    clip_bounds: Callable[[Params], tuple[float, float]] | None = None
    closed_moments: Callable[[float, Params], tuple[float, float, float, float] | None] | None = None
    gate_like: bool = False  # bounded output, often a multiplicative gate (SE blocks, LSTM/GRU gates)
    summary: str = ""
    # f'(x) in ONNX ops: calibration reduces E f'(x)² inside the graph (ANAct's backward gain ρ')
    derivative_body: Callable[[Body, str], str] | None = None

    def with_defaults(self, params: Params | None = None) -> dict[str, Any]:
        """The full parameter set: defaults overridden by ``params``."""
        out: dict[str, Any] = dict(self.params)
        if params:
            unknown = set(params) - set(self.params)
            if unknown:
                raise KeyError(f"{self.kind} has no parameter(s) {sorted(unknown)}")
            out.update(params)
        return out

    def f(self, x: np.ndarray, params: Params | None = None) -> np.ndarray:
        return self.forward(np.asarray(x), **self.with_defaults(params))

    def df(self, x: np.ndarray, params: Params | None = None) -> np.ndarray:
        return self.derivative(np.asarray(x), **self.with_defaults(params))


# ---- numpy helpers shared by entries ---------------------------------------------------------

_erf = np.vectorize(math.erf, otypes=[np.float64])


def erf(x: np.ndarray) -> np.ndarray:
    """Exact erf for numpy arrays (numpy has none; scipy is not a dependency)."""
    x = np.asarray(x, dtype=np.float64)
    return _erf(x) if x.size else x.copy()


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def softplus(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def step(b: Body, x: str, at: str | None = None, compare: str = "Greater") -> str:
    """1 where x > at (``compare="Less"``: x < at), else 0, in x's float type.

    Greater + Cast is several times faster in ONNX Runtime than Sign or Where
    (calibration evaluates it on every activation tensor of every batch).
    """
    mask = b.op(compare, x, at if at is not None else b.const(0.0))
    elem = getattr(b, "elem_type", None)
    return b.op("Cast", mask, to=elem) if elem is not None else b.op("CastLike", mask, x)


def one_minus_square(b: Body, t: str) -> str:
    """1 − t²: the derivative of tanh written through its output (also used by Mish, tanh-GELU)."""
    return b.op("Sub", b.const(1.0), b.op("Mul", t, t))


def attrs_reader(**defaults: float) -> Callable[[Any], dict[str, Any]]:
    """Read float attributes of a matched node, falling back to ONNX's defaults."""

    def read(view: Any) -> dict[str, Any]:
        return {name: float(view.attr(name, default)) for name, default in defaults.items()}

    return read


def no_params(view: Any) -> dict[str, Any]:
    return {}
