"""The command line as a new user meets it: kind aliases, float16 models, bad models, progress, help, pipes.

Each test runs the real command in a subprocess and checks the exit code, the one stderr line and
the files, as a user would see them.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import onnx
import pytest
from onnx import helper

from .conftest import MODELS, ROOT, bundled_models, fvi, subcommands, tiny_model, to_low_precision

SRC = ROOT / "src" / "normact_onnx"


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("normact-onnx: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


def silu_chain(path: Path, layers: int) -> Path:
    nodes, x = [], "x"
    for i in range(layers):
        nodes += [
            helper.make_node("Sigmoid", [x], [f"s{i}"], name=f"sig{i}"),
            helper.make_node("Mul", [x, f"s{i}"], [f"a{i}"], name=f"silu{i}"),
        ]
        x = f"a{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    onnx.save(tiny_model(nodes, [fvi("x", [2, 4])], [fvi("y", [2, 4])]), str(path))
    return path


# ---------------------------------------------------------------- matching: fp16, aliases, bad input


@pytest.mark.parametrize("file", ["transformer_gelu.torchscript.onnx", "transformer_gelu_tanh.torchscript.onnx"])
def test_explain_lists_the_decomposed_gelu_of_a_float16_model(cli, tmp_path, file):
    path = tmp_path / "half.onnx"
    onnx.save(to_low_precision(onnx.load(str(MODELS / file))), str(path))
    proc = cli("rewrite", path, "--explain")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\S+\s+gelu(_tanh)?\s+main\s+rewritten", proc.stdout, re.M), proc.stdout
    assert not list(tmp_path.glob("*.normact.onnx"))


def test_rewrite_and_fold_a_float16_model_verify_at_its_own_precision(cli, tmp_path):
    path = tmp_path / "half.onnx"
    onnx.save(to_low_precision(onnx.load(str(MODELS / "hardswish_net.torchscript.onnx"))), str(path))
    proc = cli("rewrite", path, "-o", tmp_path / "n.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "4 " in proc.stdout and "hard_swish" in proc.stdout
    proc = cli("fold", tmp_path / "n.onnx", "-o", tmp_path / "f.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "4 folded, 0 kept" in proc.stdout
    assert (tmp_path / "f.onnx").exists()


@pytest.mark.parametrize(
    ("file", "alias", "kind"),
    [
        ("silu_net.torchscript.onnx", "swish", "silu"),
        ("mobilenet_like.torchscript.onnx", "relu6", "clip"),
        ("mobilenet_like.torchscript.onnx", "hard-swish", "hard_swish"),
        ("mobilenet_like.torchscript.onnx", "HardSwish", "hard_swish"),
    ],
)
def test_include_accepts_the_common_aliases(cli, file, alias, kind):
    proc = cli("rewrite", MODELS / file, "--include", alias, "--explain")
    assert proc.returncode == 0, proc.stderr
    actions = {
        m.group(1): m.group(2) for m in re.finditer(r"^\S+\s+(\w+)\s+main\s+(rewritten|skipped)", proc.stdout, re.M)
    }
    assert actions.get(kind) == "rewritten", proc.stdout
    assert all(a == "skipped" for k, a in actions.items() if k != kind), actions


def test_exclude_accepts_aliases_and_unknown_kinds_list_kinds_and_aliases(cli):
    proc = cli("rewrite", MODELS / "silu_net.torchscript.onnx", "--exclude", "swish", "--explain")
    assert proc.returncode == 0, proc.stderr
    assert not re.search(r"^\S+\s+silu\s+main\s+rewritten", proc.stdout, re.M)
    proc = cli("rewrite", MODELS / "silu_net.torchscript.onnx", "--include", "swishy")
    line = one_error_line(proc)
    assert proc.returncode == 2
    assert "swishy" in line and "silu" in line and "swish=silu" in line and "relu6=clip" in line


@pytest.fixture
def failing_checker(tmp_path) -> Path:
    """Loads, but fails the ONNX checker: a node reads a value nothing defines."""
    m = tiny_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "ghost"], ["y"])],
        [fvi("x", [2])],
        [fvi("y", [2])],
    )
    onnx.save(m, str(tmp_path / "bad.onnx"))
    return tmp_path / "bad.onnx"


@pytest.mark.parametrize("command", ["inspect", "fold", "rewrite"])
def test_a_model_failing_the_checker_is_refused(cli, failing_checker, command):
    proc = cli(command, failing_checker)
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "bad.onnx: fails the ONNX checker" in line and "ghost" in line
    assert sorted(p.name for p in failing_checker.parent.iterdir()) == ["bad.onnx"]


def test_an_unknown_custom_op_is_blamed_on_the_input_by_name(cli, tmp_path):
    m = tiny_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Frob", ["r"], ["f"], domain="com.acme"),
            helper.make_node("Relu", ["f"], ["y"]),
        ],
        [fvi("x", [2])],
        [fvi("y", [2])],
    )
    m.opset_import.append(helper.make_opsetid("com.acme", 1))
    onnx.save(m, str(tmp_path / "custom.onnx"))
    proc = cli("rewrite", tmp_path / "custom.onnx", "-o", tmp_path / "out.onnx")
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "custom.onnx: the input model uses op com.acme::Frob" in line, line
    assert "the result" not in line.split("uses op")[0] and ".tmp" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom.onnx"]
    # unverified, the rewrite itself works: the custom op is carried over untouched
    proc = cli("rewrite", tmp_path / "custom.onnx", "-o", tmp_path / "out.onnx", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert [n.op_type for n in onnx.load(str(tmp_path / "out.onnx")).graph.node].count("Frob") == 1


# ---------------------------------------------------------------- output and UX


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path):
    model = silu_chain(tmp_path / "many.onnx", 3000)  # ~500 kB of table: more than a pipe holds
    proc = subprocess.Popen(
        [sys.executable, "-m", "normact_onnx", "inspect", str(model)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.readline().startswith(b"name")
    proc.stdout.close()  # what `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141  # 128 + SIGPIPE, what a shell reports
    assert err == ""


def test_a_reader_gone_before_a_short_output_is_flushed_is_quiet_too():
    proc = subprocess.Popen(
        [sys.executable, "-m", "normact_onnx", "inspect", str(MODELS / "mobilenet_like.torchscript.onnx")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # `| true`: the reader exits before reading anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


def _with_terminal_stderr(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal (stdout a pipe); its exit code and what the terminal got."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen(
        [sys.executable, "-m", "normact_onnx", *args], stdout=subprocess.PIPE, stderr=slave, cwd=cwd
    )
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.stdout.read()
    rc = proc.wait(timeout=300)
    os.close(master)
    return rc, b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize(
    ("args", "label"),
    [
        # 300 statically normalized SiLUs in a row overflow (the whole-model check says so): stages without it
        (["rewrite", "{m}", "-o", "out.onnx", "--no-verify"], "rewrite"),
        (["compare", "{m}", "{m}", "--synthetic", "--batches", "3"], "compare"),
    ],
)
def test_progress_on_a_terminal_and_quiet_with_quiet(tmp_path, args, label):
    model = silu_chain(tmp_path / "m.onnx", 300)
    argv = [a.format(m=model) for a in args]
    rc, shown = _with_terminal_stderr(argv, tmp_path)
    assert rc == 0, shown
    assert label in shown and ("stage" in shown or "batch" in shown), shown
    rc, shown = _with_terminal_stderr([*argv, "--quiet"], tmp_path)
    # no progress; notes and warnings ("looks pretrained") still print: --quiet silences progress only
    assert rc == 0 and all(line.startswith("note: ") for line in shown.splitlines()), shown
    assert "stage" not in shown and "batch" not in shown, shown


def test_fold_shows_progress_on_a_terminal(tmp_path, cli):
    assert cli("rewrite", MODELS / "mlp_relu.torchscript.onnx", "-o", tmp_path / "n.onnx").returncode == 0
    rc, shown = _with_terminal_stderr(["fold", str(tmp_path / "n.onnx"), "-o", "f.onnx"], tmp_path)
    assert rc == 0 and "fold" in shown and "stage" in shown, shown


def test_no_progress_bar_when_stderr_is_not_a_terminal(cli, tmp_path):
    proc = cli("rewrite", MODELS / "mobilenet_like.torchscript.onnx", "-o", tmp_path / "n.onnx")
    assert proc.returncode == 0 and proc.stderr == ""
    proc = cli("compare", MODELS / "mobilenet_like.torchscript.onnx", tmp_path / "n.onnx", "--synthetic")
    assert proc.stderr == ""  # no bar, and no ORT warnings either


def test_no_hand_made_progress_bars_left():
    offenders = [str(p.relative_to(ROOT)) for p in SRC.rglob("*.py") if "class Progress" in p.read_text()]
    assert offenders == []


CLIP_MODELS = [p for p in bundled_models() if p.name.startswith(("mobilenet_like", "hardswish_net"))]


@pytest.mark.parametrize("path", CLIP_MODELS, ids=lambda p: p.name)
def test_rewritten_clip_models_load_without_ort_warnings(path, tmp_path, cli):
    out = tmp_path / "n.onnx"
    proc = cli("rewrite", path, "-o", out)
    assert proc.returncode == 0, proc.stderr
    m = onnx.load(str(out))
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    dangling = [n.output[0] for n in m.graph.node if n.op_type == "Constant" and n.output[0] not in used]
    assert dangling == []
    # a plain ORT session at its default log level: nothing to warn about ("Removing initializer …")
    code = "import onnxruntime as ort, sys; ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])"
    load = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert load.returncode == 0 and "Removing initializer" not in load.stderr, load.stderr


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_option_has_a_help_string(name):
    p = subcommands()[name]
    options = [a for a in p._actions if not isinstance(a, argparse._HelpAction)]
    missing = [a.option_strings or [a.dest] for a in options if not a.help]
    assert missing == [], f"{name}: {missing}"
    assert "--help" in p.format_help()  # every help string formats (a stray % would raise here)


def test_python_dash_m_runs_the_cli(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "normact_onnx", "inspect", str(MODELS / "mlp_relu.torchscript.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 sites" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "normact_onnx", "nosuch"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
