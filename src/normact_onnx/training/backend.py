"""The ``onnxruntime.training`` module of the optional ``[train]`` environment, or how to get it.

Importing anything in :mod:`normact_onnx.training` needs only ``onnx`` and numpy; what drives
``onnxruntime.training`` asks for it here, at the moment it is needed.
"""

from __future__ import annotations

from typing import Any

from ..errors import NormactError

TRAIN_ENV_HINT = (
    "fine-tuning needs onnxruntime-training, which cannot share an environment with onnxruntime; "
    "from the repository's folder: scripts/make_train_env.sh train-env && train-env/bin/normact-onnx finetune …"
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
