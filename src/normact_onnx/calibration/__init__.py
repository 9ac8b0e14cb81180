"""ANAct calibration: data readers, in-graph statistics, mergeable per-site moments, reports."""

from .readers import InputSpec, model_inputs, open_source
from .run import CalibrationResult, anact_constants, calibrate, collect, stats_constants
from .stats import CalibrationStats, SiteStats, merge

__all__ = [
    "CalibrationResult",
    "CalibrationStats",
    "InputSpec",
    "SiteStats",
    "anact_constants",
    "calibrate",
    "collect",
    "merge",
    "model_inputs",
    "open_source",
    "stats_constants",
]
