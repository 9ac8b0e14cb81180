"""The benchmark scripts measure what a user installed, and say what they could not measure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from .conftest import ROOT


def test_bench_latency_uses_the_installed_package_and_says_when_the_kernel_variant_is_skipped(tmp_path):
    import normact_onnx
    from normact_onnx.runtime import has_library

    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_latency.py"), "--models", "mlp", "--rounds", "2",
         "--inner", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )  # fmt: skip
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["package"]) == Path(normact_onnx.__file__).parent
    (result,) = out["results"]
    if has_library():
        assert "kernel" in result["ms"]
    else:
        assert "kernel" in result["skipped"] and "kernel variant skipped" in proc.stderr
    assert np.isfinite(result["ms"]["folded"])
