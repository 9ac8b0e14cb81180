"""Write ONNX Runtime's fused ops out as their layer and activation, for passes that measure the pre-activation.

A rewrite splits a fused op only where it normalizes its site (see
:mod:`normact_onnx.catalogue.fused`); calibration measures the value between
the layer and the activation, so its instrumented copy needs that value to exist.
"""

from __future__ import annotations

import onnx

from .find import find_sites


def split_fused_sites(model: onnx.ModelProto, base_dir: str | None) -> int:
    """Split every fused op that holds a site, in place; returns how many (0: the model is unchanged)."""
    count = 0
    for s in find_sites(model, base_dir):
        if s.unfused is not None:  # the split find_sites made: the layer, then the activation reading its output
            pre, act = s.unfused
            s.container.replace(s.root, [*pre, act])
            count += 1
    return count
