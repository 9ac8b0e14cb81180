"""Bring an exported graph to what onnxruntime-training 1.19 can differentiate (the training graph only).

onnxruntime-training 1.19.2 is the last release: its gradient registry and its
CPU gradient kernels are fixed. Real exported models use ops it cannot
differentiate on CPU, so the training graph (never the exported model) writes
them in standard ops it can:

* single-op activations without a gradient (HardSigmoid, HardSwish, Elu, Selu,
  Softplus, Softsign, Mish, PRelu, ONNX Gelu, …) become the catalogue's
  gradient-safe body, whether they are normalization sites or not. Which ops
  need it is read from the catalogue itself: an op whose gradient-safe body
  does not use it has no gradient;
* ``Resize`` in nearest mode with integer scales (the upsampling of FPN necks,
  YOLO and OCR detectors; ONNX Runtime has no CPU ResizeGrad kernel) becomes
  Unsqueeze → Expand → Reshape, which repeats every element exactly as nearest
  upsampling does;
* ``ConvTranspose`` with kernel = stride (no CPU ConvTransposeGrad kernel)
  becomes a MatMul with the weight reshaped, and the blocks moved into place;
* ``BatchNormalization`` keeps its running statistics (written as the
  per-channel affine map; scale and bias still train): ORT would switch it to
  batch statistics and update running values the export never sees;
* ``auto_pad=SAME_*`` at stride 1 becomes explicit pads (ORT's ConvGrad and
  PoolGrad mis-size SAME padding with even kernels);
* variadic ``Sum`` becomes a chain of ``Add``; ``LayerNormalization`` names its
  optional Mean/InvStdDev outputs (its gradient reads them);
* graphs below opset 13 are converted to opset 13 (the gradient builders emit
  opset-13 ops); the export keeps the model's own opset;
* once the data is known, the inputs' symbolic axes take the training batch's
  concrete sizes (``fix_input_shapes``): ORT sizes some gradients of symbolic
  Paddle graphs −1 or 0. The export keeps the model's symbolic shapes.

Each rewrite computes the same values as the op it replaces; the export check
after training (training graph vs exported model on one batch) confirms it.

Why one module past 500 lines: it is a list of independent rewrites, one per gap of onnxruntime-training 1.19's
gradient registry (the bullets above), each short and each applied to the training graph only; they share the
container edits and constant readers and are read as that list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..catalogue import CATALOGUE
from ..domains import is_standard
from ..errors import NormactError
from ..graph import default_opset
from ..passes.find import find_sites
from ..passes.forms import LiteralBody
from ..valuetypes import FLOAT_TYPES, infer_value_types

# (op type) -> input positions that hold learned parameters. A float initializer is trainable by default only
# where some node reads it at such a position: never a Resize scale, a Clip bound, a Pad value or anything that
# only shapes the computation (those would ask ONNX Runtime for gradients it cannot build). Elementwise ops count
# only for per-channel vectors (see is_weight_input); scalars there are constants of the computation (0.5 in
# a GELU, epsilons).
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "Einsum": tuple(range(8)),
    "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "GroupNormalization": (1, 2),
    "BatchNormalization": (1, 2),  # scale and bias; running mean/variance (3, 4) are statistics
    "PRelu": (1,),
    "Gather": (0,),  # embedding tables
    "LSTM": (1, 2, 3),
    "GRU": (1, 2, 3),
}
ELEMENTWISE_WEIGHT_OPS = ("Add", "Sub", "Mul", "Div", "Concat")


MIN_TRAIN_OPSET = 13  # the gradient builders of ORT 1.19 write opset-13 ops (LessOrEqual, ReduceSum axes as input)
UNSQUEEZE_AXES_AS_INPUT = 13


@dataclass
class Preparation:
    """What was rewritten for training, for the plan and for error messages."""

    decomposed: dict[str, int] = field(default_factory=dict)  # op type -> how many nodes
    opset_from: int | None = None  # set when the graph was converted to MIN_TRAIN_OPSET
    lifted: list[str] = field(default_factory=list)  # weights that were Constant nodes (initializers in training)

    def note(self, op_type: str) -> None:
        self.decomposed[op_type] = self.decomposed.get(op_type, 0) + 1


def is_weight_input(op_type: str, position: int, dims: list[int]) -> bool:
    """Whether input ``position`` of an ``op_type`` node holds a learned parameter when it is a constant.

    Elementwise operands count when they are per-channel vectors (one axis longer than 1: biases, norm
    scales written out); grids such as a detector's anchor points stay constants (``--freeze`` for more).
    """
    if position in WEIGHT_INPUTS.get(op_type, ()):
        return True
    return op_type in ELEMENTWISE_WEIGHT_OPS and sum(1 for d in dims if d > 1) == 1


def lift_weight_constants(m: onnx.ModelProto) -> list[str]:
    """Weights stored as ``Constant`` nodes (Paddle exports do this) become initializers of the training graph.

    Only float constants read at a weight position are lifted (so they can be trained); every other
    ``Constant`` stays a node and never asks for a gradient. The export writes trained values back
    into the original ``Constant`` nodes, so the exported graph keeps its structure.
    """
    g = m.graph
    consumers: dict[str, list[tuple[str, int]]] = {}
    for n in g.node:
        for pos, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n.op_type, pos))
    lifted, keep = [], []
    for n in g.node:
        t = _constant_tensor(n)
        uses = consumers.get(n.output[0], ()) if n.output else ()
        if t is not None and t.data_type in FLOAT_TYPES and len(n.output) == 1:  # noqa: SIM102
            if any(is_weight_input(op, pos, list(t.dims)) for op, pos in uses):
                init = onnx.TensorProto()
                init.CopyFrom(t)
                init.name = n.output[0]
                g.initializer.append(init)
                lifted.append(init.name)
                continue
        keep.append(n)
    if lifted:
        kept = [onnx.NodeProto() for _ in keep]
        for dst, src in zip(kept, keep):
            dst.CopyFrom(src)
        del g.node[:]
        g.node.extend(kept)
    return lifted


def _constant_tensor(n: onnx.NodeProto) -> onnx.TensorProto | None:
    if n.op_type != "Constant" or not is_standard(n):
        return None
    return next((a.t for a in n.attribute if a.name == "value"), None)


def _needs_gradient_safe_body(kind: str, op_type: str, params: dict, opset: int, elem: int) -> list | None:
    """The gradient-safe body of one op, or None if that body still uses the op (it has a gradient)."""
    act = CATALOGUE[kind]
    b = LiteralBody(opset, "", elem, act.with_defaults(params), True)
    act.body(b, "x")
    if any(n.op_type == op_type for n in b.nodes):
        return None
    return b.nodes


def decompose_activations(m: onnx.ModelProto, base_dir: str | None, prep: Preparation) -> None:
    """Write every main-graph activation op without an ORT gradient as its catalogue gradient-safe body."""
    opset = default_opset(m.opset_import)
    types = None
    replace: dict[str, list[onnx.NodeProto]] = {}
    for site in find_sites(m, base_dir):
        c = site.container
        if c.parent is not None or c.function is not None or len(site.nodes) != 1:
            continue
        node = site.nodes[0]
        if _needs_gradient_safe_body(site.kind, node.op_type, dict(site.params), opset, TensorProto.FLOAT) is None:
            continue
        types = types or infer_value_types(m)
        act = CATALOGUE[site.kind]
        prefix = f"{node.name or node.output[0]}/grad_safe/"
        b = LiteralBody(opset, prefix, types.elem_type(site.input), act.with_defaults(site.params), True)
        act.body(b, site.input)
        b.nodes[-1].output[0] = site.output
        replace[node.output[0]] = b.nodes
        prep.note(node.op_type)
    if replace:
        _splice(m.graph, replace)


def _const_of(g: onnx.GraphProto, name: str, producers: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    for t in g.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
    return None


def _integer_nearest_scales(node: onnx.NodeProto, g: onnx.GraphProto, producers: dict) -> list[int] | None:
    """Integer per-axis scales of a nearest-mode Resize whose output is an exact repetition, else None."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    mode = attrs.get("mode", b"nearest")
    if mode != b"nearest" or len(node.input) < 3 or not node.input[2]:
        return None
    if len(node.input) > 3 and node.input[3]:
        return None  # sizes given: the factor depends on the input's shape
    if attrs.get("antialias", 0) or attrs.get("axes"):
        return None
    ctm = attrs.get("coordinate_transformation_mode", b"half_pixel")
    nearest = attrs.get("nearest_mode", b"round_prefer_floor")
    scales = _const_of(g, node.input[2], producers)
    if scales is None or scales.size == 0 or np.any(scales < 1) or np.any(scales != np.round(scales)):
        return None
    ints = [int(s) for s in scales]
    exact = ctm == b"asymmetric" and nearest == b"floor"
    # half_pixel/pytorch_half_pixel with round_prefer_floor: src = (i + 0.5)/s − 0.5 rounds to i // s for s ≤ 2
    half = ctm in (b"half_pixel", b"pytorch_half_pixel") and nearest == b"round_prefer_floor"
    exact = exact or (half and max(ints) <= 2)
    return ints if exact else None


