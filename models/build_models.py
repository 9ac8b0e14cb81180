"""Build the small example/test models in ``models/`` and their ``manifest.json``.

Why: the pattern matchers must be tested against what real exporters write, not
against graphs we imagine they write. Each model here is a tiny torch module
(fixed seed, so files are reproducible) exported with both torch exporters —
``torchscript`` (``dynamo=False``) and ``dynamo`` (the default) — plus a few
extra variants where the form of an activation depends on the opset
(``torchscript_opset13``: HardSwish as ``HardSigmoid·Mul``; ``dynamo_opset18``:
GELU as an Erf/tanh chain instead of the ``Gelu`` op) and hand-built graphs
(``helper``) for control flow with weights in ``Constant`` nodes and subgraph
initializers.

Every file is self-contained (no external data), keeps the opset it was
exported at, carries the exporter's node metadata except stack traces (they
hold absolute paths), has its IR version clamped for older runtimes (see
:func:`minilm.clamp_ir_version`), passes ``onnx.checker`` and matches torch in
ONNX Runtime (CPU) on a batch size different from the export one.

Usage::

    python models/build_models.py [--out models/]
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

try:  # imported as part of the repository (``models.build_models``)
    from models.minilm import clamp_ir_version, default_opset
except ImportError:  # run as a script: ``python models/build_models.py``
    from minilm import clamp_ir_version, default_opset

MAX_FILE_BYTES = 300_000
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"
RTOL, ATOL = 1e-4, 1e-5

# --------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """A graph input: name and shape; a ``str`` dimension is dynamic (e.g. ``"N"``)."""

    name: str
    shape: tuple[int | str, ...]


#: Sizes used for dynamic dimensions when exporting and when verifying. They
#: differ on purpose: verification proves the exported dimension is dynamic.
EXPORT_DIMS = {"N": 2, "S": 5}
VERIFY_DIMS = {"N": 3, "S": 7}


@dataclass(frozen=True)
class Site:
    """An activation site the model contains, for tests and humans.

    ``role`` follows docs/architecture.md §4: ``hidden`` sites feed further layers (rewritten
    by default); ``output`` sites are graph outputs and ``gate`` sites multiply
    another branch (found and reported, rewritten only on request).
    """

    kind: str
    count: int = 1
    role: str = "hidden"
    where: str = ""


@dataclass(frozen=True)
class Exporter:
    """One way of turning a torch module into an ONNX file."""

    name: str  # file-name tag: <model>.<name>.onnx
    dynamo: bool | None  # None: built by hand with onnx.helper
    opset: int | None  # None: the exporter's default


TORCHSCRIPT = Exporter("torchscript", dynamo=False, opset=17)
TORCHSCRIPT_OPSET13 = Exporter("torchscript_opset13", dynamo=False, opset=13)
DYNAMO = Exporter("dynamo", dynamo=True, opset=None)
DYNAMO_OPSET18 = Exporter("dynamo_opset18", dynamo=True, opset=18)
HELPER = Exporter("helper", dynamo=None, opset=17)
HELPER_IR_VERSION = 8


@dataclass(frozen=True)
class ModelEntry:
    """Registry row: how to build one model and which files to make from it."""

    name: str
    description: str
    factory: Callable[[], nn.Module]
    inputs: tuple[TensorSpec, ...]
    sites: tuple[Site, ...]
    exporters: tuple[Exporter, ...] = (TORCHSCRIPT, DYNAMO)
    #: Output dynamic axes for the TorchScript exporter (dynamo infers them).
    output_axes: dict[int, str] = field(default_factory=lambda: {0: "N"})
    #: TorchScript exporter: script (keeps Python control flow as If/Loop)
    #: instead of tracing.
    script: bool = False
    #: Hand-built ONNX graph from the module's weights (for ``HELPER``).
    helper_builder: Callable[[nn.Module], onnx.ModelProto] | None = None


# --------------------------------------------------------------------------
# Torch modules (tiny widths: every file stays far below 300 KB)
# --------------------------------------------------------------------------


def hard_swish_mul_div(x: torch.Tensor) -> torch.Tensor:
    """HardSwish as written in older MobileNetV3 code: Add→Clip→Mul→Div."""
    return x * F.relu6(x + 3.0) / 6.0


def hard_swish_div_mul(x: torch.Tensor) -> torch.Tensor:
    """HardSwish with the division first: Add→Clip→Div→Mul."""
    return x * (F.relu6(x + 3.0) / 6.0)


def hard_swish_hsig_mul(x: torch.Tensor) -> torch.Tensor:
    """HardSwish as ``x·HardSigmoid(x)`` (torch's own opset<14 export form)."""
    return x * F.hardsigmoid(x)


class Lambda(nn.Module):
    """Wrap a function so it can sit in ``nn.Sequential``."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def mlp(width: int, acts: list[nn.Module], n_in: int, n_out: int) -> nn.Sequential:
    """``Linear → act → Linear → act … → Linear``: one hidden layer per activation."""
    layers: list[nn.Module] = []
    prev = n_in
    for act in acts:
        layers += [nn.Linear(prev, width), act]
        prev = width
    layers.append(nn.Linear(prev, n_out))
    return nn.Sequential(*layers)


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv + BatchNorm; both exporters fold the BN into the Conv in eval mode."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class CnnRelu(nn.Module):
    """Padded and unpadded 3x3 convs: folding must respect zero padding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)  # 28 -> 28
        self.conv2 = nn.Conv2d(4, 8, 3)  # 14 -> 12, no padding
        self.head = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.avg_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(torch.flatten(x, 1))


