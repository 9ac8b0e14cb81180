"""ONNX Runtime sessions as the tool itself uses them (verification, calibration, compare).

Every session the tool creates registers the fused-kernel library when it was
built, so what the tool measures is what a deployment with the library runs;
without the library, the model-local function bodies run instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from .errors import NormactError

STANDARD_DOMAINS = ("", "ai.onnx")


def require_onnxruntime() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise NormactError('onnxruntime is not installed: pip install "normact-onnx[cpu]" (or [gpu])') from None
    return ort


def kernel_library(cuda: bool = False) -> str | None:
    """Path of the fused-kernel library, or None when it was not built."""
    try:
        from .runtime.library import get_library_path
    except ImportError:
        return None
    try:
        return get_library_path(cuda=cuda)
    except NormactError:
        return None


def make_session(
    model: Any,
    providers: list[str] | None = None,
    optimize: bool | str = True,
    threads: int = 0,
    config: Mapping[str, str] | None = None,
) -> Any:
    """An ORT session on ``model`` (path or bytes) with the kernel library registered when available.

    ``optimize=False`` (or ``"none"``) turns off graph rewrites that could fuse or erase sites;
    ``optimize="basic"`` keeps constant folding only (calibration: every site's
    statistics stay where they were put). ``config``: session config entries (dotted keys such as
    ``"session.disable_prepacking"``).
    """
    ort = require_onnxruntime()
    so = ort.SessionOptions()
    so.log_severity_level = 3  # warnings about the user's own model are not ours to print
    if optimize == "basic":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    elif optimize in (False, "none"):
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    providers = providers or ["CPUExecutionProvider"]
    lib = kernel_library(cuda="CUDAExecutionProvider" in providers)
    if lib:
        so.register_custom_ops_library(lib)
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise NormactError(
            f"{missing[0]} is not available in this onnxruntime (it has {', '.join(ort.get_available_providers())}); "
            "install onnxruntime-gpu for CUDA, or run without --cuda"
        )
    sess = ort.InferenceSession(model, sess_options=so, providers=providers)
    inactive = [p for p in providers if p != "CPUExecutionProvider" and p not in sess.get_providers()]
    if inactive:  # ORT falls back to the CPU silently when a device provider cannot start
        raise NormactError(f"{inactive[0]} did not start (no usable device?); refusing to run on the CPU instead")
    return sess


@lru_cache(maxsize=1)
def _known_ops() -> frozenset[tuple[str, str]] | None:
    """(domain, op) of every operator schema the installed onnxruntime registers; None if it cannot say."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state

        schemas = state.get_all_operator_schema()
    except Exception:  # an onnxruntime build without schema introspection: no pre-check
        return None
    return frozenset(("" if s.domain in STANDARD_DOMAINS else s.domain, s.name) for s in schemas)


def unknown_ops(model: Any) -> list[str]:
    """``domain::op`` of the model's nodes that onnxruntime cannot run: no schema, no model-local function.

    Ops of the ``ai.normact`` domain count as known when the kernel library is built.
    """
    from .catalogue import NORM_DOMAIN
    from .graph import containers

    known = _known_ops()
    if known is None:
        return []
    local = {(f.domain, f.name) for f in model.functions}
    library = kernel_library() is not None
    out: dict[str, None] = {}
    for c in containers(model):
        for n in c.nodes:
            domain = "" if n.domain in STANDARD_DOMAINS else n.domain
            if (domain, n.op_type) in known or (n.domain, n.op_type) in local or (library and domain == NORM_DOMAIN):
                continue
            out[f"{n.domain or 'ai.onnx'}::{n.op_type}"] = None
    return list(out)
