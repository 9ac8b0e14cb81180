"""Element types and shapes of values, from a weightless copy of the model.

ONNX shape inference needs initializer types and shapes but not their bytes, so
it runs on a skeleton whose initializers carry no data: fast on large models and
safe for external data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx import TensorProto

from .domains import is_standard

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16})


@dataclass
class ValueTypes:
    elem: dict[str, int] = field(default_factory=dict)
    shape: dict[str, list[int | str | None]] = field(default_factory=dict)

    def elem_type(self, name: str, default: int = TensorProto.FLOAT) -> int:
        return self.elem.get(name, default)


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g = m.graph
    src = model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    for t in src.initializer:
        g.initializer.append(_bare(t))
    return m


def _bare(t: TensorProto) -> TensorProto:
    out = TensorProto(name=t.name, data_type=t.data_type)
    out.dims.extend(t.dims)
    return out


def _collect(g: onnx.GraphProto, out: ValueTypes) -> None:
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.elem_type:
            out.elem[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                out.shape[vi.name] = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
                ]
    for t in g.initializer:
        out.elem[t.name] = t.data_type
        out.shape[t.name] = list(t.dims)
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _collect(a.g, out)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    _collect(sg, out)


# Element types a node's outputs have whatever its inputs, and ops whose output has their data input's type:
# enough to carry types through shape arithmetic where ONNX's inference gave up (an op it does not know,
# a subgraph it could not type), so an int64 ``Abs`` is never taken for an activation.
_FIXED = {
    **dict.fromkeys(("Shape", "Size", "NonZero", "ArgMax", "ArgMin", "NonMaxSuppression"), TensorProto.INT64),
    **dict.fromkeys(
        ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf"),
        TensorProto.BOOL,
    ),
}
_SAME_AS_INPUT = {"Where": 1, "CastLike": 1}  # which input gives the type (default: the first)
_KEEPS_TYPE = frozenset(
    [
        "Abs",
        "Neg",
        "Relu",
        "LeakyRelu",
        "Clip",
        "Max",
        "Min",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Mod",
        "Pow",
        "Sign",
        "Ceil",
        "Floor",
        "Round",
        "Identity",
        "Reshape",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Transpose",
        "Expand",
        "Tile",
        "Slice",
        "Gather",
        "GatherElements",
        "GatherND",
        "Concat",
        "Split",
        "ReduceMax",
        "ReduceMin",
        "ReduceSum",
        "ReduceProd",
        "CumSum",
        "Range",
        "Where",
        "CastLike",
        "Sigmoid",
        "Tanh",
        "Erf",
        "Exp",
        "Log",
        "Sqrt",
        "Reciprocal",
    ]
)


def _attr_type(node: onnx.NodeProto) -> int | None:
    """The element type a Constant or Cast states in its attributes."""
    for a in node.attribute:
        if node.op_type == "Cast" and a.name == "to":
            return int(a.i)
        if node.op_type == "Constant":
            if a.name in ("value", "sparse_value"):
                return int(a.t.data_type if a.name == "value" else a.sparse_tensor.values.data_type)
            if a.name in ("value_int", "value_ints"):
                return TensorProto.INT64
            if a.name in ("value_float", "value_floats"):
                return TensorProto.FLOAT
    return None


def _propagate(g: onnx.GraphProto, out: ValueTypes) -> None:
    """Fill the element types inference left out, node by node (subgraphs included; known types are kept)."""
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _propagate(a.g, out)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    _propagate(sg, out)
        if not n.output or n.output[0] in out.elem:
            continue
        if not is_standard(n):
            continue
        elem = _attr_type(n) if n.op_type in ("Constant", "Cast") else _FIXED.get(n.op_type)
        if elem is None and n.op_type in _KEEPS_TYPE:
            i = _SAME_AS_INPUT.get(n.op_type, 0)
            elem = out.elem.get(n.input[i]) if len(n.input) > i else None
        if elem:
            outputs = n.output if n.op_type == "Split" else n.output[:1]
            for name in outputs:
                if name:
                    out.elem.setdefault(name, elem)


def infer_value_types(model: onnx.ModelProto) -> ValueTypes:
    """Types of every value ONNX can infer (missing entries mean unknown).

    ONNX's shape inference first (subgraphs included); where it fails, in part or whole, the types are carried
    forward from what is stated (inputs, initializers, Constant, Cast, Shape, comparisons) by :func:`_propagate`.
    """
    out = ValueTypes()
    _collect(model.graph, out)
    try:
        inferred = onnx.shape_inference.infer_shapes(_skeleton(model), strict_mode=False, data_prop=False)
        _collect(inferred.graph, out)
    except Exception:
        pass
    _propagate(model.graph, out)
    return out
