"""Which fine-tuning backend runs, and the one line that says how to get a missing one.

Two backends train the same graph (:mod:`.trainer`): ``torch`` (PyTorch in the main environment, the ``[torch]``
extra) and ``ort`` (onnxruntime-training, its own ``[train]`` environment: it installs the same module as
onnxruntime). Importing anything in :mod:`normact_onnx.training` needs only ``onnx`` and numpy; what drives either
runtime asks for it here, at the moment it is needed.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal, get_args

from ..errors import NormactError
from . import torch_ops  # imports torch only when asked (torch_ops.load)

Backend = Literal["torch", "ort"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)

TRAIN_ENV_HINT = (
    "fine-tuning needs onnxruntime-training, which cannot share an environment with onnxruntime; "
    "from the repository's folder: scripts/make_train_env.sh train-env && train-env/bin/normact-onnx finetune …"
)
TORCH_HINT = 'the torch backend needs PyTorch; from the repository\'s folder: pip install ".[cpu,torch]"'


def has_ort_training() -> bool:
    """Whether this environment is an onnxruntime-training one (found without importing it)."""
    try:
        return importlib.util.find_spec("onnxruntime.training") is not None
    except (ImportError, ValueError):
        return False


def has_torch() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def default_backend() -> Backend:
    """``ort`` inside an onnxruntime-training environment, else ``torch`` (the one-environment path)."""
    return "ort" if has_ort_training() else "torch"


def resolve_backend(backend: str | None) -> Backend:
    """The backend to run (``None``/``auto``: :func:`default_backend`), checked to be installed."""
    chosen = default_backend() if backend in (None, "auto") else backend
    if chosen == "ort":
        require_training()
        return "ort"
    if chosen == "torch":
        require_torch()
        return "torch"
    raise NormactError(f"unknown --backend {backend!r}; choose one of {', '.join(BACKENDS)}")


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


def require_torch() -> Any:
    """The ``torch`` module (bound for :mod:`.torch_ops`), or a NormactError naming the install command."""
    try:
        return torch_ops.load()
    except ImportError:
        raise NormactError(TORCH_HINT) from None
