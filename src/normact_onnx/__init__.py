"""normact-onnx: normalized activations for any ONNX model.

Find activation sites in exported models, rewrite them into statically
normalized or ANAct-calibrated form (a portable model-local function that ONNX
Runtime runs as a fused kernel when the library is registered), and deploy.

The public API is imported lazily, so ``import normact_onnx`` stays cheap and
does not need onnxruntime (the training environment has its own).
"""

from __future__ import annotations

import importlib
from typing import Any

# The one place the version is written: pyproject.toml (the wheel's metadata), runtime_ops/CMakeLists.txt (the
# kernel library's NormactLibraryInfo) and the ``normact.version`` entry of every written model read it from here.
__version__ = "0.2.0"

_API = {
    "inspect": "normact_onnx.api",
    "rewrite": "normact_onnx.api",
    "RewriteResult": "normact_onnx.api",
    "SiteSelection": "normact_onnx.selection",
    "OutputOptions": "normact_onnx.writer",
    "MethodOptions": "normact_onnx.policy",
    "DataOptions": "normact_onnx.data.options",
    "fold": "normact_onnx.deploy",
    "compare": "normact_onnx.comparison",
    "calibrate": "normact_onnx.api",
    "InferenceSession": "normact_onnx.runtime",
    "get_library_path": "normact_onnx.runtime",
    "finetune": "normact_onnx.training",
    "NormactError": "normact_onnx.errors",
    "CATALOGUE": "normact_onnx.catalogue",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'normact_onnx' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
