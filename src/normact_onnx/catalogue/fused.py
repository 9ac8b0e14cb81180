"""ONNX Runtime's fused ops, split into the layer before the activation and the activation itself.

Models saved by ONNX Runtime's optimizer hold their activations inside
``com.microsoft`` ops (``FusedConv``/``FusedGemm`` with an ``activation``
attribute, ``BiasGelu``, ``FastGelu`` with a bias). Each entry here says how one
such node is the same computation as standard nodes ``pre`` (writing the
pre-activation) followed by one activation node the catalogue's op forms read.
The matcher reports the activation as a site of the fused node; a rewrite that
normalizes it writes ``pre`` and the normalized activation in its place, and a
fused node whose site is not rewritten stays as it was.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
from onnx import helper

from ..outcome import Refusal

MS = "com.microsoft"
Split = tuple[list[onnx.NodeProto], onnx.NodeProto]
NO_BIAS = "no bias to split off"  # FastGelu without a bias is a standalone activation, not a miss


def _attrs(node: onnx.NodeProto, drop: tuple[str, ...]) -> list[onnx.AttributeProto]:
    return [a for a in node.attribute if a.name not in drop]


def _activation(node: onnx.NodeProto, x: str, out: str) -> onnx.NodeProto | Refusal:
    """The standard node for an ``activation``/``activation_params`` attribute pair."""
    act = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "activation"), b"")
    act = act.decode() if isinstance(act, bytes) else act
    params = next((list(a.floats) for a in node.attribute if a.name == "activation_params"), [])
    if not params:  # FusedGemm spells them activation_alpha / activation_beta
        named = {a.name: a.f for a in node.attribute if a.name in ("activation_alpha", "activation_beta")}
        params = [named[k] for k in ("activation_alpha", "activation_beta") if k in named]
    name = f"{node.name or out}/activation"
    if act in ("Relu", "Sigmoid", "Tanh"):
        return helper.make_node(act, [x], [out], name=name)
    if act == "LeakyRelu":
        return helper.make_node(act, [x], [out], name=name, alpha=params[0] if params else 0.01)
    if act == "HardSigmoid":
        alpha, beta = (params + [0.2, 0.5][len(params) :])[:2]
        return helper.make_node(act, [x], [out], name=name, alpha=alpha, beta=beta)
    known = "Relu, Sigmoid, Tanh, LeakyRelu, HardSigmoid"
    return Refusal(f"{node.op_type} activation {act or '(none)'!r} is not split (only {known})")


def _fused_layer(op: str, n_inputs: int) -> Callable[[onnx.NodeProto, str], Split | Refusal]:
    """FusedConv (X, W, B, Z: Z added before the activation) and FusedGemm (A, B, C)."""

    def split(node: onnx.NodeProto, pre: str) -> Split | Refusal:
        inputs = list(node.input)
        extra = inputs[n_inputs:] if len(inputs) > n_inputs else []
        drop = ("activation", "activation_params", "activation_alpha", "activation_beta", "activation_gamma")
        layer = helper.make_node(op, inputs[:n_inputs], [pre if not any(extra) else f"{pre}_layer"])
        layer.name = node.name
        layer.attribute.extend(_attrs(node, drop))
        nodes = [layer]
        if any(extra):  # FusedConv's Z: y = act(conv + Z)
            nodes.append(helper.make_node("Add", [layer.output[0], extra[0]], [pre], name=f"{node.name}/sum"))
        act = _activation(node, pre, node.output[0])
        return act if isinstance(act, Refusal) else (nodes, act)

    return split


def _bias_then(act_op: str) -> Callable[[onnx.NodeProto, str], Split | Refusal]:
    """BiasGelu(A, B) = Gelu(A + B); FastGelu(X, bias) = FastGelu(X + bias)."""

    def split(node: onnx.NodeProto, pre: str) -> Split | Refusal:
        if len(node.input) < 2 or not node.input[1]:
            return Refusal(NO_BIAS)
        add = helper.make_node("Add", [node.input[0], node.input[1]], [pre], name=f"{node.name}/bias")
        act = helper.make_node(act_op, [pre], [node.output[0]], name=node.name or None, domain=MS)
        return [add], act

    return split


def _quick_gelu(node: onnx.NodeProto, pre: str) -> Split | Refusal:
    alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.702)
    return Refusal(f"QuickGelu is x·Sigmoid({alpha:g}·x): a Swish with β ≠ 1 is not in the catalogue")


FUSED: dict[tuple[str, str], Callable[[onnx.NodeProto, str], Split | Refusal]] = {
    (MS, "QuickGelu"): _quick_gelu,
    (MS, "FusedConv"): _fused_layer("Conv", 3),
    (MS, "FusedGemm"): _fused_layer("Gemm", 3),
    (MS, "BiasGelu"): _bias_then("Gelu"),
    (MS, "FastGelu"): _bias_then("FastGelu"),
}
