"""Release: one version everywhere, the changelog, ``--version``, and what the CMake project installs.

The wheel itself is built and tested as a user gets it by scripts/build_release.sh and scripts/test_wheel.sh
(in .ci/run); these are the parts that can be checked from a checkout in seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import normact_onnx

from .conftest import ROOT

VERSION_LINE = re.compile(r'^__version__ = "(\d+\.\d+\.\d+)"$', re.M)


def test_the_version_is_written_in_one_place():
    """pyproject.toml and CMake read it from the package's __init__.py; nothing else spells it."""
    init = ROOT / "src" / "normact_onnx" / "__init__.py"
    m = VERSION_LINE.search(init.read_text())
    assert m and m.group(1) == normact_onnx.__version__
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    provider = project["tool"]["scikit-build"]["metadata"]["version"]
    assert provider == {"provider": "scikit_build_core.metadata.regex", "input": "src/normact_onnx/__init__.py"}
    cmake = (ROOT / "runtime_ops" / "CMakeLists.txt").read_text()
    assert "src/normact_onnx/__init__.py" in cmake and "project(normact_ops VERSION ${NORMACT_VERSION}" in cmake
    assert normact_onnx.__version__ not in cmake


def test_installed_metadata_has_the_package_version():
    dist = metadata.distribution("normact-onnx")
    files = [str(f) for f in dist.files or ()]
    if "normact_onnx/__init__.py" not in files:
        pytest.skip("a development install (.pth or editable): its metadata is from when it was installed")
    assert dist.version == normact_onnx.__version__


def test_changelog_lists_this_release():
    text = (ROOT / "CHANGELOG.md").read_text()
    heads = re.findall(r"^## (\d+\.\d+\.\d+)\b", text, re.M)
    assert heads and heads[0] == normact_onnx.__version__, heads  # the newest release first
    assert "0.1.0" in heads


def test_version_names_the_kernel_libraries():
    from normact_onnx.runtime import has_library

    out = subprocess.run(
        [sys.executable, "-m", "normact_onnx.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"normact-onnx {normact_onnx.__version__}"
    if has_library():
        assert lines[1].startswith("kernels: CPU") and "libnormact_cpu.so" in lines[1], lines
        assert "rebuild" not in out.stdout, "the loaded library was built for another version"
    else:
        assert lines[1].startswith("kernels: unavailable"), lines


def test_inspect_ends_with_the_kernel_libraries(tmp_path):
    """What a rewritten model will run with here, after the table (and after 'no activation sites found')."""
    import onnx
    from onnx import helper

    from normact_onnx.runtime import kernel_status

    from .conftest import MODELS, fvi, tiny_model

    plain = tmp_path / "add.onnx"
    add = helper.make_node("Add", ["X", "X"], ["Y"])
    onnx.save(tiny_model([add], [fvi("X", [2])], [fvi("Y", [2])]), plain)
    for model, first in ((MODELS / "mobilenet_like.torchscript.onnx", "name"), (plain, "no activation sites found")):
        out = subprocess.run(
            [sys.executable, "-m", "normact_onnx", "inspect", str(model)], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].startswith(first), lines[0]
        assert lines[-len(kernel_status()) :] == kernel_status()


def test_version_into_a_closed_pipe_exits_quietly():
    proc = subprocess.Popen(
        [sys.executable, "-m", "normact_onnx", "--version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # `| true`: the reader exits before reading anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


# ------------------------------------------------------------------------------ CMake: what is installed


def _ort_headers() -> Path | None:
    """Real ONNX Runtime headers: $ONNXRUNTIME_INCLUDE_DIR, or those a `pip install .` unpacked into build/."""
    env = os.environ.get("ONNXRUNTIME_INCLUDE_DIR")
    candidates = [Path(env)] if env else []
    candidates += sorted((ROOT / "build").glob("*/ort_headers/include"))
    return next((d for d in candidates if (d / "onnxruntime_c_api.h").is_file()), None)


def _configure(build: Path, *defines: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not on PATH")
    clean = {k: v for k, v in os.environ.items() if k not in ("ONNXRUNTIME_INCLUDE_DIR", "NORMACT_FETCH_HEADERS")}
    return subprocess.run(
        ["cmake", "-S", str(ROOT / "runtime_ops"), "-B", str(build), *defines],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=300,
    )


def _installed(build: Path) -> set[str]:
    """The library names the install step (cmake_install.cmake, what scikit-build-core runs) would copy."""
    return set(re.findall(r"libnormact_\w+\.so", (build / "cmake_install.cmake").read_text()))


def test_install_rule_names_only_the_libraries_built(tmp_path):
    headers = _ort_headers()
    if headers is None:
        pytest.skip("no ONNX Runtime headers here (set ONNXRUNTIME_INCLUDE_DIR)")
    out = _configure(tmp_path / "cpu", f"-DONNXRUNTIME_INCLUDE_DIR={headers}", "-DNORMACT_CUDA=OFF")
    assert out.returncode == 0, out.stderr
    assert _installed(tmp_path / "cpu") == {"libnormact_cpu.so"}


def test_no_headers_configures_a_pure_python_install(tmp_path):
    """No headers and fetching off: a warning and nothing to install, never a failed build."""
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"ONNXRUNTIME_INCLUDE_DIR": str(empty), "NORMACT_FETCH_HEADERS": "0"}
    out = _configure(tmp_path / "none", env=env)
    assert out.returncode == 0, out.stderr
    assert "pure-Python mode" in out.stderr and "has no onnxruntime_c_api.h" in out.stderr
    assert _installed(tmp_path / "none") == set()


def test_no_headers_fails_a_release_build(tmp_path):
    """A release (NORMACT_REQUIRE_KERNELS=ON) never ships a wheel without its kernels."""
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"ONNXRUNTIME_INCLUDE_DIR": str(empty), "NORMACT_FETCH_HEADERS": "0"}
    out = _configure(tmp_path / "req", "-DNORMACT_REQUIRE_KERNELS=ON", env=env)
    assert out.returncode != 0
    assert "NORMACT_REQUIRE_KERNELS is ON" in out.stderr and "no ONNX Runtime headers found" in out.stderr


def test_no_compiler_configures_a_pure_python_install(tmp_path):
    headers = _ort_headers()
    if headers is None:
        pytest.skip("no ONNX Runtime headers here (set ONNXRUNTIME_INCLUDE_DIR)")
    missing = str(tmp_path / "no-such-compiler")
    out = _configure(tmp_path / "nocxx", f"-DONNXRUNTIME_INCLUDE_DIR={headers}", env={"CXX": missing, "CC": missing})
    assert out.returncode == 0, out.stderr
    assert "no C++ compiler found" in out.stderr and "pure-Python mode" in out.stderr
    assert _installed(tmp_path / "nocxx") == set()
