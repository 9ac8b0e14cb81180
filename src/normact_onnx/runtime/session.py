"""An ``onnxruntime.InferenceSession`` with the ``ai.normact`` kernels registered.

A model in the default ``function`` form carries each ``Norm<Act>`` node's
body as a model-local function; registering the kernel library makes ONNX
Runtime run the fused kernel instead (and the body when it is not registered).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import onnx

from .library import get_library_path

CUDA_EP = "CUDAExecutionProvider"


def _provider_names(providers: Sequence[Any] | None) -> list[str]:
    names = []
    for p in providers or ():
        names.append(p[0] if isinstance(p, tuple | list) else str(p))
    return names


def wants_cuda(providers: Sequence[Any] | None) -> bool:
    """True when the CUDA execution provider is requested and this onnxruntime has it."""
    import onnxruntime as ort

    return CUDA_EP in _provider_names(providers) and CUDA_EP in ort.get_available_providers()


def InferenceSession(
    model: str | bytes | os.PathLike[str] | onnx.ModelProto,
    providers: Sequence[Any] | None = None,
    sess_options: Any = None,
    **kw: Any,
) -> Any:
    """Create an ``onnxruntime.InferenceSession`` with the kernel library registered.

    ``model`` is a path, serialized bytes or a ``ModelProto``.  ``providers``
    defaults to ``["CPUExecutionProvider"]``; when ``CUDAExecutionProvider`` is
    requested and available the CUDA library (CUDA + CPU kernels) is used,
    otherwise the CPU one.  The library is registered on ``sess_options`` itself
    when one is given (the caller's object is modified); without one, ORT logs
    errors only.
    Raises :class:`~normact_onnx.runtime.library.KernelLibraryNotFound` when the
    library was not built.
    """
    import onnxruntime as ort

    if providers is None:
        providers = ["CPUExecutionProvider"]
    cuda = wants_cuda(providers)
    path = get_library_path(cuda=cuda)
    if sess_options is not None:
        so = sess_options
    else:
        so = ort.SessionOptions()
        so.log_severity_level = 3  # ORT's load-time warnings ("Removing initializer …") are noise here
    so.register_custom_ops_library(path)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    return ort.InferenceSession(model, sess_options=so, providers=list(providers), **kw)
