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
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from ..runtime.session import open_session, require_onnxruntime, session_options
from .find import Site
from .normalize import SiteOutcome


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
