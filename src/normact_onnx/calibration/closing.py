"""The closing check of in-situ calibration: measure the model as written, repair in depth order (docs/math.md §4.2).

In situ, each batch normalizes every site with *its own* statistics, but the model
is written with the statistics pooled over all batches. With large batches the two
agree; with a few samples per batch they drift apart, and the drift compounds with
depth (a site measured downstream of per-batch constants sees another input than it
will see downstream of the pooled ones).

The check runs the written model's normalization, every normalized site at its
pooled constants exactly as deployed, instrumented over the same batches, and
recomputes each site's constants from what it now measures. A site is *settled*
when its recomputed constants equal its current ones within a tolerance and every
site upstream of it is settled. A repair pass replaces the constants of the
shallowest unsettled sites only (no unsettled site upstream of them): those were
just measured with final constants everywhere upstream, so their new constants are
exact and stay so; the sites after them are re-measured by the next pass (none after
them: no pass is needed). At convergence every site was measured with the final
constants upstream; the common case is one check pass that finds every site settled.

Fixing all constants at once and rewriting them all from the second pass (tried,
benchmarks/README.md) oscillates: every site is then measured with constants
upstream that the same pass replaces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..data.inputs import model_inputs
from ..data.options import DataOptions
from ..data.readers import open_source
from ..graph import outer_names, structure_fingerprint, unique_namer
from ..io import ModelLike, clamp_ir, load_model_like, model_folder
from ..methods.static import Affine
from ..outcome import Refusal
from ..passes.find import Site, find_sites
from ..passes.unfuse import split_fused_sites
from ..valuetypes import infer_value_types
from .instrument import Instrumented, instrument
from .run import calibration_session, measure, on_cpu
from .stats import CalibrationStats, SiteStats

ConstantsOf = Callable[[CalibrationStats], Callable[[Site], Affine | Refusal]]
"""Statistics → the written model's per-site constants (the orchestrator passes ``policy.method_constants``)."""

TOLERANCE = 0.1
"""A site is off when its recomputed scale departs by more than this (relative), or its shift or slope moves
its normalized output by more than this many standard deviations."""

MAX_PASSES = 8
"""Check and repair passes at most after the in-situ one (each is one instrumented run over the batches)."""

AUTO_BELOW = 32
"""``closing=None`` (auto) runs the check when the batches hold fewer rows than this: measured on the real-model
set (benchmarks/README.md), the single pass held every site's property at 32 rows, not at 2."""


def batch_rows(model: ModelLike, source: DataOptions) -> int | None:
    """The leading dimension of the first batch's arrays (its rows: samples, usually), None when it has none."""
    src, _ = load_model_like(model)
    reader = open_source(source, model_inputs(src))
    for _, raw in reader.batches():
        sizes = [np.shape(v)[0] for v in dict(raw).values() if np.ndim(v) >= 1]
        return min(sizes) if sizes else None
    return None


def wanted(closing: bool | None, model: ModelLike, source: DataOptions) -> bool:
    """Whether to run the closing check: as asked, or (None, auto) when the batches are small."""
    if closing is not None:
        return closing
    rows = batch_rows(model, source)
    return rows is not None and rows < AUTO_BELOW


@dataclass
class Closing:
    """What the closing check did: passes run, the sites each repair replaced, whether it converged."""

    passes: int = 0
    repaired: list[list[str]] = field(default_factory=list)  # per repair pass, the sites' names
    converged: bool = False
    off: list[str] = field(default_factory=list)  # sites the last pass found off, when the pass cap stopped it

    def as_dict(self) -> dict[str, object]:
        return {
            "passes": self.passes,
            "repaired": [len(r) for r in self.repaired],
            "converged": self.converged,
            "off": self.off,
        }


def shallowest(off: Iterable[str], upstream: dict[str, frozenset[str]]) -> set[str]:
    """The off sites with no off site upstream of them: the ones a repair pass may replace.

    ``upstream``: every site → all the sites it depends on (transitively). A site downstream of an off site
    is unsettled whatever it measures (it was measured with constants upstream that will change), so only
    these are repaired; the rest wait for the next measurement.
    """
    off = set(off)
    return {s for s in off if not (upstream.get(s, frozenset()) & off)}


def unsettled(off: Iterable[str], upstream: dict[str, frozenset[str]]) -> set[str]:
    """The off sites and every site with an off site upstream."""
    off = set(off)
    return off | {s for s, up in upstream.items() if up & off}


