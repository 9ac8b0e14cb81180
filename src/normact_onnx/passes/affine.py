"""Move an affine map of a value into the layers that consume it (MATH.md §3).

Given consumers that read ``u`` and a new value ``u'`` with ``u = a·u' + c``
(``a``, ``c`` scalars or per-channel vectors), rewrite every consumer so that
reading ``u'`` computes exactly what reading ``u`` did. Both directions use it:

- ``rewrite --preserve-function``: the site now outputs y = s·(f − h); the
  consumers used f = y/s + h, so a = 1/s, c = h.
- ``fold``: the site goes back to plain f; consumers used y = s·f − s·h, so
  a = s, c = −s·h.

Exact for Gemm, MatMul (+Add) and Conv. A Conv that pads with zeros sees
zeros of ``u``, which are not zeros of ``u'`` once there is an offset; the
``padding`` strategy says what to do there (MATH.md §3): ``"refuse"``, ``"pad"``
(an explicit ``Pad`` of ``u'`` with the value that stands for u = 0, then the
Conv without padding: exact, one copy), or ``"keep-shift"`` (fold only the
scale; an explicit ``Add`` of off/a in front of that Conv: exact, one
elementwise op). ``"pad"`` falls back to ``"keep-shift"`` when that value
differs per channel (Pad takes one scalar). Shared weights are copied, never
changed in place for the other users.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import helper

from ..graph import Container, attr_value, const_value
from .edits import Edits

Plan = Callable[[Edits], None]
PADDING = ("pad", "keep-shift", "refuse")


def _vector(v: Any) -> np.ndarray:
    arr = np.asarray(v, dtype=np.float64)
    return arr.reshape(()) if arr.size == 1 else arr.ravel()


class _Weights:
    """Reads a consumer's constant input and writes its replacement (copied when shared)."""

    def __init__(self, c: Container, base_dir: str | None, fresh: Callable[[str], str]) -> None:
        self.c, self.base_dir, self.fresh = c, base_dir, fresh

    def read(self, name: str) -> np.ndarray | None:
        return const_value(self.c, name, self.base_dir, limit=None) if name else None

    def write(self, edits: Edits, node: onnx.NodeProto, index: int, value: np.ndarray, like: np.ndarray) -> None:
        value = value.astype(like.dtype if like is not None else np.float32)
        old = node.input[index] if index < len(node.input) else ""
        producer = self.c.producer.get(old)
        users = self.c.consumers.get(old, [])
        exclusive = old and len(users) == 1 and old not in self.c.outputs and old not in self.c.inputs
        if exclusive and old in self.c.initializers:
            edits.initializers[old] = onnx.numpy_helper.from_array(value, old)
            return
        if exclusive and producer is not None and producer.op_type == "Constant":
            edits.replace[id(producer)] = [
                helper.make_node(
                    "Constant", [], [old], name=producer.name, value=onnx.numpy_helper.from_array(value, old)
                )
            ]
            return
        new = self.fresh(f"{old or node.name or node.op_type}_normact")
        edits.add_constant(new, value, node)
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = new


