"""``normact-onnx inspect``: which activations, where, already normalized, skipped why."""

from __future__ import annotations

import argparse

from ..api import inspect
from ..runtime.library import kernel_status
from ..texttable import plural, table
from .common import print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="list activation sites", description="List every activation site.")
    p.add_argument("model", help="path to an .onnx file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    sites = inspect(args.model)
    if args.json:
        print_json(sites)
        return 0
    if not sites:
        print("no activation sites found")
        print("\n".join(kernel_status()))
        return 0
    rows = [
        {
            **s,
            "params": ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s["params"].items()),
            "normalized": "yes" if s["normalized"] else "no",
            "note": s["skipped"] or "",
        }
        for s in sites
    ]
    print(table(rows, ["name", "kind", "params", "written_as", "graph", "normalized", "note"]))
    n_norm = sum(s["normalized"] for s in sites)
    print(
        f"\n{plural(len(sites), 'site')}, {n_norm} already normalized, "
        f"{sum(1 for s in sites if s['skipped'] and not s['normalized'])} skipped by default"
    )
    print("\n".join(kernel_status()))  # what a rewritten model will run with here
    return 0
