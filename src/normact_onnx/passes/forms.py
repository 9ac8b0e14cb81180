"""Write a normalized site in ONNX: the ``Norm<Act>`` function, the fused-op node, or plain ops.

Every form computes ``y = scale·(f(x) − shift − slope·x)``. The activation part
``f`` comes from the catalogue entry's body, written through one of two builders:
:class:`FunctionBody` (parameters are references to the Norm op's attributes;
constants follow the input's type through ``CastLike``) or :class:`LiteralBody`
(parameters are numbers; used for training graphs and reference models).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from ..catalogue import CATALOGUE, NORM_DOMAIN, Activation, Ref

AFFINE_ATTRS = (("scale", 1.0), ("shift", 0.0), ("slope", 0.0))
MIN_FUNCTION_OPSET = 12  # Constant(value_float=@attr) needs opset 12
MIN_FUNCTION_IR = 8  # model-local functions need IR 8
GENERIC_OPSET = 15  # CastLike (type-generic constants) needs opset 15


class _Builder:
    def __init__(self, opset: int, prefix: str, gradient_safe: bool = False) -> None:
        self.opset, self.prefix, self.gradient_safe = opset, prefix, gradient_safe
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        out = self.fresh(op_type.lower())
        node = helper.make_node(op_type, list(inputs), [out], name=out if self.name_nodes else "")
        for key, value in attrs.items():
            node.attribute.append(self._attribute(key, value))
        self.nodes.append(node)
        return out

    name_nodes = False

    def _attribute(self, key: str, value: Any) -> AttributeProto:
        return helper.make_attribute(key, value)


class FunctionBody(_Builder):
    """Builds a FunctionProto body: params are attribute references, constants typed like X."""

    def __init__(self, opset: int, x: str, elem_type: int | None) -> None:
        super().__init__(opset, "")
        self.x, self.elem_type = x, elem_type

    def _attribute(self, key: str, value: Any) -> AttributeProto:
        if isinstance(value, Ref):
            a = AttributeProto()
            a.name, a.ref_attr_name, a.type = key, value.name, AttributeProto.FLOAT
            return a
        return helper.make_attribute(key, value)

    def _typed(self, const: str) -> str:
        if self.elem_type is None:
            return self.op("CastLike", const, self.x)
        return self.op("Cast", const, to=self.elem_type)

    def const(self, value: float) -> str:
        return self._typed(self.op("Constant", value_float=float(value)))

    def param(self, name: str) -> str:
        return self._typed(self.op("Constant", value_float=Ref(name)))

    def attr(self, name: str) -> Ref:
        return Ref(name)


class LiteralBody(_Builder):
    """Builds plain nodes with numeric parameters (scalar or per-channel) of a known element type."""

    name_nodes = True

    def __init__(self, opset: int, prefix: str, elem_type: int, params: dict[str, Any], gradient_safe: bool) -> None:
        super().__init__(opset, prefix, gradient_safe)
        self.elem_type, self.params = elem_type, params

    def tensor(self, value: Any) -> str:
        dtype = helper.tensor_dtype_to_np_dtype(self.elem_type)
        out = self.fresh("const")
        t = numpy_helper.from_array(np.asarray(value, dtype=dtype), out)
        self.nodes.append(helper.make_node("Constant", [], [out], name=out, value=t))
        return out

    def const(self, value: float) -> str:
        return self.tensor(value)

    def param(self, name: str) -> str:
        return self.tensor(self.params[name])

    def attr(self, name: str) -> float:
        return float(self.params[name])


def norm_function(kind: str, opset: int, elem_type: int | None = None) -> onnx.FunctionProto:
    """The model-local function ``ai.normact::Norm<Act>`` in standard ops of ``opset``.

    ``elem_type=None`` makes a type-generic body (needs opset ≥ 15 for CastLike);
    older opsets fix the element type.
    """
    act = CATALOGUE[kind]
    if elem_type is None and opset < GENERIC_OPSET:
        elem_type = TensorProto.FLOAT
    b = FunctionBody(opset, "X", elem_type)
    f = act.body(b, "X")
    y = affine_tail(b, "X", f, b.param("scale"), b.param("shift"), b.param("slope"), out="Y")
    assert y == "Y"
    attrs = [name for name, _ in AFFINE_ATTRS] + list(act.params)
    return helper.make_function(
        NORM_DOMAIN,
        act.op_name,
        ["X"],
        ["Y"],
        b.nodes,
        [helper.make_opsetid("", opset)],
        attributes=attrs,
        doc_string=f"Normalized {kind}: Y = scale·(f(X) − shift − slope·X), f = {act.summary}",
    )


def affine_tail(
    b: _Builder,
    x: str,
    f: str,
    scale: str | None,
    shift: str | None,
    slope: str | None,
    out: str | None = None,
) -> str:
    """scale·(f − shift − slope·x), skipping terms given as None."""
    y = f
    if slope is not None:
        y = b.op("Sub", y, b.op("Mul", slope, x))
    if shift is not None:
        y = b.op("Sub", y, shift)
    if scale is not None:
        y = b.op("Mul", y, scale)
    if out is not None:
        b.nodes[-1].output[0] = out
        if b.name_nodes:
            b.nodes[-1].name = out
        y = out
    return y


def norm_node(
    act: Activation, x: str, y: str, affine: Any, params: dict[str, Any], name: str, doc: str = ""
) -> onnx.NodeProto:
    """A fused ``Norm<Act>`` node carrying the site's constants as float attributes."""
    attrs: dict[str, float] = {
        "scale": float(affine.scale),
        "shift": float(affine.shift),
        "slope": float(affine.slope),
    }
    attrs.update({k: float(v) for k, v in act.with_defaults(params).items()})
    node = helper.make_node(act.op_name, [x], [y], name=name, domain=NORM_DOMAIN, doc_string=doc)
    node.attribute.extend(helper.make_attribute(k, v) for k, v in sorted(attrs.items()))  # as make_node orders them
    return node


