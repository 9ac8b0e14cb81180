"""Shared fixtures: the bundled models, onnx's real test models, tiny graph builders, the one CLI runner."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def bundled_models() -> list[Path]:
    """The models the repository ships, as models/manifest.json lists them (not whatever else lies in models/)."""
    manifest = json.loads((MODELS / "manifest.json").read_text())
    return sorted(MODELS / entry["file"] for entry in manifest["models"])


def light_models() -> list[Path]:
    return sorted(LIGHT.glob("*.onnx"))


def random_feeds(model_path: str | Path, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching a model's declared inputs (symbolic dims become ``batch``)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else batch for d in i.shape]
        if i.type == "tensor(float)":
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        elif i.type == "tensor(int64)":
            feeds[i.name] = rng.integers(0, 100, shape).astype(np.int64)
        elif i.type == "tensor(bool)":
            feeds[i.name] = np.ones(shape, dtype=bool)
        else:
            raise AssertionError(f"unhandled input type {i.type}")
    return feeds


def run_model(model: str | Path | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def calibrate_copy(inst: Any, base: str | None, per_channel: bool, batches: list[dict]) -> tuple[list[dict], Any]:
    """An instrumented copy run over ``batches`` as ``collect`` runs it: each batch's statistics outputs, and the
    merged statistics (for the tests that compare two copies bit for bit)."""
    from normact_onnx.calibration.run import calibration_session, empty_stats, fold, run_batch
    from normact_onnx.io import clamp_ir

    clamp_ir(inst.model)
    sess = calibration_session(inst.model, base)
    stats = empty_stats(inst, per_channel, "fp")
    runs = []
    for i, feed in enumerate(batches):
        values = run_batch(sess, inst, feed, f"batch {i}")
        runs.append(values)
        fold(stats, inst, values, f"batch {i}")
    return runs, stats


def assert_same_statistics(a: tuple[Any, list[dict], Any], b: tuple[Any, list[dict], Any]) -> None:
    """Two instrumented copies of one model (``(inst, runs, stats)`` from :func:`calibrate_copy`) measured the same
    bits: every statistics output of every batch, and the merged moments of every site."""
    (ia, runs_a, stats_a), (ib, runs_b, stats_b) = a, b
    assert [p.site.output for p in ia.probes] == [p.site.output for p in ib.probes]
    for ra, rb in zip(runs_a, runs_b):
        for pa, pb in zip(ia.probes, ib.probes):
            for stat in pa.outputs:
                np.testing.assert_array_equal(
                    ra[pa.outputs[stat]], rb[pb.outputs[stat]], err_msg=f"{pa.site.name} {stat}"
                )
    for key, sa in stats_a.sites.items():
        sb = stats_b.sites[key]
        for part in ("x", "f"):
            for name in ("n", "mean", "m2"):
                np.testing.assert_array_equal(getattr(getattr(sa, part), name), getattr(getattr(sb, part), name))
        np.testing.assert_array_equal(sa.d2, sb.d2)


def tiny_model(nodes, inputs, outputs, initializers=(), opset: int = 17, ir: int = 8, functions=()):
    """A model from helper parts with a deliberate IR version (onnx ≥ 1.23 would stamp 14)."""
    graph = helper.make_graph(list(nodes), "tiny", list(inputs), list(outputs), list(initializers))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], functions=list(functions))
    m.ir_version = ir
    return m


def tanh_sigmoid_mlp(width: int, rng: np.random.Generator) -> onnx.ModelProto:
    """x → Tanh → MatMul → Sigmoid → MatMul → y: two hidden sites of different kinds (λ differs by kind and rule)."""
    w1 = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    w2 = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes = [
        helper.make_node("Tanh", ["x"], ["t"], name="tanh"),
        helper.make_node("MatMul", ["t", "w1"], ["h"]),
        helper.make_node("Sigmoid", ["h"], ["s"], name="sigmoid"),
        helper.make_node("MatMul", ["s", "w2"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    return tiny_model(nodes, [fvi("x", ["N", width])], [fvi("y", ["N", width])], inits)


def fvi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def const(name: str, value) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def run_cli(
    *args: object, cwd: Path, process: bool = False, umask: int | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``normact-onnx ARGS`` run in ``cwd``: exit code, stdout and stderr, as a user's shell would see them.

    By default the command's ``main`` runs in this process (a new interpreter costs a second or two of imports per
    call, and the suite makes hundreds of calls). Its output is captured at file descriptors 1 and 2, not only
    ``sys.stdout``/``sys.stderr``, so what native code prints (ONNX Runtime's warnings) is seen as a user sees it.
    A real process runs where the process is the point: ``process=True``, an explicit ``env`` (what the program
    inherits), and every ``--ray`` run (Ray's native threads and its redirection of descriptor 2 belong to a
    program of their own). ``umask`` applies to either.
    """
    argv = [str(a) for a in args]
    if process or env is not None or "--ray" in argv:
        return subprocess.run(
            [sys.executable, "-m", "normact_onnx.cli", *argv],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            timeout=600,
            preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
        )
    return _run_main(argv, cwd, umask)


