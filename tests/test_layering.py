"""The package's layers import downward only (docs/architecture.md §2), read from the source with ``ast``.

Four rules, each a test: no import cycle among the package's modules (an import of ``a.b.c`` also runs the
``__init__`` of ``a.b``, so that counts as an edge too); imports of package modules at module level only
(inside functions only optional dependencies: ray, torch, onnxruntime.training, matplotlib, …); no import
from a higher layer than the importer's; no private name (``_x``) imported from another module. Every module
belongs to exactly one declared layer, so a new module has to be placed before these tests pass.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "normact_onnx"

# Bottom first. A module may import modules of its own layer (without a cycle) and of the layers below.
# Patterns are module names below the package ("calibration.*": the package's modules, not the package).
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["", "errors", "outcome", "progress", "valuetypes", "domains", "texttable", "runtime", "runtime.*"]),
    ("catalogue", ["catalogue", "catalogue.*"]),
    ("model", ["io", "outpaths", "interop", "graph", "provenance", "ort"]),
    ("data", ["data", "data.*"]),
    ("methods", ["moments", "streaming", "methods", "methods.*"]),
    ("passes", ["passes", "passes.*", "selection"]),
    ("checks and calibration", ["verify", "calibration", "calibration.*"]),
    ("decisions", ["policy", "writer"]),
    ("comparison", ["comparison", "comparison.*"]),
    ("orchestration", ["operations", "operations.*", "api", "deploy"]),
    ("training", ["training", "training.*"]),
    ("command line", ["commands", "commands.*", "cli", "__main__"]),
]


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a package module
    line: int
    in_function: bool
    names: tuple[str, ...]  # the names taken from the target (from-imports)


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = p.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _short(name: str) -> str:
    return name[len(PACKAGE) + 1 :] if name != PACKAGE else ""


def _imports(name: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name in MODULES:
                        found.append(Import(name, alias.name, child.lineno, in_function, ()))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                if base not in MODULES:
                    continue
                plain = []
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    if sub in MODULES:  # ``from . import rows``: the module itself
                        found.append(Import(name, sub, child.lineno, in_function, ()))
                    else:
                        plain.append(alias.name)
                if plain:
                    found.append(Import(name, base, child.lineno, in_function, tuple(plain)))
            visit(child, nested)

    visit(tree, False)
    return found


IMPORTS = [imp for name, path in MODULES.items() for imp in _imports(name, path)]


def _edges() -> dict[str, set[str]]:
    """Module → modules its import runs: the target and every enclosing package the importer is not inside."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        parts = imp.target.split(".")
        for k in range(1, len(parts) + 1):
            mod = ".".join(parts[:k])
            inside = imp.importer == mod or imp.importer.startswith(mod + ".")
            if mod in MODULES and mod != imp.importer and (mod == imp.target or not inside):
                edges[imp.importer].add(mod)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _layer_of(module: str) -> list[int]:
    """Indexes of the layers whose patterns match ``module`` (exact names win over ``pkg.*`` patterns)."""
    short = _short(module)
    exact = [i for i, (_, pats) in enumerate(LAYERS) if short in pats]
    if exact:
        return exact
    return [i for i, (_, pats) in enumerate(LAYERS) if any("*" in p and fnmatchcase(short, p) for p in pats)]


def test_every_module_is_in_exactly_one_layer():
    placed = {m: _layer_of(m) for m in MODULES}
    assert {m: ls for m, ls in placed.items() if len(ls) != 1} == {}


def test_no_import_cycle():
    assert _cycles(_edges()) == []


def test_package_modules_are_imported_at_module_level_only():
    inside = [f"{_short(i.importer)}:{i.line} imports {_short(i.target)}" for i in IMPORTS if i.in_function]
    assert inside == []


def test_imports_go_downward_only():
    upward = []
    for i in IMPORTS:
        (mine,), (theirs,) = _layer_of(i.importer), _layer_of(i.target)
        if theirs > mine:
            upward.append(f"{_short(i.importer)} ({LAYERS[mine][0]}) imports {_short(i.target)} ({LAYERS[theirs][0]})")
    assert upward == []


def test_no_private_names_across_modules():
    private = [
        f"{_short(i.importer)}:{i.line} imports {n} from {_short(i.target)}"
        for i in IMPORTS
        for n in i.names
        if n.startswith("_") and not n.startswith("__") and i.target != i.importer
    ]
    assert private == []


def test_data_consumers_share_data_not_each_other():
    """calibration, comparison and fold (deploy) read and run data through ``data/`` only (docs/architecture.md §1)."""

    def room(module: str) -> str:
        short = _short(module)
        return short.split(".")[0]

    consumers = {"calibration", "comparison", "deploy"}
    across = [
        f"{_short(i.importer)} imports {_short(i.target)}"
        for i in IMPORTS
        if room(i.importer) in consumers and room(i.target) in consumers and room(i.importer) != room(i.target)
    ]
    assert across == []


def test_architecture_doc_states_the_same_layer_order():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    order = " → ".join(name for name, _ in LAYERS)
    assert order in doc, f"docs/architecture.md §2 should state the layer order: {order}"


# ---- the checker itself, on small made-up graphs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("edges", "cycles"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}}, [["a", "b", "c"]]),
    ],
)
def test_cycle_finder(edges, cycles):
    assert _cycles(edges) == cycles


def test_parser_sees_function_level_and_relative_imports(tmp_path):
    code = "from .errors import NormactError\n\ndef f():\n    from .data import rows\n    return rows\n"
    path = tmp_path / "probe.py"
    path.write_text(code)
    got = {(i.target, i.in_function) for i in _imports(f"{PACKAGE}.probe", path)}
    assert got == {(f"{PACKAGE}.errors", False), (f"{PACKAGE}.data.rows", True)}
    assert re.fullmatch(r"[a-z_.]+", _short(f"{PACKAGE}.data.rows"))