def literal_site(
    act: Activation,
    x: str,
    y: str,
    affine: Any,
    params: dict[str, Any],
    elem_type: int,
    prefix: str,
    gradient_safe: bool,
    opset: int,
) -> list[onnx.NodeProto]:
    """The whole normalized activation in standard ops with literal constants (training, references)."""
    b = LiteralBody(opset, prefix, elem_type, act.with_defaults(params), gradient_safe)
    f = act.body(b, x)
    affine_literal_tail(b, x, f, affine, out=y)
    return b.nodes


def affine_literal_tail(b: LiteralBody, x: str, f: str, affine: Any, out: str) -> str:
    """The affine tail with numeric constants, dropping identity terms (slope 0, shift 0, scale 1)."""
    nonzero = lambda v: np.any(np.asarray(v) != 0)  # noqa: E731
    slope = b.tensor(affine.slope) if nonzero(affine.slope) else None
    shift = b.tensor(affine.shift) if nonzero(affine.shift) else None
    scale = b.tensor(affine.scale) if np.any(np.asarray(affine.scale) != 1) else None
    if slope is None and shift is None and scale is None:
        return b.op("Identity", f) if out is None else _identity(b, f, out)
    return affine_tail(b, x, f, scale, shift, slope, out=out)


def _identity(b: LiteralBody, f: str, out: str) -> str:
    b.op("Identity", f)
    b.nodes[-1].output[0] = out
    b.nodes[-1].name = out
    return out


def conv_affine_tail(b: LiteralBody, f: str, affine: Any, channels: int, out: str) -> str:
    """scale·(f − shift) as one 1×1 depthwise ``Conv`` over the ``channels`` of an NCHW value (slope 0 only).

    The same numbers as :func:`affine_literal_tail`, in the one standard op ONNX Runtime's CPU provider keeps in
    its blocked NCHWc layout between two convolutions (a ``Mul``/``Sub`` or a custom op there costs a reorder
    out of the layout and one back in; :mod:`.kernel_form`).
    """
    if np.any(np.asarray(affine.slope) != 0) or any(
        np.size(v) not in (1, channels) for v in (affine.scale, affine.shift)
    ):
        raise ValueError("the depthwise-Conv tail takes slope 0 and scalar or per-channel constants")
    dtype = helper.tensor_dtype_to_np_dtype(b.elem_type)
    scale, shift = (np.resize(np.asarray(v, dtype=np.float64), channels) for v in (affine.scale, affine.shift))
    weight = b.tensor(scale.reshape(channels, 1, 1, 1).astype(dtype))
    bias = b.tensor((-scale * shift).astype(dtype))
    b.op("Conv", f, weight, bias, group=channels, kernel_shape=[1, 1])
    b.nodes[-1].output[0] = out
    b.nodes[-1].name = out
    return out
