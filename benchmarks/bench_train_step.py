"""One fine-tuning step on real models: ANAct's cost, the torch backend against the ORT backend, PyTorch eager.

Run in the training environment (onnxruntime-training and torch 2.13 both); the regular environment (torch +
transformers, for the MiniLM export and the PyTorch eager step) is named by ``--main-python``::

    PYTHONPATH=src train-env/bin/python benchmarks/bench_train_step.py --main-python venv/bin/python --threads 1

Per model, the same batch goes through four trainers built the way ``finetune`` builds them, interleaved step by
step (each round starting with the next trainer): the ORT backend and the torch backend, each with ``--method none``
(the model as exported, made trainable) and ``--method anact`` (every site's in-graph statistics and the host's
running update; target ≤ 1.3× of none). The torch backend's target is ≤ 1.5× the ORT step (issue 23). For MiniLM a
PyTorch eager AdamW step of the same model, batch and loss is timed in the regular environment in the same run (the
PP-OCR detector has no PyTorch definition). Every runtime gets the same number of threads. Median over the timed
steps.

``--baseline-src DIR`` adds the torch backend of another source tree (e.g. ``git archive <commit> src | tar -x -C
DIR``; DIR/normact_onnx is loaded as the package ``normact_onnx_baseline``, its modules import each other
relatively) to the same interleaved loop: before and after of a torch-backend change, timed step by step together.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TORCH_STEP = """
import sys, time, json, numpy as np, torch
sys.path.insert(0, sys.argv[1] + "/models")
from minilm import load_minilm
d = np.load(sys.argv[2]); steps = int(sys.argv[3])
if int(sys.argv[4]): torch.set_num_threads(int(sys.argv[4]))
model = load_minilm(); model.train()
for m in model.modules():
    if isinstance(m, torch.nn.Dropout):
        m.p = 0.0  # the ONNX export has no dropout
