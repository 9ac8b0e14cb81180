"""Sample batches → per-site statistics: the measuring half of ``calibrate``.

One ONNX Runtime session runs an instrumented copy of the model (see
:mod:`.instrument`) and returns only the statistics outputs; each batch's numbers
are folded into running moments at once, so nothing grows with the number of
batches. The constants (:mod:`normact_onnx.policy`) and the calibrated model (the
same rewrite pass as static normalization: ``Norm<Act>`` with scale = λ, shift = μ)
are the orchestrator's, :func:`normact_onnx.api.calibrate`, which this package never imports.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from ..data.inputs import model_inputs
from ..data.options import DataOptions
from ..data.readers import check_header, conform, open_source
from ..errors import NormactError
from ..graph import structure_fingerprint
from ..io import ModelLike, clamp_ir, external_locations, load_model_like, model_folder
from ..ort import make_session, require_onnxruntime
from ..passes.find import Site
from ..progress import bar as progress_bar
from ..selection import SiteSelection
from ..streaming import Moments
from .flat import FlatFolder
from .insitu import Normalizer
from .instrument import Instrumented, Probe, instrument
from .stats import CalibrationStats, SiteStats

# ORT level for calibration sessions: all of ONNX Runtime's graph optimizations. They cannot erase a site: the
# statistics (and, in situ, the normalization) read each site's pre-activation and raw output, so those values stay
# (a fusion needs the fused values to have no other reader); what a fusion changes is float rounding only.
OPTIMIZATION: bool | str = True


def calibration_session(
    model: onnx.ModelProto,
    base_dir: str | None,
    providers: list[str] | None = None,
    threads: int = 0,
    config: dict[str, str] | None = None,
) -> Any:
    """An ORT session for the instrumented copy: kernel library registered, all graph optimizations.

    External data stays where it is: ORT is told the model's folder instead of the
    copy being written next to it. ``threads``: intra-op threads (0: ORT's default;
    a Ray worker uses its one CPU); ``config``: more session configuration entries (a benchmark turns
    thread spinning off so interleaved sessions do not steal each other's cores).
    """
    require_onnxruntime()
    config = dict(config or {})
    if external_locations(model) and base_dir:
        config["session.model_external_initializers_file_folder_path"] = base_dir
    try:
        return make_session(model.SerializeToString(), providers, optimize=OPTIMIZATION, threads=threads, config=config)
    except Exception as e:
        raise NormactError(f"onnxruntime cannot run the model: {str(e).strip().splitlines()[0]}") from None


def collect(
    model: ModelLike,
    source: DataOptions,
    *,
    per_channel: bool = False,
    providers: list[str] | None = None,
    progress: bool = False,
    normalize: Normalizer | None = None,
    selection: SiteSelection | None = None,
) -> CalibrationStats:
    """Run the batches ``source`` names through the instrumented model and return the merged per-site statistics.

    ``normalize``: calibrate in situ (:mod:`.insitu`): the sites the ``selection`` flags
    (when None: a default rewrite's) leave to be normalized are normalized with each batch's
    statistics on their way through the copy, so every site is measured with the sites
    before it already normalized. None: measure the original network as it is.
    """
    src, path = load_model_like(model)
    base_dir = model_folder(path)
    specs = model_inputs(src)
    batches = source.batches
    reader = open_source(source, specs)
    noted: set[str] = set()  # arrays no input takes, said once
    if reader.headers is not None:  # files: every batch checked before the first run
        for i, (where, header) in enumerate(reader.headers()):
            if batches is not None and i >= batches:
                break
            check_header(specs, header, where, noted)
    inst = prepare(src, base_dir, per_channel, normalize, selection, providers)
    stats = measure(inst, source, base_dir, per_channel, structure_fingerprint(src), providers, progress, reader, noted)
    return finish(stats, inst, normalize)


def measure(
    inst: Instrumented,
    source: DataOptions,
    base_dir: str | None,
    per_channel: bool,
    fingerprint: str,
    providers: list[str] | None = None,
    progress: bool = False,
    reader: Any = None,
    noted: set[str] | None = None,
    extra: dict[str, np.ndarray] | None = None,
    session: Any = None,
    quiet: bool = False,
) -> CalibrationStats:
    """The batches ``source`` names through an instrumented copy: the merged per-site statistics (keyed as
    ``inst``'s sites). ``reader``: the source already opened (and its files checked) by :func:`collect`;
    None: opened here (a closing pass re-reads the data :func:`collect` read). ``noted``: arrays no input
    takes, already said. ``extra``: inputs fed with every batch, not read from the data (a closing pass's constants);
    ``session``: for ``inst.model``, made once for several passes; ``quiet``: no notes (a pass re-reading data)."""
    specs = [s for s in model_inputs(inst.model) if s.name not in (extra or {})]
    batches = source.batches
    noted = set() if noted is None else noted
    if reader is None:
        reader = open_source(source, specs)
    sess = session if session is not None else calibration_session(inst.model, base_dir, providers)
    stats = empty_stats(inst, per_channel, fingerprint)
    folder = FlatFolder(stats, inst, fold_probes)  # every main-graph site merged as one flat array per batch
    total = min(reader.total, batches) if reader.total and batches else (batches or reader.total)
    bar = progress_bar(total, "calibrating", progress, unit="batch")
    n = 0
    try:
        for where, raw in reader.batches():
            if batches is not None and n >= batches:
                break
            if quiet and isinstance(raw, dict):  # a re-read: its arrays no input takes were noted the first time
                noted.update(raw)
            feed = conform(specs, raw, where, noted)
            folder.fold(run_batch(sess, inst, {**feed, **extra} if extra else feed, where), where)
            n += 1
            bar.update()
    finally:
        bar.close()
    folder.flush()
    if n == 0:
        raise NormactError(f"{reader.describe}: no batches")
    stats.batches = n
    stats.sources = [reader.describe]
    return stats


def _check_finite(
    site: Site, where: str, x: Any, f: Any, d2: np.ndarray, xf: np.ndarray | None, in_situ: bool = False
) -> None:
    """A batch whose statistics are not finite poisons every later merge: refuse it by name.

    ``in_situ``: earlier sites were normalized on the way, so the overflow may be theirs, not the model's (a
    float16 model whose in-situ ANAct constants grow the variance past float16's range, 65504).
    """
    parts = [x.mean, x.m2, f.mean, f.m2, d2] + ([xf] if xf is not None else [])
    if not all(np.all(np.isfinite(p)) for p in parts):
        what = "its input" if not (np.all(np.isfinite(x.mean)) and np.all(np.isfinite(x.m2))) else "its output"
        why = (
            "check the data, or the model overflows on it; if the original model does not, the sites normalized "
            "in situ before it do: try --no-in-situ or --method static, or calibrate the float32 model"
            if in_situ
            else "check the data, or the model overflows on it"
        )
        raise NormactError(f"{where}: site {site.name} ({site.kind}): {what} holds NaN or Inf on this batch ({why})")


def finish(stats: CalibrationStats, inst: Instrumented, normalize: Normalizer | None) -> CalibrationStats:
    """Record how the statistics were measured; refuse a site to be normalized whose statistics are undefined."""
    stats.settings["in_situ"] = normalize is not None
    if normalize is not None:
        stats.settings.update(normalize.as_dict())
        stats.settings["normalized_in_situ"] = inst.in_situ
    for s in stats.ordered():  # a site left alone may be constant (a rewrite skips it with the reason)
        if s.key in inst.in_situ and s.x.n.size and np.all(s.x.n > 0) and not np.any(s.x.var > 0):
            raise NormactError(
                f"site {s.name} ({s.kind}): its pre-activation is constant on all {stats.batches} batches "
                "(zero variance): its statistics are undefined; calibrate on varied data or exclude it (--nodes)"
            )
    return stats


# ---- the pieces the single-process and the distributed (Ray) runs share ----------------------------------------


def on_cpu(providers: list[str] | None) -> bool:
    """Whether a copy runs on ONNX Runtime's CPU provider alone (None: the default, the CPU)."""
    return all(p == "CPUExecutionProvider" for p in providers or ["CPUExecutionProvider"])


def prepare(
    src: onnx.ModelProto,
    base_dir: str | None,
    per_channel: bool,
    normalize: Normalizer | None = None,
    selection: SiteSelection | None = None,
    providers: list[str] | None = None,
) -> Instrumented:
    """The instrumented copy (IR clamped for ONNX Runtime), or why nothing in the model can be calibrated.

    ``normalize``: in situ (:mod:`.insitu`), for the sites the ``selection`` flags (include, exclude,
    nodes, all_sites; None: a default rewrite's) leave to be normalized. ``providers``: where the copy
    runs; the statistics ops compute ONNX Runtime's f themselves only when that is the CPU (:mod:`.ort_f`).
    """
    selected = (selection or SiteSelection()).selected if normalize is not None else None
    inst = instrument(src, base_dir, per_channel, normalize=normalize, selected=selected, ort_f=on_cpu(providers))
    if not inst.probes:
        if not inst.sites:
            raise NormactError("no activation sites found: nothing to calibrate")
        why = "; ".join(sorted(set(inst.skipped.values())))
        raise NormactError(f"none of the {len(inst.sites)} activation sites can be calibrated ({why})")
    clamp_ir(inst.model)
    return inst


def run_batch(sess: Any, inst: Instrumented, feed: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """One checked batch through the instrumented model: statistic output name → value."""
    names = inst.output_names
    try:
        return dict(zip(names, sess.run(names, feed)))
    except Exception as e:
        raise NormactError(f"{where}: onnxruntime failed: {str(e).strip().splitlines()[0]}") from None


SiteRecord = tuple[Moments, Moments, np.ndarray, np.ndarray | None]  # x, f, mean f'², x·f co-moment


def batch_moments(
    inst: Instrumented, values: dict[str, np.ndarray], where: str = "", probes: list[Probe] | None = None
) -> list[SiteRecord]:
    """One run's outputs → per probe (site) this batch's moments of x and f, mean of f'(x)², co-moment.

    ``probes``: these only (default: all). A batch whose statistics are not finite is refused, naming the
    site and ``where``.
    """
    probes = inst.probes if probes is None else probes
    records = [probe.read(values) for probe in probes]
    mine = values if probes is inst.probes else {n: values[n] for p in probes for n in p.outputs.values()}
    if not np.isfinite(sum(float(np.sum(v)) for v in mine.values())):  # one check per batch
        for probe, rec in zip(probes, records):
            if rec[0].n.size:
                _check_finite(probe.site, where, *rec, in_situ=bool(inst.in_situ))
    return records


def fold(stats: CalibrationStats, inst: Instrumented, values: dict[str, np.ndarray], where: str = "") -> None:
    """Fold one batch's outputs into the running statistics (moments exactly, plus the gated EMA), site by site.

    :class:`.flat.FlatFolder` does the same for all main-graph sites at once; this is its per-site reference.
    """
    fold_probes(stats, inst, inst.probes, values, where)


def fold_probes(
    stats: CalibrationStats, inst: Instrumented, probes: list[Probe], values: dict[str, np.ndarray], where: str = ""
) -> None:
    """:func:`fold` for the given probes only."""
    for probe, (x, f, d2, xf) in zip(probes, batch_moments(inst, values, where, probes)):
        if x.n.size:
            stats.sites[probe.site.output].add(x, f, d2, xf)


def empty_stats(inst: Instrumented, per_channel: bool, fp: str) -> CalibrationStats:
    """One SiteStats per probe, no data yet (the first batch fixes each site's channel count).

    ``fp``: the model's structure fingerprint (statistics are refused for another model).
    """
    sites = {}
    for p in inst.probes:
        s = p.site
        sites[s.output] = SiteStats(
            s.output, s.name, s.kind, s.path, p.depth, p.channel_axis, p.channel_shape,
            Moments.empty(0), Moments.empty(0), np.zeros(0),
        )  # fmt: skip
    return CalibrationStats(sites, per_channel, 0, fp, [], dict(inst.skipped))
