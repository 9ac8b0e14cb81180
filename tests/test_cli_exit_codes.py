"""Issue 20, exit codes: 0 ok, 1 compare found a difference, 2 bad input or environment, 3 internal error.

Memory, a full disk, names that are not UTF-8 and unreadable data files are the user's situation, not a bug:
one line and exit 2. Only an unexpected exception is exit 3, with a way to see its traceback.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import MODELS, listing, one_line_error, run_cli, subcommands
from .test_io_files_and_data import SYN

MLP = MODELS / "mlp_relu.torchscript.onnx"


def _limited(args: list[str], cwd: Path, address_space: int) -> subprocess.CompletedProcess:
    """The CLI in a process whose address space is capped, so a huge allocation fails the same way everywhere."""
    return subprocess.run(
        [sys.executable, "-m", "normact_onnx.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space)),
    )


def test_out_of_memory_is_one_line_and_exit_2(tmp_path):
    shutil.copy(MLP, tmp_path / "m.onnx")
    r = _limited(["calibrate", "m.onnx", "--synthetic", "--batch-size", "100000000", "-o", "c.onnx"], tmp_path, 4 << 30)
    one_line_error(r, "out of memory", "--batch-size")
    assert listing(tmp_path) == ["m.onnx"]


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=8k tmpfs /mnt"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and a user namespace to mount a small tmpfs")
def test_a_full_disk_is_one_line_and_exit_2_and_leaves_nothing(tmp_path):
    """A real 8 KiB tmpfs (in a private mount namespace): the 14 KB model does not fit."""
    shutil.copy(MLP, tmp_path / "m.onnx")
    (tmp_path / "full").mkdir()
    script = (
        "mount -t tmpfs -o size=8k tmpfs full && "
        f"{sys.executable} -m normact_onnx.cli rewrite m.onnx -o full/out.onnx; echo rc=$?; ls -A full"
    )
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=tmp_path)
    stdout_lines = r.stdout.strip().splitlines()
    assert stdout_lines[-1] == "rc=2", r.stdout  # ls -A printed nothing: no temporary file left on the full disk
    assert r.stderr.count("\n") == 1 and "full/out.onnx: no space left" in r.stderr, r.stderr


def test_an_object_array_npy_is_one_line_and_exit_2(tmp_path):
    shutil.copy(MLP, tmp_path / "m.onnx")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    one_line_error(run_cli("calibrate", "m.onnx", "--data", "obj.npy", "-o", "c.onnx", cwd=tmp_path), "Python objects")
    assert listing(tmp_path) == ["m.onnx", "obj.npy"]


def test_an_output_name_that_is_not_utf8_is_one_line_and_exit_2(tmp_path):
    shutil.copy(MLP, tmp_path / "m.onnx")
    bad = b"\xffout.onnx".decode("utf-8", "surrogateescape")  # what Python makes of such a name in argv
    r = run_cli("rewrite", "m.onnx", "-o", bad, cwd=tmp_path)
    one_line_error(r, "not valid UTF-8")
    assert listing(tmp_path) == ["m.onnx"]
    # an input with such a name is fine: it is only read
    (tmp_path / "m.onnx").rename(tmp_path / bad)
    r = run_cli("rewrite", bad, "-o", "ok.onnx", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "ok.onnx").exists(), r.stderr


def test_an_internal_error_is_exit_3_with_the_way_to_its_traceback(tmp_path, monkeypatch, capsys):
    """A bug (here: the site finder raising ZeroDivisionError) is not bad input: exit 3, not 2 or 1."""
    from normact_onnx.commands import inspect_cmd

    def broken(model):
        return 1 / 0

    monkeypatch.setattr(inspect_cmd, "inspect", broken)
    shutil.copy(MLP, tmp_path / "m.onnx")
    r = run_cli("inspect", "m.onnx", cwd=tmp_path)
    assert r.returncode == 3
    assert r.stderr.count("\n") == 1 and "internal error" in r.stderr and "--verbose" in r.stderr, r.stderr
    r = run_cli("inspect", "m.onnx", "--verbose", cwd=tmp_path)
    assert r.returncode == 3 and "Traceback" in r.stderr and "ZeroDivisionError" in r.stderr


def test_compare_difference_is_1_and_agreement_0(tmp_path):
    shutil.copy(MLP, tmp_path / "m.onnx")
    assert run_cli("rewrite", "m.onnx", "-o", "n.onnx", cwd=tmp_path).returncode == 0
    assert run_cli("compare", "m.onnx", "m.onnx", *SYN, cwd=tmp_path).returncode == 0
    assert run_cli("compare", "m.onnx", "n.onnx", *SYN, cwd=tmp_path).returncode == 1


@pytest.mark.parametrize("name", [None, *sorted(subcommands())])
def test_every_help_states_the_exit_codes(name):
    from normact_onnx.cli import build_parser

    parser = build_parser() if name is None else subcommands()[name]
    text = " ".join(parser.format_help().split())
    for code in ("0 ok", "1 compare found a difference", "2 bad input", "3 internal error"):
        assert code in text, (name, text[-400:])