class ResBlock(nn.Module):
    """The stem ReLU output feeds both a Conv and the residual Add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8, 3)
        self.conv1 = conv_bn(8, 8, 3)
        self.conv2 = conv_bn(8, 8, 3)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        y = self.conv2(torch.relu(self.conv1(h)))
        y = torch.relu(y + h)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class TinyEncoderBlock(nn.Module):
    """Pre-LN transformer encoder block: self-attention + GELU FFN.

    Written out by hand (not ``nn.TransformerEncoderLayer``) so neither exporter
    takes a fused fast path and the attention stays MatMul/Softmax.
    """

    def __init__(self, d: int = 32, heads: int = 2, ffn: int = 64, approximate: str = "none") -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        dh = d // self.heads
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, s, self.heads, dh).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dh), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, s, d))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class SqueezeExcite(nn.Module):
    """Channel gate: ``x · gate(fc(relu/silu(fc(pool(x)))))``; the gate is not a hidden site."""

    def __init__(self, ch: int, mid: int, act: nn.Module, gate: nn.Module) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(ch, mid, 1)
        self.act = act
        self.expand = nn.Conv2d(mid, ch, 1)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class SiluNet(nn.Module):
    """EfficientNet-like: SiLU everywhere and a Sigmoid SE gate.

    ``x·Sigmoid(x)`` (SiLU) and ``x·Sigmoid(g(x))`` (gate) are both Sigmoid→Mul:
    a matcher must check that the Mul's other input is the Sigmoid's input.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.se = SqueezeExcite(8, 4, nn.SiLU(), nn.Sigmoid())
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv1(x))
        x = self.se(F.silu(self.conv2(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(F.silu(self.fc1(x)))


class InvertedResidual(nn.Module):
    """MobileNet block: 1x1 expand → depthwise 3x3 → [SE] → 1x1 project (+ skip)."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, act: Callable[[], nn.Module], se: bool) -> None:
        super().__init__()
        self.expand = nn.Sequential(conv_bn(cin, mid, 1), act())
        self.dw = nn.Sequential(conv_bn(mid, mid, 3, stride, groups=mid), act())
        self.se = SqueezeExcite(mid, max(mid // 4, 4), nn.ReLU(), nn.Hardsigmoid()) if se else nn.Identity()
        self.project = conv_bn(mid, cout, 1)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.skip else y


class MobileNetLike(nn.Module):
    """MobileNetV2 (ReLU6) block, then a MobileNetV3 (HardSwish + SE) block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3, stride=2), nn.Hardswish())
        self.block1 = InvertedResidual(8, 16, 8, 1, nn.ReLU6, se=False)
        self.block2 = InvertedResidual(8, 24, 16, 2, nn.Hardswish, se=True)
        self.head = nn.Sequential(nn.Conv2d(16, 32, 1), nn.Hardswish())
        self.classifier = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.block2(self.block1(self.stem(x))))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class IfBranch(nn.Module):
    """``relu`` branch when ``sum(x) > 0``, SiLU branch otherwise.

    Eager/torch.export use ``torch.cond`` (the dynamo exporter writes ``If``);
    TorchScript scripting sees a plain ``if`` (also written as ``If``).
    """

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.then_in, self.then_out = nn.Linear(d, d), nn.Linear(d, d)
        self.else_in, self.else_out = nn.Linear(d, d), nn.Linear(d, d)

    def then_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.then_out(torch.relu(self.then_in(x)))

    def else_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.else_out(F.silu(self.else_in(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            if bool(x.sum() > 0):
                return self.then_branch(x)
            return self.else_branch(x)
        return torch.cond(x.sum() > 0, self.then_branch, self.else_branch, (x,))


class LoopBody(nn.Module):
    """``steps`` iterations of ``h = gelu(fc2(relu(fc1(h))))`` (shared weights), then a Linear head.

    The head keeps the body's GELU a hidden site (its last value feeds a Linear,
    not the graph output).

    TorchScript scripting keeps the ``for`` loop as ``Loop`` only because the
    trip count is a buffer (a Python ``int`` constant gets unrolled); the dynamo
    exporter writes ``torch.while_loop`` as ``Loop``.
    """

    def __init__(self, d: int = 16, steps: int = 3) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.register_buffer("steps", torch.tensor(steps, dtype=torch.int64))

    def step(self, h: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc2(torch.relu(self.fc1(h))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            h = x
            for _ in range(int(self.steps)):
                h = self.step(h)
            return self.head(h)
        return self.head(self._while_loop(x))

    @torch.jit.unused
    def _while_loop(self, x: torch.Tensor) -> torch.Tensor:
        def cond(i: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            return i < self.steps

        def body(i: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return i + 1, self.step(h)

        return torch.while_loop(cond, body, (torch.zeros((), dtype=torch.int64), x))[1]


# --------------------------------------------------------------------------
# Hand-built control-flow graphs (onnx.helper), from the torch modules' weights
# --------------------------------------------------------------------------


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _init(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _const_node(output: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], value=_init(output + "_value", value))


def _linear_nodes(x: str, w: str, b: str, out: str) -> list[onnx.NodeProto]:
    """``out = x @ w + b`` as MatMul + Add (``w`` stored as ``[in, out]``)."""
    return [
        helper.make_node("MatMul", [x, w], [out + "_mm"]),
        helper.make_node("Add", [out + "_mm", b], [out]),
    ]


def _float_info(name: str, shape: tuple[int | str, ...] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _helper_model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", HELPER.opset)],
        producer_name="normact-onnx models/build_models.py",
        doc_string=doc,
    )
    model.ir_version = HELPER_IR_VERSION
    return model


def build_if_onnx(module: nn.Module) -> onnx.ModelProto:
    """``If(sum(x) > 0)`` with Relu in then_branch and Sigmoid·Mul SiLU in else_branch.

    Weight storage deliberately varies, as it does in real files: the first
    Linear of each branch is a main-graph initializer used from the subgraph
    (outer scope), the then-branch's second Linear is a ``Constant`` node
    inside the branch, the else-branch's second Linear is a subgraph initializer.
    """
    assert isinstance(module, IfBranch)
    d = module.then_in.in_features
    then_nodes = [
        *_linear_nodes("x", "then_in_w", "then_in_b", "then_h"),
        helper.make_node("Relu", ["then_h"], ["then_act"], name="then_relu"),
        _const_node("then_out_w", _np(module.then_out.weight).T),
        _const_node("then_out_b", _np(module.then_out.bias)),
        *_linear_nodes("then_act", "then_out_w", "then_out_b", "then_y"),
    ]
    then_graph = helper.make_graph(then_nodes, "then_branch", [], [_float_info("then_y", ("N", d))])
    else_nodes = [
        *_linear_nodes("x", "else_in_w", "else_in_b", "else_h"),
        helper.make_node("Sigmoid", ["else_h"], ["else_sig"], name="else_silu_sigmoid"),
        helper.make_node("Mul", ["else_h", "else_sig"], ["else_act"], name="else_silu_mul"),
        *_linear_nodes("else_act", "else_out_w", "else_out_b", "else_y"),
    ]
    else_graph = helper.make_graph(
        else_nodes,
        "else_branch",
        [],
        [_float_info("else_y", ("N", d))],
        initializer=[
            _init("else_out_w", _np(module.else_out.weight).T),
            _init("else_out_b", _np(module.else_out.bias)),
        ],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["x_sum"], keepdims=0),
        helper.make_node("Greater", ["x_sum", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    initializers = [
        _init("zero", np.array(0.0)),
        _init("then_in_w", _np(module.then_in.weight).T),
        _init("then_in_b", _np(module.then_in.bias)),
        _init("else_in_w", _np(module.else_in.weight).T),
        _init("else_in_b", _np(module.else_in.bias)),
    ]
    graph = helper.make_graph(
        nodes, "if_branch", [_float_info("x", ("N", d))], [_float_info("y", ("N", d))], initializers
    )
    return _helper_model(graph, "If with Relu (then) and SiLU as Sigmoid·Mul (else)")


def _erf_gelu_nodes(x: str, out: str) -> list[onnx.NodeProto]:
    """Exact GELU as torch's TorchScript exporter writes it: Div→Erf→Add→Mul→Mul."""
    return [
        _const_node(out + "_sqrt2", np.array(math.sqrt(2.0))),
        _const_node(out + "_one", np.array(1.0)),
        _const_node(out + "_half", np.array(0.5)),
        helper.make_node("Div", [x, out + "_sqrt2"], [out + "_div"]),
        helper.make_node("Erf", [out + "_div"], [out + "_erf"]),
        helper.make_node("Add", [out + "_erf", out + "_one"], [out + "_add"]),
        helper.make_node("Mul", [x, out + "_add"], [out + "_mul"]),
        helper.make_node("Mul", [out + "_mul", out + "_half"], [out]),
    ]


def build_loop_onnx(module: nn.Module) -> onnx.ModelProto:
    """``Loop`` (fixed trip count) whose body has a Relu and an Erf-chain GELU.

    fc1's weights are main-graph initializers read from the body (outer scope);
    fc2's weight is a ``Constant`` node in the body and its bias a body
    initializer. Opset 17 has no ``Gelu`` op, hence the Erf chain.
    """
    assert isinstance(module, LoopBody)
    d = module.fc1.in_features
    body_nodes = [
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        *_linear_nodes("h_in", "fc1_w", "fc1_b", "h1"),
        helper.make_node("Relu", ["h1"], ["h1_act"], name="body_relu"),
        _const_node("fc2_w", _np(module.fc2.weight).T),
        *_linear_nodes("h1_act", "fc2_w", "fc2_b", "h2"),
        *_erf_gelu_nodes("h2", "h_out"),
    ]
    body = helper.make_graph(
        body_nodes,
        "loop_body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            _float_info("h_in", ("N", d)),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            _float_info("h_out", ("N", d)),
        ],
        initializer=[_init("fc2_b", _np(module.fc2.bias))],
    )
    initializers = [
        numpy_helper.from_array(module.steps.numpy().astype(np.int64), "trip_count"),
        numpy_helper.from_array(np.array(True), "keep_going"),
        _init("fc1_w", _np(module.fc1.weight).T),
        _init("fc1_b", _np(module.fc1.bias)),
    ]
    initializers += [_init("head_w", _np(module.head.weight).T), _init("head_b", _np(module.head.bias))]
    nodes = [
        helper.make_node("Loop", ["trip_count", "keep_going", "x"], ["h"], body=body),
        *_linear_nodes("h", "head_w", "head_b", "y"),
    ]
    graph = helper.make_graph(
        nodes, "loop_body", [_float_info("x", ("N", d))], [_float_info("y", ("N", d))], initializers
    )
    return _helper_model(graph, "Loop whose body has Relu and an Erf-chain GELU")


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------

X64 = (TensorSpec("x", ("N", 64)),)
X16 = (TensorSpec("x", ("N", 16)),)
X32 = (TensorSpec("x", ("N", 32)),)
IMG28 = (TensorSpec("x", ("N", 1, 28, 28)),)
IMG16 = (TensorSpec("x", ("N", 3, 16, 16)),)
IMG32 = (TensorSpec("x", ("N", 3, 32, 32)),)
SEQ = (TensorSpec("x", ("N", "S", 32)),)

MIXED_HIDDEN = [
    ("leaky_relu", lambda: nn.LeakyReLU(0.2)),
    ("elu", nn.ELU),
    ("selu", nn.SELU),
    ("celu", lambda: nn.CELU(1.5)),
    ("softplus", nn.Softplus),
    ("tanh", nn.Tanh),
    ("mish", nn.Mish),
    ("relu6", nn.ReLU6),
    ("hard_sigmoid", nn.Hardsigmoid),
    ("sigmoid", nn.Sigmoid),
    ("softsign", nn.Softsign),
    ("prelu", lambda: nn.PReLU(16, init=0.1)),
]


def _mixed_mlp() -> nn.Module:
    body = mlp(16, [make() for _, make in MIXED_HIDDEN], n_in=16, n_out=1)
    return nn.Sequential(body, nn.Sigmoid())


def _hardswish_mlp() -> nn.Module:
    acts = [
        nn.Hardswish(),
        Lambda(hard_swish_mul_div),
        Lambda(hard_swish_div_mul),
        Lambda(hard_swish_hsig_mul),
    ]
    return mlp(32, acts, n_in=32, n_out=10)


REGISTRY: tuple[ModelEntry, ...] = (
    ModelEntry(
        "mlp_relu",
        "Linear→ReLU→Linear→ReLU→Linear",
        lambda: mlp(32, [nn.ReLU(), nn.ReLU()], n_in=64, n_out=10),
        X64,
        (Site("relu", 2),),
    ),
    ModelEntry(
        "cnn_relu",
        "Conv3x3(pad 1)→ReLU→MaxPool→Conv3x3(no pad)→ReLU→AvgPool→Linear",
        CnnRelu,
        IMG28,
        (Site("relu", 2),),
    ),
    ModelEntry(
        "resblock",
        "Conv+BN→ReLU (feeds Conv and residual Add)→Conv+BN→ReLU→Conv+BN→Add→ReLU→GAP→Linear",
        ResBlock,
        IMG16,
        (Site("relu", 3, where="stem ReLU output feeds a Conv and the residual Add"),),
    ),
    ModelEntry(
        "transformer_gelu",
        "pre-LN encoder block (2 heads, d=32) with nn.GELU() FFN",
        TinyEncoderBlock,
        SEQ,
        (Site("gelu", 1, where="FFN"),),
        exporters=(TORCHSCRIPT, DYNAMO, DYNAMO_OPSET18),
        output_axes={0: "N", 1: "S"},
    ),
    ModelEntry(
        "transformer_gelu_tanh",
        "pre-LN encoder block (2 heads, d=32) with nn.GELU(approximate='tanh') FFN",
        lambda: TinyEncoderBlock(approximate="tanh"),
        SEQ,
        (Site("gelu_tanh", 1, where="FFN"),),
        exporters=(TORCHSCRIPT, DYNAMO, DYNAMO_OPSET18),
        output_axes={0: "N", 1: "S"},
    ),
    ModelEntry(
        "silu_net",
        "CNN with SiLU after each conv/linear and a squeeze-excitation block with a Sigmoid gate",
        SiluNet,
        IMG16,
        (
            Site("silu", 4, where="conv1, conv2, SE reduce, fc1"),
            Site("sigmoid", 1, role="gate", where="SE gate multiplying the features"),
        ),
    ),
    ModelEntry(
        "hardswish_net",
        "MLP with nn.Hardswish, x*relu6(x+3)/6, x*(relu6(x+3)/6) and x*hardsigmoid(x)",
        _hardswish_mlp,
        X32,
        (Site("hard_swish", 4, where="one per written form"),),
        exporters=(TORCHSCRIPT, TORCHSCRIPT_OPSET13, DYNAMO),
    ),
    ModelEntry(
        "mlp_mixed",
        "Linear layers (width 16) with a different hidden activation each, Sigmoid output",
        _mixed_mlp,
        X16,
        (
            *(Site(kind, 1) for kind, _ in MIXED_HIDDEN),
            Site("sigmoid", 1, role="output", where="classifier output"),
        ),
    ),
    ModelEntry(
        "mobilenet_like",
        "HardSwish stem, MobileNetV2 block (ReLU6, depthwise), MobileNetV3 block "
        "(HardSwish, depthwise, SE with ReLU and HardSigmoid gate), HardSwish head",
        MobileNetLike,
        IMG32,
        (
            Site("hard_swish", 4, where="stem, block2 expand, block2 depthwise, head"),
            Site("relu6", 2, where="block1 expand, block1 depthwise"),
            Site("relu", 1, where="SE reduce"),
            Site("hard_sigmoid", 1, role="gate", where="SE gate multiplying the features"),
        ),
        exporters=(TORCHSCRIPT, TORCHSCRIPT_OPSET13, DYNAMO),
    ),
    ModelEntry(
        "if_branch",
        "If(sum(x) > 0): Linear→ReLU→Linear, else Linear→SiLU→Linear",
        IfBranch,
        X16,
        (Site("relu", 1, where="If then_branch"), Site("silu", 1, where="If else_branch")),
        exporters=(TORCHSCRIPT, DYNAMO, HELPER),
        script=True,
        helper_builder=build_if_onnx,
    ),
    ModelEntry(
        "loop_body",
        "Loop (3 iterations): h = GELU(Linear(ReLU(Linear(h)))), then Linear",
        LoopBody,
        X16,
        (Site("relu", 1, where="Loop body"), Site("gelu", 1, where="Loop body")),
        exporters=(TORCHSCRIPT, DYNAMO, HELPER),
        script=True,
        helper_builder=build_loop_onnx,
    ),
)

# --------------------------------------------------------------------------
# Export, verification, manifest
# --------------------------------------------------------------------------


def make_module(entry: ModelEntry, seed: int) -> nn.Module:
    """Build the module with a fixed seed; give BatchNorms non-trivial statistics.

    Fresh BatchNorms are identity maps (mean 0, var 1), which would make BN
    folding invisible; random statistics keep the exported weights realistic.
    """
    torch.manual_seed(seed)
    module = entry.factory()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return module.eval()


def example_inputs(entry: ModelEntry, dims: dict[str, int], seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(*(dims[d] if isinstance(d, str) else d for d in spec.shape), generator=gen) for spec in entry.inputs
    )


def export(entry: ModelEntry, exporter: Exporter, module: nn.Module) -> onnx.ModelProto:
    """Run one exporter and return an in-memory, self-contained ModelProto."""
    names = [spec.name for spec in entry.inputs]
    args = example_inputs(entry, EXPORT_DIMS, seed=1)
    if exporter.dynamo is None:
        assert entry.helper_builder is not None, entry.name
        return entry.helper_builder(module)
    if exporter.dynamo:
        dims = {name: torch.export.Dim(name, min=1, max=4096) for name in EXPORT_DIMS}
        # Positional (a tuple): dict keys would have to be forward()'s arg names.
        shapes = tuple({i: dims[d] for i, d in enumerate(spec.shape) if isinstance(d, str)} for spec in entry.inputs)
        kwargs = {} if exporter.opset is None else {"opset_version": exporter.opset}
        program = torch.onnx.export(
            module,
            args,
            None,
            dynamo=True,
            input_names=names,
            output_names=["y"],
            dynamic_shapes=shapes,
            verbose=False,
            **kwargs,
        )
        # model_proto holds the weights inline: no external-data side file.
        return program.model_proto
    axes = {spec.name: {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)} for spec in entry.inputs}
    axes["y"] = entry.output_axes
    target = torch.jit.script(module) if entry.script else module
    buf = io.BytesIO()
    torch.onnx.export(
        target,
        args,
        buf,
        dynamo=False,
        opset_version=exporter.opset,
        input_names=names,
        output_names=["y"],
        dynamic_axes=axes,
    )
    return onnx.load_from_string(buf.getvalue())


def verify(entry: ModelEntry, model: onnx.ModelProto, module: nn.Module) -> float:
    """Checker + ONNX Runtime vs torch on new batch sizes; returns the max error.

    Each feed is also run negated, so both branches of ``if_branch`` are taken.
    """
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    worst = 0.0
    base = example_inputs(entry, VERIFY_DIMS, seed=2)
    for sign in (1.0, -1.0):
        args = tuple(sign * t for t in base)
        with torch.no_grad():
            ref = module(*args).numpy()
        feed = {spec.name: t.numpy() for spec, t in zip(entry.inputs, args, strict=True)}
        got = sess.run(None, feed)[0]
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL, err_msg=entry.name)
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and all its If/Loop/Scan subgraphs, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Op histogram over the main graph, subgraphs and model-local functions."""
    counts: collections.Counter[str] = collections.Counter()
    for graph in iter_graphs(model.graph):
        counts.update(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in graph.node)
    for fn in model.functions:
        counts.update(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in fn.node)
    return dict(sorted(counts.items()))


def _shape(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def manifest_entry(
    entry: ModelEntry, exporter: Exporter, module: nn.Module, path: Path, model: onnx.ModelProto
) -> dict:
    source = f"models/build_models.py REGISTRY[{entry.name}]: torch {type(module).__name__}"
    if exporter.dynamo is None and entry.helper_builder is not None:
        source += f", rebuilt by hand with onnx.helper in {entry.helper_builder.__name__}()"
    return {
        "file": path.name,
        "model": entry.name,
        "description": entry.description,
        "source": source,
        "exporter": exporter.name,
        "torch_exporter": {None: "onnx.helper", False: "dynamo=False", True: "dynamo=True"}[exporter.dynamo],
        "opset": default_opset(model),
        "opset_imports": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "inputs": [
            {
                "name": i.name,
                "shape": _shape(i),
                "dtype": helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name,
            }
            for i in model.graph.input
        ],
        "outputs": [{"name": o.name, "shape": _shape(o)} for o in model.graph.output],
        "activations": [f"{s.kind} x{s.count}" + ("" if s.role == "hidden" else f" ({s.role})") for s in entry.sites],
        "sites": [{"kind": s.kind, "count": s.count, "role": s.role, "where": s.where} for s in entry.sites],
        "op_counts": op_counts(model),
        "size_bytes": path.stat().st_size,
    }


def drop_stack_traces(model: onnx.ModelProto) -> None:
    """Remove the dynamo exporter's per-node ``pkg.torch.onnx.stack_trace`` entries.

    They hold absolute paths and line numbers of this checkout and of the
    venv, so the committed files would change with every edit or clone. The
    other node metadata (namespace, class hierarchy, fx node) is kept: it is
    part of what the exporter writes and what a rewrite must preserve.
    """
    nodes = [n for g in iter_graphs(model.graph) for n in g.node]
    nodes += [n for fn in model.functions for n in fn.node]
    for node in nodes:
        kept = [p for p in node.metadata_props if p.key != STACK_TRACE_KEY]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)


def save(model: onnx.ModelProto, path: Path) -> None:
    """Write atomically, as one file (weights inline)."""
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp), save_as_external_data=False)
    os.replace(tmp, path)


def build_all(out_dir: Path) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for seed, entry in enumerate(REGISTRY):
        module = make_module(entry, seed)
        for exporter in entry.exporters:
            path = out_dir / f"{entry.name}.{exporter.name}.onnx"
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                model = export(entry, exporter, module)
            clamp_ir_version(model)
            drop_stack_traces(model)
            save(model, path)
            model = onnx.load(str(path))  # verify what is on disk
            err = verify(entry, model, module)
            size = path.stat().st_size
            if size >= MAX_FILE_BYTES:
                raise RuntimeError(f"{path.name} is {size} bytes (limit {MAX_FILE_BYTES})")
            records.append(manifest_entry(entry, exporter, module, path, model))
            print(
                f"{path.name:45s} opset {default_opset(model):2d} IR {model.ir_version:2d} "
                f"{size / 1000:6.1f} KB  max|ort-torch| {err:.1e}"
            )
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the example ONNX models and manifest.json.")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    records = build_all(args.out)
    manifest = {
        "generator": "models/build_models.py",
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "models": records,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(records)} models and manifest.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