def _absorb_matmul_like(w: np.ndarray, a: np.ndarray, c: np.ndarray, k_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """W scaled along its input-feature axis, and the bias term Σ_k c_k·W_k."""
    shape = [1, 1]
    if a.ndim:
        shape[k_axis] = -1
    w64 = w.astype(np.float64)
    new_w = w64 * a.reshape(shape)
    bias = np.tensordot(np.broadcast_to(c, (w.shape[k_axis],)), w64, axes=([0], [k_axis]))
    return new_w, bias


# Ops an affine map passes through unchanged: op(a·u + c) = a·op(u) + c. ``positive``: only for a > 0
# (max commutes with positive scaling); ``per_tensor``: the op moves elements across channels.
_TRANSPARENT = {
    "MaxPool": "positive",
    "GlobalMaxPool": "positive",
    "AveragePool": "pads",
    "GlobalAveragePool": "",
    "Identity": "",
    "Dropout": "",
    "Flatten": "per_tensor",
    "Reshape": "per_tensor",
    "Transpose": "per_tensor",
    "Squeeze": "per_tensor",
    "Unsqueeze": "per_tensor",
    "ReduceMean": "per_tensor",
}


def plan_absorb(
    c: Container,
    tensor: str,
    a: Any,
    off: Any,
    base_dir: str | None,
    fresh: Callable[[str], str],
    padding: str = "refuse",
) -> Plan | str:
    """A plan that makes every consumer of ``tensor`` read ``u'`` where u = a·u' + off, or why not.

    Pooling and reshaping ops in between are looked through: the affine map
    commutes with them, and the layers after them absorb it.
    """
    a, off = _vector(a), _vector(off)
    return _plan_tensor(c, tensor, a, off, _Weights(c, base_dir, fresh), fresh, padding)


def _plan_tensor(
    c: Container,
    tensor: str,
    a: np.ndarray,
    off: np.ndarray,
    weights: _Weights,
    fresh: Callable[[str], str],
    padding: str,
) -> Plan | str:
    if tensor in c.outputs:
        return "the value is a graph output"
    consumers = c.consumers.get(tensor, [])
    if not consumers:
        return "the value has no consumer"
    plans: list[Plan] = []
    for node in consumers:
        rule = _TRANSPARENT.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is not None and node.input and node.input[0] == tensor and tensor not in node.input[1:]:
            why = _transparent_blocker(node, rule, a, off)
            plan = why or _plan_tensor(c, node.output[0], a, off, weights, fresh, padding)
            if not why and any(o and c.consumers.get(o) for o in node.output[1:]):
                plan = f"consumer {node.op_type} '{node.name}' has a second output in use"
        else:
            plan = _plan_one(c, node, tensor, a, off, weights, fresh, padding)
        if isinstance(plan, str):
            return plan
        plans.append(plan)

    def apply(edits: Edits) -> None:
        for p in plans:
            p(edits)

    return apply


def _transparent_blocker(node: onnx.NodeProto, rule: str, a: np.ndarray, off: np.ndarray) -> str | None:
    label = f"{node.op_type} '{node.name or node.output[0]}'"
    if rule == "positive" and np.any(a <= 0):
        return f"a negative scale does not commute with {label}"
    if rule == "per_tensor" and (a.ndim or off.ndim):
        return f"per-channel constants do not pass through {label}"
    if rule == "pads" and any(attr_value(node, "pads", [0])) and attr_value(node, "count_include_pad", 0):
        return f"{label} averages padded zeros (count_include_pad=1)"
    return None


def _plan_one(
    c: Container,
    node: onnx.NodeProto,
    tensor: str,
    a: np.ndarray,
    off: np.ndarray,
    weights: _Weights,
    fresh: Callable[[str], str],
    padding: str,
) -> Plan | str:
    label = f"{node.op_type} '{node.name or node.output[0]}'"
    linear = node.op_type in ("Gemm", "MatMul", "Conv") and node.domain in ("", "ai.onnx")
    if not linear or len(node.input) < 2 or node.input[0] != tensor or tensor in node.input[1:]:
        return f"consumer {label} is not linear in this value (only Gemm, MatMul(+Add), Conv fold)"
    w = weights.read(node.input[1])
    if w is None:
        return f"consumer {label} has no constant weight"
    has_shift = bool(np.any(off != 0))
    if node.op_type == "Gemm":
        if w.ndim != 2 or (a.ndim and attr_value(node, "transA", 0)):
            return f"consumer {label}: per-feature constants with transA are not supported"
        k_axis = 1 if attr_value(node, "transB", 0) else 0
        if a.ndim and a.shape[0] != w.shape[k_axis]:
            return f"consumer {label}: constants do not match the weight's input dimension"
        alpha, beta = float(attr_value(node, "alpha", 1.0)), float(attr_value(node, "beta", 1.0))
        new_w, bias = _absorb_matmul_like(w, a, off, k_axis)
        has_c = len(node.input) > 2 and bool(node.input[2])
        c_val = weights.read(node.input[2]) if has_c else None
        if has_shift and ((has_c and c_val is None) or beta == 0):
            return f"consumer {label}: its bias is not a constant"

        def gemm(edits: Edits) -> None:
            weights.write(edits, node, 1, new_w, w)
            if has_shift:
                base = c_val.astype(np.float64) if c_val is not None else 0.0
                weights.write(edits, node, 2, base + alpha * bias / beta, c_val if c_val is not None else w)

        return gemm
    if node.op_type == "MatMul":
        if w.ndim != 2:
            return f"consumer {label}: weight is not a 2-D matrix"
        if a.ndim and a.shape[0] != w.shape[0]:
            return f"consumer {label}: constants do not match the weight's input dimension"
        new_w, bias = _absorb_matmul_like(w, a, off, 0)
        out = node.output[0]
        users = c.consumers.get(out, [])
        add = users[0] if len(users) == 1 and users[0].op_type == "Add" and out not in c.outputs else None
        add_idx = (1 if add.input[0] == out else 0) if add is not None else None
        add_val = weights.read(add.input[add_idx]) if add is not None else None

        def matmul(edits: Edits) -> None:
            weights.write(edits, node, 1, new_w, w)
            if not has_shift:
                return
            if add_val is not None and np.broadcast_shapes(add_val.shape, bias.shape) == add_val.shape:
                weights.write(edits, add, add_idx, add_val.astype(np.float64) + bias, add_val)
                return
            raw = fresh(f"{out}_normact_matmul")
            bias_name = fresh(f"{out}_normact_bias")
            edits.replace[id(node)] = [_renamed_output(node, raw)]
            edits.add_constant(bias_name, bias.astype(w.dtype), node)
            edits.after.setdefault(id(node), []).append(
                helper.make_node("Add", [raw, bias_name], [out], name=fresh(f"{node.name or out}_normact_bias"))
            )

        return matmul
    if node.op_type == "Conv":
        if w.ndim < 3:
            return f"consumer {label}: unexpected weight rank"
        group = int(attr_value(node, "group", 1))
        out_ch, cg = w.shape[0], w.shape[1]
        if a.ndim and a.shape[0] != cg * group:
            return f"consumer {label}: constants do not match its input channels"
        if off.ndim and off.shape[0] != cg * group:
            return f"consumer {label}: constants do not match its input channels"
        pads = list(attr_value(node, "pads", []) or [])
        auto_pad = attr_value(node, "auto_pad", "NOTSET")
        padded = any(pads) or auto_pad not in ("NOTSET", "VALID")
        explicit = None  # how the padded border stays exact: "pad" or "keep-shift"
        if padded and has_shift:
            if padding not in PADDING[:2]:
                return f"consumer {label} pads with zeros (the shift is not exact at the borders)"
            if auto_pad not in ("NOTSET", "VALID"):
                return f"consumer {label} pads with auto_pad={auto_pad} (pads not explicit)"
            if np.any(a == 0):
                return f"consumer {label} pads with zeros and the scale has a zero"
            zero = np.broadcast_to(-off / a, (cg * group,))  # the u' that stands for u = 0
            explicit = "pad" if padding == "pad" and np.all(zero == zero[0]) else "keep-shift"
            if explicit == "keep-shift":  # u = a·(u' + off/a): the Conv absorbs a, the Add keeps the shift
                pre_add, off = -zero, np.zeros(())
        in_channel = (np.arange(out_ch)[:, None] // (out_ch // group)) * cg + np.arange(cg)[None, :]
        expand = (slice(None), slice(None)) + (None,) * (w.ndim - 2)
        a_w = (np.broadcast_to(a, (cg * group,))[in_channel])[expand]
        c_w = (np.broadcast_to(off, (cg * group,))[in_channel])[expand]
        w64 = w.astype(np.float64)
        new_w = w64 * a_w
        bias = (w64 * c_w).reshape(out_ch, -1).sum(axis=1)
        fold_bias = bool(np.any(off != 0))
        b_val = weights.read(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and b_val is None and fold_bias:
            return f"consumer {label}: its bias is not a constant"

        def conv(edits: Edits) -> None:
            weights.write(edits, node, 1, new_w, w)
            if fold_bias:
                base = b_val.astype(np.float64) if b_val is not None else np.zeros(out_ch)
                weights.write(edits, node, 2, base + bias, b_val if b_val is not None else w)
            if explicit == "pad":
                _explicit_pad(edits, c, node, float(zero[0]), pads, w, fresh)
            elif explicit == "keep-shift":
                name = fresh(f"{node.name or node.output[0]}_normact_shift")
                _explicit_input(edits, node, "Add", [name], fresh)
                edits.add_constant(name, pre_add.reshape((-1,) + (1,) * (w.ndim - 2)).astype(w.dtype), node)
                _move_last_before(edits, node)

        return conv
    raise AssertionError(node.op_type)


def _explicit_input(
    edits: Edits, node: onnx.NodeProto, op: str, extra: list[str], fresh: Callable[[str], str], **attrs: Any
) -> onnx.NodeProto:
    """Put ``op(input0, *extra)`` in front of ``node`` and make ``node`` read its result."""
    out = fresh(f"{node.input[0]}_normact_{op.lower()}")
    pre = helper.make_node(op, [node.input[0], *extra], [out], name=fresh(f"{node.name or out}_normact_{op}"), **attrs)
    edits.before.setdefault(id(node), []).append(pre)
    new = onnx.NodeProto()
    new.CopyFrom(node)  # after the weight writes, which may have renamed its inputs
    new.input[0] = out
    edits.replace[id(node)] = [new]
    return new


def _move_last_before(edits: Edits, node: onnx.NodeProto) -> None:
    """Keep the inserted op after the constants it reads (function bodies hold them as nodes)."""
    before = edits.before[id(node)]
    pre = next(n for n in reversed(before) if n.op_type != "Constant")
    before.remove(pre)
    before.append(pre)


def _explicit_pad(
    edits: Edits,
    c: Container,
    node: onnx.NodeProto,
    value: float,
    pads: list[int],
    w: np.ndarray,
    fresh: Callable[[str], str],
) -> None:
    """``Pad`` the Conv's input with ``value`` (what a padded zero stood for) and drop the Conv's own pads."""
    k = w.ndim - 2
    full = [0, 0, *pads[:k], 0, 0, *pads[k:]]
    if c.opset < 11:
        new = _explicit_input(edits, node, "Pad", [], fresh, mode="constant", pads=full, value=value)
    else:
        names = [
            fresh(f"{node.name or node.output[0]}_normact_pads"),
            fresh(f"{node.name or node.output[0]}_normact_padv"),
        ]
        new = _explicit_input(edits, node, "Pad", names, fresh, mode="constant")
        edits.add_constant(names[0], np.asarray(full, dtype=np.int64), node)
        edits.add_constant(names[1], np.asarray(value, dtype=w.dtype), node)
        _move_last_before(edits, node)
    kept = [a for a in new.attribute if a.name != "pads"]
    del new.attribute[:]
    new.attribute.extend(kept)


def _renamed_output(node: onnx.NodeProto, name: str) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    out.output[0] = name
    return out
