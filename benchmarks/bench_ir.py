"""Should the passes run on ``onnx_ir`` instead of protobuf? The measurements issue 9 §2 asks for, in one run.

1. Speed on all-MiniLM-L6-v2 (torchscript export, ~90 MB inline weights), interleaved, median of N, every
   ratio against ``onnx.load`` + ``onnx.save`` of the same file measured in the same loop:
   ``normact-onnx rewrite --no-verify`` (today's protobuf layer), ``onnx_ir.load`` + ``onnx_ir.save``, and
   ``onnx.load`` → ``onnx_ir.serde.deserialize_model`` → ``serialize_model`` → ``onnx.save`` (the IR entered
   from a ModelProto, as an API accepting a ModelProto would).
2. Peak resident memory of loading and saving a ~3 GB external-data model (sparse file, as in
   ``bench_rewrite.py``), each in a fresh process: protobuf (``onnx.load(load_external_data=False)`` +
   ``onnx.save`` beside it), ``onnx_ir.load`` + ``onnx_ir.save`` beside it (references kept),
   ``onnx_ir.save`` into another folder writing the data anew (``external_data=``: what carrying the
   weights to a new folder costs through the IR), and today's ``normact-onnx rewrite --no-verify``.
3. Preservation: after an ``onnx_ir`` round trip (``load`` + ``save``), is every ``NodeProto`` byte-identical
   (deterministic serialization, graphs, subgraphs and functions), every initializer, and the rest of the
   model (opsets, IR version, metadata, doc strings, inputs/outputs, functions)? ``value_info`` entries are
   counted separately (the preservation rule allows adding or dropping them). On MiniLM, on every example
   model in ``models/`` and on ``rewrite``'s own output (``Norm<Act>`` functions, ``normact.*`` metadata).

Usage: python benchmarks/bench_ir.py [--repeat 5] [--skip-big] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from bench_rewrite import make_big_model
from machine import machine

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn: Callable[[], None], wall: list[float], cpu: list[float]) -> None:
    """Wall and CPU seconds of one call (CPU time is what a loaded, shared machine distorts least)."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)


def bench_speed(src: Path, work: Path, repeat: int) -> list[dict[str, Any]]:
    from normact_onnx.api import rewrite

    def baseline() -> None:
        onnx.save(onnx.load(str(src)), str(work / "copy.onnx"))

    def ours() -> None:
        rewrite(src, work / "out.onnx", verify=False)

    def ir_file() -> None:
        ir.save(ir.load(src), work / "ir.onnx")

    def ir_serde() -> None:
        onnx.save(ir.serde.serialize_model(ir.serde.deserialize_model(onnx.load(str(src)))), str(work / "serde.onnx"))

    variants = {"baseline": baseline, "rewrite": ours, "ir": ir_file, "serde": ir_serde}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up: page cache, imports
        fn()
    for _ in range(repeat):  # interleaved: every variant sees the same machine state
        for k, fn in variants.items():
            _timed(fn, wall[k], cpu[k])
    med = {k: statistics.median(v) for k, v in wall.items()}
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}
    base = "onnx.load + onnx.save (same file, same loop)"
    detail = (
        f"baseline {med['baseline']:.3f} s wall, {mcpu['baseline']:.3f} s CPU; "
        f"model {src.stat().st_size / 1e6:.1f} MB; median of {repeat}"
    )
    return [
        {
            "name": "MiniLM: normact-onnx rewrite --no-verify (protobuf layer)",
            "ratio": round(med["rewrite"] / med["baseline"], 2),
            "cpu_ratio": round(mcpu["rewrite"] / mcpu["baseline"], 2),
            "baseline": base,
            "target": "≤ 2.0 (moonshot 1.2)",
            "seconds": round(med["rewrite"], 3),
            "detail": detail,
        },
        {
            "name": "MiniLM: onnx_ir.load + onnx_ir.save",
            "ratio": round(med["ir"] / med["baseline"], 2),
            "cpu_ratio": round(mcpu["ir"] / mcpu["baseline"], 2),
            "baseline": base,
            "seconds": round(med["ir"], 3),
            "detail": detail,
        },
        {
            "name": "MiniLM: onnx.load → ir.serde.deserialize_model → serialize_model → onnx.save",
            "ratio": round(med["serde"] / med["baseline"], 2),
            "cpu_ratio": round(mcpu["serde"] / mcpu["baseline"], 2),
            "baseline": base,
            "seconds": round(med["serde"], 3),
            "detail": detail,
        },
    ]


