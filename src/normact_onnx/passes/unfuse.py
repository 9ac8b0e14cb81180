"""Write ONNX Runtime's fused ops out as their layer and activation, for passes that measure the pre-activation.

A rewrite splits a fused op only where it normalizes its site (see
:mod:`normact_onnx.catalogue.fused`); calibration measures the value between
the layer and the activation, so its instrumented copy needs that value to exist.
"""

from __future__ import annotations

import onnx

from ..catalogue.fused import FUSED
from .edits import Edits
from .find import find_sites


def split_fused_sites(model: onnx.ModelProto, base_dir: str | None) -> int:
    """Split every fused op that holds a site, in place; returns how many (0: the model is unchanged)."""
    edits: dict[int, Edits] = {}
    for s in find_sites(model, base_dir):
        if s.unfused is None:
            continue
        pre, act = FUSED[(s.root.domain, s.root.op_type)](s.root, s.input)
        edits.setdefault(id(s.container), Edits(s.container)).replace[id(s.root)] = [*pre, act]
    for e in reversed(list(edits.values())):  # subgraphs first (see normalize.apply_plan)
        e.commit()
    return sum(len(e.replace) for e in edits.values())
