"""The CUDA side of runtime_ops/ that can be checked without a GPU.

* The launch arithmetic of the CUDA kernel (``src/cuda_launch.h``: scalar head,
  16-byte packs, scalar tail; one wave of blocks), by a host C++ program that
  replays the kernel's index plan (``runtime_ops/tests/launch_test.cc``).
* The default architecture set reaches every deployed GPU generation under
  CUDA's compatibility rules.
* A built ``libnormact_cuda.so``: what it says it carries, the driver check
  RegisterCustomOps runs, and that it still registers (CPU kernels) on a
  machine without a driver.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from normact_onnx.runtime import get_library_path, has_library

from .kernel_helpers import full_attrs, node_model, random_input, reference

ROOT = Path(__file__).resolve().parents[1]
OPS = ROOT / "runtime_ops"


def test_launch_arithmetic(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        pytest.skip("no host C++ compiler")
    exe = tmp_path / "launch_test"
    build = subprocess.run(
        [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{OPS / 'src'}",
         str(OPS / "tests" / "launch_test.cc"), "-o", str(exe)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "coverage cases passed" in run.stdout


def _default_architectures() -> list[str]:
    text = (OPS / "CMakeLists.txt").read_text()
    m = re.search(r'set\(NORMACT_DEFAULT_CUDA_ARCHITECTURES "([^"]+)"\)', text)
    assert m, "CMakeLists.txt no longer sets NORMACT_DEFAULT_CUDA_ARCHITECTURES"
    return m.group(1).split(";")


def _runs_on(archs: list[str], cc: int) -> str | None:
    """How a GPU of compute capability ``cc`` (e.g. 86) runs a fatbinary of ``archs``: 'sass', 'ptx' or None.

    CUDA's rules: SASS for sm_XY runs on sm_XZ with Z >= Y (same major); PTX for
    compute_N is JIT-compiled for any cc >= N.  "N" carries both, "N-real" SASS, "N-virtual" PTX.
    """
    sass, ptx = [], []
    for a in archs:
        num, _, kind = a.partition("-")
        if kind in ("", "real"):
            sass.append(int(num))
        if kind in ("", "virtual"):
            ptx.append(int(num))
    if any(s // 10 == cc // 10 and s <= cc for s in sass):
        return "sass"
    return "ptx" if any(p <= cc for p in ptx) else None


# Compute capabilities of GPUs in service that nvcc 13 supports: T4 / RTX 20, A100 / A30, A10 / RTX 30,
# Jetson Orin, L4 / RTX 40, H100 / H200, B200, B300, Jetson Thor, RTX 50, DGX Spark.
DEPLOYED = [75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121]


def test_default_architectures_reach_every_deployed_gpu():
    archs = _default_architectures()
    how = {cc: _runs_on(archs, cc) for cc in DEPLOYED}
    assert None not in how.values(), how
    # Every generation but Thor (sm_110) runs precompiled SASS: no JIT at session start.
    assert [cc for cc, h in how.items() if h != "sass"] == [110], how
    # and anything newer still runs (PTX).
    assert _runs_on(archs, 130) == "ptx"


needs_cuda_library = pytest.mark.skipif(not has_library(cuda=True), reason="libnormact_cuda.so not built (no nvcc)")


def _cuda_lib() -> ctypes.CDLL:
    return ctypes.CDLL(get_library_path(cuda=True))


@needs_cuda_library
def test_cuda_library_names_its_architectures_and_runtime():
    lib = _cuda_lib()
    lib.NormactLibraryInfo.restype = ctypes.c_char_p
    info = json.loads(lib.NormactLibraryInfo())
    assert info["cuda"] is True
    assert info["cuda_runtime"] >= 12000
    archs = info["cuda_architectures"].split(",")
    assert archs and all(re.fullmatch(r"\d+(-real|-virtual)?", a) for a in archs), archs


@needs_cuda_library
def test_cuda_driver_check_names_the_minimum_driver():
    lib = _cuda_lib()
    lib.NormactCudaDriverCheck.restype = ctypes.c_char_p
    lib.NormactCudaDriverCheck.argtypes = [ctypes.c_int]
    lib.NormactLibraryInfo.restype = ctypes.c_char_p
    runtime = json.loads(lib.NormactLibraryInfo())["cuda_runtime"]
    major = runtime // 1000
    # No driver: not an error (the CPU kernels work; no CUDA session can start).
    assert lib.NormactCudaDriverCheck(0) == b""
    # The runtime's own major version, any minor: minor-version compatibility.
    assert lib.NormactCudaDriverCheck(major * 1000) == b""
    assert lib.NormactCudaDriverCheck(major * 1000 + 90) == b""
    old = lib.NormactCudaDriverCheck((major - 1) * 1000 + 40).decode()
    assert f"supports CUDA {major - 1}.4" in old
    assert f"needs a driver for CUDA {major}.x" in old
    minimum = {12: "525.60.13", 13: "580.65.06"}.get(major)
    if minimum:
        assert f"Linux driver >= {minimum}" in old
    assert "\n" not in old


@needs_cuda_library
def test_cuda_library_registers_without_a_driver():
    """On a machine with no (or a new enough) driver the library registers and its CPU kernels run."""
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path(cuda=True))
    attrs = full_attrs("gelu", scale=1.3, shift=0.1)
    sess = ort.InferenceSession(
        node_model("gelu", attrs, np.float32, with_function=False).SerializeToString(),
        so,
        providers=["CPUExecutionProvider"],
    )
    x = random_input((4, 33), np.float32, seed=3)
    np.testing.assert_allclose(sess.run(None, {"X": x})[0], reference("gelu", x, attrs)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA driver")
def test_gpu_check_script_fails_clearly_without_a_gpu(tmp_path):
    """scripts/gpu_check.sh on a machine without a GPU: exit 2 and one line saying so, nothing passed."""
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2, run.stdout + run.stderr
    assert "no NVIDIA GPU here" in run.stderr and "nothing was checked" in run.stderr
    assert "PASS" not in run.stdout
