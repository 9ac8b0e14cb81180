"""ONNX Runtime as the tool itself uses it (verification, calibration, compare): sessions and known ops.

Every session the tool creates registers the fused-kernel library when it was
built, so what the tool measures is what a deployment with the library runs;
without the library, the model-local function bodies run instead. The factory
itself is :func:`.runtime.session.open_session`, shared with the public
``normact_onnx.InferenceSession``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from .catalogue import NORM_DOMAIN
from .domains import canonical_domain
from .graph import containers
from .runtime.library import kernel_library
from .runtime.session import open_session, require_onnxruntime, session_options


def make_session(
    model: Any,
    providers: list[str] | None = None,
    optimize: bool | str = True,
    threads: int = 0,
    config: Mapping[str, str] | None = None,
) -> Any:
    """The tool's own session on ``model`` (path or bytes): the kernel library registered when it was built.

    ``optimize=False`` (or ``"none"``) turns off graph rewrites that could fuse or erase sites;
    ``optimize="basic"`` keeps constant folding only. A requested provider that is missing or does not
    start is an error, never a silent CPU run (see :func:`.runtime.session.open_session`).
    """
    return open_session(model, providers, session_options(optimize, threads, config), strict_providers=True)


@lru_cache(maxsize=1)
def _known_ops() -> frozenset[tuple[str, str]] | None:
    """(domain, op) of every operator schema the installed onnxruntime registers; None if it cannot say."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state

        schemas = state.get_all_operator_schema()
    except Exception:  # an onnxruntime build without schema introspection: no pre-check
        return None
    return frozenset((canonical_domain(s.domain), s.name) for s in schemas)


def unknown_ops(model: Any) -> list[str]:
    """``domain::op`` of the model's nodes that onnxruntime cannot run: no schema, no model-local function.

    Ops of the ``ai.normact`` domain count as known when the kernel library is built.
    """
    known = _known_ops()
    if known is None:
        return []
    local = {(f.domain, f.name) for f in model.functions}
    library = kernel_library() is not None
    out: dict[str, None] = {}
    for c in containers(model):
        for n in c.nodes:
            domain = canonical_domain(n.domain)
            if (domain, n.op_type) in known or (n.domain, n.op_type) in local or (library and domain == NORM_DOMAIN):
                continue
            out[f"{n.domain or 'ai.onnx'}::{n.op_type}"] = None
    return list(out)


__all__ = ["kernel_library", "make_session", "require_onnxruntime", "unknown_ops"]