def _peak(code: str) -> tuple[float, float]:
    """Peak RSS (MB, VmHWM of a fresh process: not inherited through fork) and seconds of ``code``."""
    wrapped = (
        "import time\nt = time.perf_counter()\n"
        + code
        + "\nsecs = time.perf_counter() - t\n"
        + "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        + "print(int(hwm) / 1024, secs)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory probe failed: {out.stderr.strip().splitlines()[-1:]}")
    rss, secs = out.stdout.strip().splitlines()[-1].split()
    return float(rss), float(secs)


def bench_big(work: Path) -> list[dict[str, Any]]:
    path = make_big_model(work)
    gb = (work / "big.weights").stat().st_size / 2**30
    other = work / "elsewhere"
    other.mkdir()
    p, o = str(path), str(work)
    cases = [
        (
            "protobuf: onnx.load(load_external_data=False) + onnx.save beside it",
            f"import onnx\nm = onnx.load({p!r}, load_external_data=False)\nonnx.save(m, {o!r} + '/pb.onnx')",
        ),
        (
            "onnx_ir: ir.load + ir.save beside it (external references kept)",
            f"import onnx_ir as ir\nm = ir.load({p!r})\nir.save(m, {o!r} + '/ir.onnx')",
        ),
        (
            "onnx_ir: ir.load + ir.save to another folder, external data written anew",
            f"import onnx_ir as ir\nm = ir.load({p!r})\n"
            f"ir.save(m, {str(other)!r} + '/ir.onnx', external_data='ir.data')",
        ),
        (
            "today: normact-onnx rewrite --no-verify (carries the data file)",
            "from normact_onnx.cli import main\n"
            f"assert main(['rewrite', {p!r}, '-o', {o!r} + '/nw.onnx', '--no-verify']) == 0",
        ),
    ]
    rows = []
    for name, code in cases:
        rss, secs = _peak(code)
        rows.append(
            {
                "name": f"{gb:.1f} GB external data — {name}",
                "peak_rss_mb": round(rss),
                "seconds": round(secs, 2),
                "target": "< 500 MB",
            }
        )
        for f in (other / "ir.data", work / "nw.onnx.data"):
            f.unlink(missing_ok=True)
    return rows


# ---- preservation -----------------------------------------------------------------------------------------------


def _graph_nodes(g: onnx.GraphProto, where: str) -> Iterator[tuple[str, onnx.NodeProto]]:
    for i, n in enumerate(g.node):
        yield f"{where}/{i}", n
        for a in n.attribute:
            for k, sub in enumerate([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _graph_nodes(sub, f"{where}/{i}.{a.name}{k}")


def _all_nodes(m: onnx.ModelProto) -> list[tuple[str, onnx.NodeProto]]:
    out = list(_graph_nodes(m.graph, "main"))
    for f in m.functions:
        out += [(f"{f.domain}::{f.name}/{i}", n) for i, n in enumerate(f.node)]
    return out


def _value_infos(g: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    yield from g.value_info
    for n in g.node:
        for a in n.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                yield from _value_infos(sub)


def _initializers(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from g.initializer
    for n in g.node:
        for a in n.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                yield from _initializers(sub)


def _b(msg: Any) -> bytes:
    return msg.SerializeToString(deterministic=True)


def _without_value_info(n: onnx.NodeProto) -> onnx.NodeProto:
    """``n`` with the ``value_info`` of its subgraphs (If/Loop/Scan bodies) removed, recursively."""
    out = onnx.NodeProto()
    out.CopyFrom(n)
    for a in out.attribute:
        for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            del sub.value_info[:]
            for k, inner in enumerate(sub.node):
                sub.node[k].CopyFrom(_without_value_info(inner))
    return out


def _semantic(m: onnx.ModelProto, name: str) -> Any:
    """Fields whose byte form may change without changing their meaning, compared by meaning."""
    if name == "opset_import":  # an omitted domain and an explicit "" are the same default domain
        return sorted((i.domain, i.version) for i in m.opset_import)
    if name == "metadata_props":  # a map: order carries nothing
        return sorted((p.key, p.value) for p in m.metadata_props)
    return _field(m, name)


def compare_round_trip(src: Path, work: Path) -> dict[str, Any]:
    """Round-trip ``src`` through onnx_ir and say what changed, field by field."""
    dst = work / f"rt_{src.name}"
    ir.save(ir.load(src), dst)
    a, b = onnx.load(str(src), load_external_data=False), onnx.load(str(dst), load_external_data=False)
    na, nb = _all_nodes(a), _all_nodes(b)
    same_nodes = sum(1 for (_, x), (_, y) in zip(na, nb) if _b(x) == _b(y)) if len(na) == len(nb) else 0
    same_but_vi = (
        sum(1 for (_, x), (_, y) in zip(na, nb) if _b(_without_value_info(x)) == _b(_without_value_info(y)))
        if len(na) == len(nb)
        else 0
    )
    diff_fields: set[str] = set()
    if len(na) == len(nb):
        for (_, x), (_, y) in zip(na, nb):
            if _b(x) != _b(y):
                diff_fields.update(
                    f.name for f in onnx.NodeProto.DESCRIPTOR.fields if _field(x, f.name) != _field(y, f.name)
                )
    ia, ib = list(_initializers(a.graph)), list(_initializers(b.graph))
    va, vb = {v.name: _b(v) for v in _value_infos(a.graph)}, {v.name: _b(v) for v in _value_infos(b.graph)}

    def rest(m: onnx.ModelProto) -> onnx.ModelProto:
        r = onnx.ModelProto()
        r.CopyFrom(m)
        del r.graph.node[:], r.graph.initializer[:], r.graph.value_info[:]
        return r

    ra, rb = rest(a), rest(b)
    model_fields = [f.name for f in onnx.ModelProto.DESCRIPTOR.fields if f.name != "graph"]
    graph_fields = [f.name for f in onnx.GraphProto.DESCRIPTOR.fields]
    other = [f for f in model_fields if _field(ra, f) != _field(rb, f)]
    other += [f"graph.{f}" for f in graph_fields if _field(ra.graph, f) != _field(rb.graph, f)]
    return {
        "model": src.name,
        "nodes": len(na),
        "nodes_identical": same_nodes,
        "nodes_identical_but_subgraph_value_info": same_but_vi,
        "node_fields_differing": sorted(diff_fields),
        "initializers_identical": f"{sum(1 for x, y in zip(ia, ib) if _b(x) == _b(y))}/{len(ia)}"
        if len(ia) == len(ib)
        else f"count {len(ia)} → {len(ib)}",
        "value_info": f"{len(va)} → {len(vb)}",
        "value_info_added": len(set(vb) - set(va)),
        "value_info_dropped": len(set(va) - set(vb)),
        "value_info_changed": sum(1 for k in set(va) & set(vb) if va[k] != vb[k]),
        "other_fields_differing": other,
        "other_fields_differing_in_meaning": [f for f in other if _semantic(a, f) != _semantic(b, f)],
    }


def _field(msg: Any, name: str) -> Any:
    v = getattr(msg, name)
    if hasattr(v, "SerializeToString"):
        return _b(v)
    try:
        return [(_b(x) if hasattr(x, "SerializeToString") else x) for x in v]
    except TypeError:
        return v


def bench_preservation(minilm: Path, work: Path) -> list[dict[str, Any]]:
    from normact_onnx.api import rewrite

    rewritten = work / "minilm.normact.onnx"
    rewrite(minilm, rewritten, verify=False)
    small = sorted((ROOT / "models").glob("*.onnx"))
    small_out = []
    for p in small:
        out = work / f"{p.stem}.normact.onnx"
        rewrite(p, out, verify=False)
        small_out.append(out)
    return [compare_round_trip(p, work) for p in (minilm, rewritten, *small, *small_out)]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    nodes = sum(r["nodes"] for r in rows)
    same = sum(r["nodes_identical"] for r in rows)
    same_vi = sum(r["nodes_identical_but_subgraph_value_info"] for r in rows)
    return {
        "name": f"onnx_ir round trip preservation over {len(rows)} models",
        "nodes_identical": f"{same}/{nodes}",
        "nodes_identical_but_subgraph_value_info": f"{same_vi}/{nodes}",
        "models_with_node_changes": [r["model"] for r in rows if r["nodes_identical"] != r["nodes"]],
        "node_fields_differing": sorted({f for r in rows for f in r["node_fields_differing"]}),
        "value_info_added": sum(r["value_info_added"] for r in rows),
        "value_info_dropped": sum(r["value_info_dropped"] for r in rows),
        "value_info_changed": sum(r["value_info_changed"] for r in rows),
        "other_fields_differing_in_bytes": sorted({f for r in rows for f in r["other_fields_differing"]}),
        "other_fields_differing_in_meaning": sorted({f for r in rows for f in r["other_fields_differing_in_meaning"]}),
        "initializers": {
            r["model"]: r["initializers_identical"]
            for r in rows
            if "/" not in r["initializers_identical"]
            or r["initializers_identical"].split("/")[0] != r["initializers_identical"].split("/")[1]
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-big", action="store_true", help="skip the 3 GB external-data model")
    ap.add_argument("--json", action="store_true", help="print one JSON object (for run_all.py)")
    ap.add_argument("--per-model", action="store_true", help="print the preservation result of every model")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "models"))
    from minilm import export_minilm

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "minilm.onnx"
        export_minilm(src, exporter="torchscript")
        rows += bench_speed(src, work, args.repeat)
        per_model = bench_preservation(src, work)
        rows.append(summarize(per_model))
        if not args.skip_big:
            rows += bench_big(work)
    result = {
        "benchmark": "ir",
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "versions": f"onnx {onnx.__version__}, onnx_ir {ir.__version__}",
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"onnx_ir vs protobuf — {result['machine']} — {result['date']} — {result['versions']}")
    for r in rows:
        print("  " + ", ".join(f"{k}={v}" for k, v in r.items()))
    if args.per_model:
        for r in per_model:
            print("  " + json.dumps(r, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