def is_off(current: Affine, new: Affine, s: SiteStats, tol: float = TOLERANCE) -> bool:
    """Whether constants recomputed from ``s`` depart from the ``current`` ones by more than ``tol``.

    Scale relatively; shift and slope by how far they move the normalized output, in its standard deviations.
    """
    sd_f = np.sqrt(np.maximum(np.asarray(s.f.var, np.float64), 1e-30)).reshape(-1)
    sd_x = np.sqrt(np.maximum(np.asarray(s.x.var, np.float64), 0.0)).reshape(-1)

    def flat(v: object) -> np.ndarray:
        return np.asarray(v, np.float64).reshape(-1)

    old_scale, new_scale = flat(current.scale), flat(new.scale)
    scale = np.abs(new_scale / np.where(old_scale != 0, old_scale, 1e-30) - 1.0)
    shift = np.abs(flat(new.shift) - flat(current.shift)) / sd_f
    slope = np.abs(flat(new.slope) - flat(current.slope)) * sd_x / sd_f
    worst = max(float(np.max(scale)), float(np.max(shift)), float(np.max(slope)))
    return not worst <= tol  # NaN is off


def site_upstream(model: onnx.ModelProto, sites: list[Site]) -> dict[str, frozenset[str]]:
    """Every site → the sites upstream of it, through the main graph's data flow (a site inside a control-flow
    body counts as its main-graph node; the node's subgraphs' outer reads count as its inputs)."""
    index = {s.output: i for i, s in enumerate(sites)}
    at: dict[int, list[Site]] = {}
    for s in sites:
        c, node = s.container, s.root
        while c.parent is not None and c.owner is not None:
            node, c = c.owner, c.parent
        at.setdefault(id(node), []).append(s)
    reach: dict[str, int] = {}
    masks: dict[str, int] = {}
    for node in model.graph.node:
        inputs = [*node.input, *sorted(outer_names(node))]
        mask = 0
        for i in inputs:
            mask |= reach.get(i, 0)
        here = at.get(id(node), [])
        for s in here:
            masks[s.output] = reach.get(s.input, mask) if s.container.parent is None else mask
        out = mask
        for s in here:
            out |= 1 << index[s.output]
        for o in node.output:
            reach[o] = out
    names = [s.output for s in sites]
    return {k: frozenset(names[i] for i in range(len(names)) if m >> i & 1 and names[i] != k) for k, m in masks.items()}


@dataclass
class Fixed:
    """The model as written, instrumented, its constants fed per pass: the raw outputs keyed back to the sites."""

    inst: Instrumented
    sites: list[Site]  # the original model's sites (what ``constants_of`` answers for)
    upstream: dict[str, frozenset[str]]
    feeds: dict[str, tuple[str, str, str, np.dtype]]  # site -> (scale, shift, slope) input names, element type
    raw_to_site: dict[str, str]

    def feed(self, constants: dict[str, Affine]) -> dict[str, np.ndarray]:
        """The constant inputs for one pass: a site without constants (refused) passes f unchanged."""
        out = {}
        for k, (scale, shift, slope, dtype) in self.feeds.items():
            a = constants.get(k, Affine(1.0, 0.0, 0.0))
            for name, v in ((scale, a.scale), (shift, a.shift), (slope, a.slope)):
                out[name] = np.asarray(v, dtype=dtype)
        return out


def fixed_model(
    m: onnx.ModelProto,
    sites: list[Site],
    constants: dict[str, Affine],
    base_dir: str | None,
    per_channel: bool,
    with_slope: bool = True,
    ort_f: bool = True,
) -> Fixed:
    """An instrumented copy in which each site ``constants`` names writes ``scale·(f − shift − slope·x)`` (as the
    written model does) with constants as inputs (one session for every pass, the constants fed per run; inputs,
    not overridable initializers, which ONNX Runtime warns about); the activation's raw output takes a new name,
    which the statistics measure.

    ``m`` (edited in place): the model with its fused sites split, ``sites`` its sites (``find_sites``).
    ``with_slope``: False when the method's slope is always 0 (ANAct, static center-scale): two ops fewer.
    ``ort_f``: the statistics ops may compute ONNX Runtime's CPU f themselves (:mod:`.ort_f`); False off the CPU."""
    types = infer_value_types(m)
    fresh = unique_namer(m)
    upstream = site_upstream(m, sites)
    renamed: dict[str, str] = {}
    feeds: dict[str, tuple[str, str, str, np.dtype]] = {}
    for site in sites:
        a = constants.get(site.output)
        if a is None:
            continue
        elem = types.elem_type(site.input) or TensorProto.FLOAT
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
        raw = fresh(f"{site.output}__normact_raw")
        site.container.set_output(site.root, 0, raw)
        renamed[raw] = site.output
        names = []
        for what, v in (("scale", a.scale), ("shift", a.shift), ("slope", a.slope)):
            name = fresh(f"{site.output}__normact_{what}")
            m.graph.input.append(helper.make_tensor_value_info(name, elem, list(np.shape(v))))
            names.append(name)
        scale, shift, slope = names
        lin, cen, off = (fresh(f"{site.output}__normact_{w}") for w in ("lin", "centred", "shifted"))
        nodes = [
            helper.make_node("Mul", [slope, site.input], [lin], name=lin),
            helper.make_node("Sub", [raw, lin], [cen], name=cen),
        ]
        if not with_slope:
            nodes, cen = [], raw
        nodes += [
            helper.make_node("Sub", [cen, shift], [off], name=off),
            helper.make_node("Mul", [off, scale], [site.output], name=fresh(f"{site.output}__normact_scaled")),
        ]
        site.container.insert_after(site.root, nodes)
        feeds[site.output] = (scale, shift, slope, dtype)
    inst = instrument(m, base_dir, per_channel, ort_f=ort_f)
    clamp_ir(inst.model)
    raw_to_site = {s.output: renamed.get(s.output, s.output) for s in inst.sites}
    return Fixed(inst, sites, upstream, feeds, raw_to_site)


