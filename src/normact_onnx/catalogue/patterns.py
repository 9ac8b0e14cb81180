"""A tiny pattern language for the ways exporters write an activation.

A pattern is a tree rooted at the node that produces the activation's output.
Leaves are the activation input ``X`` (every ``X`` must bind to the same tensor)
or constants (``C``), checked by value, or captured as a parameter. The matcher
in :mod:`normact_onnx.passes.find` interprets these trees; catalogue entries only
declare them, so adding a spelling of an activation is one line, not a new matcher.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Var:
    """The activation's input tensor."""


X = Var()


@dataclass(frozen=True)
class C:
    """A constant input: a scalar (or tensor whose elements are all equal) near ``value``.

    With ``capture`` set, its value is returned as that activation parameter instead
    of (or in addition to) being checked.
    """

    value: float | None = None
    capture: str | None = None
    rtol: float = 1e-4

    def read(self, value: np.ndarray | None) -> float | None:
        """The constant's scalar value when it fits this leaf, else None.

        The tolerance is ``rtol`` or the rounding of the constant's own element type, whichever
        is larger: √2 stored as float16 is 1.4140625, 1.1e-4 away from √2, and still means √2.
        """
        if value is None or value.size == 0 or not is_numeric(value.dtype):
            return None
        first = float(value.flat[0])
        if not np.all(value == value.flat[0]):
            return None
        rtol = max(self.rtol, rounding(value.dtype))
        if self.value is not None and not np.isclose(first, self.value, rtol=rtol, atol=rtol * 1e-3):
            return None
        return first

    def mismatch(self, value: np.ndarray | None) -> str:
        """Why ``value`` does not fit this leaf (``read`` returned None), in words for ``--explain``."""
        want = "a constant" if self.value is None else f"the constant {self.value:.6g}"
        if value is None:
            return f"not a constant (expected {want})"
        if value.size == 0 or not is_numeric(value.dtype):
            return f"a {value.dtype} constant of {value.size} elements (expected {want})"
        if not np.all(value == value.flat[0]):
            return f"a constant whose {value.size} elements differ (expected {want})"
        rtol = max(self.rtol, rounding(value.dtype))
        return f"the constant {float(value.flat[0]):.6g} (expected {want}, rtol {rtol:.0e})"


# the spacing of 1.0 in float types numpy does not describe (ml_dtypes types, as onnx returns them)
_EPS_BY_NAME = {"bfloat16": 2.0**-7, "float8_e4m3fn": 2.0**-3, "float8_e4m3fnuz": 2.0**-3, "float8_e5m2": 2.0**-2}


def is_numeric(dtype: Any) -> bool:
    """Numbers: numpy's own numeric types and the low-precision floats onnx reads as ml_dtypes."""
    dtype = np.dtype(dtype)
    return bool(np.issubdtype(dtype, np.number)) or dtype.name in _EPS_BY_NAME


def rounding(dtype: Any) -> float:
    """Relative rounding step (machine epsilon) of a float element type; 0 for integers."""
    dtype = np.dtype(dtype)
    if dtype.name in _EPS_BY_NAME:
        return _EPS_BY_NAME[dtype.name]
    if np.issubdtype(dtype, np.floating):
        return float(np.finfo(dtype).eps)
    return 0.0


@dataclass(frozen=True)
class Attr:
    """A node attribute that must be near ``value`` (absent = ``default``), or is captured."""

    value: float | None = None
    default: float | None = None
    capture: str | None = None


@dataclass(frozen=True)
class N:
    """A node with op type ``op`` whose inputs match ``inputs`` in order.

    ``commutative`` tries both orders of a two-input node. ``attrs`` constrains
    float attributes. Intermediate nodes must have no consumer outside the pattern.
    """

    op: str
    inputs: tuple[Pattern, ...]
    commutative: bool = False
    attrs: tuple[tuple[str, Attr], ...] = ()
    domain: str = ""


@dataclass(frozen=True)
class Alt:
    """Any one of several sub-patterns."""

    options: tuple[Pattern, ...]


Pattern = Var | C | N | Alt


def node(op: str, *inputs: Pattern, comm: bool = False, domain: str = "", **attrs: Attr) -> N:
    """Shorthand used by catalogue entries: ``node("Mul", X, node("Sigmoid", X), comm=True)``."""
    return N(op, tuple(inputs), comm, tuple(sorted(attrs.items())), domain)


def alt(*options: Pattern) -> Alt:
    return Alt(tuple(options))


@dataclass(frozen=True)
class DecomposedForm:
    """A named multi-node spelling of an activation (``fixed`` params are implied by the pattern).

    ``refuse`` marks a spelling that looks like the activation but is not in the catalogue (Swish with
    β ≠ 1): when it matches, the matcher does not make a site of it, its nodes stay what they are one by
    one, and ``refuse(captured params)`` is the reason ``inspect --explain`` and the skip note give.
    Refusing forms are tried after the accepted forms of the same size.
    """

    name: str
    pattern: N
    fixed: dict[str, float] = field(default_factory=dict)
    refuse: Callable[[Mapping[str, float]], str] | None = None

    def size(self, longest: bool = False) -> int:
        """Pattern nodes in the form: the shortest alternative's count (``longest``: the longest's)."""
        return _count_nodes(self.pattern, max if longest else min)


def _count_nodes(p: Pattern, pick: Callable[..., int] = min) -> int:
    if isinstance(p, N):
        return 1 + sum(_count_nodes(i, pick) for i in p.inputs)
    if isinstance(p, Alt):
        return pick(_count_nodes(o, pick) for o in p.options)
    return 0
