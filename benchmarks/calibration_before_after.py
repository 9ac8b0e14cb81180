"""Calibration cost before / after a change: two source trees, interleaved, each against plain ORT inference.

Each child process (one per tree and repetition, the trees taking turns) times plain ONNX Runtime inference
of the original model and then ``normact_onnx.calibration.collect`` in situ over the same batches, twice, both
including session creation (``bench_calibration.py``'s ``Reader``, ``plain_inference`` and
``normact_calibration``); the table gives the median ratio per tree. Used for issue 24's flat merge.

    python benchmarks/calibration_before_after.py --before /path/to/old/src --after src \\
        --model mobilenet --batches 300 --repeats 3
    python benchmarks/calibration_before_after.py --before /path/to/old/src --after src --model yolov8n --batches 20

An old tree needs its kernel library copied into src/normact_onnx/lib for the fused statistics ops.
A change behind an environment switch is measured on one tree with ``--before-env``:

    python benchmarks/calibration_before_after.py --before src --after src --before-env NORMACT_ORT_F=0 \
        --model yolov8n --batches 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = """
import json, sys, tempfile
sys.path.insert(0, {bench!r})
from pathlib import Path
from bench_calibration import Reader, model_and_batch, normact_calibration, plain_inference
with tempfile.TemporaryDirectory() as tmp:
    path, spec = model_and_batch({model!r}, Path(tmp))
    r = Reader(spec, {batches})
    r.rewind(); plain_inference(path, r)  # warm-up: page cache, imports
    out = []
    for _ in range(2):
        r.rewind(); p = plain_inference(path, r)
        r.rewind(); c = normact_calibration(path, r, in_situ={in_situ})
        out.append((p, c))
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="the old tree's src folder")
    ap.add_argument("--after", required=True, help="the new tree's src folder")
    ap.add_argument("--model", default="mobilenet", help="a bench_calibration.py model name")
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before-env", action="append", default=[], help="KEY=VALUE set for the before children")
    ap.add_argument("--no-in-situ", action="store_true", help="measure the original network instead of in situ")
    args = ap.parse_args()
    code = CHILD.format(bench=str(HERE), model=args.model, batches=args.batches, in_situ=not args.no_in_situ)
    extra = dict(kv.split("=", 1) for kv in args.before_env)
    got: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    for _ in range(args.repeats):
        for label in got:
            env = dict(os.environ, PYTHONPATH=str(Path(getattr(args, label)).resolve()))
            if label == "before":
                env.update(extra)
            run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            if run.returncode:
                print(run.stderr[-2000:], file=sys.stderr)
                return 1
            got[label] += [tuple(x) for x in json.loads(run.stdout.strip().splitlines()[-1])]
    mode = "original network" if args.no_in_situ else "in situ"
    print(f"{args.model} ({mode}), {args.batches} batches, load average {os.getloadavg()[0]:.1f}")
    for label, runs in got.items():
        ratios = [c / p for p, c in runs]
        print(
            f"  {label}: plain {statistics.median(p for p, _ in runs):.3f} s, calibration "
            f"{statistics.median(c for _, c in runs):.3f} s, ratio {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}–{max(ratios):.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