def _repeat_nodes(node: onnx.NodeProto, scales: list[int], opset: int) -> list[onnx.NodeProto]:
    """y[..., i, ...] = x[..., i // s, ...] per axis: interleave unit axes, Expand them to s, Reshape back."""
    p = f"{node.name or node.output[0]}/grad_safe/"
    rank = len(scales)
    x = node.input[0]
    nodes = []

    def const(name: str, value: np.ndarray) -> str:
        nodes.append(helper.make_node("Constant", [], [p + name], name=p + name, value=numpy_helper.from_array(value)))
        return p + name

    axes = [2 * i + 1 for i in range(rank)]  # [d0, 1, d1, 1, …]
    if opset >= UNSQUEEZE_AXES_AS_INPUT:
        axes_name = const("axes", np.array(axes, np.int64))
        nodes.append(helper.make_node("Unsqueeze", [x, axes_name], [p + "u"], name=p + "u"))
    else:
        nodes.append(helper.make_node("Unsqueeze", [x], [p + "u"], name=p + "u", axes=axes))
    reps = np.ones(2 * rank, np.int64)
    reps[1::2] = scales
    nodes.append(helper.make_node("Expand", [p + "u", const("reps", reps)], [p + "e"], name=p + "e"))
    nodes.append(helper.make_node("Shape", [x], [p + "shape"], name=p + "shape"))
    new_shape = [p + "shape", const("scales", np.array(scales, np.int64))]
    nodes.append(helper.make_node("Mul", new_shape, [p + "out_shape"], name=p + "out_shape"))
    nodes.append(helper.make_node("Reshape", [p + "e", p + "out_shape"], [node.output[0]], name=p + "reshape"))
    return nodes


