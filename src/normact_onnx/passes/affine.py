"""Move an affine map of a value into the layers that consume it (docs/math.md §3.1).

Given consumers that read ``u`` and a new value ``u'`` with ``u = a·u' + c``
(``a``, ``c`` scalars or per-channel vectors), rewrite every consumer so that
reading ``u'`` computes exactly what reading ``u`` did. Both directions use it:

- ``rewrite --preserve-function``: the site now outputs y = s·(f − h); the
  consumers used f = y/s + h, so a = 1/s, c = h.
- ``fold``: the site goes back to plain f; consumers used y = s·f − s·h, so
  a = s, c = −s·h.

Exact for Gemm, MatMul (+Add), Conv and ConvTranspose (its scale; the shift of a
ConvTranspose input does not move into its bias, since output positions sum
different numbers of inputs, so it stays as an op in front). A Conv that pads with zeros sees
zeros of ``u``, which are not zeros of ``u'`` once there is an offset; the
``padding`` strategy says what to do there (docs/math.md §3.3): ``"refuse"``, ``"pad"``
(an explicit ``Pad`` of ``u'`` with the value that stands for u = 0, then the
Conv without padding: exact, one copy), or ``"keep-shift"`` (fold only the
scale; the shift off/a added in front of that Conv by a depthwise 1×1 ``Conv``
with weight 1: exact, one elementwise op). ``"free"`` (:data:`FREE`, internal):
insert no op at all, refuse instead. ``"pad"`` falls back to ``"keep-shift"`` when that value
differs per channel (Pad takes one scalar). Shared weights are copied, never
changed in place for the other users. ``Shape``/``Size`` consumers need nothing.

With a :class:`Restore` (``rewrite --preserve-function``), a consumer that
cannot absorb the map (a gating ``Mul``, a ``Concat``, a residual ``Add``, a
nonlinearity) reads ``a·u' + c`` written explicitly in front of it (``Mul`` and
``Add``, shared by every such consumer of the value): exact for any consumer.

The producer side (:func:`plan_produce`) is the mirror image: make the layer
that computes ``t`` compute ``a·t + c`` instead (Conv, Gemm, MatMul (+ Add) with
constant weights: output channels scaled, bias ``a·b + c``). ``fold`` uses it
for sites whose activation is a clip of its input (docs/math.md §3.4, backward) and,
with ``residual=True``, to carry an affine map through a residual ``Add``:
(a·u' + c) + v = a·(u' + (v + c)/a) when the layer producing ``v`` feeds only
that ``Add`` and absorbs (1/a, c/a); the ``Add``'s consumers then absorb ``a``.

A plan is decided first (every check, nothing changed; or a :class:`Refusal`) and
edits its container in place when called (:class:`~normact_onnx.graph.Container`'s
edit methods). Plans compose: a plan reads weights when it runs, so it sees what
earlier plans wrote, and a layer can absorb one site on its input side and another
on its output side.

Why one module past 500 lines: every consumer rule here (Gemm, MatMul, Conv, ConvTranspose, Pad, Add, the
preserve helpers) plans against the same private bookkeeping (``_Weights``: a shared weight copied once, never
changed for its other readers) and the same recursion through transparent ops (``_plan_tensor``); split, that
bookkeeping would have to become public API for the sake of file size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper

from ..domains import is_standard
from ..graph import Container, attr_value, const_value, renamable_in_subgraphs
from ..outcome import Refusal

Plan = Callable[[], None]  # applies the decided edits to the container, in place
Padding = Literal["pad", "keep-shift", "refuse", "free"]
PADDING: tuple[Padding, ...] = ("pad", "keep-shift", "refuse")
FREE: Padding = "free"  # plan_absorb's "insert no op at all": refuse padded Convs and a MatMul without its Add


def padding_of(text: str) -> Padding:
    """``text`` as a user-facing padding strategy (one of :data:`PADDING`), or ValueError."""
    if text not in PADDING:
        raise ValueError(f"padding must be one of {PADDING}")
    return text


def _vector(v: Any) -> np.ndarray:
    arr = np.asarray(v, dtype=np.float64)
    return arr.reshape(()) if arr.size == 1 else arr.ravel()


class _Weights:
    """Reads a layer's constant input and writes its replacement (a copy when others read it too)."""

    def __init__(self, c: Container, base_dir: str | None, fresh: Callable[[str], str]) -> None:
        self.c, self.base_dir, self.fresh = c, base_dir, fresh

    def read(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        return const_value(self.c, name, self.base_dir, limit=None)

    def value(self, node: onnx.NodeProto, index: int) -> np.ndarray:
        """A constant input the plan checked when it was made (so it is there when the plan runs)."""
        v = self.read(node.input[index])
        if v is None:
            raise AssertionError(f"input {index} of {node.op_type} {node.name!r} stopped being a constant")
        return v

    def optional(self, node: onnx.NodeProto, index: int) -> np.ndarray | None:
        """An optional constant input (a bias): None when the node has none."""
        return self.value(node, index) if len(node.input) > index and node.input[index] else None

    def write(self, node: onnx.NodeProto, index: int, value: np.ndarray, like: np.ndarray | None) -> None:
        value = value.astype(like.dtype if like is not None else np.float32, copy=False)
        c = self.c
        old = node.input[index] if index < len(node.input) else ""
        producer = c.producer.get(old)
        users = c.consumers.get(old, [])
        # an initializer listed as a graph input is a default below IR 4 (the convention then), an override above
        overridable = old in c.inputs and not (c.ir_version < 4 and old in c.initializers)
        exclusive = old and len(users) == 1 and old not in c.outputs and not overridable
        if exclusive and (old in c.initializers or (producer is not None and producer.op_type == "Constant")):
            c.set_constant(old, value)
            return
        new = self.fresh(f"{old or node.name or node.op_type}_normact")
        c.add_constant(new, value, node)
        c.set_input(node, index, new)


# consumers that quantize what they read (ONNX and ONNX Runtime's contrib ops): an explicit inverse in front
# of them is exact only up to float rounding, and the quantizer turns a rounding into a whole step
QUANTIZERS = frozenset(
    {
        "QuantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "QAttention",
        "QGemm",
    }
)
QUANTIZER_WAY_OUT = (
    "preserve the float model's function first, then quantize it; or rewrite without --preserve-function"
)


ABSORB_BLOCK = 1 << 22  # float64 elements per block of _absorb_matmul_like (32 MB)


class Restore:
    """Writes ``u = a·u' + c`` explicitly for consumers that cannot absorb it (one ``Mul``/``Add`` per value).

    ``made`` maps each value to the name of its restored copy, per container, so
    the caller can point rewritten sites that read the value at the copy.
    """

    def __init__(self, types: Any, fresh: Callable[[str], str]) -> None:
        self.types, self.fresh = types, fresh
        self.made: dict[tuple[int, str], str] = {}

    def plan(self, c: Container, tensor: str, node: onnx.NodeProto, a: np.ndarray, off: np.ndarray) -> Plan | Refusal:
        label = f"{node.op_type} '{node.name or node.output[0]}'"
        if node.op_type in QUANTIZERS:
            return Refusal(
                f"consumer {label} quantizes the value: the inverse written in front of it restores the value up "
                "to float rounding, which moves values across quantization steps, and the outputs change by "
                f"whole steps; {QUANTIZER_WAY_OUT}"
            )
        if tensor not in node.input and not renamable_in_subgraphs(node, tensor):
            return Refusal(f"consumer {label} reads the value inside a subgraph that also defines that name")
        producer = c.producer.get(tensor)
        if producer is None:
            return Refusal(f"the value read by {label} is not computed in this graph")
        elem = self.types.elem_type(tensor)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
        if dtype.kind != "f":
            return Refusal(f"the value read by {label} is not a float tensor")
        shape = self.types.shape.get(tensor)
        if (a.ndim or off.ndim) and (shape is None or len(shape) < 2):
            return Refusal(f"per-channel constants need the rank of the value read by {label}")
        key = (id(c), tensor)

        def apply() -> None:
            name = self.made.get(key)
            if name is None:
                name = self.made[key] = self._write(c, tensor, producer, a, off, dtype, shape)
            c.rename_input(node, tensor, name)

        return apply

    def _write(
        self,
        c: Container,
        tensor: str,
        producer: onnx.NodeProto,
        a: np.ndarray,
        off: np.ndarray,
        dtype: np.dtype,
        shape: list | None,
    ) -> str:
        def laid_out(v: np.ndarray) -> np.ndarray:
            return v.reshape((-1,) + (1,) * (len(shape) - 2)) if v.ndim and shape is not None else v

        value = tensor
        after: list[onnx.NodeProto] = []
        for op, v, skip in (("Mul", a, 1.0), ("Add", off, 0.0)):
            if np.all(v == skip):
                continue
            k = self.fresh(f"{tensor}_normact_restore_{op.lower()}")
            c.add_constant(k, laid_out(v).astype(dtype), producer)
            out = self.fresh(f"{tensor}_normact_restored")
            after.append(helper.make_node(op, [value, k], [out], name=self.fresh(f"{tensor}_normact_restore_{op}")))
            value = out
        if value == tensor:  # a = 1, c = 0: an Identity keeps the bookkeeping simple
            value = self.fresh(f"{tensor}_normact_restored")
            after.append(helper.make_node("Identity", [tensor], [value], name=value))
        c.insert_after(producer, after)
        return value


def _absorb_matmul_like(w: np.ndarray, a: np.ndarray, c: np.ndarray, k_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """W scaled along its input-feature axis (in W's dtype), and the bias term Σ_k c_k·W_k (float64).

    Computed in float64 a block of output features at a time, so a big weight costs one copy in its
    own dtype rather than several float64 ones (folding a multi-GB model stays within memory).
    """
    shape = [1, 1]
    if a.ndim:
        shape[k_axis] = -1
    scale = a.reshape(shape)
    cv = np.broadcast_to(c, (w.shape[k_axis],))
    out_axis = 1 - k_axis
    new_w = np.empty(w.shape, dtype=w.dtype if w.dtype.kind == "f" else np.float64)
    bias = np.empty(w.shape[out_axis], dtype=np.float64)
    step = max(1, ABSORB_BLOCK // max(1, w.shape[k_axis]))
    for j in range(0, w.shape[out_axis], step):
        block = (slice(None), slice(j, j + step)) if out_axis == 1 else (slice(j, j + step), slice(None))
        w64 = w[block].astype(np.float64)
        new_w[block] = w64 * scale
        bias[j : j + step] = np.tensordot(cv, w64, axes=([0], [k_axis]))
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
    # value-moving ops: every output element is one input element (or, for Resize linear/cubic, a
    # combination whose weights sum to 1, which an affine map commutes with)
    "Resize": "per_tensor",
    "Upsample": "per_tensor",
    "Split": "per_tensor",
    "Slice": "per_tensor",
    "Gather": "per_tensor",
    "Expand": "per_tensor",
    "Tile": "per_tensor",
    "DepthToSpace": "per_tensor",
    "SpaceToDepth": "per_tensor",
}
_SHAPE_ONLY = ("Shape", "Size")  # read the shape, never the values


def plan_absorb(
    c: Container,
    tensor: str,
    a: Any,
    off: Any,
    base_dir: str | None,
    fresh: Callable[[str], str],
    padding: Padding = "refuse",
    *,
    residual: bool = False,
    restore: Restore | None = None,
) -> Plan | Refusal:
    """A plan that makes every consumer of ``tensor`` read ``u'`` where u = a·u' + off, or why not.

    Pooling, reshaping and value-moving ops in between are looked through: the
    affine map commutes with them, and the layers after them absorb it. Weights
    earlier plans changed are read as changed (they are in the graph already).
    ``residual``: carry the map through an ``Add`` whose other operand's layer can
    absorb (1/a, off/a) (see the module docstring). ``restore``: consumers that
    cannot absorb read the map written explicitly.
    """
    a, off = _vector(a), _vector(off)
    return _plan_tensor(c, tensor, a, off, _Weights(c, base_dir, fresh), fresh, padding, residual, restore)


def plan_produce(
    c: Container,
    tensor: str,
    a: Any,
    off: Any,
    base_dir: str | None,
    fresh: Callable[[str], str],
) -> Plan | Refusal:
    """A plan that makes the layer computing ``tensor`` compute ``a·tensor + off`` instead, or why not.

    The caller makes sure nothing else reads ``tensor`` (every reader sees the new value).
    Per-channel constants run along a Conv's output channels (axis 1); for Gemm, MatMul
    and a bias ``Add`` they must be scalars.
    """
    a, off = _vector(a), _vector(off)
    return _plan_producer(c, tensor, a, off, _Weights(c, base_dir, fresh))


def _plan_tensor(
    c: Container,
    tensor: str,
    a: np.ndarray,
    off: np.ndarray,
    weights: _Weights,
    fresh: Callable[[str], str],
    padding: Padding,
    residual: bool = False,
    restore: Restore | None = None,
) -> Plan | Refusal:
    if tensor in c.outputs:
        if c.owner is not None and c.owner.op_type in ("Loop", "Scan"):  # a recurrent state (scripted torch loops)
            return Refusal(
                f"the value is carried out of the {c.owner.op_type} body (to the next iteration or the "
                f"{c.owner.op_type}'s outputs): its inverse cannot be folded into the consumers of every iteration"
            )
        return Refusal("the value is a graph output")
    consumers = c.consumers.get(tensor, [])
    if not consumers:
        return Refusal("the value has no consumer")
    plans: list[Plan] = []
    unique = list({id(n): n for n in consumers}.values())  # a node reading the value twice is one consumer
    for node in unique:
        standard = is_standard(node)
        rule = _TRANSPARENT.get(node.op_type) if standard else None
        plan: Plan | Refusal
        composed = _helper_map(c, node, tensor, weights) if standard else None
        if standard and node.op_type in _SHAPE_ONLY and tensor in node.input:
            plan = _nothing
        elif composed is not None:  # a Mul/Add/1×1 Conv this tool wrote: compose with it, it goes
            plan = _plan_through_helper(c, node, tensor, a, off, composed, weights, fresh, padding, residual, restore)
            if isinstance(plan, Refusal) and node.op_type == "Conv":
                plan = _plan_one(c, node, tensor, a, off, weights, fresh, padding)
        elif standard and node.op_type == "Pad" and node.input and node.input[0] == tensor:
            plan = _plan_through_pad(c, node, a, off, weights, fresh, padding, residual, restore)
        elif rule is not None and node.input and node.input[0] == tensor and tensor not in node.input[1:]:
            plan = _transparent_blocker(node, rule, a, off) or _plan_through(
                c, node, a, off, weights, fresh, padding, residual, restore
            )
        elif (
            residual
            and node.op_type == "Add"
            and is_standard(node)
            and len(node.input) == 2
            and list(node.input).count(tensor) == 1
        ):
            plan = _plan_through_add(c, node, tensor, a, off, weights, fresh, padding)
        else:
            plan = _plan_one(c, node, tensor, a, off, weights, fresh, padding)
        if isinstance(plan, Refusal) and restore is not None:
            plan = restore.plan(c, tensor, node, a, off)
        if isinstance(plan, Refusal):
            return plan
        plans.append(plan)

    return _sequence(plans)


def _sequence(plans: list[Plan]) -> Plan:
    """One plan that applies ``plans`` in order."""

    def apply() -> None:
        for p in plans:
            p()

    return apply


def _nothing() -> None:
    """A consumer that reads only the value's shape: nothing to change."""


def _plan_through(
    c: Container,
    node: onnx.NodeProto,
    a: np.ndarray,
    off: np.ndarray,
    weights: _Weights,
    fresh: Callable[[str], str],
    padding: Padding,
    residual: bool,
    restore: Restore | None,
) -> Plan | Refusal:
    """The map passes through ``node`` (it commutes with it): its outputs' consumers take it."""
    outputs = [o for o in node.output if o] if node.op_type == "Split" else node.output[:1]
    for extra in node.output[len(outputs) :] if node.op_type != "Split" else ():
        if extra and (c.consumers.get(extra) or extra in c.outputs):
            return Refusal(f"consumer {node.op_type} '{node.name}' has a second output in use")
    plans = []
    for o in outputs:
        if not c.consumers.get(o) and o not in c.outputs:
            continue
        plan = _plan_tensor(c, o, a, off, weights, fresh, padding, residual, restore)
        if isinstance(plan, Refusal):
            return plan
        plans.append(plan)

    return _sequence(plans)


HELPER_MARK = "_normact_"  # in the name of every node this tool writes (restore Mul/Add, Pad, shift Conv)


def is_helper(node: onnx.NodeProto) -> bool:
    """A node ``rewrite --preserve-function`` or ``fold`` wrote around a site (its name says so)."""
    return HELPER_MARK in node.name and is_standard(node)


def _helper_map(
    c: Container, node: onnx.NodeProto, tensor: str, weights: _Weights
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(m, d, eps) with ``node``'s output = m·tensor + d, for an elementwise affine helper this tool wrote.

    The restore ``Mul``/``Add`` (a scalar or a [C, 1, …] constant) and the shift ``Conv`` (depthwise,
    1×1, weight [C, 1, 1, …], unpadded); ``eps`` is the machine epsilon of its constant's type.
    """
    if not is_helper(node) or tensor not in node.input or node.output[0] in c.outputs:
        return None
    if node.op_type in ("Mul", "Add") and len(node.input) == 2 and list(node.input).count(tensor) == 1:
        k = weights.read(node.input[1] if node.input[0] == tensor else node.input[0])
        if k is None or k.dtype.kind != "f" or (k.size > 1 and any(d != 1 for d in k.shape[1:])):
            return None
        v, eps = _vector(k), float(np.finfo(k.dtype).eps)
        return (v, np.zeros(()), eps) if node.op_type == "Mul" else (np.ones(()), v, eps)
    if node.op_type != "Conv" or node.input[0] != tensor or len(node.input) < 2 or tensor in node.input[1:]:
        return None
    w = weights.read(node.input[1])
    b = weights.read(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if w is None or w.dtype.kind != "f" or w.ndim < 3 or any(d != 1 for d in w.shape[1:]):
        return None
    if (len(node.input) > 2 and node.input[2] and b is None) or int(attr_value(node, "group", 1)) != w.shape[0]:
        return None
    if any(attr_value(node, "pads", [0])) or attr_value(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    if any(s != 1 for s in attr_value(node, "strides", [1])):
        return None
    return _vector(w), (_vector(b) if b is not None else np.zeros(())), float(np.finfo(w.dtype).eps)


ROUNDING_ULPS = 16  # a composed map within this many epsilons of the identity is the identity


def _plan_through_helper(
    c: Container,
    node: onnx.NodeProto,
    tensor: str,
    a: np.ndarray,
    off: np.ndarray,
    composed: tuple[np.ndarray, np.ndarray, float],
    weights: _Weights,
    fresh: Callable[[str], str],
    padding: Padding,
    residual: bool,
    restore: Restore | None,
) -> Plan | Refusal:
    """A helper computing m·u + d reads u = a·u' + off: it computes (m·a)·u' + (m·off + d), and goes.

    Its readers read ``u'`` itself: directly when the composed map is the identity within the
    rounding of the helper's constants (``fold`` after ``--preserve-function``: the inverse the
    helper wrote meets the site's own affine), else absorbing the composed map by the usual rules.
    """
    m, d, eps = composed
    a2, off2 = m * a, m * off + d
    label = f"{node.op_type} '{node.name}'"
    out = node.output[0]
    readers = list({id(n): n for n in c.consumers.get(out, [])}.values())
    if any(out not in r.input and not renamable_in_subgraphs(r, out) for r in readers):
        return Refusal(f"a reader of {label} defines that name inside its subgraph")
    tol = ROUNDING_ULPS * eps  # each part snaps to the identity's on its own (a scale may stay, the shift go)
    a2 = np.where(np.abs(a2 - 1) <= tol, 1.0, a2)
    off2 = np.where(np.abs(off2) <= tol * (np.abs(m * off) + np.abs(d)), 0.0, off2)
    identity = bool(np.all(a2 == 1) and np.all(off2 == 0))
    rest: Plan = _nothing
    if not identity:
        readers_plan = _plan_tensor(c, out, a2, off2, weights, fresh, padding, residual, restore)
        if isinstance(readers_plan, Refusal):
            kept = _keep_restore(c, node, a2, off2, weights)
            return kept if kept is not None else Refusal(f"after {label}: {readers_plan.reason}")
        rest = readers_plan

    def through() -> None:
        rest()  # the readers now read u' under the helper's output name; the helper goes
        for r in list({id(n): n for n in c.consumers.get(out, [])}.values()):
            c.rename_input(r, out, tensor)
        c.remove([node])
        c.drop_value_info({out})

    return through


def _keep_restore(c: Container, node: onnx.NodeProto, a: np.ndarray, off: np.ndarray, weights: _Weights) -> Plan | None:
    """The restore pair ``Mul(m)``, ``Add(d)`` kept, computing the composed a·u′ + off from the site's new output.

    For a helper whose constants no longer invert the site's (the site's factors moved, the restore did not):
    its readers cannot absorb the difference, so the pair stays with new constants, exact, and the site folds.
    None when ``node`` is not the ``Mul`` of such a pair or the constants do not fit its layout.
    """
    if node.op_type != "Mul":
        return None
    out = node.output[0]
    readers = c.consumers.get(out, [])
    if len(readers) != 1 or out in c.outputs or not is_helper(readers[0]) or readers[0].op_type != "Add":
        return None
    add = readers[0]
    if _helper_map(c, add, out, weights) is None:
        return None
    m_idx = 1 if weights.read(node.input[1]) is not None else 0
    d_idx = 1 if add.input[0] == out else 0
    m, d = weights.read(node.input[m_idx]), weights.read(add.input[d_idx])
    new_d = off + _vector(d) if d is not None else None  # Add(Mul(u′, A), D) = a·u′ + off + d: A = a, D = off + d
    if m is None or d is None or new_d is None:
        return None
    if any(v.ndim and v.size != k.size for v, k in ((a, m), (new_d, d))):
        return None  # a per-channel value where the helper holds a scalar (or other channels): its layout is unknown

    def keep() -> None:
        weights.write(node, m_idx, np.broadcast_to(a, (a.size,)).reshape(m.shape) if a.ndim else np.full(m.shape, a), m)
        weights.write(add, d_idx, new_d.reshape(d.shape) if new_d.ndim else np.full(d.shape, new_d), d)

    return keep


def _pad_parts(c: Container, node: onnx.NodeProto, weights: _Weights) -> tuple[np.ndarray, np.ndarray] | Refusal:
    """A ``Pad``'s pads and fill value (0 when not given), constants, or why not."""
    label = f"consumer Pad '{node.name or node.output[0]}'"
    if c.opset < 11:
        fill = np.asarray(attr_value(node, "value", 0.0), np.float32)  # a float attribute is float32
        return np.asarray(attr_value(node, "pads", []), np.int64), fill
    if len(node.input) > 3 and node.input[3]:
        return Refusal(f"{label} pads chosen axes only")
    pads = weights.read(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if pads is None:
        return Refusal(f"{label} has no constant pads")
    value = weights.read(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
    if value is None:
        return Refusal(f"{label} has no constant fill value")
    return pads.astype(np.int64).ravel(), value


def _plan_through_pad(
    c: Container,
    node: onnx.NodeProto,
    a: np.ndarray,
    off: np.ndarray,
    weights: _Weights,
    fresh: Callable[[str], str],
    padding: Padding,
    residual: bool,
    restore: Restore | None,
) -> Plan | Refusal:
    """Pad(a·u' + off, v) = a·Pad(u', (v − off)/a) + off: the fill value changes, the readers take the map.

    A fill that comes back to 0 in front of an unpadded ``Conv`` (the ``Pad`` ``--preserve-function``
    wrote, now that the site is folded) goes back into the Conv's own pads, as the model had them.
    """
    label = f"consumer Pad '{node.name or node.output[0]}'"
    mode = attr_value(node, "mode", "constant")
    parts = _pad_parts(c, node, weights)
    if isinstance(parts, Refusal):
        return parts
    pads, value = parts
    rank = len(pads) // 2
    if (a.ndim or off.ndim) and (rank < 2 or pads[1] or pads[rank + 1]):
        return Refusal(f"per-channel constants do not pass through {label} (it pads the channels)")
    fill: np.ndarray | None = None
    if mode == "constant":
        if np.any(a == 0):
            return Refusal(f"{label}: the scale has a zero")
        v = np.asarray(value, np.float64).reshape(())
        new = (v - off) / a
        eps = float(np.finfo(value.dtype).eps) if value.dtype.kind == "f" else float(np.finfo(np.float32).eps)
        new = np.where(np.abs(new * a) <= ROUNDING_ULPS * eps * (np.abs(v) + np.abs(off)), 0.0, new)
        if not np.all(new == np.ravel(new)[0]):
            return Refusal(f"{label}: its fill value would differ per channel (Pad takes one scalar)")
        fill = np.asarray(np.ravel(new)[0])
    rest = _plan_tensor(c, node.output[0], a, off, weights, fresh, padding, residual, restore)
    if isinstance(rest, Refusal):
        return Refusal(f"after {label}: {rest.reason}")

    def through() -> None:
        rest()
        if fill is None or float(fill) == float(np.asarray(value, np.float64).reshape(())):
            pass
        elif c.opset < 11:
            c.set_attribute(node, "value", float(fill))
        elif len(node.input) > 2 and node.input[2]:
            weights.write(node, 2, fill, value)
        else:
            name = fresh(f"{node.name or node.output[0]}_value")
            c.add_constant(name, fill.astype(np.float32), node)
            c.set_input(node, 2, name)
        if fill is not None and float(fill) == 0.0 and is_helper(node):
            _merge_pad(c, node, pads)

    return through


def _merge_pad(c: Container, node: onnx.NodeProto, pads: np.ndarray) -> None:
    """A zero ``Pad`` of the spatial axes in front of an unpadded ``Conv`` (its only reader) becomes its pads."""
    out = node.output[0]
    readers = c.consumers.get(out, [])
    rank = len(pads) // 2
    if len(readers) != 1 or out in c.outputs or rank < 3 or np.any(pads < 0) or np.any(pads[[0, 1, rank, rank + 1]]):
        return
    conv = readers[0]
    if conv.op_type != "Conv" or not is_standard(conv) or conv.input[0] != out or out in conv.input[1:]:
        return
    if any(attr_value(conv, "pads", [0])) or attr_value(conv, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return
    if attr_value(conv, "auto_pad", "NOTSET") != "NOTSET":
        c.set_attribute(conv, "auto_pad", "NOTSET")
    c.set_attribute(conv, "pads", [int(p) for p in (*pads[2:rank], *pads[rank + 2 :])])
    c.set_input(conv, 0, node.input[0])
    c.remove([node])
    c.drop_value_info({out})


def _plan_through_add(
    c: Container,
    node: onnx.NodeProto,
    tensor: str,
    a: np.ndarray,
    off: np.ndarray,
    weights: _Weights,
    fresh: Callable[[str], str],
    padding: Padding,
) -> Plan | Refusal:
    """(a·u' + off) + v = a·(u' + v') with v' = (v + off)/a: v's layer (or constant) takes (1/a, off/a)."""
    label = f"consumer Add '{node.name or node.output[0]}'"
    idx = 1 if node.input[0] == tensor else 0
    other = node.input[idx]
    if np.any(a == 0):
        return Refusal(f"{label}: the scale has a zero")
    k = weights.read(other)
    back: Plan | Refusal
    if k is not None:
        if a.ndim or off.ndim:
            return Refusal(f"{label} adds a constant, and per-channel constants do not line up with it")

        def constant() -> None:
            v = weights.value(node, idx)
            weights.write(node, idx, (v.astype(np.float64) + off) / a, v)

        back = constant
    elif other in c.outputs or len(c.consumers.get(other, [])) != 1:
        back = Refusal("its other operand is also used elsewhere")
    else:
        back = _plan_producer(c, other, 1.0 / a, off / a, weights)
    if isinstance(back, Refusal):
        return Refusal(
            f"{label} is not linear in this value, and the other branch cannot absorb 1/scale: {back.reason}"
        )
    fwd = _plan_tensor(c, node.output[0], a, np.zeros(()), weights, fresh, padding, True)
    if isinstance(fwd, Refusal):
        return Refusal(f"after {label}: {fwd.reason}")
    return _sequence([back, fwd])


def _plan_producer(c: Container, tensor: str, a: np.ndarray, off: np.ndarray, weights: _Weights) -> Plan | Refusal:
    """Make the layer writing ``tensor`` write ``a·tensor + off`` (output channels scaled, bias a·b + off)."""
    node = c.producer.get(tensor)
    if node is None or not is_standard(node):
        return Refusal("it is not computed by a standard layer of this graph")
    label = f"producer {node.op_type} '{node.name or tensor}'"
    if node.op_type not in ("Conv", "Gemm", "MatMul", "Add") or node.output[0] != tensor:
        return Refusal(f"{label} is not a Conv, Gemm, MatMul or bias Add")
    if node.op_type == "Add":  # a bias added to a layer's output, a·(v + k) + off = (a·v) + (a·k + off)
        return _plan_bias_add(c, node, label, a, off, weights)
    per_channel = bool(a.ndim or off.ndim)
    has_off = bool(np.any(off != 0))
    if len(node.input) < 2 or node.input[0] == node.input[1]:
        return Refusal(f"{label} has no constant weight")
    w = weights.read(node.input[1])
    if w is None:
        return Refusal(f"{label} has no constant weight")
    if node.op_type == "Conv":
        if w.ndim < 3:
            return Refusal(f"{label}: unexpected weight rank")
        o = w.shape[0]
        if any(v.ndim and v.shape[0] != o for v in (a, off)):
            return Refusal(f"{label}: constants do not match its output channels")
        if len(node.input) > 2 and node.input[2] and weights.read(node.input[2]) is None:
            return Refusal(f"{label}: its bias is not a constant")

        def conv() -> None:
            w = weights.value(node, 1)
            expand = (slice(None),) + (None,) * (w.ndim - 1)
            weights.write(node, 1, w.astype(np.float64) * np.broadcast_to(a, (o,))[expand], w)
            b = weights.optional(node, 2)
            if b is not None or has_off:
                base = b.astype(np.float64) if b is not None else np.zeros(o)
                weights.write(node, 2, a * base + off, b if b is not None else w)

        return conv
    if per_channel and node.op_type != "Gemm":
        return Refusal(f"{label}: per-channel constants only fold into a Conv's or Gemm's output")
    if node.op_type == "Gemm":
        if w.ndim != 2:
            return Refusal(f"{label}: weight is not a 2-D matrix")
        n_axis = 0 if attr_value(node, "transB", 0) else 1
        beta = float(attr_value(node, "beta", 1.0))
        if any(v.ndim and v.shape[0] != w.shape[n_axis] for v in (a, off)):
            return Refusal(f"{label}: constants do not match its output features")
        if len(node.input) > 2 and node.input[2] and weights.read(node.input[2]) is None:
            return Refusal(f"{label}: its bias is not a constant")
        if has_off and beta == 0:
            return Refusal(f"{label} has beta = 0 (no bias to take the shift)")

        def gemm() -> None:
            w = weights.value(node, 1)
            shape = [1, 1]
            shape[n_axis] = -1
            weights.write(node, 1, w.astype(np.float64) * (a.reshape(shape) if a.ndim else a), w)
            cv = weights.optional(node, 2)
            if cv is not None or has_off:
                base = cv.astype(np.float64) if cv is not None else np.zeros(())
                weights.write(node, 2, a * base + off / beta, cv if cv is not None else w)

        return gemm
    # MatMul
    if w.ndim != 2:
        return Refusal(f"{label}: weight is not a 2-D matrix")
    if has_off:
        return Refusal(f"{label} has no bias to take the shift")

    def matmul() -> None:
        w = weights.value(node, 1)
        weights.write(node, 1, w.astype(np.float64) * a, w)

    return matmul


def _plan_bias_add(
    c: Container, node: onnx.NodeProto, label: str, a: np.ndarray, off: np.ndarray, weights: _Weights
) -> Plan | Refusal:
    """A bias ``Add`` after a layer: the layer takes ``a``, the bias becomes a·k + off."""
    if a.ndim or off.ndim:
        return Refusal(f"{label}: per-channel constants only fold into a Conv's or Gemm's output")
    if len(node.input) != 2:
        return Refusal(f"{label} is not a bias Add")
    known = [weights.read(i) is not None for i in node.input]
    if known.count(True) != 1:
        return Refusal(f"{label} does not add a constant to a layer's output")
    k_idx = known.index(True)
    inner = node.input[1 - k_idx]
    if inner in c.outputs or len(c.consumers.get(inner, [])) != 1:
        return Refusal(f"{label}: the layer output it adds to is used elsewhere")
    sub = _plan_producer(c, inner, a, np.zeros(()), weights)
    if isinstance(sub, Refusal):
        return sub

    def add() -> None:
        sub()
        k = weights.value(node, k_idx)
        weights.write(node, k_idx, a * k.astype(np.float64) + off, k)

    return add


def _transparent_blocker(node: onnx.NodeProto, rule: str, a: np.ndarray, off: np.ndarray) -> Refusal | None:
    label = f"{node.op_type} '{node.name or node.output[0]}'"
    if rule == "positive" and np.any(a <= 0):
        return Refusal(f"a negative scale does not commute with {label}")
    if rule == "per_tensor" and (a.ndim or off.ndim):
        return Refusal(f"per-channel constants do not pass through {label}")
    if rule == "pads" and any(attr_value(node, "pads", [0])) and attr_value(node, "count_include_pad", 0):
        return Refusal(f"{label} averages padded zeros (count_include_pad=1)")
    if node.op_type == "Resize" and attr_value(node, "coordinate_transformation_mode", "") == "tf_crop_and_resize":
        return Refusal(f"{label} fills outside its crop with a constant")
    return None


def _plan_one(
    c: Container,
    node: onnx.NodeProto,
    tensor: str,
    a: np.ndarray,
    off: np.ndarray,
    weights: _Weights,
    fresh: Callable[[str], str],
    padding: Padding,
) -> Plan | Refusal:
    label = f"{node.op_type} '{node.name or node.output[0]}'"
    linear = node.op_type in ("Gemm", "MatMul", "Conv", "ConvTranspose") and is_standard(node)
    if not linear or len(node.input) < 2 or node.input[0] != tensor or tensor in node.input[1:]:
        return Refusal(
            f"consumer {label} is not linear in this value (only Gemm, MatMul(+Add), Conv, ConvTranspose fold)"
        )
    w = weights.read(node.input[1])
    if w is None:
        return Refusal(f"consumer {label} has no constant weight")
    if node.op_type == "Gemm":
        return _plan_gemm(node, label, w, a, off, weights)
    if node.op_type == "MatMul":
        return _plan_matmul(c, node, label, w, a, off, weights, fresh, padding)
    if node.op_type == "Conv":
        return _plan_conv(c, node, label, w, a, off, weights, fresh, padding)
    return _plan_conv_transpose(c, node, label, w, a, off, weights, fresh, padding)


def _plan_gemm(
    node: onnx.NodeProto, label: str, w: np.ndarray, a: np.ndarray, off: np.ndarray, weights: _Weights
) -> Plan | Refusal:
    if w.ndim != 2 or (a.ndim and attr_value(node, "transA", 0)):
        return Refusal(f"consumer {label}: per-feature constants with transA are not supported")
    k_axis = 1 if attr_value(node, "transB", 0) else 0
    if a.ndim and a.shape[0] != w.shape[k_axis]:
        return Refusal(f"consumer {label}: constants do not match the weight's input dimension")
    alpha, beta = float(attr_value(node, "alpha", 1.0)), float(attr_value(node, "beta", 1.0))
    has_shift = bool(np.any(off != 0))
    has_c = len(node.input) > 2 and bool(node.input[2])
    if has_shift and ((has_c and weights.read(node.input[2]) is None) or beta == 0):
        return Refusal(f"consumer {label}: its bias is not a constant")

    def gemm() -> None:
        w = weights.value(node, 1)
        new_w, bias = _absorb_matmul_like(w, a, off, k_axis)
        like = np.empty(0, w.dtype)
        del w  # a big weight is not held while its replacement is serialized
        weights.write(node, 1, new_w, like)
        if has_shift:
            c_val = weights.optional(node, 2)
            base = c_val.astype(np.float64) if c_val is not None else 0.0
            weights.write(node, 2, base + alpha * bias / beta, c_val if c_val is not None else like)

    return gemm


def _plan_matmul(
    c: Container,
    node: onnx.NodeProto,
    label: str,
    w: np.ndarray,
    a: np.ndarray,
    off: np.ndarray,
    weights: _Weights,
    fresh: Callable[[str], str],
    padding: Padding,
) -> Plan | Refusal:
    """u'·W' (+ the bias Σ c_k·W_k into the ``Add`` after it, or a new one)."""
    if w.ndim != 2:
        return Refusal(f"consumer {label}: weight is not a 2-D matrix")
    if a.ndim and a.shape[0] != w.shape[0]:
        return Refusal(f"consumer {label}: constants do not match the weight's input dimension")
    has_shift = bool(np.any(off != 0))
    out = node.output[0]
    users = c.consumers.get(out, [])
    add = users[0] if len(users) == 1 and users[0].op_type == "Add" and out not in c.outputs else None
    add_idx = (1 if add.input[0] == out else 0) if add is not None else 0
    if padding == FREE and has_shift:
        k = weights.read(add.input[add_idx]) if add is not None else None
        if k is None or np.broadcast_shapes(k.shape, (w.shape[1],)) != k.shape:
            return Refusal(f"consumer {label} has no bias Add to take the shift (one would be inserted)")

    def matmul() -> None:
        w = weights.value(node, 1)
        new_w, bias = _absorb_matmul_like(w, a, off, 0)
        like = np.empty(0, w.dtype)
        del w  # a big weight is not held while its replacement is serialized
        weights.write(node, 1, new_w, like)
        if not has_shift:
            return
        add_val = weights.read(add.input[add_idx]) if add is not None else None
        if add is not None and add_val is not None and np.broadcast_shapes(add_val.shape, bias.shape) == add_val.shape:
            total = add_val.astype(np.float64) + bias
            eps = float(np.finfo(add_val.dtype).eps) if add_val.dtype.kind == "f" else 0.0
            terms = np.abs(add_val) + np.max(np.abs(off)) * _column_abs_sums(node, weights) if is_helper(add) else None
            if terms is not None and np.all(np.abs(total) <= ROUNDING_ULPS * eps * terms):
                c.remove([add])  # the bias Add an earlier move wrote, cancelled by this one: it goes
                c.set_output(node, 0, add.output[0])
                return
            weights.write(add, add_idx, total, add_val)
            return
        raw = fresh(f"{out}_normact_matmul")
        bias_name = fresh(f"{out}_normact_bias")
        c.set_output(node, 0, raw)
        c.add_constant(bias_name, bias.astype(like.dtype), node)
        bias_add = helper.make_node("Add", [raw, bias_name], [out], name=fresh(f"{node.name or out}_normact_bias"))
        c.insert_after(node, [bias_add])

    return matmul


def _column_abs_sums(node: onnx.NodeProto, weights: _Weights) -> np.ndarray:
    """Σ_k |W[k, j]| of a MatMul's constant weight: the size of the terms its bias sum cancels."""
    return np.abs(weights.value(node, 1).astype(np.float64)).sum(axis=0)


def _plan_conv(
    c: Container,
    node: onnx.NodeProto,
    label: str,
    w: np.ndarray,
    a: np.ndarray,
    off: np.ndarray,
    weights: _Weights,
    fresh: Callable[[str], str],
    padding: Padding,
) -> Plan | Refusal:
    if w.ndim < 3:
        return Refusal(f"consumer {label}: unexpected weight rank")
    group = int(attr_value(node, "group", 1))
    out_ch, cg = w.shape[0], w.shape[1]
    if a.ndim and a.shape[0] != cg * group:
        return Refusal(f"consumer {label}: constants do not match its input channels")
    if off.ndim and off.shape[0] != cg * group:
        return Refusal(f"consumer {label}: constants do not match its input channels")
    pads = list(attr_value(node, "pads", []) or [])
    auto_pad = attr_value(node, "auto_pad", "NOTSET")
    padded = any(pads) or auto_pad not in ("NOTSET", "VALID")
    explicit: Literal["pad", "keep-shift"] | None = None  # how the padded border stays exact
    pre_add = zero = np.zeros(())
    if padded and bool(np.any(off != 0)):
        if padding not in PADDING[:2]:
            return Refusal(f"consumer {label} pads with zeros (the shift is not exact at the borders)")
        if auto_pad not in ("NOTSET", "VALID"):
            return Refusal(f"consumer {label} pads with auto_pad={auto_pad} (pads not explicit)")
        if np.any(a == 0):
            return Refusal(f"consumer {label} pads with zeros and the scale has a zero")
        zero = np.broadcast_to(-off / a, (cg * group,))  # the u' that stands for u = 0
        explicit = "pad" if padding == "pad" and np.all(zero == zero[0]) else "keep-shift"
        if explicit == "keep-shift":  # u = a·(u' + off/a): the Conv absorbs a, the Add keeps the shift
            pre_add, off = -zero, np.zeros(())
    in_channel = (np.arange(out_ch)[:, None] // (out_ch // group)) * cg + np.arange(cg)[None, :]
    expand = (slice(None), slice(None)) + (None,) * (w.ndim - 2)
    a_w = (np.broadcast_to(a, (cg * group,))[in_channel])[expand]
    c_w = (np.broadcast_to(off, (cg * group,))[in_channel])[expand]
    fold_bias = bool(np.any(off != 0))
    if len(node.input) > 2 and node.input[2] and weights.read(node.input[2]) is None and fold_bias:
        return Refusal(f"consumer {label}: its bias is not a constant")

    def conv() -> None:
        w = weights.value(node, 1)
        w64 = w.astype(np.float64)
        weights.write(node, 1, w64 * a_w, w)
        if fold_bias:
            b_val = weights.optional(node, 2)
            base = b_val.astype(np.float64) if b_val is not None else np.zeros(out_ch)
            bias = (w64 * c_w).reshape(out_ch, -1).sum(axis=1)
            weights.write(node, 2, base + bias, b_val if b_val is not None else w)
        if explicit == "pad":
            _explicit_pad(c, node, float(zero[0]), pads, w, fresh)
        elif explicit == "keep-shift":
            _explicit_shift(c, node, pre_add, w, fresh)

    return conv


def _plan_conv_transpose(
    c: Container,
    node: onnx.NodeProto,
    label: str,
    w: np.ndarray,
    a: np.ndarray,
    off: np.ndarray,
    weights: _Weights,
    fresh: Callable[[str], str],
    padding: Padding,
) -> Plan | Refusal:
    """Weight [C_in, C_out/group, k…]: the scale runs along axis 0. The shift cannot go into the bias.

    Output position p sums x over the input positions whose kernel window covers
    p, and how many those are depends on p (strides, borders), so Σ off·W is not
    one number per output channel. The shift stays in front (u = a·(u' + off/a)),
    like ``"keep-shift"`` for a padded Conv.
    """
    if w.ndim < 3:
        return Refusal(f"consumer {label}: unexpected weight rank")
    c_in = w.shape[0]
    if any(v.ndim and v.shape[0] != c_in for v in (a, off)):
        return Refusal(f"consumer {label}: constants do not match its input channels")
    has_shift = bool(np.any(off != 0))
    if has_shift and padding not in PADDING[:2]:
        return Refusal(f"consumer {label}: a shift does not fold into a ConvTranspose (one op would be inserted)")
    if has_shift and np.any(a == 0):
        return Refusal(f"consumer {label}: the scale has a zero")
    shift = off / a if has_shift else None
    expand = (slice(None),) + (None,) * (w.ndim - 1)

    def convt() -> None:
        w = weights.value(node, 1)
        weights.write(node, 1, w.astype(np.float64) * np.broadcast_to(a, (c_in,))[expand], w)
        if shift is not None:
            _explicit_shift(c, node, shift, w, fresh, channels=c_in)

    return convt


def _explicit_input(
    c: Container,
    node: onnx.NodeProto,
    op: str,
    extra: list[str],
    fresh: Callable[[str], str],
    **attrs: Any,
) -> None:
    """Put ``op(input0, *extra)`` in front of ``node`` and make ``node`` read its result."""
    out = fresh(f"{node.input[0]}_normact_{op.lower()}")
    pre = helper.make_node(op, [node.input[0], *extra], [out], name=fresh(f"{node.name or out}_normact_{op}"), **attrs)
    c.insert_before(node, [pre])
    c.set_input(node, 0, out)


def _explicit_shift(
    c: Container,
    node: onnx.NodeProto,
    shift: np.ndarray,
    w: np.ndarray,
    fresh: Callable[[str], str],
    channels: int | None = None,
) -> None:
    """``u' + shift`` (per channel) in front of ``node``, written as a depthwise 1×1 ``Conv`` (weight 1, bias shift).

    Exact (x·1 + b is the Add), and on ONNX Runtime CPU it stays in the blocked
    convolution layout, where a broadcast ``Add`` costs two layout reorders.
    """
    channels = channels or w.shape[1] * int(attr_value(node, "group", 1))
    k = w.ndim - 2
    base = node.name or node.output[0]
    names = [fresh(f"{base}_normact_shift_w"), fresh(f"{base}_normact_shift")]
    # the op's own name is taken after its constants' (as it always was), and it goes after them
    out = fresh(f"{node.input[0]}_normact_conv")
    op_name = fresh(f"{node.name or out}_normact_Conv")
    c.add_constant(names[0], np.ones((channels, 1) + (1,) * k, dtype=w.dtype), node)
    c.add_constant(names[1], np.broadcast_to(shift, (channels,)).astype(w.dtype), node)
    pre = helper.make_node("Conv", [node.input[0], *names], [out], name=op_name, group=channels, kernel_shape=[1] * k)
    c.insert_before(node, [pre])
    c.set_input(node, 0, out)


def _explicit_pad(
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
        _explicit_input(c, node, "Pad", [], fresh, mode="constant", pads=full, value=value)
    else:
        names = [
            fresh(f"{node.name or node.output[0]}_normact_pads"),
            fresh(f"{node.name or node.output[0]}_normact_padv"),
        ]
        out = fresh(f"{node.input[0]}_normact_pad")
        op_name = fresh(f"{node.name or out}_normact_Pad")
        c.add_constant(names[0], np.asarray(full, dtype=np.int64), node)
        c.add_constant(names[1], np.asarray(value, dtype=w.dtype), node)
        c.insert_before(node, [helper.make_node("Pad", [node.input[0], *names], [out], name=op_name, mode="constant")])
        c.set_input(node, 0, out)
    for i in reversed(range(len(node.attribute))):
        if node.attribute[i].name == "pads":
            del node.attribute[i]
