"""One PyTorch function per ONNX op: what :mod:`.torch_graph` executes a graph with.

Why our own table and not a converter from the registry: docs/torch-backend.md compares them on the real-model set
(op coverage, parity with ONNX Runtime, weights mapped back to initializers). Each function takes the node's
attributes (a dict, ONNX defaults filled in by the function), its inputs (tensors, ``None`` for an omitted optional
input) and the node's opset, and returns the list of its outputs. Shape-like inputs (Reshape's shape, Slice's starts)
are read back to Python integers, so a graph with dynamic shapes runs shape by shape as ONNX Runtime runs it.

Gradient safety: every function is built from torch ops whose gradients are finite wherever ONNX Runtime training's
are (no ``where`` over a branch that overflows; ``max``/``min`` split ties). ``torch`` is an optional dependency:
:func:`load` imports it on first use and binds it here.

Why one module past 500 lines: it is a table, one short function per ONNX op (102 ops in `OPS`), each read on its own
against the ONNX operator spec; splitting the table by op family would only spread the shared helpers (attribute
defaults, shape reading, broadcasting) over several files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

torch: Any = None  # bound by load()
F: Any = None
# Where tensors an op creates from nothing (Shape, ConstantOfShape, Range) live: the running graph's device, set by
# TorchGraph.forward, so every tensor of a run shares one device (CUDA included).
device: Any = None
# Set while TorchGraph.forward_float64 runs: every float tensor an op creates (Cast, ConstantOfShape, the plan's fused
# comparisons) is float64, so a float32 graph runs in float64 throughout (the export check's reference).
wide: bool = False

Attrs = dict[str, Any]
Op = Callable[[Attrs, list[Any], int], list[Any]]
OPS: dict[tuple[str, str], Op] = {}
MS = "com.microsoft"


def load() -> Any:
    """Import torch (an optional dependency) and bind it for the op functions; returns the module."""
    global torch, F
    if torch is None:
        import torch as _torch
        import torch.nn.functional as _functional

        torch, F = _torch, _functional
    return torch


def op(*names: str, domain: str = "") -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        for name in names:
            OPS[(domain, name)] = fn
        return fn

    return register


def dtype_of(elem: int) -> Any:
    """The torch dtype of an ONNX element type (float64 for every float type while :data:`wide` is set)."""
    np_dtype = helper.tensor_dtype_to_np_dtype(elem)
    if np_dtype == np.bool_:
        return torch.bool
    dtype = getattr(torch, np.dtype(np_dtype).name)
    return torch.float64 if wide and dtype.is_floating_point else dtype


def ints(t: Any) -> list[int]:
    """A shape-like tensor as Python integers."""
    return [int(v) for v in t.detach().reshape(-1).tolist()]


def scalar(t: Any) -> Any:
    """A one-element tensor as a Python number (a bound, a pad value, an exponent: no gradient flows to it)."""
    return t.detach().reshape(()).item()


def axis_norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ---- elementwise ----------------------------------------------------------------------------------------------


def unary(name: str, torch_name: str) -> None:
    def run(a: Attrs, x: list[Any], v: int) -> list[Any]:
        return [getattr(torch, torch_name)(x[0])]

    OPS[("", name)] = run


def binary(name: str, torch_name: str) -> None:
    def run(a: Attrs, x: list[Any], v: int) -> list[Any]:
        return [getattr(torch, torch_name)(x[0], x[1])]

    OPS[("", name)] = run


def _register_elementwise() -> None:
    for name, attr in [
        ("Abs", "abs"),
        ("Neg", "neg"),
        ("Exp", "exp"),
        ("Log", "log"),
        ("Sqrt", "sqrt"),
        ("Reciprocal", "reciprocal"),
        ("Erf", "erf"),
        ("Tanh", "tanh"),
        ("Sigmoid", "sigmoid"),
        ("Relu", "relu"),
        ("Floor", "floor"),
        ("Ceil", "ceil"),
        ("Round", "round"),
        ("Sign", "sign"),
        ("Sin", "sin"),
        ("Cos", "cos"),
        ("Not", "logical_not"),
        ("IsNaN", "isnan"),
    ]:
        unary(name, attr)
    for name, attr in [
        ("Add", "add"),
        ("Sub", "sub"),
        ("Mul", "mul"),
        ("Equal", "eq"),
        ("Greater", "gt"),
        ("Less", "lt"),
        ("GreaterOrEqual", "ge"),
        ("LessOrEqual", "le"),
        ("And", "logical_and"),
        ("Or", "logical_or"),
        ("Xor", "logical_xor"),
    ]:
        binary(name, attr)


_register_elementwise()


@op("Div")
def div(a: Attrs, x: list[Any], v: int) -> list[Any]:
    p, q = x
    if not p.is_floating_point():
        return [torch.div(p, q, rounding_mode="trunc")]
    return [p / q]


@op("Pow")
def pow_(a: Attrs, x: list[Any], v: int) -> list[Any]:
    """The exponent gets no gradient: its derivative needs log of the base, undefined (NaN) where the base is ≤ 0,
    and an exponent is a constant of the computation, not a weight."""
    base, exponent = x[0], x[1].detach()
    if exponent.numel() == 1:
        e = float(scalar(exponent))
        if e == 2.0:
            return [base * base]  # exact like ORT, and no log in the gradient
        return [torch.pow(base, e).to(base.dtype)]
    return [torch.pow(base, exponent.to(base.dtype))]


@op("Mod")
def mod(a: Attrs, x: list[Any], v: int) -> list[Any]:
    return [torch.fmod(x[0], x[1]) if a.get("fmod", 0) else torch.remainder(x[0], x[1])]


def _fold(fn: Callable[[Any, Any], Any], xs: list[Any]) -> Any:
    out = xs[0]
    for t in xs[1:]:
        out = fn(out, t)
    return out


OPS[("", "Max")] = lambda a, x, v: [_fold(torch.maximum, x)]
OPS[("", "Min")] = lambda a, x, v: [_fold(torch.minimum, x)]
OPS[("", "Sum")] = lambda a, x, v: [_fold(torch.add, x)]
OPS[("", "Mean")] = lambda a, x, v: [_fold(torch.add, x) / len(x)]


@op("Where")
def where(a: Attrs, x: list[Any], v: int) -> list[Any]:
    return [torch.where(x[0].bool(), x[1], x[2])]


@op("OneHot")
def one_hot(a: Attrs, x: list[Any], v: int) -> list[Any]:
    """ONNX OneHot (magika 0.5's byte encoding): negative indices count from ``depth``, out-of-range ones give an
    all-``off`` row, the new axis goes where ``axis`` says."""
    depth = int(scalar(x[1]))
    off, on = x[2][0], x[2][1]
    i = x[0].to(torch.int64)
    i = torch.where(i < 0, i + depth, i)
    valid = ((i >= 0) & (i < depth)).unsqueeze(-1)
    hot = F.one_hot(i.clamp(0, depth - 1), depth).bool() & valid
    out = torch.where(hot, on, off)
    return [torch.movedim(out, -1, axis_norm(int(a.get("axis", -1)), i.dim() + 1))]


@op("ArrayFeatureExtractor", domain="ai.onnx.ml")
def array_feature_extractor(a: Attrs, x: list[Any], v: int) -> list[Any]:
    """ONNX-ML ArrayFeatureExtractor (skl2onnx's class-label head): the last axis' entries at the given indices;
    a 1-D input becomes one row, as ONNX Runtime computes it."""
    t = x[0] if x[0].dim() > 1 else x[0].unsqueeze(0)
    return [t.index_select(-1, x[1].reshape(-1).to(torch.int64))]


@op("Cast")
def cast(a: Attrs, x: list[Any], v: int) -> list[Any]:
    return [x[0].to(dtype_of(a["to"]))]


@op("CastLike")
def cast_like(a: Attrs, x: list[Any], v: int) -> list[Any]:
    return [x[0].to(x[1].dtype)]


@op("Identity", "Dropout")
def identity(a: Attrs, x: list[Any], v: int) -> list[Any]:
    if a.get("_n_outputs", 1) < 2:
        return [x[0]]  # no mask asked for: no tensor allocated (most Identity nodes)
    return [x[0], torch.ones_like(x[0], dtype=torch.bool)]  # Dropout's mask


@op("LeakyRelu")
def leaky_relu(a: Attrs, x: list[Any], v: int) -> list[Any]:
    return [F.leaky_relu(x[0], a.get("alpha", 0.01))]


@op("PRelu")
def prelu(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t, slope = x
    return [torch.where(t >= 0, t, t * slope)]  # both branches finite: the where is gradient-safe


@op("Elu")
def elu(a: Attrs, x: list[Any], v: int) -> list[Any]:
    return [F.elu(x[0], a.get("alpha", 1.0))]


@op("Selu")
def selu(a: Attrs, x: list[Any], v: int) -> list[Any]:
    alpha, gamma = a.get("alpha", 1.67326319217681884765625), a.get("gamma", 1.05070102214813232421875)
    return [gamma * F.elu(x[0], alpha)]


@op("Celu")
def celu(a: Attrs, x: list[Any], v: int) -> list[Any]:
    return [F.celu(x[0], a.get("alpha", 1.0))]


@op("Softplus")
def softplus(a: Attrs, x: list[Any], v: int) -> list[Any]:
    return [F.softplus(x[0])]


@op("Softsign")
def softsign(a: Attrs, x: list[Any], v: int) -> list[Any]:
    return [F.softsign(x[0])]


@op("Mish")
def mish(a: Attrs, x: list[Any], v: int) -> list[Any]:
    return [F.mish(x[0])]


@op("HardSigmoid")
def hard_sigmoid(a: Attrs, x: list[Any], v: int) -> list[Any]:
    alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
    return [torch.clamp(x[0] * alpha + beta, 0.0, 1.0)]


@op("HardSwish")
def hard_swish(a: Attrs, x: list[Any], v: int) -> list[Any]:
    return [x[0] * torch.clamp(x[0] * (1 / 6.0) + 0.5, 0.0, 1.0)]


def _gelu(t: Any, approximate: str = "none") -> Any:
    return F.gelu(t, approximate=approximate)


@op("Gelu")
def gelu(a: Attrs, x: list[Any], v: int) -> list[Any]:
    return [_gelu(x[0], _s(a.get("approximate", "none")))]


@op("Clip")
def clip(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t = x[0]
    if v < 11:
        lo, hi = a.get("min", -math.inf), a.get("max", math.inf)
    else:
        lo = x[1] if len(x) > 1 and x[1] is not None else None
        hi = x[2] if len(x) > 2 and x[2] is not None else None
        lo = None if lo is None else scalar(lo)
        hi = None if hi is None else scalar(hi)
    return [torch.clamp(t, lo, hi)]


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---- shapes and indexing ----------------------------------------------------------------------------------------


@op("Shape")
def shape(a: Attrs, x: list[Any], v: int) -> list[Any]:
    dims = list(x[0].shape)
    start, end = a.get("start", 0), a.get("end", None)
    return [torch.tensor(dims[start:end], dtype=torch.int64, device=device)]


@op("Size")
def size(a: Attrs, x: list[Any], v: int) -> list[Any]:
    return [torch.tensor(x[0].numel(), dtype=torch.int64, device=device)]


@op("Reshape")
def reshape(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t = x[0]
    want = ints(x[1]) if v >= 5 else list(a["shape"])
    if not a.get("allowzero", 0):
        want = [t.shape[i] if d == 0 else d for i, d in enumerate(want)]
    return [torch.reshape(t, tuple(want))]


@op("Flatten")
def flatten(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t = x[0]
    axis = axis_norm(a.get("axis", 1), t.dim())
    lead = int(np.prod(t.shape[:axis])) if axis else 1
    return [t.reshape(lead, -1) if t.numel() else t.reshape(lead, int(np.prod(t.shape[axis:])))]


@op("Transpose")
def transpose(a: Attrs, x: list[Any], v: int) -> list[Any]:
    perm = a.get("perm") or list(range(x[0].dim()))[::-1]
    return [x[0].permute(*perm)]


def _axes(a: Attrs, x: list[Any], v: int, since: int) -> list[int] | None:
    if v >= since:
        return ints(x[1]) if len(x) > 1 and x[1] is not None else None
    return list(a["axes"]) if "axes" in a else None


@op("Squeeze")
def squeeze(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t = x[0]
    axes = _axes(a, x, v, 13)
    if axes is None:
        return [t.squeeze()]
    return [t.squeeze(tuple(axis_norm(i, t.dim()) for i in axes))]


@op("Unsqueeze")
def unsqueeze(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t = x[0]
    axes = _axes(a, x, v, 13) or []
    rank = t.dim() + len(axes)
    for i in sorted(axis_norm(i, rank) for i in axes):
        t = t.unsqueeze(i)
    return [t]


@op("Concat")
def concat(a: Attrs, x: list[Any], v: int) -> list[Any]:
    parts = [t for t in x if t is not None]
    dtype = parts[0].dtype
    return [torch.cat([t.to(dtype) for t in parts], dim=a["axis"])]


@op("Split")
def split(a: Attrs, x: list[Any], v: int, n_out: int | None = None) -> list[Any]:
    t = x[0]
    axis = axis_norm(a.get("axis", 0), t.dim())
    sizes: list[int] | None
    if v >= 13:
        sizes = ints(x[1]) if len(x) > 1 and x[1] is not None else None
    else:
        sizes = list(a["split"]) if "split" in a else None
    if sizes is None:
        n = a.get("num_outputs") or a["_n_outputs"]
        chunk = -(-t.shape[axis] // n)
        sizes = [min(chunk, t.shape[axis] - i * chunk) for i in range(n)]
    return list(torch.split(t, sizes, dim=axis))


@op("Slice")
def slice_(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t = x[0]
    if v < 10:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = ints(x[1]), ints(x[2])
        axes = ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * t.dim()
    flips = []
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax = axis_norm(ax, t.dim())
        n = t.shape[ax]
        if st > 0:
            s = max(0, min(n, s + n if s < 0 else s))
            e = max(0, min(n, e + n if e < 0 else e))
            index[ax] = slice(s, max(s, e), st)
        else:  # a negative step: slice the flipped axis (torch slices forward only)
            s = max(-1, min(n - 1, s + n if s < 0 else s))
            e = max(-1, min(n - 1, e + n if e < 0 else e))
            flips.append(ax)
            index[ax] = slice(n - 1 - s, n - 1 - e if e < s else n - 1 - s, -st)
    if flips:
        t = t.flip(flips)
    return [t[tuple(index)]]


@op("Gather")
def gather(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t, idx = x
    axis = axis_norm(a.get("axis", 0), t.dim())
    idx = idx.long()
    idx = torch.where(idx < 0, idx + t.shape[axis], idx)
    out = torch.index_select(t, axis, idx.reshape(-1))
    return [torch.reshape(out, (*t.shape[:axis], *idx.shape, *t.shape[axis + 1 :]))]


@op("GatherElements")
def gather_elements(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t, idx = x
    axis = axis_norm(a.get("axis", 0), t.dim())
    idx = idx.long()
    return [torch.gather(t, axis, torch.where(idx < 0, idx + t.shape[axis], idx))]


@op("Expand")
def expand(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t, want = x[0], ints(x[1])
    return [t.expand(torch.broadcast_shapes(tuple(t.shape), tuple(want)))]  # ONNX broadcasts both ways


@op("Tile")
def tile(a: Attrs, x: list[Any], v: int) -> list[Any]:
    return [x[0].repeat(tuple(ints(x[1])))]


@op("ConstantOfShape")
def constant_of_shape(a: Attrs, x: list[Any], v: int) -> list[Any]:
    value = a.get("value")
    fill = np.zeros(1, np.float32) if value is None else value
    first = np.array(fill).reshape(-1)[:1]
    dtype = dtype_of(helper.np_dtype_to_tensor_dtype(first.dtype))
    return [torch.full(tuple(ints(x[0])), first.item(), dtype=dtype, device=device)]


@op("Range")
def range_(a: Attrs, x: list[Any], v: int) -> list[Any]:
    start, limit, delta = (scalar(t) for t in x)
    return [torch.arange(start, limit, delta, dtype=x[0].dtype, device=x[0].device)]


@op("Pad")
def pad(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t = x[0]
    mode = _s(a.get("mode", "constant"))
    if v < 11:
        pads, value, axes = list(a["pads"]), a.get("value", 0.0), None
    else:
        pads = ints(x[1])
        value = float(scalar(x[2])) if len(x) > 2 and x[2] is not None and x[2].numel() else 0.0
        axes = ints(x[3]) if len(x) > 3 and x[3] is not None else None
    rank = t.dim()
    axes = [axis_norm(i, rank) for i in axes] if axes is not None else list(range(rank))
    k = len(axes)
    begin = dict(zip(axes, pads[:k]))
    end = dict(zip(axes, pads[k:]))
    spec: list[int] = []
    for ax in reversed(range(rank)):  # torch's pad lists the last axis first
        spec += [begin.get(ax, 0), end.get(ax, 0)]
    while len(spec) > 2 and spec[-2:] == [0, 0]:
        spec = spec[:-2]
    if mode == "constant":
        return [F.pad(t, spec, value=value)]
    # torch pads k trailing axes in these modes only on inputs of rank k + 1 or k + 2 (silero v3 reflect-pads the
    # last axis of a 4-D tensor): the untouched leading axes are merged into one, and split again after
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    k = len(spec) // 2
    lead, tail = t.shape[: rank - k], t.shape[rank - k :]
    padded = F.pad(t.reshape(-1, *tail), spec, mode=torch_mode)
    return [padded.reshape(*lead, *padded.shape[1:])]


@op("Constant")
def constant(a: Attrs, x: list[Any], v: int) -> list[Any]:
    raise AssertionError("Constant nodes are folded by TorchGraph")  # never called


# ---- reductions -------------------------------------------------------------------------------------------------


def _reduce(fn: Callable[..., Any], since: int) -> Op:
    def run(a: Attrs, x: list[Any], v: int) -> list[Any]:
        t = x[0]
        axes = _axes(a, x, v, since)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return [t]
            axes = list(range(t.dim()))
        return [fn(t, [axis_norm(i, t.dim()) for i in axes], keep)]

    return run


def _amax(t: Any, axes: list[int], keep: bool) -> Any:
    return torch.amax(t, dim=axes, keepdim=keep)


def _amin(t: Any, axes: list[int], keep: bool) -> Any:
    return torch.amin(t, dim=axes, keepdim=keep)


OPS[("", "ReduceMean")] = _reduce(lambda t, ax, k: torch.mean(t, dim=ax, keepdim=k), 18)
OPS[("", "ReduceSum")] = _reduce(lambda t, ax, k: torch.sum(t, dim=ax, keepdim=k), 13)
OPS[("", "ReduceMax")] = _reduce(_amax, 18)
OPS[("", "ReduceMin")] = _reduce(_amin, 18)
OPS[("", "ReduceProd")] = _reduce(lambda t, ax, k: _fold(torch.mul, [t.prod(d, keepdim=True) for d in ax]), 18)
OPS[("", "ReduceL2")] = _reduce(lambda t, ax, k: torch.sqrt(torch.sum(t * t, dim=ax, keepdim=k)), 18)
OPS[("", "ReduceSumSquare")] = _reduce(lambda t, ax, k: torch.sum(t * t, dim=ax, keepdim=k), 18)


@op("ArgMax", "ArgMin")
def argmax(a: Attrs, x: list[Any], v: int) -> list[Any]:
    fn = torch.argmax if a["_op"] == "ArgMax" else torch.argmin
    return [fn(x[0], dim=a.get("axis", 0), keepdim=bool(a.get("keepdims", 1)))]


@op("Softmax", "LogSoftmax")
def softmax(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t = x[0]
    fn = F.softmax if a["_op"] == "Softmax" else F.log_softmax
    if v >= 13:
        return [fn(t, dim=a.get("axis", -1))]
    axis = axis_norm(a.get("axis", 1), t.dim())  # before 13: the input as 2-D, axis..end one row
    flat = t.reshape(int(np.prod(t.shape[:axis])), -1)
    return [fn(flat, dim=1).reshape(t.shape)]


# ---- neural-network ops -----------------------------------------------------------------------------------------


@op("MatMul")
def matmul(a: Attrs, x: list[Any], v: int) -> list[Any]:
    return [torch.matmul(x[0], x[1])]


@op("Gemm")
def gemm(a: Attrs, x: list[Any], v: int) -> list[Any]:
    p = x[0].t() if a.get("transA", 0) else x[0]
    q = x[1].t() if a.get("transB", 0) else x[1]
    out = torch.matmul(p, q) * a.get("alpha", 1.0)
    if len(x) > 2 and x[2] is not None:
        out = out + x[2] * a.get("beta", 1.0)
    return [out]


def _auto_pads(a: Attrs, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dil: Sequence[int]):
    """(begin, end) pads per spatial axis, SAME_UPPER/SAME_LOWER resolved from the input's size."""
    auto = _s(a.get("auto_pad", "NOTSET"))
    k = len(kernel)
    if auto in ("NOTSET", ""):
        pads = list(a.get("pads", [0] * 2 * k))
        return pads[:k], pads[k:]
    if auto == "VALID":
        return [0] * k, [0] * k
    begin, end = [], []
    for n, kk, s, d in zip(spatial, kernel, strides, dil):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (kk - 1) * d + 1 - n)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin, end


def _pad_spatial(t: Any, begin: list[int], end: list[int], value: float = 0.0) -> tuple[Any, list[int]]:
    """Pad asymmetric spatial pads explicitly; return the symmetric part torch's op can take itself."""
    if begin == end:
        return t, begin
    spec: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        spec += [b, e]
    return F.pad(t, spec, value=value), [0] * len(begin)


@op("Conv")
def conv(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t, w = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    k = w.dim() - 2
    strides = list(a.get("strides", [1] * k))
    dil = list(a.get("dilations", [1] * k))
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    begin, end = _auto_pads(a, t.shape[2:], kernel, strides, dil)
    t, sym = _pad_spatial(t, begin, end)
    fn = (F.conv1d, F.conv2d, F.conv3d)[k - 1]
    return [fn(t, w, bias, strides, sym, dil, a.get("group", 1))]


@op("ConvTranspose")
def conv_transpose(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t, w = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    k = w.dim() - 2
    strides = list(a.get("strides", [1] * k))
    dil = list(a.get("dilations", [1] * k))
    pads = list(a.get("pads", [0] * 2 * k))
    if _s(a.get("auto_pad", "NOTSET")) not in ("NOTSET", "", "VALID") or "output_shape" in a:
        raise NotImplementedError("ConvTranspose with auto_pad SAME or output_shape")
    out_pad = list(a.get("output_padding", [0] * k))
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[k - 1]
    y = fn(t, w, bias, strides, 0, out_pad, a.get("group", 1), dil)
    index = [slice(None), slice(None)] + [
        slice(b, y.shape[2 + i] - e) for i, (b, e) in enumerate(zip(pads[:k], pads[k:]))
    ]
    return [y[tuple(index)]]


@op("BatchNormalization")
def batch_norm(a: Attrs, x: list[Any], v: int) -> list[Any]:
    """Inference form: the running mean and variance are statistics, not weights (no gradient, as in ORT training)."""
    t, scale, bias, mean, var = x[:5]
    return [F.batch_norm(t, mean.detach(), var.detach(), scale, bias, False, 0.0, a.get("epsilon", 1e-5))]


@op("InstanceNormalization")
def instance_norm(a: Attrs, x: list[Any], v: int) -> list[Any]:
    return [F.instance_norm(x[0], weight=x[1], bias=x[2], eps=a.get("epsilon", 1e-5))]


@op("LayerNormalization")
def layer_norm(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t, scale = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    axis = axis_norm(a.get("axis", -1), t.dim())
    eps = a.get("epsilon", 1e-5)
    dims = list(range(axis, t.dim()))
    if scale.shape == t.shape[axis:]:
        y = F.layer_norm(t, t.shape[axis:], scale, bias, eps)
    else:
        y = F.layer_norm(t, t.shape[axis:], None, None, eps) * scale
        y = y if bias is None else y + bias
    if a.get("_named", 1) == 1:
        return [y]  # the optional Mean and InvStdDev outputs cost a second pass: only when the graph names them
    mean = t.mean(dim=dims, keepdim=True)
    inv = torch.rsqrt(t.var(dim=dims, keepdim=True, unbiased=False) + eps)
    return [y, mean, inv]


def _pool_args(a: Attrs, t: Any) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    kernel = list(a["kernel_shape"])
    k = len(kernel)
    strides = list(a.get("strides", [1] * k))
    dil = list(a.get("dilations", [1] * k))
    begin, end = _auto_pads(a, t.shape[2:], kernel, strides, dil)
    return kernel, strides, dil, begin, end


@op("MaxPool")
def max_pool(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t = x[0]
    kernel, strides, dil, begin, end = _pool_args(a, t)
    ceil = bool(a.get("ceil_mode", 0))
    if begin != end:
        t, sym = _pad_spatial(t, begin, end, value=-math.inf)
    else:
        sym = begin
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(kernel) - 1]
    return [fn(t, kernel, strides, sym, dil, ceil_mode=ceil)]


@op("AveragePool")
def average_pool(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t = x[0]
    kernel, strides, _, begin, end = _pool_args(a, t)
    ceil = bool(a.get("ceil_mode", 0))
    include = bool(a.get("count_include_pad", 0))
    if begin != end:
        if include:
            t, sym = _pad_spatial(t, begin, end)
        else:
            raise NotImplementedError("AveragePool with asymmetric pads excluded from the count")
    else:
        sym = begin
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(kernel) - 1]
    return [fn(t, kernel, strides, sym, ceil_mode=ceil, count_include_pad=include)]


@op("GlobalAveragePool")
def global_average_pool(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t = x[0]
    return [t.mean(dim=tuple(range(2, t.dim())), keepdim=True)]


@op("GlobalMaxPool")
def global_max_pool(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t = x[0]
    return [torch.amax(t, dim=tuple(range(2, t.dim())), keepdim=True)]  # ties share the gradient, like ORT's max


@op("Resize", "Upsample")
def resize(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t = x[0]
    mode = _s(a.get("mode", "nearest"))
    if a["_op"] == "Upsample" or v < 11:
        scales_t, sizes_t = (x[1] if len(x) > 1 else None), None
        coord = "asymmetric"
    else:
        scales_t = x[2] if len(x) > 2 and x[2] is not None and x[2].numel() else None
        sizes_t = x[3] if len(x) > 3 and x[3] is not None and x[3].numel() else None
        coord = _s(a.get("coordinate_transformation_mode", "half_pixel"))
    if sizes_t is not None:
        out = ints(sizes_t)[2:]
    else:
        if "scales" in a:  # Upsample before opset 9: an attribute
            scales = [float(s) for s in a["scales"]]
        elif scales_t is not None:
            scales = [float(s) for s in scales_t.detach().reshape(-1).tolist()]
        else:
            raise NotImplementedError("Resize without scales or sizes")
        if scales[:2] != [1.0, 1.0]:
            raise NotImplementedError("Resize of the batch or channel axis")
        out = [math.floor(n * s) for n, s in zip(t.shape[2:], scales[2:])]
    if mode == "nearest":
        nearest = _s(a.get("nearest_mode", "round_prefer_floor"))
        if coord == "asymmetric" and nearest == "floor":
            return [F.interpolate(t, size=out, mode="nearest")]
        if coord in ("half_pixel", "pytorch_half_pixel") and nearest in ("round_prefer_ceil", "round_prefer_floor"):
            return [F.interpolate(t, size=out, mode="nearest-exact")]
        raise NotImplementedError(f"Resize nearest with {coord}/{nearest}")
    if mode == "linear":
        interp = ("linear", "bilinear", "trilinear")[t.dim() - 3]
        if coord == "align_corners":
            return [F.interpolate(t, size=out, mode=interp, align_corners=True)]
        if coord in ("half_pixel", "pytorch_half_pixel"):
            return [F.interpolate(t, size=out, mode=interp, align_corners=False)]
        raise NotImplementedError(f"Resize linear with {coord}")
    raise NotImplementedError(f"Resize mode {mode}")


@op("LSTM")
def lstm(a: Attrs, x: list[Any], v: int) -> list[Any]:
    """ONNX LSTM (forward direction, default activations): gates i, o, f, c in that order in W, R, B."""
    if _s(a.get("direction", "forward")) != "forward" or "activations" in a or a.get("layout", 0):
        raise NotImplementedError("LSTM other than forward with default activations and layout 0")
    t, w, r = x[0], x[1][0], x[2][0]
    hidden = a["hidden_size"]
    bias = x[3][0] if len(x) > 3 and x[3] is not None else torch.zeros(8 * hidden, dtype=t.dtype, device=t.device)
    seq, batch = t.shape[0], t.shape[1]
    h = x[5][0] if len(x) > 5 and x[5] is not None else torch.zeros(batch, hidden, dtype=t.dtype, device=t.device)
    c = x[6][0] if len(x) > 6 and x[6] is not None else torch.zeros(batch, hidden, dtype=t.dtype, device=t.device)
    if len(x) > 4 and x[4] is not None and x[4].numel() and int(x[4].min()) != seq:
        raise NotImplementedError("LSTM with sequence_lens shorter than the sequence")
    clip_at = a.get("clip")
    b = bias[: 4 * hidden] + bias[4 * hidden :]
    outs = []
    for step in range(seq):
        gates = t[step] @ w.t() + h @ r.t() + b
        if clip_at is not None:
            gates = torch.clamp(gates, -clip_at, clip_at)
        i, o, f, g = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    y = torch.stack(outs).unsqueeze(1)  # (seq, num_directions, batch, hidden)
    return [y, h.unsqueeze(0), c.unsqueeze(0)]


# ---- com.microsoft fused ops (ONNX Runtime's transformer and conv fusions) ----------------------------------------


@op("BiasGelu", domain=MS)
def bias_gelu(a: Attrs, x: list[Any], v: int) -> list[Any]:
    return [_gelu(x[0] + x[1])]


@op("FastGelu", domain=MS)
def fast_gelu(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t = x[0] if len(x) < 2 or x[1] is None else x[0] + x[1]
    return [_gelu(t, "tanh")]


@op("SkipLayerNormalization", domain=MS)
def skip_layer_norm(a: Attrs, x: list[Any], v: int) -> list[Any]:
    t, skip, gamma = x[0], x[1], x[2]
    beta = x[3] if len(x) > 3 else None
    bias = x[4] if len(x) > 4 else None
    s = t + skip if bias is None else t + skip + bias
    y = F.layer_norm(s, s.shape[-1:], gamma, beta, a.get("epsilon", 1e-12))
    if a.get("_named", 1) == 1:
        return [y]
    mean = s.mean(dim=-1, keepdim=True)
    inv = torch.rsqrt(s.var(dim=-1, keepdim=True, unbiased=False) + a.get("epsilon", 1e-12))
    return [y, mean, inv, s]


@op("EmbedLayerNormalization", domain=MS)
def embed_layer_norm(a: Attrs, x: list[Any], v: int) -> list[Any]:
    ids, segments, word, position, segment_table, gamma, beta = x[:7]
    mask = x[7] if len(x) > 7 else None
    position_ids = x[8] if len(x) > 8 else None
    seq = ids.shape[1]
    if position_ids is None:
        position_ids = torch.arange(seq, device=ids.device).unsqueeze(0).expand(ids.shape[0], seq)
    s = word[ids.long()] + position[position_ids.long()]
    if segments is not None and segment_table is not None:
        s = s + segment_table[segments.long()]
    y = F.layer_norm(s, s.shape[-1:], gamma, beta, a.get("epsilon", 1e-12))
    if mask is None:
        index = torch.zeros(ids.shape[0], dtype=torch.int32, device=ids.device)
    else:  # ONNX Runtime: the number of ones in each row (the end of right-padded tokens)
        index = (mask == 1).sum(dim=1).to(torch.int32)
    return [y, index, s]


@op("Attention", domain=MS)
def attention(a: Attrs, x: list[Any], v: int) -> list[Any]:
    """Multi-head self-attention with packed QKV weights; a 1-D mask index masks keys from that position on."""
    t, w = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    mask = x[3] if len(x) > 3 else None
    if any(len(x) > i and x[i] is not None for i in range(4, len(x))) or a.get("unidirectional", 0):
        raise NotImplementedError("Attention with past state, attention bias or unidirectional")
    heads = a["num_heads"]
    batch, seq, _ = t.shape
    qkv = t @ w if bias is None else t @ w + bias
    sizes = list(a.get("qkv_hidden_sizes", [qkv.shape[-1] // 3] * 3))
    q, k, val = torch.split(qkv, sizes, dim=-1)

    def heads_first(u: Any) -> Any:
        return u.reshape(batch, seq, heads, -1).transpose(1, 2)

    q, k, val = heads_first(q), heads_first(k), heads_first(val)
    scale = a.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        fill = a.get("mask_filter_value", -10000.0)
        if mask.dim() == 1 and mask.shape[0] == batch:
            keep = torch.arange(seq, device=t.device).unsqueeze(0) < mask.unsqueeze(1)
            scores = scores + (~keep).to(scores.dtype)[:, None, None, :] * fill
        elif mask.dim() == 2:  # raw (batch, seq) mask of 0/1
            scores = scores + (1 - mask.to(scores.dtype))[:, None, None, :] * fill
        else:
            raise NotImplementedError(f"Attention mask_index of shape {tuple(mask.shape)}")
    probs = torch.softmax(scores, dim=-1)
    out = (probs @ val).transpose(1, 2).reshape(batch, seq, -1)
    return [out]


@op("FusedConv", domain=MS)
def fused_conv(a: Attrs, x: list[Any], v: int) -> list[Any]:
    (y,) = conv(a, x[:3], v)
    if len(x) > 3 and x[3] is not None:
        y = y + x[3]  # the optional sum input
    act = _s(a.get("activation", ""))
    params = list(a.get("activation_params", []))
    if act == "Relu":
        return [torch.relu(y)]
    if act == "Sigmoid":
        return [torch.sigmoid(y)]
    if act == "Tanh":
        return [torch.tanh(y)]
    if act == "LeakyRelu":
        return [F.leaky_relu(y, params[0] if params else 0.01)]
    if act == "Clip":
        return [torch.clamp(y, params[0], params[1])]
    if act == "HardSigmoid":
        alpha, beta = (params + [0.2, 0.5][len(params) :])[:2]
        return [torch.clamp(y * alpha + beta, 0.0, 1.0)]
    if act in ("", "Identity"):
        return [y]
    raise NotImplementedError(f"FusedConv activation {act}")


def attributes(node: Any) -> Attrs:
    """A node's attributes as Python values (graph attributes stay GraphProtos), plus ``_op``."""
    out: Attrs = {"_op": node.op_type, "_n_outputs": len(node.output), "_named": sum(1 for o in node.output if o)}
    for attr in node.attribute:
        if attr.type == attr.TENSOR:
            out[attr.name] = numpy_helper.to_array(attr.t)
        else:
            out[attr.name] = helper.get_attribute_value(attr)
    return out


__all__ = ["MS", "OPS", "TensorProto", "attributes", "dtype_of", "load"]
