"""Does normalization hold inside real networks? In-situ calibration against the original-network baseline.

For each model of the real-model set (tests/real_models) and both methods, calibrate on the model's
sample batches twice — measuring the original network (``--no-in-situ``, what the tool did before)
and in situ (the default) — write the model, run the written model on the same batches and count the
normalized sites that hold their property (static: E y² in [0.5, 2] and |E y| ≤ 0.25; ANAct: the
forward gain E y²/Var x in [0.5, 2]). Sites the method cannot hold by itself are counted apart: an
ANAct site whose *calibrated* gain λ²·Var f/var x is already below 0.5 (λ is a compromise with the
backward gain) misses whatever the calibration does.

    python benchmarks/insitu_property.py [--models id,id] [--batches 8] [--batch-size 2] [--json out.json]

Needs the real-model cache (python scripts/fetch_real_models.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import real_models as rm  # noqa: E402


def _run(
    path: Path,
    entry: dict,
    method: str,
    in_situ: bool,
    data: Path,
    batch_size: int | None,
    centered: bool = False,
    closing: bool = True,
) -> dict:
    from normact_onnx.api import calibrate
    from normact_onnx.comparison import measure_sites
    from normact_onnx.data.options import DataOptions
    from normact_onnx.methods.anact import site_factors
    from normact_onnx.outcome import Refusal

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.onnx"
        start = time.perf_counter()
        extra = {"centered_rho": True} if centered and method == "anact" else {}
        stats = calibrate(
            path, data, out, method=method, in_situ=in_situ, aggregate="mean", verify=False, closing=closing, **extra
        )
        seconds = time.perf_counter() - start
        rows = [r for r in measure_sites(out, DataOptions(data)) if "holds" in r]
    limited = set()
    if method == "anact":
        for s in stats.sites.values():
            f = site_factors(s, aggregate="mean")
            if not isinstance(f, Refusal) and float(np.max(f.rho_after)) < 0.5:
                limited.add(s.name)
    held = sum(r["holds"] for r in rows)
    values = np.array([r["value"] for r in rows], dtype=np.float64)
    return {
        "measured": len(rows),
        "held": held,
        "method_limited": sum(1 for r in rows if not r["holds"] and r["site"] in limited),
        "median": float(np.nanmedian(values)) if values.size else float("nan"),
        "max": float(np.nanmax(values)) if values.size else float("nan"),
        "seconds": seconds,
        "closing": stats.settings.get("closing"),
        "worst": sorted((r["value"], r["site"]) for r in rows if not r["holds"])[:3],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated ids (default: every cached model with hidden sites)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--centered-rho", action="store_true", help="ANAct with --centered-rho (issue 24's property)")
    ap.add_argument("--in-situ-only", action="store_true", help="skip the original-network calibration")
    ap.add_argument("--methods", default="static,anact", help="comma-separated (default static,anact)")
    ap.add_argument("--repeats", type=int, default=1, help="run each contender this many times (median seconds)")
    ap.add_argument(
        "--closing",
        default="on",
        help="in situ: the closing check on, off, or off,on (both, interleaved in the same run; default on)",
    )
    args = ap.parse_args()
    wanted = set(args.models.split(",")) if args.models else None
    rows = []
    for entry, path in rm.available():
        if wanted is not None and entry["id"] not in wanted:
            continue
        if wanted is None and (entry.get("known_failures") or not entry["sites"].get("hidden")):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                rm.write_batches(entry, tmp, args.batches, args.batch_size)
            except Exception as e:  # a manifest entry the sampler cannot feed is a row, not a crash
                r = {"error": f"sample data: {type(e).__name__}: {str(e).splitlines()[0][:100]}"}
                rows.append({**r, "model": entry["id"], "family": entry["family"], "method": "-", "how": "-"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            for method in args.methods.split(","):
                runs = [(True, c == "on") for c in args.closing.split(",")]
                got: dict[tuple[bool, bool], dict] = {}
                for _ in range(args.repeats):  # the contenders interleaved, round after round
                    for in_situ, closing in ([] if args.in_situ_only else [(False, False)]) + runs:
                        try:
                            r = _run(path, entry, method, in_situ, Path(tmp), None, args.centered_rho, closing)
                        except Exception as e:  # a model the tool cannot calibrate is a row, not a crash
                            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
                        seen = got.setdefault((in_situ, closing), r)
                        seen.setdefault("times", []).append(r.get("seconds"))
                for (in_situ, closing), r in got.items():
                    if "error" not in r:
                        r["seconds"] = float(np.median(r["times"]))
                    how = "original" if not in_situ else ("closed" if closing else "in situ")
                    r.update(model=entry["id"], family=entry["family"], method=method, in_situ=in_situ, how=how)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    print()
    print(
        f"{'model':<22}{'family':<17}{'method':<8}{'measured as':<13}{'held':>10}{'median':>10}{'max':>10}"
        f"{'seconds':>9}  passes"
    )
    for r in rows:
        how = r["how"]
        if "error" in r:
            print(f"{r['model']:<22}{r['family']:<17}{r['method']:<8}{how:<13}  {r['error']}")
            continue
        held = f"{r['held']}/{r['measured']}"
        if r["method_limited"]:
            held += f" ({r['method_limited']}m)"
        c = r.get("closing") or {}
        passes = f"{c['passes']} {'converged' if c['converged'] else 'capped'} {c['repaired']}" if c else ""
        print(
            f"{r['model']:<22}{r['family']:<17}{r['method']:<8}{how:<13}{held:>10}{r['median']:>10.3g}{r['max']:>10.3g}"
            f"{r['seconds']:>9.2f}  {passes}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
