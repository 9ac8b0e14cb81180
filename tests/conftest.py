"""Shared fixtures: the bundled models, onnx's real test models, tiny graph builders, a CLI runner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


@pytest.fixture
def cli(tmp_path):
    """Run the installed ``normact-onnx`` entry point as a user would (a real subprocess)."""

    def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "normact_onnx.cli", *map(str, args)],
            capture_output=True,
            text=True,
            cwd=cwd or tmp_path,
            timeout=600,
        )

    return run


@pytest.fixture
def main_in(capsys, monkeypatch):
    """The CLI's ``main`` in this process (for the many quick refusals): returns a CompletedProcess like run_cli."""
    from normact_onnx.cli import main

    def run(*args, cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        rc = main([str(a) for a in args])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out.out, out.err)

    return run


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
