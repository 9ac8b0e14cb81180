"""Which normact_onnx the benchmarks measure: the installed package (with its kernel library).

A fresh checkout without an install falls back to ``src/`` — appended, never put first, so an
installed package (whose kernel library was built by ``pip install``) always wins — and says so.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def ensure_package() -> str:
    """Import normact_onnx (installed first, ``src/`` as the fallback); return where it came from."""
    try:
        import normact_onnx

        installed = getattr(normact_onnx, "__file__", None) is not None  # not a stray namespace folder
    except ImportError:
        installed = False
    if not installed:
        sys.modules.pop("normact_onnx", None)
        sys.path.append(str(SRC))
        import normact_onnx

        print(
            f"note: normact_onnx is not installed; using {SRC} (its kernel library only with NORMACT_LIBRARY_DIR)",
            file=sys.stderr,
        )
    return str(Path(normact_onnx.__file__).parent)


def child_pythonpath() -> str:
    """PYTHONPATH for a benchmark's subprocess: the caller's, with ``src/`` last as the same fallback."""
    return os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(SRC)]))
