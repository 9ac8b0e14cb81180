"""The docs cannot drift: docs/math.md's tables are recomputed by the code, and every cited document exists.

Every number in the oracle tables of docs/math.md is checked against ``normact_onnx.moments`` and
``normact_onnx.methods`` (the same functions ``rewrite`` and ``calibrate`` use), and every citation of the form
``docs/<name>.md §n`` anywhere in the repository must name an existing file and one of its numbered sections.
"""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from normact_onnx.catalogue import CATALOGUE
from normact_onnx.methods.anact import lambda_of
from normact_onnx.methods.static import static_affine
from normact_onnx.moments import gaussian_moments

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT / "docs" / "math.md"
TOL = 1e-6  # the tables print six decimals: rounding leaves at most 5e-7

# The rows the project's original oracle tables had (tests/test_catalogue.py and test_calibration.py use the same
# numbers): docs/math.md must keep all of them.
STATIC_REQUIRED = {
    ("relu", ""), ("leaky_relu", "alpha=0.01"), ("leaky_relu", "alpha=0.2"), ("abs", ""), ("tanh", ""),
    ("sigmoid", ""), ("softplus", ""), ("silu", ""), ("gelu", ""), ("gelu_tanh", ""), ("elu", "alpha=1.0"),
    ("selu", ""), ("mish", ""), ("hard_swish", ""),
}  # fmt: skip
ANACT_REQUIRED = {
    ("relu", ""), ("tanh", ""), ("sigmoid", ""), ("silu", ""), ("gelu", ""), ("elu", "alpha=1.0"), ("hard_swish", ""),
}  # fmt: skip


def table(tag: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the Markdown table after ``<!-- oracle-table: tag -->`` in docs/math.md."""
    lines = MATH.read_text(encoding="utf-8").splitlines()
    start = lines.index(f"<!-- oracle-table: {tag} -->")
    body = []
    for line in lines[start + 1 :]:
        if not line.startswith("|"):
            break
        body.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, sep, *rows = body
    assert set("".join(sep)) <= set("-:"), f"table {tag!r}: second line is not a separator"
    return header, rows


def params_of(cell: str) -> dict[str, float]:
    return {k: float(v) for k, v in (p.split("=") for p in cell.split(",") if p.strip())}


def test_static_table_matches_the_code():
    header, rows = table("static")
    assert header == ["kind", "params", "m1", "m2", "v", "b", "d2", "cs scale", "zz scale"]
    assert {(r[0], r[1]) for r in rows} >= STATIC_REQUIRED
    for kind, p, *numbers in rows:
        act, params = CATALOGUE[kind], params_of(p)
        m = gaussian_moments(act, 1.0, params)
        got = [
            m.m1,
            m.m2,
            m.v,
            m.b,
            m.d2,
            static_affine(act, params, 1.0, "center-scale").scale,
            static_affine(act, params, 1.0, "zeta-zero").scale,
        ]
        for name, want, have in zip(header[2:], numbers, got):
            assert abs(float(want) - have) <= TOL, f"{kind} {p}: {name} is {have:.7f} by the code, {want} in the doc"
        # §1.1's bounds: q·b² ≤ v ≤ q·d2 (Cauchy–Schwarz with Stein below, Poincaré above)
        assert m.b**2 - 1e-12 <= m.v <= m.d2 + 1e-12, kind


def test_anact_table_matches_the_code():
    header, rows = table("anact")
    assert header == ["kind", "params", "μ", "ρ", "ρ′", "λ (anact)", "λ (xavier)"]
    assert {(r[0], r[1]) for r in rows} >= ANACT_REQUIRED
    for kind, p, *numbers in rows:
        m = gaussian_moments(CATALOGUE[kind], 1.0, params_of(p))
        rho, drho = np.array([m.m2]), np.array([m.d2])  # X ~ N(0, 1): var X = 1, so ρ = E f², ρ′ = E f′²
        got = [m.m1, m.m2, m.d2, float(lambda_of(rho, drho, "anact")[0]), float(lambda_of(rho, drho, "xavier")[0])]
        for name, want, have in zip(header[2:], numbers, got):
            assert abs(float(want) - have) <= TOL, f"{kind} {p}: {name} is {have:.7f} by the code, {want} in the doc"
        assert got[3] >= got[4] - 1e-12, f"{kind}: §2.2 says λ(anact) ≥ λ(xavier)"


def test_closed_forms_quoted_in_math_md_match_the_quadrature():
    """§1.6: facts the piecewise quadrature is not given but must reproduce."""
    gelu, silu = gaussian_moments(CATALOGUE["gelu"]), gaussian_moments(CATALOGUE["silu"])
    sigmoid, softplus = gaussian_moments(CATALOGUE["sigmoid"]), gaussian_moments(CATALOGUE["softplus"])
    assert gelu.m1 == pytest.approx(1 / (2 * math.sqrt(math.pi)), abs=1e-12)
    assert gelu.m2 == pytest.approx(1 / 3 + 1 / (2 * math.pi * math.sqrt(3)), abs=1e-12)
    assert gelu.b == pytest.approx(0.5, abs=1e-12)
    assert silu.m1 == pytest.approx(sigmoid.b, abs=1e-12)
    assert softplus.b == pytest.approx(0.5, abs=1e-12) and softplus.d2 == pytest.approx(sigmoid.m2, abs=1e-12)


def test_homogeneous_scaling_of_section_1_5():
    """§1.5: for a positively homogeneous f, m1 ∝ √q, v ∝ q, b fixed: center-scale shift ∝ √q, scale ∝ 1/√q."""
    q = 4.0
    for kind in ("relu", "leaky_relu", "abs"):
        act = CATALOGUE[kind]
        one, at_q = static_affine(act, q=1.0), static_affine(act, q=q)
        assert at_q.shift == pytest.approx(one.shift * math.sqrt(q), rel=1e-12)
        assert at_q.scale == pytest.approx(one.scale / math.sqrt(q), rel=1e-12)
        zz1, zzq = static_affine(act, q=1.0, variant="zeta-zero"), static_affine(act, q=q, variant="zeta-zero")
        assert zzq.slope == pytest.approx(zz1.slope, abs=1e-12)


def sections(doc: Path) -> set[str]:
    """The section numbers of a docs/ file: headings like ``## 3. Folding`` or ``### 3.2 Forward``."""
    found = set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#+\s+(\d+(?:\.\d+)*)\.?\s", line)
        if m:
            found.add(m.group(1))
    return found


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:  # not a git checkout (an sdist): every text file under the root
        return [p for p in ROOT.rglob("*") if p.suffix in {".py", ".md", ".h", ".cc", ".cu", ".sh", ".txt"}]
    return [ROOT / p for p in out.stdout.splitlines() if Path(p).suffix in {".py", ".md", ".h", ".cc", ".cu", ".sh"}]


def test_every_docs_citation_names_an_existing_file_and_section():
    cite = re.compile(r"docs/([\w-]+\.md)(?:\s*(?:§|section\s)(\d+(?:\.\d+)*))?")
    known: dict[str, set[str]] = {}
    checked = 0
    for path in tracked_text_files():
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in cite.finditer(text):
            name, sec = m.group(1), m.group(2)
            doc = ROOT / "docs" / name
            assert doc.is_file(), f"{path.relative_to(ROOT)} cites docs/{name}, which does not exist"
            if sec:
                known.setdefault(name, sections(doc))
                where = path.relative_to(ROOT)
                assert sec in known[name], f"{where} cites docs/{name} §{sec}, which has no such section"
            checked += 1
    assert checked > 20  # the code cites these documents; zero citations would mean the pattern broke


def test_no_citation_of_documents_outside_the_repository():
    """The math and design notes the code once cited lived outside the repository; docs/ holds them now."""
    stale = re.compile(r"\b(MATH|DESIGN)\.md")
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in tracked_text_files()
        if p.is_file()
        for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if stale.search(line)
    ]
    assert not offenders, f"cite docs/ instead: {offenders}"


