"""ANAct calibration: in-graph statistics, mergeable per-site moments, reports.

The data it runs on (readers, rows, batching, ``DataOptions``) is :mod:`normact_onnx.data`'s. ``calibrate()``
itself, which drives these and writes the calibrated model, is an orchestrator above this package:
:func:`normact_onnx.api.calibrate` (``normact_onnx.calibrate``).
"""

from .run import collect
from .stats import CalibrationStats, SiteStats, merge

__all__ = [
    "CalibrationStats",
    "SiteStats",
    "collect",
    "merge",
]