x = [torch.from_numpy(d[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]
y = torch.from_numpy(d["y"])
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
times = []
for i in range(steps + 2):
    t = time.perf_counter()
    opt.zero_grad()
    out = model(*x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    loss = torch.nn.functional.mse_loss(out, y)
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - t)
print(json.dumps({"median_s": float(np.median(times[2:])), "threads": torch.get_num_threads()}))
"""

PREPARE_MINILM = """
import sys, numpy as np, onnxruntime as ort
sys.path.insert(0, sys.argv[1] + "/models")
from minilm import export_minilm, minilm_inputs
export_minilm(sys.argv[2], exporter="torchscript")
x = minilm_inputs(4, 32)
y = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"]).run(None, x)[0]
np.savez(sys.argv[3], **x, y=(0.5 * y).astype(np.float32))
"""


BASELINE = "normact_onnx_baseline"


def load_baseline(src: Path) -> str:
    """Import ``src``/normact_onnx as the package ``normact_onnx_baseline``; returns the package name."""
    import importlib.util

    init = src / "normact_onnx" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline-src: {init} does not exist")
    spec = importlib.util.spec_from_file_location(BASELINE, init, submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[BASELINE] = module
    spec.loader.exec_module(module)
    return BASELINE


def _trainer(
    model_path: Path,
    data: dict,
    loss: str,
    method: str,
    work: Path,
    backend: str,
    threads: int,
    package: str = "normact_onnx",
):
    import importlib

    import onnx

    def mod(name: str):
        return importlib.import_module(f"{package}.training.{name}")

    generate = mod("artifacts").generate
    check_labels, input_specs, load_dataset = (
        getattr(mod("data"), n) for n in ("check_labels", "input_specs", "load_dataset")
    )
    build_train_graph = mod("graph").build_train_graph
    Settings, _data_shapes, _output_shape = (
        getattr(mod("loop"), n) for n in ("Settings", "_data_shapes", "_output_shape")
    )
    fix_input_shapes = mod("prepare").fix_input_shapes
    TorchTrainer = mod("torch_backend").TorchTrainer

    settings = Settings(
        loss=loss, method=method, lr=1e-4, batch_size=len(data["y"]), threads=threads, backend=backend, device="cpu"
    )
    tg = build_train_graph(onnx.load(str(model_path)), str(model_path.parent), method=method, backend=backend)
    ds = load_dataset(data, "y", input_specs(tg.model, tg.data_inputs))
    check_labels(ds, loss, tg.output, _output_shape(tg, ds.inputs))
    tg.batch = len(ds)
    if backend == "torch":
        return TorchTrainer(tg, settings, ds.labels.ndim, None), ds
    # the ORT training graph with the batch's concrete shape, as finetune builds it
    fix_input_shapes(tg.model, _data_shapes(ds, tg.batch), tg.prepared)
    art = generate(tg, work / "artifacts", loss, label_rank=ds.labels.ndim)
    return mod("ort_backend").OrtTrainer(tg, art, settings, art.checkpoint), ds


def bench_model(
    name: str, path: Path, data: dict, loss: str, steps: int, threads: int, baseline: str | None = None
) -> dict:
    """Interleaved ORT/torch × none/anact steps on one batch (and the baseline tree's torch backend); medians and
    their ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for backend in ("ort", "torch"):
            for method in ("none", "anact"):
                work = Path(tmp) / f"{backend}_{method}"
                trainers[f"{backend}_{method}"], ds = _trainer(path, data, loss, method, work, backend, threads)
        if baseline:
            for method in ("none", "anact"):
                work = Path(tmp) / f"base_{method}"
                trainers[f"base_{method}"], _ = _trainer(path, data, loss, method, work, "torch", threads, baseline)
        x, y = ds.inputs, ds.labels
        times: dict[str, list[float]] = {k: [] for k in trainers}
        order = list(trainers.items())
        for r in range(steps + 2):  # each round starts with the next trainer: no one always follows the same one
            for label, tr in order[r % len(order) :] + order[: r % len(order)]:
                t = time.perf_counter()
                tr.train_step(x, y)
                times[label].append(time.perf_counter() - t)
        med = {k: float(np.median(v[2:])) for k, v in times.items()}
        base = {}
        if baseline:
            base = {
                "baseline_torch_none_s": med["base_none"],
                "baseline_torch_anact_s": med["base_anact"],
                "baseline_vs_ort": med["base_none"] / med["ort_none"],
                "baseline_vs_ort_anact": med["base_anact"] / med["ort_anact"],
            }
        return base | {
            "model": name,
            "sites": len(trainers["ort_anact"].tg.anact_sites),
            "batch": len(y),
            "none_s": med["ort_none"],
            "anact_s": med["ort_anact"],
            "ratio": med["ort_anact"] / med["ort_none"],
            "torch_none_s": med["torch_none"],
            "torch_anact_s": med["torch_anact"],
            "torch_vs_ort": med["torch_none"] / med["ort_none"],
            "torch_vs_ort_anact": med["torch_anact"] / med["ort_anact"],
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--main-python", required=True, help="python of the regular environment (torch, transformers)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="threads of every runtime (ORT intra-op, torch)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--baseline-src", type=Path, help="a source tree whose torch backend is timed alongside")
    args = ap.parse_args()
    from machine import machine
    from tests import real_models as rm

    baseline = load_baseline(args.baseline_src.resolve()) if args.baseline_src else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        e = rm.entry("ppocrv4_det")
        det = rm.require_path(e, rm.model_path(e))
        feeds = rm.sample_batches(e, 1, 2)[0]
        import onnxruntime as ort

        out = ort.InferenceSession(str(det), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        y = (out < 0.5).astype(np.float32)
        rows.append(bench_model("ppocrv4_det", det, {**feeds, "y": y}, "bce", args.steps, args.threads, baseline))

        minilm, batch = Path(tmp) / "minilm.onnx", Path(tmp) / "batch.npz"
        env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
        subprocess.run(
            [args.main_python, "-c", PREPARE_MINILM, str(ROOT), str(minilm), str(batch)], check=True, env=env
        )
        data = dict(np.load(batch))
        row = bench_model("minilm", minilm, data, "mse", args.steps, args.threads, baseline)
        r = subprocess.run(
            [args.main_python, "-c", TORCH_STEP, str(ROOT), str(batch), str(args.steps), str(args.threads)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        torch_step = json.loads(r.stdout.strip().splitlines()[-1])
        row["torch_eager_s"] = torch_step["median_s"]
        row["ort_vs_torch"] = row["none_s"] / torch_step["median_s"]
        row["torch_backend_vs_eager"] = row["torch_none_s"] / torch_step["median_s"]
        rows.append(row)

    print(f"fine-tuning step, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
    print(f"machine: {machine()}, {args.threads} thread(s) per runtime")
    for r in rows:
        line = (
            f"{r['model']:<12} batch {r['batch']}  {r['sites']:>2} ANAct sites  none {r['none_s'] * 1e3:8.1f} ms  "
            f"anact {r['anact_s'] * 1e3:8.1f} ms  ratio {r['ratio']:.3f}x (target ≤ 1.3)"
            f"  | torch backend none {r['torch_none_s'] * 1e3:8.1f} ms ({r['torch_vs_ort']:.3f}x ORT), "
            f"anact {r['torch_anact_s'] * 1e3:8.1f} ms ({r['torch_vs_ort_anact']:.3f}x ORT; target ≤ 1.5)"
        )
        if "baseline_torch_none_s" in r:
            line += (
                f"  | baseline none {r['baseline_torch_none_s'] * 1e3:8.1f} ms ({r['baseline_vs_ort']:.3f}x ORT), "
                f"anact {r['baseline_torch_anact_s'] * 1e3:8.1f} ms ({r['baseline_vs_ort_anact']:.3f}x ORT)"
            )
        if "torch_eager_s" in r:
            line += (
                f"  | PyTorch eager {r['torch_eager_s'] * 1e3:.1f} ms, ORT/eager {r['ort_vs_torch']:.3f}x, "
                f"torch backend/eager {r['torch_backend_vs_eager']:.3f}x"
            )
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0 if all(r["ratio"] <= 1.3 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
