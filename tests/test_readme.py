"""The README a newcomer reads: its commands run as written, its Python blocks run, it installs only what exists.

The reference pages in docs/ are checked in ``tests/test_docs.py``; the README's commands, installs and examples
are checked here, and so is what the Quickstart relies on (the bundled models, the ignored output folders).
"""

from __future__ import annotations

import os
import re
import shlex

import pytest

from .conftest import MODELS, ROOT, bundled_models

README = ROOT / "README.md"
# Every page that tells a user what to install: the README and the install page of the reference.
INSTALL_PAGES = (README, ROOT / "docs" / "install.md")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def command_lines(text: str) -> list[str]:
    """The shell commands of a page's indented blocks, continuation lines joined, comments and prompts dropped."""
    found, pending = [], ""
    for line in text.splitlines():
        if not line.startswith("    "):
            pending = ""
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        found.append(line.removeprefix("$ "))
    return found


def normact_commands(text: str) -> list[list[str]]:
    """The ``normact-onnx`` invocations (any environment's) among a page's commands, as argument lists."""
    found = []
    for line in command_lines(text):
        for part in re.split(r"&&|;", line.split("  #")[0]):
            words = shlex.split(part, comments=True)
            if words and words[0].endswith("normact-onnx"):
                found.append(words[1:])
    return found


def pip_installs(page=README) -> list[str]:
    """What each ``pip install`` in a page's command blocks installs (its last argument)."""
    found = []
    for line in page.read_text().splitlines():
        for cmd in re.findall(r"pip install ([^&#]+)", line) if line.startswith("    ") else ():
            found.append(cmd.split()[-1].strip("\"'"))
    return found


@pytest.mark.parametrize("page", INSTALL_PAGES, ids=lambda p: p.name)
def test_install_instructions_install_only_what_exists(page):
    """Nothing from a package index (normact-onnx is not on PyPI): the checkout, or a wheel of this version."""
    from normact_onnx import __version__

    targets = pip_installs(page)
    assert ".[cpu]" in targets and "dist/" + f"normact_onnx-{__version__}-" in " ".join(targets), targets
    for target in targets:
        assert target.startswith((".", "dist/")), f"{page.name} installs {target!r}, which is not on any index"
        if target.startswith("dist/"):
            assert re.fullmatch(
                rf"dist/normact_onnx-{re.escape(__version__)}-py3-none-manylinux_2_\d+_x86_64\.whl\[\w+(,\w+)*\]",
                target,
            ), target


def test_readme_has_one_example_per_command_and_each_parses():
    """Every subcommand has an example in the README, and every example is a command line the CLI accepts."""
    from normact_onnx.cli import build_parser

    from .conftest import subcommands

    examples = normact_commands(README.read_text())
    assert {words[0] for words in examples if words} >= set(subcommands()), examples
    parser = build_parser()
    for words in examples:
        try:
            parser.parse_args(words)
        except SystemExit as e:  # argparse refuses with exit 2 (and prints why)
            raise AssertionError(f"the README's `normact-onnx {shlex.join(words)}` does not parse") from e


def test_readme_stays_a_short_page_that_names_its_reference():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for page in ("docs/cli.md", "docs/fine-tuning.md", "docs/distributed.md", "docs/install.md", "CONTRIBUTING.md"):
        assert f"]({page})" in text, page
        assert (ROOT / page).is_file(), page


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


def test_bundled_models_come_from_the_manifest_not_from_whatever_lies_in_models():
    stray = MODELS / f"_stray_{os.getpid()}.normact.onnx"  # what the old Quickstart left there
    stray.write_bytes((MODELS / "mlp_relu.torchscript.onnx").read_bytes())
    try:
        assert stray not in bundled_models()
    finally:
        stray.unlink()
    assert len(bundled_models()) == len(list(MODELS.glob("*.onnx")))  # every shipped model is listed


def _quickstart() -> list[str]:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    python3 ")]


def test_quickstart_commands_use_their_own_environments_and_write_outside_models():
    commands = _quickstart()
    assert len(commands) == 2
    venvs = [re.match(r"python3 -m venv (\S+) ", c).group(1) for c in commands]
    assert venvs[0] != venvs[1]
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    first = commands[0]
    model = re.search(r"rewrite (\S+)", first).group(1)
    assert (ROOT / model).is_file()
    out = re.search(r"-o (\S+)", first).group(1)
    assert not out.startswith("models/")
    assert f"{out.split('/')[0]}/" in ignored
    for v in venvs:
        assert any(re.fullmatch(pat.replace("*", ".*").rstrip("/"), v) for pat in ignored if pat.endswith("/")), v
    assert "train-env/" in ignored
