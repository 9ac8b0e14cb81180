"""How a model travels through the package: the import graph, and the modules ``rewrite`` and ``calibrate`` enter.

Issue 22's check of the layout (docs/architecture.md §2): fewer modules per trip and fewer returns to a module
already left mean a reader follows one call down through fewer files. Run it from a checkout::

    .venv/bin/python scripts/module_trip.py [--src SRC]

``--src`` measures another checkout's ``src`` (e.g. one exported with ``git archive``), for before/after numbers.

Import graph: the package's modules and their module-level imports of each other (read with ``ast``), and how
many of those imports reach into ``calibration/`` from outside it, and which join two of the rooms that consume the
data (calibration, comparison, ``fold``'s deploy, training).

Trip: one warm-up call, then the same call profiled (``sys.setprofile``). Every call of a package function
whose module differs from its caller's is a crossing. *Rooms*: the distinct modules entered. *Returns*: crossings
into a module that was entered before and is no longer on the call stack (the reader has to go back to a file
already left); counted as distinct (caller, callee) module pairs, so a loop over sites counts once.
"""

from __future__ import annotations

import argparse
import ast
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE = "normact_onnx"


def import_graph(src: Path) -> dict[str, set[str]]:
    """Module → package modules it imports at module level (relative imports resolved)."""
    root = src / PACKAGE
    names = {}
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(src).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    edges: dict[str, set[str]] = {m: set() for m in names}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base
                    if target in names and target != name:
                        edges[name].add(target)
            elif isinstance(node, ast.Import):
                edges[name].update(a.name for a in node.names if a.name in names and a.name != name)
    return edges


def small_model() -> Any:
    """An MLP with a Relu, a decomposed SiLU and a Tanh on its hidden path (what `rewrite` finds)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i, act in enumerate(("Relu", "SiLU", "Tanh", None)):
        w = numpy_helper.from_array(rng.normal(0, 0.3, (16, 16)).astype(np.float32), f"w{i}")
        b = numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), f"b{i}")
        inits += [w, b]
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"h{i}"]),
        ]
        x = f"h{i}"
        if act == "SiLU":
            nodes += [helper.make_node("Sigmoid", [x], [f"s{i}"]), helper.make_node("Mul", [x, f"s{i}"], [f"a{i}"])]
            x = f"a{i}"
        elif act:
            nodes.append(helper.make_node(act, [x], [f"a{i}"]))
            x = f"a{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", 16])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9, producer_name="trip")


def room(module: str) -> str:
    """A module's room: its folder below the package (``calibration``, ``data``, ``passes``), else the module."""
    return module.split(".")[1] if "." in module else module


def trip(call: Callable[[], Any], key: Callable[[str], str]) -> tuple[list[str], set[tuple[str, str]], int]:
    """Modules (``key``: or rooms) in order of first entry, the distinct returning crossings, all crossings."""
    stack: list[str | None] = []
    entered: list[str] = []
    returns: set[tuple[str, str]] = set()
    crossings = 0

    def current() -> str | None:
        return next((m for m in reversed(stack) if m is not None), None)

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal crossings
        if event == "call":
            mod = frame.f_globals.get("__name__", "")
            mine = key(mod) if mod == PACKAGE or mod.startswith(PACKAGE + ".") else None
            caller = current()
            if mine is not None and caller is not None and mine != caller:
                crossings += 1
                if mine in entered and mine not in stack:
                    returns.add((caller, mine))
            if mine is not None and mine not in entered:
                entered.append(mine)
            stack.append(mine)
        elif event == "return" and stack:
            stack.pop()

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return entered, returns, crossings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src")
    ap.add_argument("--verbose", action="store_true", help="list the modules and the returns")
    args = ap.parse_args()
    sys.path.insert(0, str(args.src))
    import onnx

    import normact_onnx

    assert Path(normact_onnx.__file__).resolve().is_relative_to(args.src.resolve()), normact_onnx.__file__
    edges = import_graph(args.src)
    short = lambda m: m[len(PACKAGE) + 1 :] or "__init__"  # noqa: E731
    into_cal = sum(
        1 for m, ts in edges.items() for t in ts if t.startswith(f"{PACKAGE}.calibration") and ".calibration" not in m
    )
    print(f"import graph: {len(edges)} modules, {sum(map(len, edges.values()))} imports, {into_cal} into calibration/")
    consumers = ("calibration", "comparison", "deploy", "training")  # data/'s consumers: none should need another
    across = sorted(
        f"{short(m)} → {short(t)}"
        for m, ts in edges.items()
        for t in ts
        if room(m) in consumers and room(t) in consumers and room(m) != room(t)
    )
    print(f"  imports between calibration, comparison, deploy and training: {len(across)} ({', '.join(across)})")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mlp.onnx"
        onnx.save(small_model(), path)
        calls = {
            "rewrite": lambda: normact_onnx.rewrite(str(path), str(Path(d) / "r.onnx")),
            "calibrate": lambda: normact_onnx.calibrate(
                str(path), None, str(Path(d) / "c.onnx"), synthetic=True, shapes=["x=4x16"], batches=3
            ),
        }
        for name, call in calls.items():
            call()  # warm-up: lazy imports and caches are not part of the trip
            for unit, key in (("modules", short), ("rooms", room)):
                entered, back, crossings = trip(call, lambda m, k=key: k(m))  # type: ignore[misc]
                back_n = f"{len(back)} returns to one already left"
                print(f"{name}: {len(entered)} {unit} entered, {back_n}, {crossings} crossings")
                if args.verbose:
                    print(f"  {', '.join(entered)}")
                    print("".join(f"  back: {a} → {b}\n" for a, b in sorted(back)), end="")


if __name__ == "__main__":
    main()
