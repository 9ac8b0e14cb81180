"""Fine-tuning with normalized activations: two backends over one training graph.

``torch`` runs the graph in PyTorch in the main environment; ``ort`` runs it through onnxruntime-training in its
own environment (:mod:`.backend`). Importing this package needs only ``onnx`` and numpy: the graph builder, the
running-statistics rule and the export run anywhere; what drives a runtime imports it lazily and, where it is
missing, says in one line how to get it.
"""

from __future__ import annotations

from .backend import BACKENDS, TORCH_HINT, TRAIN_ENV_HINT, default_backend, require_torch, require_training
from .loop import finetune

__all__ = [
    "BACKENDS",
    "TORCH_HINT",
    "TRAIN_ENV_HINT",
    "default_backend",
    "finetune",
    "require_torch",
    "require_training",
]
