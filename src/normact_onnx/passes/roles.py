"""A found site's role: rewritten by default, or skipped (graph output, output head, gate), or not a site (a guard).

The matcher (:mod:`.find`) says where activations are; this module says which of them the methods are about.
Hidden activations that feed further layers are; a value that reaches a graph output through weightless ops
(a head), a gate-like site multiplying another branch, and a clamp that only feeds a normalization's
denominator (a numerical guard) are reported with the reason instead.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..domains import is_standard
from ..graph import Container, const_value
from .site import Site


def _is_const(c: Container, name: str, base_dir: str | None) -> bool:
    return const_value(c, name, base_dir, limit=None if name in c.initializers else 1 << 30) is not None


def skip_reason(site: Site, base_dir: str | None, refused: Mapping[int, str]) -> str | None:
    """Why a site is not rewritten by default; ``refused``: node id → the refusal of a form it is part of."""
    c = site.container
    if site.output in c.outputs and c.parent is None and c.function is None:
        return "its output is a graph output"
    head = _output_head(site, base_dir) if site.normalized is None else None
    if head:
        return head
    quantized = _quantized_by(site) if site.normalized is None else None
    if quantized:
        return quantized
    if site.activation.gate_like:
        for consumer in c.consumers.get(site.output, ()):
            if consumer.op_type in ("Mul", "Div") and len(consumer.input) == 2:
                other = consumer.input[1] if consumer.input[0] == site.output else consumer.input[0]
                if other != site.output and not _is_const(c, other, base_dir):
                    if id(site.root) in refused:  # a spelling the catalogue declines (Swish with β ≠ 1)
                        return refused[id(site.root)]
                    return f"multiplicative gate (feeds {consumer.op_type} '{consumer.name or consumer.output[0]}')"
    return None


def _quantized_by(site: Site) -> str | None:
    """Why a site of a QDQ-quantized model is left alone: its output feeds a ``QuantizeLinear``.

    The quantizer's scale and zero point were calibrated for the activation's own range (a gate's [0, 1]): a
    normalized value lands outside it and saturates, so the model silently computes something else. The way out
    is the usual order: normalize the float model, then quantize it.
    """
    for consumer in site.container.consumers.get(site.output, ()):
        if consumer.op_type == "QuantizeLinear" and consumer.input[0] == site.output:
            return (
                f"its output is quantized (feeds {consumer.op_type} '{consumer.name or consumer.output[0]}', whose "
                "scale was calibrated for the original values): normalize the float model, then quantize it"
            )
    return None


# Ops that carry no weights: a value passed through them to a graph output is still an output (a head)
_WEIGHTLESS = frozenset(
    {
        "Reshape",
        "Concat",
        "Transpose",
        "Slice",
        "Gather",
        "GatherElements",
        "GatherND",
        "Softmax",
        "LogSoftmax",
        "Squeeze",
        "Unsqueeze",
        "Flatten",
        "Identity",
        "Cast",
        "Split",
        "Expand",
        "Tile",
        "Resize",
        "Upsample",
        "DepthToSpace",
        "SpaceToDepth",
        "Pad",
        "TopK",
        "ArgMax",
        "ArgMin",
        "ReduceMax",
        "ReduceMin",
        "Dropout",
        "ReduceMean",
        "ReduceSum",
    }
)
_ARITHMETIC = frozenset(("Add", "Sub", "Mul", "Div", "Pow"))  # weightless when the other operand is a constant
_PLAIN = frozenset(("Shape", "Size", "Constant", "Equal", "Greater", "Less", "Not"))  # bookkeeping in branches


def _output_head(site: Site, base_dir: str | None) -> str | None:
    """Why the site is an output head: its value reaches a graph output through weightless ops only."""
    if site.container.function is not None:
        return None
    found = _head_path(site.container, site.output, base_dir, [])
    if found is None:
        return None
    out, via = found
    return f"an output head: its value reaches graph output '{out}' through {' → '.join(dict.fromkeys(via))} only"


def _head_path(c: Container, start: str, base_dir: str | None, path: list[str]) -> tuple[str, list[str]] | None:
    """(graph output, ops on the way) when ``start`` flows into a model output through weightless ops.

    Inside an ``If`` branch, a branch output continues as the ``If`` node's output in the enclosing graph.
    """
    seen = {start}
    frontier = [(start, path)]
    while frontier:
        value, path = frontier.pop()
        if value in c.outputs:
            if c.parent is None:
                return value, path
            if c.owner is not None and c.owner.op_type == "If" and c.graph is not None:
                k = [o.name for o in c.graph.output].index(value)
                if k < len(c.owner.output):
                    found = _head_path(c.parent, c.owner.output[k], base_dir, [*path, "If"])
                    if found is not None:
                        return found
            continue
        for n in c.consumers.get(value, ()):
            if not is_standard(n):
                continue
            if n.op_type in _ARITHMETIC:
                others = [i for i in n.input if i != value]
                if not others or not all(_known_const(c, i, base_dir) for i in others):
                    continue
            elif n.op_type == "If" and value not in n.input:  # read inside the branches: follow if they are plain
                if not all(m.op_type in _WEIGHTLESS | _PLAIN for a in n.attribute for m in a.g.node):
                    # or into a branch that passes it to its output (openWakeWord's models return the score as
                    # it is below the threshold and run a verifier network on the other branch)
                    for sub in c.children:
                        if sub.owner is n and value in sub.consumers:
                            found = _head_path(sub, value, base_dir, [*path, "If"])
                            if found is not None:
                                return found
                    continue
            elif n.op_type not in _WEIGHTLESS:
                continue
            for out in n.output:
                if out and out not in seen:
                    seen.add(out)
                    frontier.append((out, [*path, n.op_type]))
    return None


def _known_const(c: Container, name: str, base_dir: str | None) -> bool:
    """Whether ``name`` is a constant, without reading large initializers (their bytes are not needed here)."""
    scope: Container | None = c
    while scope is not None:
        if name in scope.initializers:
            return True
        if name in scope.producer or name in scope.inputs:
            break
        scope = scope.parent
    return const_value(c, name, base_dir) is not None


# What only a normalization's denominator does with a value: a clip of it there is a numerical guard
_DENOMINATOR = frozenset(("Sqrt", "Reciprocal", "Log", "Rsqrt"))
_RESHAPING = frozenset(
    ("Reshape", "Expand", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast", "Flatten", "Tile")
)


def guard_reason(site: Site, base_dir: str | None) -> str | None:
    """Why a clip-shaped site is a numerical guard, not an activation: its value only feeds denominators.

    ``Max(0, E x² − (E x)²) + eps → Rsqrt`` (LayerNorm written by JAX/TF
    exporters) clamps a variance; normalizing that clamp makes the square root
    of a negative number.
    """
    if site.activation.clip_bounds is None:
        return None
    c = site.container
    frontier, uses = [site.output], 0
    while frontier:
        value = frontier.pop()
        if value in c.outputs:
            return None
        for n in c.consumers.get(value, ()):
            uses += 1
            if not is_standard(n):
                return None
            if n.op_type in _DENOMINATOR or (n.op_type == "Div" and list(n.input).index(value) == 1):
                continue
            if n.op_type in _RESHAPING and n.input[0] == value:  # a broadcast of the variance (tf2onnx)
                frontier.append(n.output[0])
                continue
            if n.op_type == "Pow" and len(n.input) == 2 and n.input[0] == value:
                e = const_value(c, n.input[1], base_dir)
                if e is not None and e.size == 1 and float(e.reshape(-1)[0]) in (-1.0, -0.5, 0.5):  # 1/x, 1/√x, √x
                    continue
                return None
            eps = [i for i in n.input if i != value]
            if n.op_type == "Add" and len(eps) == 1 and _is_const(c, eps[0], base_dir):
                frontier.append(n.output[0])  # + eps
                continue
            return None
    if not uses:
        return None
    return "a numerical guard: its value only feeds a normalization's denominator (Sqrt, Rsqrt, Reciprocal, a divisor)"