def decompose_resize(m: onnx.ModelProto, prep: Preparation) -> None:
    """Nearest-mode Resize by integer factors as Unsqueeze/Expand/Reshape (no CPU ResizeGrad in ORT 1.19)."""
    g = m.graph
    opset = default_opset(m.opset_import)
    producers = {o: n for n in g.node for o in n.output}
    replace = {}
    for node in g.node:
        if node.op_type != "Resize" or not is_standard(node) or opset < 11:
            continue
        scales = _integer_nearest_scales(node, g, producers)
        if scales is not None:
            replace[node.output[0]] = _repeat_nodes(node, scales, opset)
            prep.note("Resize")
    if replace:
        _splice(g, replace)


def _conv_transpose_nodes(node: onnx.NodeProto, w_dims: list[int]) -> list[onnx.NodeProto] | None:
    """A 2-D ConvTranspose whose kernel equals its stride (no overlap) as one MatMul, or None.

    y[n, o, h·s + i, w·s + j] = Σ_c x[n, c, h, w]·W[c, o, i, j] + b[o]: a MatMul of the channels-last input
    with W reshaped to [C_in, C_out·s·s], then the s×s blocks moved into place. W (and b) are read where
    they are, so they stay trainable. ONNX Runtime has no CPU ConvTransposeGrad kernel.
    """
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if len(w_dims) != 4 or attrs.get("group", 1) != 1 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b""):
        return None
    kh, kw = w_dims[2:]
    strides = list(attrs.get("strides", [1, 1]))
    if list(attrs.get("kernel_shape", [kh, kw])) != [kh, kw] or strides != [kh, kw]:
        return None
    if any(attrs.get("pads", [0] * 4)) or any(attrs.get("output_padding", [0, 0])) or "output_shape" in attrs:
        return None
    if any(d != 1 for d in attrs.get("dilations", [1, 1])):
        return None
    cin, cout = w_dims[0], w_dims[1]
    p = f"{node.name or node.output[0]}/grad_safe/"
    nodes: list[onnx.NodeProto] = []

    def const(name: str, values: list[int]) -> str:
        t = numpy_helper.from_array(np.array(values, np.int64))
        nodes.append(helper.make_node("Constant", [], [p + name], name=p + name, value=t))
        return p + name

    def add(op: str, inputs: list[str], out: str, **kw) -> str:
        nodes.append(helper.make_node(op, inputs, [p + out], name=p + out, **kw))
        return p + out

    x, w = node.input[0], node.input[1]
    xt = add("Transpose", [x], "x_nhwc", perm=[0, 2, 3, 1])
    wm = add("Reshape", [w, const("w_shape", [cin, cout * kh * kw])], "w_matrix")
    y = add("MatMul", [xt, wm], "blocks")  # [N, H, W, C_out·kh·kw]
    y = add("Reshape", [y, const("blocks_shape", [0, 0, 0, cout, kh, kw])], "blocks6")
    y = add("Transpose", [y], "placed", perm=[0, 3, 1, 4, 2, 5])  # [N, C_out, H, kh, W, kw]
    shape = add("Shape", [x], "in_shape")
    shape = add("Mul", [shape, const("scale", [1, 0, kh, kw])], "scaled_shape")
    shape = add("Add", [shape, const("channels", [0, cout, 0, 0])], "out_shape")
    out = node.output[0]
    if len(node.input) > 2 and node.input[2]:
        y = add("Reshape", [y, shape], "unbiased")
        b = add("Reshape", [node.input[2], const("b_shape", [cout, 1, 1])], "bias")
        nodes.append(helper.make_node("Add", [y, b], [out], name=p + "add_bias"))
    else:
        nodes.append(helper.make_node("Reshape", [y, shape], [out], name=p + "reshape"))
    return nodes


