"""Fine-tuning through ONNX Runtime training (the optional ``[train]`` environment).

Importing this package needs only ``onnx`` and numpy: the graph builder, the
running-statistics rule and the export run anywhere. Everything that drives
``onnxruntime.training`` imports it lazily and, where it is missing, says in one
line how to get it (:func:`require_training`).
"""

from __future__ import annotations

from typing import Any

from ..errors import NormactError

TRAIN_ENV_HINT = (
    "fine-tuning needs onnxruntime-training, which cannot share an environment with onnxruntime: "
    'python3.11 -m venv train-env && train-env/bin/pip install "normact-onnx[train]"'
)


def require_training() -> Any:
    """The ``onnxruntime.training`` module, or a NormactError saying how to get it."""
    try:
        import onnxruntime.training.api
        import onnxruntime.training.artifacts
    except ImportError:
        raise NormactError(TRAIN_ENV_HINT) from None
    import onnxruntime
    import onnxruntime.training as training

    onnxruntime.set_default_logger_severity(3)  # building gradients logs every graph transformer at INFO
    return training


def finetune(*args: Any, **kwargs: Any) -> Any:
    """See :func:`normact_onnx.training.loop.finetune` (imported lazily)."""
    from .loop import finetune as _finetune

    return _finetune(*args, **kwargs)


__all__ = ["TRAIN_ENV_HINT", "finetune", "require_training"]
