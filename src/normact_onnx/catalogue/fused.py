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

from ..domains import is_standard
from ..outcome import Refusal

MS = "com.microsoft"
Split = tuple[list[onnx.NodeProto], onnx.NodeProto]
NO_BIAS = "no bias to split off"
STANDALONE = "a standalone activation, nothing fused"  # FastGelu without a bias: the op forms read it; not a miss
FUSED_PRE = "__normact_pre"  # the suffix of a split fused op's pre-activation value: how fold finds it again


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


def _bias_then(act_op: str, standalone: bool) -> Callable[[onnx.NodeProto, str], Split | Refusal]:
    """BiasGelu(A, B) = Gelu(A + B); FastGelu(X, bias) = FastGelu(X + bias).

    ``standalone``: without a bias the op is itself an activation op (FastGelu), not a fused op missing its bias.
    """

    def split(node: onnx.NodeProto, pre: str) -> Split | Refusal:
        if len(node.input) < 2 or not node.input[1]:
            return Refusal(STANDALONE if standalone else NO_BIAS)
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
    (MS, "BiasGelu"): _bias_then("Gelu", standalone=False),
    (MS, "FastGelu"): _bias_then("FastGelu", standalone=True),
}


_LAYER_OF = {"Conv": "FusedConv", "Gemm": "FusedGemm"}
_BIAS_OF = {"gelu": "BiasGelu", "gelu_tanh": "FastGelu"}  # catalogue kind → the bias-taking fused op
_ACT_PARAMS = {
    "Relu": (),
    "Sigmoid": (),
    "Tanh": (),
    "LeakyRelu": (("alpha", 0.01),),
    "HardSigmoid": (("alpha", 0.2), ("beta", 0.5)),
}


def fuse_back(layer: onnx.NodeProto, kind: str, act: list[onnx.NodeProto], out: str) -> onnx.NodeProto | None:
    """The fused op a split wrote as ``layer`` then the plain activation ``act`` (writing ``out``), or None.

    The inverse of the splits above, for ``fold``: a site inside a fused op comes back as that op. FusedConv /
    FusedGemm take one activation op of :func:`_activation`'s list; BiasGelu / FastGelu take the bias ``Add``
    and the activation of their kind, whatever ops it is written in.
    """
    standard = is_standard(layer)
    if standard and layer.op_type == "Add" and kind in _BIAS_OF and len(layer.input) == 2:
        return helper.make_node(
            _BIAS_OF[kind], list(layer.input), [out], name=layer.name.removesuffix("/bias"), domain=MS
        )
    if not standard or layer.op_type not in _LAYER_OF or len(act) != 1 or act[0].op_type not in _ACT_PARAMS:
        return None
    fused = helper.make_node(_LAYER_OF[layer.op_type], list(layer.input), [out], name=layer.name, domain=MS)
    fused.attribute.extend(layer.attribute)
    fused.attribute.append(helper.make_attribute("activation", act[0].op_type))
    given = {a.name: a.f for a in act[0].attribute}
    params = [given.get(k, default) for k, default in _ACT_PARAMS[act[0].op_type]]
    if params and layer.op_type == "Conv":
        fused.attribute.append(helper.make_attribute("activation_params", params))
    elif params:  # FusedGemm spells them activation_alpha / activation_beta
        for (k, _), v in zip(_ACT_PARAMS[act[0].op_type], params):
            fused.attribute.append(helper.make_attribute(f"activation_{k}", v))
    return fused
