"""Plain aligned text tables for the terminal (no third-party dependency).

Every table a person reads (rewrite's sites, calibration's factors, compare's errors) is laid out here,
so the commands, the calibration report and the comparison share one layout and none of them imports the CLI.
"""

from __future__ import annotations

from typing import Any


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """``rows`` as left-aligned columns under a header and a dashed rule; missing or None cells are empty."""
    cells = [[str(r.get(c, "")) if r.get(c) is not None else "" for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*columns), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in cells])


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 site``, ``2 sites``: a count with its noun in the right number (``many``: an irregular plural)."""
    if n == 1:
        return f"1 {word}"
    return f"{n} {many or (word + 'es' if word.endswith(('s', 'ch')) else word + 's')}"