# ---------------------------------------------------------------- the reference pages and the command line

DOCS = ROOT / "docs"
REFERENCE = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]  # where a user looks an option up


def synopses(doc: Path) -> list[tuple[str, str]]:
    """``(subcommand, text)`` of each ``normact-onnx SUBCOMMAND …`` in a page's indented blocks.

    A synopsis goes on over lines that start with ``[`` (the optional arguments) or follow a trailing ``\\``.
    """
    found: list[list[str]] = []
    going = False
    for line in doc.read_text(encoding="utf-8").splitlines():
        text = line.strip().removeprefix("$ ")
        if not line.startswith("    "):
            going = False
            continue
        m = re.match(r"(?:\S*/)?normact-onnx\s+([a-z][\w-]*)(.*)", text)
        if m:
            found.append([m.group(1), m.group(2)])
            going = True
        elif going and (text.startswith("[") or found[-1][1].rstrip().endswith("\\")):
            found[-1][1] += " " + text
        else:
            going = False
    return [(cmd, " ".join(rest.split("#")[0].split())) for cmd, rest in found]


def test_every_option_of_every_command_is_in_the_reference():
    """The reference is complete: each long option of each subcommand is named on some page of docs/ (or README)."""
    from .conftest import subcommands

    text = " ".join(p.read_text(encoding="utf-8") for p in REFERENCE)
    missing = [
        f"{name} {option}"
        for name, parser in subcommands().items()
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help" and not re.search(re.escape(option) + r"(?![\w-])", text)
    ]
    assert missing == [], f"options no page documents: {missing}"


def test_every_option_a_synopsis_shows_exists():
    """No page shows an option its command does not have (a renamed or removed flag left in the docs)."""
    from .conftest import subcommands

    parsers = subcommands()
    checked = 0
    for page in REFERENCE:
        for cmd, rest in synopses(page):
            assert cmd in parsers, f"{page.name}: `normact-onnx {cmd}` is not a command"
            known = {o for a in parsers[cmd]._actions for o in a.option_strings}
            for option in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest):
                assert option in known, f"{page.name}: `normact-onnx {cmd}` has no option {option}"
                checked += 1
    assert checked > 50  # the synopses of cli.md alone show more; fewer means the pattern broke


def test_every_command_has_its_synopsis_in_the_reference():
    from .conftest import subcommands

    shown = {cmd for page in REFERENCE if page.parent == DOCS for cmd, _ in synopses(page)}
    assert shown >= set(subcommands()), set(subcommands()) - shown


@pytest.mark.parametrize("page", [ROOT / "README.md", DOCS / "cli.md"], ids=lambda p: p.name)
def test_the_exit_codes_are_stated(page):
    text = " ".join(page.read_text(encoding="utf-8").split())
    for code in ("`0` ok", "`1` `compare` found a difference", "`2` bad input or environment", "`3` internal error"):
        assert code in text, (page.name, code)
    assert "`130` interrupted" in text and "--verbose" in text


def test_relative_links_name_existing_files():
    """Every Markdown link to a file of the repository (README, CONTRIBUTING, docs/) points at one that exists."""
    checked = 0
    for page in [*REFERENCE, ROOT / "CONTRIBUTING.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:|#", target):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)} links {target}, which does not exist"
            checked += 1
    assert checked > 10