def measure_fixed(
    fixed: Fixed,
    session: object,
    constants: dict[str, Affine],
    source: DataOptions,
    base_dir: str | None,
    per_channel: bool,
    fingerprint: str,
) -> CalibrationStats:
    """The statistics of every site with the normalized sites at ``constants``, keyed as in the original model."""
    feed = fixed.feed(constants)
    stats = measure(fixed.inst, source, base_dir, per_channel, fingerprint, extra=feed, session=session, quiet=True)
    key = fixed.raw_to_site
    stats.sites = {key[k]: dataclasses.replace(v, key=key[k]) for k, v in stats.sites.items()}
    stats.skipped = {key.get(k, k): v for k, v in stats.skipped.items()}
    return stats


def close(
    model: ModelLike,
    source: DataOptions,
    stats: CalibrationStats,
    constants_of: ConstantsOf,
    *,
    providers: list[str] | None = None,
    tol: float = TOLERANCE,
    max_passes: int = MAX_PASSES,
) -> tuple[CalibrationStats, Closing]:
    """Check the in-situ ``stats`` in the model as written, repairing in depth order (the module doc).

    Returns statistics from which ``constants_of`` gives the final constants (each normalized site's record is
    the one its constants came from; the others' the last measurement) and what was done.
    """
    src, path = load_model_like(model)
    base_dir = model_folder(path)
    normalized = set(stats.settings.get("normalized_in_situ") or [])
    chosen = dict(stats.sites)  # site -> the record its current constants come from
    work = onnx.ModelProto()
    work.CopyFrom(src)
    split_fused_sites(work, base_dir)
    every = find_sites(work, base_dir)
    sites = [s for s in every if s.output in normalized]

    def constants(records: dict[str, SiteStats]) -> dict[str, Affine]:
        rule = constants_of(dataclasses.replace(stats, sites=records))
        out = {}
        for s in sites:
            a = rule(s)
            if isinstance(a, Affine):
                out[s.output] = a
        return out

    current = constants(chosen)
    settings = stats.settings
    slope = settings.get("method") == "static" and settings.get("variant", "center-scale") != "center-scale"
    fixed = fixed_model(work, every, current, base_dir, stats.per_channel, slope, on_cpu(providers))
    upstream = fixed.upstream
    session = calibration_session(fixed.inst.model, base_dir, providers)
    fingerprint = structure_fingerprint(src)
    report = Closing()
    latest = stats
    while report.passes < max_passes:
        latest = measure_fixed(fixed, session, current, source, base_dir, stats.per_channel, fingerprint)
        report.passes += 1
        records = {k: latest.sites.get(k, v) for k, v in chosen.items()}
        fresh = constants(records)  # a site refused at first stays as the rewrite leaves it: raw, not fed
        off = {k for k, a in current.items() if k not in fresh or is_off(a, fresh[k], records[k], tol)}
        if not off:
            report.converged = True
            break
        repair = shallowest(off, upstream)
        report.repaired.append(sorted(chosen[k].name for k in repair))
        for k in repair:
            chosen[k] = records[k]
            if k in fresh:
                current[k] = fresh[k]
            else:  # refused now: fed as the identity, as the rewrite leaves it
                current.pop(k)
        report.off = sorted(chosen[k].name for k in off)  # the last measurement's; repairs are re-checked next pass
        if off == repair and not any(upstream.get(k, frozenset()) & repair for k in current):
            report.converged = True  # nothing measured after the repaired sites: they are exact, all else settled
            break
    if report.converged:
        report.off = []
    final = {k: (chosen[k] if k in normalized else latest.sites.get(k, v)) for k, v in stats.sites.items()}
    out = dataclasses.replace(stats, sites=final, settings={**stats.settings, "closing": report.as_dict()})
    return out, report
