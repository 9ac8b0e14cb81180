"""Two models side by side, one batch at a time: :class:`Comparison` measures, :class:`Tally` adds up.

The single-process run and the Ray workers (:mod:`.on_ray`) use the same two classes, so their results agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.feeding import Feeds, LoadedModel, Runner, feeds_for
from ..errors import NormactError
from ..streaming import Moments
from .outputs import ErrorStats
from .result import CompareResult
from .sites import SiteProbe, site_probes


@dataclass
class Tally:
    """What one or more batches measured: error statistics per output, moments per site probe, output shapes.

    Tallies merge exactly (counts, sums, maxima; the p99 sample is re-drawn), so batches measured on
    different Ray workers add up to the single-process result.
    """

    errors: dict[str, ErrorStats]
    sites: list[tuple[Moments, Moments]]  # (pre, post) per probe, in Comparison.probes order
    shapes: dict[str, tuple[int, ...]]
    batches: int = 0

    def merge(self, other: Tally) -> Tally:
        return Tally(
            {k: v.merge(other.errors[k]) for k, v in self.errors.items()},
            [(a.merge(c), b.merge(d)) for (a, b), (c, d) in zip(self.sites, other.sites)],
            {**other.shapes, **self.shapes},
            self.batches + other.batches,
        )


class Comparison:
    """Two models ready to run side by side; :meth:`tally` measures one batch (the single-process and Ray runs).

    ``b`` None: model A alone, its sites measured and no outputs compared (``compare A --sites``).
    """

    def __init__(
        self, a: LoadedModel, b: LoadedModel | None, two: bool, sites: bool, reference: bool,
        providers: list[str] | None, atol: float, rtol: float,
    ) -> None:  # fmt: skip
        self.atol, self.rtol = atol, rtol
        self.runtimes = ("ort", "reference" if reference else "ort")
        self.unreachable: list[dict[str, Any]] = []
        self.per_model: dict[str, list[SiteProbe]] = {"A": [], "B": []}
        if sites:
            for m in (a, b) if two and b is not None else (a,):
                p, u = site_probes(m)
                self.per_model[m.label] = p
                self.unreachable += u
        self.probes = self.per_model["A"] + self.per_model["B"]
        extra = {lbl: [n for p in self.per_model[lbl] for n in (p.pre, p.post)] for lbl in self.per_model}
        self.run_a = Runner(a, self.runtimes[0], providers, extra["A"])
        self.run_b = None if b is None else Runner(b, self.runtimes[1], providers, extra["B"])
        self.b = b
        self.pairs = [] if b is None else pair_outputs(a.output_names, b.output_names)

    def empty(self) -> Tally:
        return Tally({na: ErrorStats(self.atol, self.rtol) for na, _ in self.pairs},
                     [(Moments.empty(1), Moments.empty(1)) for _ in self.probes], {})  # fmt: skip

    def tally(self, feeds: Feeds, into: Tally | None = None) -> Tally:
        """One batch measured, added into ``into`` (the single-process run) or into a fresh tally (a Ray worker's)."""
        t = self.empty() if into is None else into
        out_a = dict(zip(self.run_a.names, self.run_a.outputs(feeds)))
        out_b: dict[str, np.ndarray] = {}
        if self.run_b is not None and self.b is not None:
            out_b = dict(zip(self.run_b.names, self.run_b.outputs(feeds_for(self.b, feeds))))
        for na, nb in self.pairs:
            t.errors[na].add(np.asarray(out_a[na]), np.asarray(out_b[nb]))
            t.shapes.setdefault(na, np.shape(out_a[na]))
        outs = [out_a] * len(self.per_model["A"]) + [out_b] * len(self.per_model["B"])
        for k, (p, o) in enumerate(zip(self.probes, outs)):
            pre, post = t.sites[k]
            t.sites[k] = (pre.merge(p.pre_moments(o[p.pre])), post.merge(Moments.of(o[p.post])))
        t.batches += 1
        return t

    def result(self, t: Tally, labels: tuple[str, str | None]) -> CompareResult:
        if t.batches == 0:
            raise NormactError("the data source gave no batches")
        outputs = [
            t.errors[na].result(na if na == nb else f"{na} / {nb}", t.shapes.get(na, ())) for na, nb in self.pairs
        ]
        for p, (pre, post) in zip(self.probes, t.sites):
            p.pre_stats, p.post_stats = pre, post
        site_rows = [p.result() for p in self.probes] + self.unreachable
        passed = all(o["passed"] for o in outputs)
        return CompareResult(outputs, site_rows, passed, self.atol, self.rtol, t.batches, self.runtimes, labels)


def pair_outputs(a: list[str], b: list[str]) -> list[tuple[str, str]]:
    """Outputs matched by name, or by position when the two models name them differently."""
    if set(a) <= set(b):
        return [(n, n) for n in a]
    if len(a) == len(b):
        return list(zip(a, b))
    raise NormactError(f"the models' outputs do not correspond: A has {', '.join(a)}; B has {', '.join(b)}")
