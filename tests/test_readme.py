"""The README's Python code blocks run as written (on a bundled model copied to ``model.onnx``)."""

from __future__ import annotations

import re

import pytest

from .conftest import MODELS, ROOT


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def pip_installs() -> list[str]:
    """What each ``pip install`` in the README's command blocks installs (its last argument)."""
    found = []
    for line in (ROOT / "README.md").read_text().splitlines():
        for cmd in re.findall(r"pip install ([^&#]+)", line) if line.startswith("    ") else ():
            found.append(cmd.split()[-1].strip("\"'"))
    return found


def test_readme_installs_only_what_exists():
    """Nothing from a package index (normact-onnx is not on PyPI): the checkout, or a wheel of this version."""
    from normact_onnx import __version__

    targets = pip_installs()
    assert ".[cpu]" in targets and "dist/" + f"normact_onnx-{__version__}-" in " ".join(targets), targets
    for target in targets:
        assert target.startswith((".", "dist/")), f"README installs {target!r}, which is not on any index"
        if target.startswith("dist/"):
            assert re.fullmatch(
                rf"dist/normact_onnx-{re.escape(__version__)}-py3-none-manylinux_2_\d+_x86_64\.whl\[\w+(,\w+)*\]",
                target,
            ), target


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 3


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    from normact_onnx.runtime import has_library

    if not has_library():
        pytest.skip("the kernel snippet needs the kernel library (built by pip install)")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.onnx").write_bytes((MODELS / "mobilenet_like.torchscript.onnx").read_bytes())
    # the sections are read in any order: the kernel snippet loads what the Python API section writes
    blocks = sorted(python_blocks(), key=lambda b: 'InferenceSession("model.normact.onnx")' in b)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # the README's own examples
    for name in ("samples.npz", "model.normact.onnx", "model.anact.onnx", "deploy.onnx"):
        assert (tmp_path / name).is_file(), name
    assert namespace["report"].passed
