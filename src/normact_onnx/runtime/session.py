"""The one way this package opens an ``onnxruntime.InferenceSession``: with the ``ai.normact`` kernels registered.

A model in the default ``function`` form carries each ``Norm<Act>`` node's
body as a model-local function; registering the kernel library makes ONNX
Runtime run the fused kernel instead (and the body when it is not registered).

:func:`open_session` is the factory; its ``library`` policy says what happens when the library was not built:
``"if-built"`` (the tool's own sessions: verification, calibration, compare; the bodies run) or
``"required"`` (the public :func:`InferenceSession`: a deployment asked for the kernels, so say they are missing);
``"none"`` registers nothing: a probe of what the installed onnxruntime accepts (``io.max_ir_version``), which
also runs under onnxruntime-training, for which the library is not built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import onnx

from ..errors import NormactError
from .library import get_library_path, kernel_library

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
LibraryPolicy = Literal["if-built", "required", "none"]
QUIET, VERBOSE = 4, 2  # ONNX Runtime severities: fatal only (the default: a failed run is raised and said in one line
# by the command; ORT logging it too would print it twice), or warnings and errors too (--verbose)
_severity = QUIET


def set_log_severity(level: int) -> None:
    """What ONNX Runtime may print: sessions opened from now on and its process-wide default logger.

    Its warnings are about the user's model or the machine (providers, unused initializers), not
    results; the command line shows them with ``--verbose`` only.
    """
    global _severity
    _severity = level
    try:
        import onnxruntime as ort
    except ImportError:
        return
    ort.set_default_logger_severity(level)


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or a NormactError saying how to install it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise NormactError('onnxruntime is not installed: pip install "normact-onnx[cpu]" (or [gpu])') from None
    return ort


def _provider_names(providers: Sequence[Any] | None) -> list[str]:
    names = []
    for p in providers or ():
        names.append(p[0] if isinstance(p, tuple | list) else str(p))
    return names


def wants_cuda(providers: Sequence[Any] | None) -> bool:
    """True when the CUDA execution provider is requested and this onnxruntime has it."""
    ort = require_onnxruntime()
    return CUDA_EP in _provider_names(providers) and CUDA_EP in ort.get_available_providers()


def session_options(optimize: bool | str = True, threads: int = 0, config: Mapping[str, str] | None = None) -> Any:
    """Session options that log only fatal errors (a failed run is raised and said once, by the command; warnings
    about the user's own model are not ours to print).

    ``optimize=False`` (or ``"none"``) turns off graph rewrites that could fuse or erase sites;
    ``optimize="basic"`` keeps constant folding only. ``threads``: intra-op threads (0: ORT's default).
    ``config``: session configuration entries (dotted keys such as ``"session.disable_prepacking"``).
    """
    ort = require_onnxruntime()
    so = ort.SessionOptions()
    so.log_severity_level = _severity
    if optimize == "basic":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    elif optimize in (False, "none"):
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    return so


def open_session(
    model: str | bytes | os.PathLike[str] | onnx.ModelProto,
    providers: Sequence[Any] | None = None,
    sess_options: Any = None,
    *,
    library: LibraryPolicy = "if-built",
    strict_providers: bool = False,
    **kw: Any,
) -> Any:
    """An ``InferenceSession`` on ``model`` (path, bytes or ``ModelProto``) with the kernel library registered.

    ``providers`` defaults to the CPU; when CUDA is requested and available the CUDA library (CUDA and CPU
    kernels) is registered, otherwise the CPU one. ``sess_options`` (default: :func:`session_options`) gets
    the library registered on it (a caller's object is modified). ``library``: what a missing library means
    (module docstring). ``strict_providers``: a requested provider this onnxruntime lacks, or one that does
    not start (ORT would fall back to the CPU silently), is a NormactError instead.
    """
    ort = require_onnxruntime()
    providers = list(providers) if providers else [CPU_EP]
    so = sess_options if sess_options is not None else session_options()
    cuda = wants_cuda(providers)
    if library == "none":
        path = None
    else:
        path = get_library_path(cuda=cuda) if library == "required" else kernel_library(cuda=cuda)
    if path:
        so.register_custom_ops_library(path)
    names = _provider_names(providers)
    if strict_providers:
        missing = [p for p in names if p not in ort.get_available_providers()]
        if missing:
            raise NormactError(
                f"{missing[0]} is not available in this onnxruntime (it has "
                f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu for CUDA, or run without --cuda"
            )
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    sess = ort.InferenceSession(model, sess_options=so, providers=providers, **kw)
    if strict_providers:
        inactive = [p for p in names if p != CPU_EP and p not in sess.get_providers()]
        if inactive:
            raise NormactError(f"{inactive[0]} did not start (no usable device?); refusing to run on the CPU instead")
    return sess


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
    fatal errors only.
    Raises :class:`~normact_onnx.runtime.library.KernelLibraryNotFound` when the
    library was not built.
    """
    return open_session(model, providers, sess_options, library="required", **kw)
