"""Fine-tuning through ONNX Runtime training (the optional ``[train]`` environment).

Importing this package needs only ``onnx`` and numpy: the graph builder, the
running-statistics rule and the export run anywhere. Everything that drives
``onnxruntime.training`` imports it lazily and, where it is missing, says in one
line how to get it (:func:`require_training`, in :mod:`.backend`).
"""

from __future__ import annotations

from .backend import TRAIN_ENV_HINT, require_training
from .loop import finetune

__all__ = ["TRAIN_ENV_HINT", "finetune", "require_training"]
