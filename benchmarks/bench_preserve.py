"""``rewrite --preserve-function`` coverage and exactness, and CLI ``fold`` success, on the real-model set.

Per model of ``tests/real_models`` (fetch them first: ``python scripts/fetch_real_models.py``):

- hidden sites (the default selection), how many ``--preserve-function`` normalizes, and the largest output
  difference against the original on the model's own sample batches, relative to the output's scale; beside it the
  model's float noise (the same original run with ONNX Runtime's graph optimizations off), the yardstick for
  "exact";
- ``fold``: the normalized model (default rewrite) folded by the CLI with ``--data`` (its sample batches as .npz
  files): exit code and, when it fails, the message.

Run it with another checkout's ``src`` on ``PYTHONPATH`` to get the "before" column (the code is imported, not
installed). Usage: PYTHONPATH=src python benchmarks/bench_preserve.py [--ids a,b] [--json OUT]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from machine import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import real_models as rm  # noqa: E402


def _session(model: onnx.ModelProto | str, optimize: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _max_rel(want: list[np.ndarray], got: list[np.ndarray]) -> float:
    worst = 0.0
    for a, b in zip(want, got):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if not np.issubdtype(np.asarray(a).dtype, np.inexact):
            continue
        scale = max(float(np.max(np.abs(a64), initial=0.0)), 1e-30)
        worst = max(worst, float(np.max(np.abs(a64 - b64), initial=0.0)) / scale)
    return worst


def feeds_for(e: dict, path: Path, n: int = 2) -> list[dict]:
    """Sample batches; derived models are fed like their base model, cast to their own input types."""
    from normact_onnx.data.inputs import model_inputs

    base = e["feed"].get("same_as", e["id"])
    specs = {s.name: s.dtype for s in model_inputs(onnx.load(str(path), load_external_data=False))}
    return [{k: v.astype(specs.get(k, v.dtype)) for k, v in b.items()} for b in rm.sample_batches(base, n, 2)]


def preserve_row(e: dict, path: Path, batches: list[dict]) -> dict:
    from normact_onnx.api import rewrite

    row: dict = {"id": e["id"]}
    try:
        res = rewrite(path, preserve_function=True, details=True, verify=False)
    except Exception as ex:  # the "before" code may refuse a model outright
        return {**row, "error": str(ex).splitlines()[0][:200]}
    hidden = [o for o in res.outcomes if o.site.skip is None and o.site.normalized is None]
    row["hidden"] = len(hidden)
    row["preserved"] = sum(o.action == "rewritten" for o in hidden)
    reasons: dict[str, int] = {}
    for o in hidden:
        if o.action != "rewritten":
            key = o.reason.split("'")[0][:90]
            reasons[key] = reasons.get(key, 0) + 1
    row["not_preserved_because"] = reasons
    try:
        onnx.checker.check_model(res.model)
        row["checker"] = "ok"
    except Exception as ex:
        row["checker"] = str(ex).splitlines()[0][:120]
    orig, plain = _session(str(path)), _session(str(path), optimize=False)
    try:
        new = _session(res.model)
    except Exception as ex:
        return {**row, "error": f"does not load: {str(ex).splitlines()[0][:160]}"}
    err = noise = 0.0
    for feeds in batches:
        want = orig.run(None, feeds)
        err = max(err, _max_rel(want, new.run(None, feeds)))
        noise = max(noise, _max_rel(want, plain.run(None, feeds)))
    row["max_err_rel_scale"], row["float_noise_rel_scale"] = err, noise
    return row


def fold_row(e: dict, path: Path, work: Path) -> dict:
    """The CLI as a user runs it: rewrite, then fold with the model's sample data."""
    data = work / f"{e['id']}-data"
    data.mkdir()
    for i, feeds in enumerate(feeds_for(e, path)):
        np.savez(data / f"batch_{i:03d}.npz", **feeds)
    env = {**os.environ}
    cli = [sys.executable, "-m", "normact_onnx.cli"]
    norm = work / f"{e['id']}.normact.onnx"
    cmd = [*cli, "rewrite", str(path), "-o", str(norm), "--no-verify"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"fold_exit": None, "fold_message": "rewrite: " + r.stderr.strip()[:200]}
    r = subprocess.run(
        [*cli, "fold", str(norm), "-o", str(work / f"{e['id']}.folded.onnx"), "--data", str(data)],
        capture_output=True,
        text=True,
        env=env,
    )
    last = (r.stderr.strip() or r.stdout.strip().splitlines()[-1] if (r.stderr or r.stdout) else "").strip()
    return {"fold_exit": r.returncode, "fold_message": last[:200]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", help="comma-separated model ids (default: every cached model)")
    ap.add_argument("--no-fold", action="store_true")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    wanted = set(args.ids.split(",")) if args.ids else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for e, path in rm.available():
            if wanted and e["id"] not in wanted:
                continue
            batches = feeds_for(e, path)
            row = preserve_row(e, path, batches)
            if not args.no_fold:
                row.update(fold_row(e, path, Path(tmp)))
            rows.append(row)
            print(json.dumps(row), flush=True)
    doc = {"machine": machine(), "date": datetime.date.today().isoformat(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