def decompose_conv_transpose(m: onnx.ModelProto, prep: Preparation) -> None:
    """Non-overlapping 2-D ConvTranspose (kernel = stride, the usual ×2 upsampling) as MatMul + reshapes."""
    g = m.graph
    dims = {t.name: list(t.dims) for t in g.initializer}
    replace = {}
    for node in g.node:
        if node.op_type != "ConvTranspose" or not is_standard(node) or node.input[1] not in dims:
            continue
        nodes = _conv_transpose_nodes(node, dims[node.input[1]])
        if nodes is not None:
            replace[node.output[0]] = nodes
            prep.note("ConvTranspose")
    if replace:
        _splice(g, replace)


def decompose_batchnorm(m: onnx.ModelProto, prep: Preparation) -> None:
    """BatchNormalization with its running statistics frozen: (x − mean)·scale/√(var + ε) + bias in plain ops.

    onnxruntime-training runs BatchNormalization in training mode (batch statistics) and updates running
    statistics that never reach the checkpoint, so neither the steps nor the export would match the model.
    Fine-tuning a pretrained model on small batches keeps the statistics anyway; scale and bias still train.
    """
    g = m.graph
    types = infer_value_types(m)
    replace = {}
    for node in g.node:
        if node.op_type != "BatchNormalization" or not is_standard(node) or len(node.output) != 1:
            continue
        shape = types.shape.get(node.input[0])
        if shape is not None and len(shape) < 2:
            continue
        eps = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon"), 1e-5)
        p = f"{node.name or node.output[0]}/frozen_bn/"
        x, scale, bias, mean, var = node.input[:5]
        shape_name = p + "channel_shape"
        eps_name = p + "eps"
        elem = types.elem_type(var)
        nodes = _channel_shape(x, shape_name, None if shape is None else len(shape), p)
        nodes += [
            helper.make_node(
                "Constant",
                [],
                [eps_name],
                name=eps_name,
                value=numpy_helper.from_array(np.array(eps, helper.tensor_dtype_to_np_dtype(elem))),
            ),
            helper.make_node("Add", [var, eps_name], [p + "var_eps"], name=p + "var_eps"),
            helper.make_node("Sqrt", [p + "var_eps"], [p + "std"], name=p + "std"),
            helper.make_node("Div", [scale, p + "std"], [p + "gain"], name=p + "gain"),
            helper.make_node("Reshape", [p + "gain", shape_name], [p + "gain_c"], name=p + "gain_c"),
            helper.make_node("Reshape", [mean, shape_name], [p + "mean_c"], name=p + "mean_c"),
            helper.make_node("Reshape", [bias, shape_name], [p + "bias_c"], name=p + "bias_c"),
            helper.make_node("Sub", [x, p + "mean_c"], [p + "centred"], name=p + "centred"),
            helper.make_node("Mul", [p + "centred", p + "gain_c"], [p + "scaled"], name=p + "scaled"),
            helper.make_node("Add", [p + "scaled", p + "bias_c"], [node.output[0]], name=p + "out"),
        ]
        replace[node.output[0]] = nodes
        prep.note("BatchNormalization")
    if replace:
        _splice(g, replace)


