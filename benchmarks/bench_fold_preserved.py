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
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", help="comma-separated model ids (default: every cached model)")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds per model (default 30)")
    ap.add_argument("--json", help="write the rows as JSON")
    args = ap.parse_args()
    wanted = set(args.ids.split(",")) if args.ids else None
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
