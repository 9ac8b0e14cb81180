#!/usr/bin/env python3
"""Recompute what tests/real_models/manifest.json records about each cached real model, and show or write changes.

Why: the manifest states what ``inspect`` finds in each model today (sites per role and kind), and what the file
itself records (producer, IR, opsets, inputs, sha256, size). A change to site detection changes those counts on
purpose; this script is how the manifest follows it, so the diff shows exactly which models changed and how.
Human-written fields (family, description, source, license, feed, known_failures, known_gaps) are never touched.

Usage (from the repository root, normact-onnx importable)::

    python scripts/describe_real_models.py            # print the fields that differ; exit 1 if any
    python scripts/describe_real_models.py --write    # rewrite the manifest with the recomputed fields
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from fetch_real_models import MANIFEST, cache_dir  # noqa: E402

KEPT_DOMAINS = ("ai.onnx", "ai.onnx.ml", "com.microsoft", "Paddle")


def role(site: dict) -> str:
    skip = site["skipped"]
    if skip is None:
        return "hidden"
    if "graph output" in skip:
        return "output"
    if "output is quantized" in skip:  # a QDQ model's activation feeding a QuantizeLinear
        return "quantized"
    return "gate" if "gate" in skip else "other"


def describe(path: Path) -> dict:
    """The manifest's computed fields for one model file."""
    from normact_onnx.api import inspect

    data = path.read_bytes()
    m = onnx.load_from_string(data)
    weights = {t.name for t in m.graph.initializer}
    inputs = []
    for i in m.graph.input:
        if i.name in weights:  # IR < 4 lists weights among the inputs
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in i.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name
        inputs.append({"name": i.name, "shape": dims, "dtype": dtype})
    sites: dict[str, Counter] = {}
    nested = 0
    for s in inspect(path):
        sites.setdefault(role(s), Counter())[s["kind"]] += 1
        nested += s["graph"] != "main"
    opsets = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "producer": f"{m.producer_name} {m.producer_version}".strip() or "(not recorded)",
        "ir_version": m.ir_version,
        "opset_imports": {d: v for d, v in opsets.items() if d in KEPT_DOMAINS},
        "inputs": inputs,
        "sites": {r: dict(sorted(c.items())) for r, c in sorted(sites.items())},
        "sites_in_subgraphs": nested,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="write the recomputed fields into the manifest")
    args = ap.parse_args(argv)
    doc = json.loads(MANIFEST.read_text())
    changed = 0
    for e in doc["models"]:
        path = cache_dir() / f"{e['id']}.onnx"
        if not path.is_file():
            print(f"describe_real_models: {e['id']} is not fetched (run scripts/fetch_real_models.py)", file=sys.stderr)
            return 2
        new = describe(path)
        if e["source"]["kind"] == "wheel" and new["sha256"] != e["sha256"]:
            print(f"describe_real_models: {e['id']}: cached file is not the pinned one (refetch it)", file=sys.stderr)
            return 2
        for key, value in new.items():
            if e.get(key) != value:
                changed += 1
                print(f"{e['id']}: {key}: {json.dumps(e.get(key))} -> {json.dumps(value)}")
                e[key] = value
    if args.write and changed:
        MANIFEST.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {changed} changed field(s) to {MANIFEST}")
    return 1 if changed and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