def _channel_shape(x: str, name: str, rank: int | None, p: str) -> list[onnx.NodeProto]:
    """Nodes that write ``name`` = [−1, 1, …, 1] (rank − 1 entries): a per-channel vector's shape against ``x``.

    When shape inference lost the rank (Paddle graphs), it is read off ``x`` at run time.
    """

    def const(out: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [out], name=out, value=numpy_helper.from_array(value))

    if rank is not None:
        return [const(name, np.array([-1] + [1] * (rank - 2), np.int64))]
    return [
        helper.make_node("Shape", [x], [p + "x_shape"], name=p + "x_shape"),
        helper.make_node("Shape", [p + "x_shape"], [p + "rank"], name=p + "rank"),
        const(p + "two", np.array([2], np.int64)),
        helper.make_node("Sub", [p + "rank", p + "two"], [p + "ones_count"], name=p + "ones_count"),
        helper.make_node(
            "ConstantOfShape",
            [p + "ones_count"],
            [p + "ones"],
            name=p + "ones",
            value=numpy_helper.from_array(np.array([1], np.int64)),
        ),
        const(p + "minus_one", np.array([-1], np.int64)),
        helper.make_node("Concat", [p + "minus_one", p + "ones"], [name], name=name, axis=0),
    ]


def decompose_sum(m: onnx.ModelProto, prep: Preparation) -> None:
    """Variadic ``Sum`` (ResNet exports use it for the residual add) as a chain of Add: no Sum gradient in ORT."""
    g = m.graph
    replace = {}
    for node in g.node:
        if node.op_type != "Sum" or not is_standard(node):
            continue
        p = f"{node.name or node.output[0]}/grad_safe/"
        acc, nodes = node.input[0], []
        for k, term in enumerate(node.input[1:], 1):
            out = node.output[0] if k == len(node.input) - 1 else f"{p}add_{k}"
            nodes.append(helper.make_node("Add", [acc, term], [out], name=f"{p}add_{k}"))
            acc = out
        if not nodes:  # a one-input Sum is a copy
            nodes = [helper.make_node("Identity", [acc], [node.output[0]], name=f"{p}identity")]
        replace[node.output[0]] = nodes
        prep.note("Sum")
    if replace:
        _splice(g, replace)


