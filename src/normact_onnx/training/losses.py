"""The training loss, written into the graph in the model's own opset (no onnxruntime-training needed).

onnxruntime-training's loss blocks use ``SoftmaxCrossEntropyLoss`` (opset ≥ 12),
and a loss on a model's *probabilities* is numerically poor: exported
classifiers end in Softmax, detectors in Sigmoid. So the loss is built here,
on the input of such a head when there is one:

* ``cross-entropy``: −mean log_softmax(z)[label] over every position, from
  the logits ``z`` (the Softmax/LogSoftmax input when the output is one, the
  output itself otherwise). Outputs ``[N, C]`` take labels ``[N]``; sequence
  outputs ``[N, T, C]`` take labels ``[N, T]`` (per-position cross-entropy).
* ``bce``: binary cross-entropy with logits, mean(softplus(z) − z·t), on the
  Sigmoid input when the output is a Sigmoid (targets in [0, 1], shaped like
  the output).
* ``mse``: mean (output − target)² on the output as it is.

Only ops with ONNX Runtime gradients are used (LogSoftmax, GatherElements,
ReduceMean, the catalogue's gradient-safe softplus), valid from opset 11 on.
Because the loss is an ordinary graph output, the same graph gives the loss in a
plain inference session too (how the step-0 loss of two models is compared).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

import onnx
from onnx import TensorProto, helper

from ..catalogue import CATALOGUE
from ..errors import NormactError
from ..graph import default_opset
from ..passes.forms import LiteralBody
from ..valuetypes import infer_value_types

Dim = TypeVar("Dim")  # an int, or a symbolic dim (str/None) of an inferred shape

Loss = Literal["cross-entropy", "bce", "mse"]
LOSSES: tuple[Loss, ...] = get_args(Loss)
LABEL_INPUTS = {"cross-entropy": "labels", "bce": "target", "mse": "target"}
LOSS_OUTPUT = "normact_loss"
HEADS = {"cross-entropy": ("Softmax", "LogSoftmax"), "bce": ("Sigmoid",)}
SOFTMAX_AXIS_DEFAULT_CHANGED = 13  # Softmax/LogSoftmax: axis 1 (2-D coercion) before 13, −1 from 13


@dataclass(frozen=True)
class LossHead:
    """Where the loss reads the model: the output the user named, and the value the loss is computed on."""

    loss: str
    output: str  # the model output (reported, checked against the export)
    input: str  # the value the loss reads: logits behind a Softmax/Sigmoid head, else the output
    head: str  # "Softmax", "LogSoftmax", "Sigmoid" or "" (the loss reads the output itself)

    @property
    def label(self) -> str:
        return LABEL_INPUTS[self.loss]

    def describe(self) -> str:
        return (
            f"{self.loss} on the input of the {self.head} that makes {self.output!r}"
            if self.head
            else (f"{self.loss} on {self.output!r}")
        )


def _rank(m: onnx.ModelProto, name: str) -> int | None:
    shape = infer_value_types(m).shape.get(name)
    return None if shape is None else len(shape)


def find_head(m: onnx.ModelProto, output: str, loss: str) -> LossHead:
    """The loss's input for ``output``: the logits behind a matching Softmax/LogSoftmax/Sigmoid head."""
    if loss not in LOSSES:
        raise NormactError(f"unknown --loss {loss!r}; choose one of {', '.join(LOSSES)}")
    producers = {o: n for n in m.graph.node for o in n.output}
    node = producers.get(output)
    # cross-entropy looks through reshapes too (opset < 13 Softmax over [N, C, 1, 1] converts to Flatten →
    # Softmax → Reshape); the labels then fit the logits' shape
    see_through = ("Identity", "Reshape", "Flatten", "Squeeze") if loss == "cross-entropy" else ("Identity",)
    while node is not None and node.op_type in see_through:
        node = producers.get(node.input[0])
    if node is None or node.op_type not in HEADS.get(loss, ()):
        return LossHead(loss, output, output, "")
    if node.op_type in ("Softmax", "LogSoftmax"):
        opset = default_opset(m.opset_import)
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), None)
        if axis is None:
            axis = 1 if opset < SOFTMAX_AXIS_DEFAULT_CHANGED else -1
        rank = _rank(m, node.output[0])
        last = axis == -1 or (rank is not None and axis == rank - 1)
        if not last:
            raise NormactError(
                f"output {output!r} is a {node.op_type} over axis {axis}, not the last (class) axis: cross-entropy "
                f"needs class scores on the last axis; choose another output with --output-name or use --loss mse"
            )
    return LossHead(loss, output, node.input[0], node.op_type)


