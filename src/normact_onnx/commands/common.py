"""Helpers the subcommands share: output paths, tables, JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def default_output(src: str, suffix: str = ".normact.onnx") -> Path:
    """``model.onnx`` → ``model.normact.onnx`` beside it."""
    p = Path(src)
    stem = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + suffix)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain aligned text table (no third-party dependency)."""
    cells = [[str(r.get(c, "")) if r.get(c) is not None else "" for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*columns), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in cells])