def complete_layernorm_outputs(m: onnx.ModelProto, prep: Preparation) -> None:
    """LayerNormalization with its optional Mean and InvStdDev outputs named: ORT's gradient builder reads them."""
    for node in m.graph.node:
        if node.op_type == "LayerNormalization" and is_standard(node) and len(node.output) < 3:
            base = node.name or node.output[0]
            while len(node.output) < 3:
                node.output.append(f"{base}/grad_safe/{('mean', 'inv_std')[len(node.output) - 1]}")
            prep.note("LayerNormalization")


def explicit_same_pads(m: onnx.ModelProto, prep: Preparation) -> None:
    """``auto_pad=SAME_*`` at stride 1 as an explicit ``Pad`` before the op (the same for every input size).

    ORT's ConvGrad and MaxPoolGrad mis-size their result for SAME padding with an even kernel
    ("Can broadcast 0 by …"); at stride 1 the padding is fixed: (k − 1)·d per axis, the odd one at the
    end (SAME_UPPER) or the start (SAME_LOWER). A separate Pad (zeros for Conv, the lowest float for
    MaxPool) keeps the op itself unpadded, which every gradient kernel handles.
    """
    g = m.graph
    replace = {}
    for node in g.node:
        if node.op_type not in ("Conv", "MaxPool") or not is_standard(node):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        mode = attrs.get("auto_pad", b"NOTSET")
        kernel = attrs.get("kernel_shape")
        if mode not in (b"SAME_UPPER", b"SAME_LOWER") or not kernel:
            continue
        if any(s != 1 for s in attrs.get("strides", [1] * len(kernel))):
            continue
        dil = attrs.get("dilations", [1] * len(kernel))
        total = [(k - 1) * d for k, d in zip(kernel, dil)]
        small, large = [t // 2 for t in total], [t - t // 2 for t in total]
        begin, end = (small, large) if mode == b"SAME_UPPER" else (large, small)
        p = f"{node.name or node.output[0]}/grad_safe/"
        pads = numpy_helper.from_array(np.array([0, 0, *begin, 0, 0, *end], np.int64))
        fill = np.array(0.0 if node.op_type == "Conv" else np.finfo(np.float32).min, np.float32)
        op = onnx.NodeProto()
        op.CopyFrom(node)
        del op.attribute[:]
        op.attribute.extend(a for a in node.attribute if a.name not in ("auto_pad", "pads"))
        op.input[0] = p + "padded"
        replace[node.output[0]] = [
            helper.make_node("Constant", [], [p + "pads"], name=p + "pads", value=pads),
            helper.make_node("Constant", [], [p + "fill"], name=p + "fill", value=numpy_helper.from_array(fill)),
            helper.make_node("Pad", [node.input[0], p + "pads", p + "fill"], [p + "padded"], name=p + "pad"),
            op,
        ]
        prep.note(f"{node.op_type}(auto_pad)")
    if replace:
        _splice(g, replace)


def clean_shapes(m: onnx.ModelProto, prep: Preparation) -> None:
    """No false shape claims: intermediate value_info dropped; on inputs/outputs, −1/0 dimensions and
    symbolic names that stand for two axes of one tensor (Paddle writes ``[-1, 3, '?', '?']``) get names
    of their own.

    ORT training's shape inference takes a shared name as equal sizes (height = width) and a −1
    literally, and sizes gradient buffers from that (crashes, "Can broadcast 0 by …").
    """
    g = m.graph
    if len(g.value_info):
        del g.value_info[:]
        prep.note("value_info")
    seen: set[str] = set()
    for vi in list(g.input) + list(g.output):
        if not vi.type.HasField("tensor_type"):
            continue
        seen.clear()  # a name may repeat across tensors (the batch axis), not across the axes of one
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            if d.HasField("dim_value") or d.dim_param in seen or d.dim_param in ("", "?"):
                d.Clear()
                d.dim_param = f"{vi.name}_dim{i}"
                prep.note("symbolic dimension renamed")
            seen.add(d.dim_param)


def fix_input_shapes(m: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], prep: Preparation) -> None:
    """Every symbolic dimension of the named inputs fixed to the training data's size (the training graph only).

    ONNX Runtime training 1.19 sizes some gradient buffers from the shapes it infers; on Paddle graphs
    whose shape-computing subgraphs (Shape → Slice → Concat → Reshape) lose track of a symbolic axis it
    sizes them −1 or 0 ("Can broadcast 0 by …", "shape.Size() must >= 0"). With concrete input sizes
    every shape is known. The exported model keeps its own symbolic shapes.
    """
    for vi in m.graph.input:
        size = shapes.get(vi.name)
        if size is None or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(size):
            continue
        changed = False
        for d, n in zip(dims, size):
            if n > 0 and not (d.HasField("dim_value") and d.dim_value > 0):
                d.Clear()
                d.dim_value = int(n)
                changed = True
        if changed:
            prep.note("input shape fixed")