def _run_main(argv: list[str], cwd: Path, umask: int | None) -> subprocess.CompletedProcess:
    """``cli.main(argv)`` with descriptors 1 and 2 pointed at files, the directory and umask set for the call."""
    from normact_onnx.cli import main

    def stream(fd: int, like: Any) -> io.TextIOWrapper:  # the interpreter's own encoding rules for that stream
        encoding, errors = getattr(like, "encoding", None) or "utf-8", getattr(like, "errors", None) or "strict"
        return open(fd, "w", encoding=encoding, errors=errors, closefd=False)

    # The program's notes go through the "normact_onnx" logger with no handler of its own: logging's last-resort
    # handler prints them on stderr. Under pytest the root logger has capture handlers, which would take them.
    log = logging.getLogger("normact_onnx")
    propagate, log.propagate = log.propagate, False
    sys.stdout.flush()
    sys.stderr.flush()
    here, saved = os.getcwd(), (os.dup(1), os.dup(2))
    old_umask = os.umask(umask) if umask is not None else None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        stdout, stderr = stream(1, sys.__stdout__), stream(2, sys.__stderr__)
        try:
            os.chdir(cwd)
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                try:
                    code = main(argv)
                except SystemExit as e:  # argparse: --help, --version, a usage error
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        finally:
            for s in (stdout, stderr):
                with contextlib.suppress(OSError, ValueError):
                    s.close()  # flushes; the descriptor stays open (closefd=False)
            os.chdir(here)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            if old_umask is not None:
                os.umask(old_umask)
            log.propagate = propagate
        out.seek(0)
        err.seek(0)
        text = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
    return subprocess.CompletedProcess(["normact-onnx", *argv], code, *text)


@pytest.fixture
def cli(tmp_path):
    """:func:`run_cli` with the test's ``tmp_path`` as the default working directory."""

    def run(*args: object, cwd: Path | None = None, **how: Any) -> subprocess.CompletedProcess:
        return run_cli(*args, cwd=cwd or tmp_path, **how)

    return run


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """The ``normact-onnx`` subcommands' parsers, by name (for checks of every command's help and docs)."""
    from normact_onnx.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one stderr line, no traceback, containing every needle."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("normact-onnx: error: "), r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr
    return r.stderr


def listing(folder: Path) -> list[str]:
    """Every file and folder below ``folder``, relative and sorted: what a command left behind."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def to_low_precision(model: onnx.ModelProto, elem: int = TensorProto.FLOAT16) -> onnx.ModelProto:
    """The model with every float32 tensor (weights, constants, inputs, outputs, casts) in ``elem``.

    What converters' float16 passes do to an exported model, written out here so the tests need no
    converter package: constants are rounded to the low-precision type (√2 becomes 1.4140625).
    """
    np_type = helper.tensor_dtype_to_np_dtype(elem)
    m = onnx.ModelProto()
    m.CopyFrom(model)

    def convert(t: onnx.TensorProto) -> None:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np_type), t.name))

    def graph(g: onnx.GraphProto) -> None:
        for t in g.initializer:
            convert(t)
        for v in (*g.input, *g.output):
            if v.type.tensor_type.elem_type == TensorProto.FLOAT:
                v.type.tensor_type.elem_type = elem
        del g.value_info[:]
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    convert(a.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    graph(a.g)
                elif a.name == "to" and n.op_type == "Cast" and a.i == TensorProto.FLOAT:
                    a.i = elem

    graph(m.graph)
    return m
