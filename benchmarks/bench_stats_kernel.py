"""The statistics op alone on yolov8n-sized tensors against plain memory passes (issue 24, calibration speed).

Why: calibration's instrumented copy spends most of its extra time in ``ai.normact::NormSiluStats``; this
measures that kernel by itself (GB/s of x read) next to ONNX Runtime's own passes over the same tensor
(``ReduceSumSquare`` per channel: one read; ``Sigmoid``: one read and one write), in one process,
variants interleaved, median of ``--repeats`` runs each, 1 and 2 threads (thread spinning off).
Run it with ``NORMACT_LIBRARY_DIR`` naming another build to compare two libraries.

    python benchmarks/bench_stats_kernel.py [--repeats 15] [--shapes 16x512x512,64x128x128,256x32x32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from onnx import TensorProto, helper

from normact_onnx.catalogue import NORM_DOMAIN
from normact_onnx.ort import make_session

STATS = ("size", "x_mean", "x_ss", "f_mean", "f_ss", "d_ss")


def _model(kind: str) -> bytes:
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)]
    if kind == "stats_x":
        node = helper.make_node("NormSiluStats", ["X"], list(STATS), domain=NORM_DOMAIN, axis=1)
    elif kind == "stats_xf":
        inputs.append(helper.make_tensor_value_info("F", TensorProto.FLOAT, None))
        node = helper.make_node("NormSiluStats", ["X", "F"], list(STATS), domain=NORM_DOMAIN, axis=1)
    elif kind == "reduce":
        node = helper.make_node("ReduceSumSquare", ["X"], ["size"], axes=[0, 2, 3], keepdims=1)
    else:
        node = helper.make_node("Sigmoid", ["X"], ["size"])
    outs = [helper.make_tensor_value_info("size", TensorProto.FLOAT, None)]
    if kind.startswith("stats"):
        outs = [helper.make_tensor_value_info("size", TensorProto.INT64, None)]
        outs += [helper.make_tensor_value_info(s, TensorProto.DOUBLE, None) for s in STATS[1:]]
    graph = helper.make_graph([node], kind, inputs, outs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(NORM_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--shapes", default="16x512x512,64x128x128,256x32x32")
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    kinds = ("stats_x", "stats_xf", "reduce", "sigmoid")
    rng = np.random.default_rng(0)
    print(f"load average {os.getloadavg()[0]:.1f}")
    print("shape | threads | " + " | ".join(f"{k} ms (GB/s of x)" for k in kinds))
    for spec in args.shapes.split(","):
        c, h, w = (int(v) for v in spec.split("x"))
        x = (rng.standard_normal((1, c, h, w)) * 3).astype(np.float32)
        f = x / (1 + np.exp(-x))
        for threads in (int(t) for t in args.threads.split(",")):
            quiet = {"session.intra_op.allow_spinning": "0"}  # idle sessions' spinning threads take the cores
            sess = {k: make_session(_model(k), threads=threads, config=quiet) for k in kinds}
            feeds = {k: {"X": x, "F": f} if k == "stats_xf" else {"X": x} for k in kinds}
            times: dict[str, list[float]] = {k: [] for k in kinds}
            for r in range(args.repeats + 1):
                for k in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:
                    t0 = time.perf_counter()
                    sess[k].run(None, feeds[k])
                    if r:
                        times[k].append(time.perf_counter() - t0)
            cells = []
            for k in kinds:
                med = statistics.median(times[k])
                cells.append(f"{med * 1e3:.2f} ({x.nbytes / med / 1e9:.1f})")
            print(f"{spec} | {threads} | " + " | ".join(cells))
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