def _splice(g: onnx.GraphProto, replace: dict[str, list[onnx.NodeProto]]) -> None:
    """Replace the nodes whose first output is a key (protobuf wrappers have no stable identity to key on)."""
    nodes = []
    for n in g.node:
        if n.output and n.output[0] in replace:
            nodes.extend(replace[n.output[0]])
        else:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            nodes.append(copy)
    del g.node[:]
    g.node.extend(nodes)


def raise_opset(m: onnx.ModelProto, prep: Preparation) -> onnx.ModelProto:
    """Graphs below opset 13 are converted to 13 for training (the exported model keeps its own)."""
    opset = default_opset(m.opset_import)
    if opset >= MIN_TRAIN_OPSET:
        return m
    from onnx import version_converter

    inits = {t.name for t in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]  # IR < 4 listed initializers as inputs too
    del m.graph.input[:]
    m.graph.input.extend(inputs)
    m.ir_version = max(m.ir_version, 7)  # opset 13 needs IR ≥ 7
    try:
        out = version_converter.convert_version(m, MIN_TRAIN_OPSET)
    except Exception as e:  # the converter's messages are C++ assertions
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NormactError(
            f"the model is at opset {opset}; training needs opset ≥ {MIN_TRAIN_OPSET} and onnx's version converter "
            f"failed ({first}): re-export the model at opset {MIN_TRAIN_OPSET} or newer"
        ) from None
    prep.opset_from = opset
    return out


def prepare(m: onnx.ModelProto, base_dir: str | None = None) -> tuple[onnx.ModelProto, Preparation]:
    """The training graph's final touches: a supported opset, ops with gradients throughout."""
    prep = Preparation()
    clean_shapes(m, prep)
    m = raise_opset(m, prep)
    decompose_activations(m, base_dir, prep)
    decompose_resize(m, prep)
    decompose_conv_transpose(m, prep)
    decompose_batchnorm(m, prep)
    decompose_sum(m, prep)
    complete_layernorm_outputs(m, prep)
    explicit_same_pads(m, prep)
    return m, prep
