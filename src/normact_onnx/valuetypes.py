"""Element types and shapes of values, from a weightless copy of the model.

ONNX shape inference needs initializer types and shapes but not their bytes, so
it runs on a skeleton whose initializers carry no data: fast on large models and
safe for external data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx import TensorProto

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


def infer_value_types(model: onnx.ModelProto) -> ValueTypes:
    """Types of every value ONNX can infer (missing entries mean unknown)."""
    out = ValueTypes()
    _collect(model.graph, out)
    try:
        inferred = onnx.shape_inference.infer_shapes(_skeleton(model), strict_mode=False, data_prop=False)
        _collect(inferred.graph, out)
    except Exception:
        pass
    return out
