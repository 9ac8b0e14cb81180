"""``normact-onnx inspect``: which activations, where, already normalized, skipped why.

With ``--explain`` it also says why the other candidates are not sites: ops the catalogue read and
refused, and decomposed forms that matched part of the way (how far, and the first thing that differed).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..api import inspect
from ..io import load_model_like, model_folder
from ..passes.find import Explanation, explain
from ..runtime.library import kernel_status
from ..texttable import plural, table
from ..writer import check_input
from .common import print_json, print_partial


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="list activation sites", description="List every activation site.")
    p.add_argument("model", help="path to an .onnx file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--explain",
        action="store_true",
        help="also list near misses: refused activation ops and half-matched patterns, with the reason",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    why: Explanation | None = None
    if args.explain:
        m, path = load_model_like(args.model)
        check_input(m, path, runtime=False)
        why = explain(m, model_folder(path))
        sites = [s.summary() for s in why.sites]
    else:
        sites = inspect(args.model)
    if args.json:
        if why is None:
            print_json(sites)
        else:
            print_json({"sites": sites, "misses": why.misses, "partial": [p.as_dict() for p in why.partial]})
        return 0
    if not sites:
        print("no activation sites found")
    else:
        print_sites(sites)
    if why is not None:
        print_explanation(why)
    print("\n".join(kernel_status()))  # what a rewritten model will run with here
    return 0


def print_sites(sites: list[dict[str, Any]]) -> None:
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


def print_explanation(why: Explanation) -> None:
    """Near misses as a table; half-matched forms one line per way of failing, with where else it happens."""
    if why.misses:
        print("\nlooked like activations but did not qualify:")
        print(table(why.misses, ["name", "op", "graph", "why"]))
    print_partial(why)
