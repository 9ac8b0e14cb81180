"""ANAct calibration: data readers, in-graph statistics, mergeable per-site moments, reports.

``calibrate()`` itself, which drives these and writes the calibrated model, is an orchestrator above this
package: :func:`normact_onnx.api.calibrate` (``normact_onnx.calibrate``).
"""

from ..inputs import InputSpec, model_inputs
from .batches import DataOptions
from .readers import open_source
from .run import collect
from .stats import CalibrationStats, SiteStats, merge

__all__ = [
    "CalibrationStats",
    "DataOptions",
    "InputSpec",
    "SiteStats",
    "collect",
    "merge",
    "model_inputs",
    "open_source",
]
