"""What ``compare`` returns and prints: the JSON-ready report and the human-readable tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..texttable import table


@dataclass
class CompareResult:
    """Per-output error statistics, per-site measurements, and the verdict."""

    outputs: list[dict[str, Any]]
    sites: list[dict[str, Any]]
    passed: bool
    atol: float
    rtol: float
    batches: int
    runtimes: tuple[str, str]
    models: tuple[str, str | None]  # B None: one model's sites measured, no outputs compared

    def report(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "atol": self.atol,
            "rtol": self.rtol,
            "batches": self.batches,
            "a": {"model": self.models[0], "runtime": self.runtimes[0]},
            "b": None if self.models[1] is None else {"model": self.models[1], "runtime": self.runtimes[1]},
            "outputs": self.outputs,
            "sites": self.sites,
        }

    def table(self) -> str:
        """Human-readable tables (outputs, then sites)."""

        def num(v: float | None, spec: str) -> str:
            return "n/a" if v is None else format(v, spec)

        rows = [
            {
                "output": o["output"],
                "max_abs": num(o["max_abs"], ".3g"),
                "mean_abs": num(o["mean_abs"], ".3g"),
                "max_rel": num(o["max_rel"], ".3g"),
                "mean_rel": num(o["mean_rel"], ".3g"),
                "p99_abs": num(o["p99_abs"], ".3g"),
                "cosine": num(o["cosine"], ".8f"),
                "result": ("pass" if o["passed"] else "FAIL") + (f" ({o['error']})" if "error" in o else ""),
            }
            for o in self.outputs
        ]
        cols = ["output", "max_abs", "mean_abs", "max_rel", "mean_rel", "p99_abs", "cosine", "result"]
        text = table(rows, cols) if self.models[1] is not None else f"{self.models[0]}: one model, outputs not compared"
        if self.sites:
            fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
            srows = [{k: fmt(v) for k, v in s.items()} for s in self.sites]
            for row, site in zip(srows, self.sites):
                if "holds" in site:
                    row["holds"] = "yes" if site["holds"] else "MISSED"
            scols = ["model", "site", "kind", "method", "pre_mean", "pre_var", "mean", "var", "property", "value"]
            scols += ["target", "holds", "note"]
            missed = sum(1 for site in self.sites if site.get("holds") is False)
            text += "\n\nnormalized sites (pre = the activation's input; mean/var = the normalized output):\n"
            text += table(srows, [c for c in scols if any(c in s for s in self.sites)])
            measured = sum(1 for site in self.sites if "holds" in site)
            text += f"\n{measured - missed} of {measured} measured sites hold their property"
            if missed:
                text += f"; {missed} MISSED (calibrate on representative data, in situ, to fix)"
        if self.models[1] is None:
            return text + f"\n\nmeasured on {self.batches} batch(es)"
        verdict = "PASS" if self.passed else "FAIL"
        text += f"\n\n{verdict}: atol={self.atol:g} rtol={self.rtol:g}, {self.batches} batch(es)"
        return text
