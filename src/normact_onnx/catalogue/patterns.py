"""A tiny pattern language for the ways exporters write an activation.

A pattern is a tree rooted at the node that produces the activation's output.
Leaves are the activation input ``X`` (every ``X`` must bind to the same tensor)
or constants (``C``), checked by value, or captured as a parameter. The matcher
in :mod:`normact_onnx.passes.find` interprets these trees; catalogue entries only
declare them, so adding a spelling of an activation is one line, not a new matcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    """A named multi-node spelling of an activation (``fixed`` params are implied by the pattern)."""

    name: str
    pattern: N
    fixed: dict[str, float] = field(default_factory=dict)

    def size(self) -> int:
        return _count_nodes(self.pattern)


def _count_nodes(p: Pattern) -> int:
    if isinstance(p, N):
        return 1 + sum(_count_nodes(i) for i in p.inputs)
    if isinstance(p, Alt):
        return min(_count_nodes(o) for o in p.options)
    return 0