def _int64s(values: list[int]) -> onnx.TensorProto:
    return helper.make_tensor("", TensorProto.INT64, [len(values)], values)


def _label_info(name: str, elem: int, rank: int | None) -> onnx.ValueInfoProto:
    """The labels input with named dimensions (onnxruntime-training wants a shape; the data decides the sizes)."""
    if rank is None:
        raise NormactError(
            "the rank of the output the loss reads is unknown (no shape information): run onnx shape "
            "inference on the model or re-export it with output shapes"
        )
    return helper.make_tensor_value_info(name, elem, [f"{name}_{i}" for i in range(rank)])


def class_view(shape: Sequence[Dim]) -> tuple[Dim, ...]:
    """An output's shape as cross-entropy sees it: trailing singleton axes dropped ([N, C, 1, 1] → [N, C])."""
    out = tuple(shape)
    while len(out) > 2 and out[-1] == 1:
        out = out[:-1]
    return out


def with_loss(model: onnx.ModelProto, head: LossHead, label_rank: int | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with the labels input and the scalar loss as its first output (``normact_loss``).

    Cross-entropy flattens the logits to [positions, C] and the labels to [positions]: labels shaped like
    the output without its class axis fit whatever reshapes the exporter put between logits and Softmax
    (Paddle's recognizers take the Softmax of [N·T, C]). ``label_rank``: the labels' rank (default: from
    shape inference).
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    opset = default_opset(m.opset_import)
    types = infer_value_types(m)
    b = LiteralBody(opset, "normact/loss/", TensorProto.FLOAT, {}, True)
    z = head.input
    if types.elem_type(z) != TensorProto.FLOAT:
        z = b.op("Cast", z, to=TensorProto.FLOAT)
    shape = types.shape.get(head.output)
    if label_rank is None and shape is not None:
        label_rank = len(class_view(shape)) - 1 if head.loss == "cross-entropy" else len(shape)
    if head.loss == "cross-entropy":
        label = _label_info(head.label, TensorProto.INT64, label_rank)
        logp = b.op("LogSoftmax", b.op("Flatten", z, axis=-1), axis=1)
        index = b.op("Reshape", head.label, b.op("Constant", value=_int64s([-1, 1])))
        picked = b.op("GatherElements", logp, index, axis=1)
        b.op("Neg", b.op("ReduceMean", picked, keepdims=0))
    else:
        label = _label_info(head.label, TensorProto.FLOAT, label_rank)
        if head.loss == "bce":  # softplus(z) − z·t, softplus in the catalogue's overflow-free form
            per = b.op("Sub", CATALOGUE["softplus"].body(b, z), b.op("Mul", z, head.label))
        else:
            d = b.op("Sub", z, head.label)
            per = b.op("Mul", d, d)
        b.op("ReduceMean", per, keepdims=0)
    b.nodes[-1].output[0] = LOSS_OUTPUT
    g.node.extend(b.nodes)
    g.input.append(label)
    outputs = [helper.make_tensor_value_info(LOSS_OUTPUT, TensorProto.FLOAT, []), *g.output]
    del g.output[:]
    g.output.extend(outputs)
    return m
