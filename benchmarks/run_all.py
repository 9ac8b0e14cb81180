"""Run every benchmark in benchmarks/ and print one table of ratios with their baselines, the machine and the date.

Contract for a benchmark script ``benchmarks/bench_*.py``: with ``--json`` it
prints one JSON object (the last line of stdout that parses as one) with

    {"benchmark": str, "machine": str (optional), "method": str (optional),
     "ratios": [{"name": str, "ratio": float, "baseline": str,
                 "target": str (optional), "ok": bool (optional), "detail": str (optional)}]}

(``"rows"`` is accepted for ``"ratios"``; a row without a ratio shows its other
numbers as the detail.)
Its exit code is informational (a missed target may exit 1); a script that
prints no such object is listed as failed with the last line of its stderr.

    python benchmarks/run_all.py [--only latency,kernels] [--timeout 900] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from machine import machine
from package import child_pythonpath

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def scripts(only: set[str] | None) -> list[Path]:
    found = sorted(HERE.glob("bench_*.py"))
    return [p for p in found if only is None or p.stem.removeprefix("bench_") in only]


def _last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    try:  # a pretty-printed object spanning lines
        obj = json.loads(stdout)
        return obj if isinstance(obj, dict) else None
    except ValueError:
        return None


def run_one(path: Path, timeout: float) -> dict[str, Any]:
    """Run one script with --json; its result, or why there is none."""
    env = dict(os.environ)
    env["PYTHONPATH"] = child_pythonpath()  # the installed package first; src/ only as a fallback
    if "NORMACT_LIBRARY_DIR" not in env and (ROOT / "build" / "ops").is_dir():
        env["NORMACT_LIBRARY_DIR"] = str(ROOT / "build" / "ops")  # a local CMake build, when there is one
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(path), "--json"], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"script": path.name, "error": f"timed out after {timeout:.0f} s"}
    result = _last_json(proc.stdout)
    elapsed = time.perf_counter() - t0
    if result is not None and "ratios" not in result and isinstance(result.get("rows"), list):
        result["ratios"] = result.pop("rows")
    if result is None or not isinstance(result.get("ratios"), list):
        tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1][:160]
        return {"script": path.name, "error": f"exit {proc.returncode}: {tail}", "seconds": elapsed}
    result.update(script=path.name, seconds=elapsed, exit=proc.returncode)
    return result


_SHOWN = {"name", "ratio", "baseline", "target", "ok", "detail"}


def table(results: list[dict[str, Any]]) -> str:
    rows = [("benchmark", "measurement", "ratio", "baseline", "target", "status", "detail")]
    for r in results:
        name = r.get("benchmark") or r["script"]
        if "error" in r:
            rows.append((name, "—", "—", "—", "—", "FAILED", r["error"]))
            continue
        for x in r["ratios"]:
            status = "" if "ok" not in x else ("ok" if x["ok"] else "MISSED")
            ratio = f"{x['ratio']:.3f}x" if isinstance(x.get("ratio"), int | float) else str(x.get("ratio", ""))
            detail = x.get("detail") or ", ".join(
                f"{k}={v}" for k, v in x.items() if k not in _SHOWN and isinstance(v, int | float | str)
            )
            row = (name, str(x.get("name", "")), ratio, str(x.get("baseline", "")), str(x.get("target", "")), status)
            rows.append((*row, detail))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated names (bench_<name>.py), e.g. latency,kernels")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per script (default 1800)")
    p.add_argument("--json", action="store_true", help="print everything collected as one JSON object")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    found = scripts(only)
    if not found:
        print("no benchmark scripts found", file=sys.stderr)
        return 2
    results = []
    for path in found:
        print(f"running {path.name} …", file=sys.stderr, flush=True)
        results.append(run_one(path, args.timeout))
    header = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine()}
    if args.json:
        print(json.dumps({**header, "results": results}, indent=2))
    else:
        print(f"normact-onnx benchmarks, {header['date']}")
        print(f"machine: {header['machine']}")
        for r in results:
            if r.get("method"):
                print(f"  {r.get('benchmark', r['script'])}: {r['method']}")
        print()
        print(table(results))
    failed = any("error" in r for r in results)
    missed = any(x.get("ok") is False for r in results for x in r.get("ratios", []))
    return 2 if failed else (1 if missed else 0)


if __name__ == "__main__":
    sys.exit(main())
