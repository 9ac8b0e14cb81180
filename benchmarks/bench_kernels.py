"""Benchmark the fused ai.normact kernels against ONNX Runtime's own ops.

For Relu, Sigmoid, Tanh, Gelu and SiLU, on the same float32 tensor and the same
intra-op thread count, times three sessions:

* kernel    one ``ai.normact::Norm<Act>`` node, kernel library registered
            (scale 1.7, shift 0.4: a typical normalized site);
* builtin   ONNX Runtime's own activation op (SiLU: the Sigmoid+Mul graph that
            exporters write, which ORT may fuse) — the op the kernel replaces;
* inlined   the same Norm node in the default ``function`` form without the
            library: ORT inlines the model-local function body (standard ops)
            and optimizes it — what a stock runtime runs.

Each repetition runs every session once, in turn (interleaved, so drift in
clocks or neighbours hits all alike); the median over repetitions is reported.
Inputs and outputs are bound once with IOBinding so only the run is timed.

Targets (issue 3): kernel ≤ 1.15× builtin at 1M and 16M elements; kernel ≥ 2×
faster than inlined at 16M.

    python benchmarks/bench_kernels.py [--reps 31] [--threads N] [--sizes 1M,16M]
    python benchmarks/bench_kernels.py --cuda      # CUDA EP (needs onnxruntime-gpu + GPU)

Uses the installed package's library, or NORMACT_LIBRARY_DIR (a CMake build).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from normact_onnx.catalogue import CATALOGUE, NORM_DOMAIN
from normact_onnx.passes.forms import norm_function
from normact_onnx.runtime import get_library_path, library_info

OPSET = 21
ACTS = {  # kind -> builtin graph (op types applied to X); SiLU has no single ONNX op
    "relu": ["Relu"],
    "sigmoid": ["Sigmoid"],
    "tanh": ["Tanh"],
    "gelu": ["Gelu"],
    "silu": ["Sigmoid", "Mul"],
}
SIZES = {"1M": 1 << 20, "16M": 1 << 24, "64M": 1 << 26}


def _model(nodes, name: str, functions=()) -> bytes:
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N"]) for n in ("X", "Y")]
    graph = helper.make_graph(nodes, name, [vi[0]], [vi[1]])
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(NORM_DOMAIN, 1)],
        ir_version=10,
    )
    m.functions.extend(functions)
    onnx.checker.check_model(m)
    return m.SerializeToString()


def builtin_model(kind: str) -> bytes:
    ops = ACTS[kind]
    if ops == ["Sigmoid", "Mul"]:
        nodes = [helper.make_node("Sigmoid", ["X"], ["S"]), helper.make_node("Mul", ["X", "S"], ["Y"])]
    else:
        nodes = [helper.make_node(ops[0], ["X"], ["Y"])]
    return _model(nodes, f"builtin_{kind}")


def norm_model(kind: str, with_function: bool) -> bytes:
    act = CATALOGUE[kind]
    attrs = {"scale": 1.7, "shift": 0.4, "slope": 0.0, **{k: float(v) for k, v in act.params.items()}}
    node = helper.make_node(act.op_name, ["X"], ["Y"], domain=NORM_DOMAIN)
    node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    return _model([node], f"norm_{kind}", [norm_function(kind, OPSET)] if with_function else [])


class Runner:
    """A session with its input and a preallocated output bound once (IOBinding)."""

    def __init__(self, model: bytes, x: np.ndarray, threads: int, library: str | None, cuda: bool) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if library:
            so.register_custom_ops_library(library)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self.sess = ort.InferenceSession(model, so, providers=providers)
        device = "cuda" if cuda else "cpu"
        self.x = ort.OrtValue.ortvalue_from_numpy(x, device, 0)
        self.y = ort.OrtValue.ortvalue_from_numpy(np.empty_like(x), device, 0)
        self.binding = self.sess.io_binding()
        self.binding.bind_ortvalue_input("X", self.x)
        self.binding.bind_ortvalue_output("Y", self.y)
        self.cuda = cuda
        for _ in range(3):  # warm-up: arena growth, thread pool spin-up, CUDA context
            self.run()

    def run(self) -> float:
        t0 = time.perf_counter()
        self.sess.run_with_iobinding(self.binding)
        if self.cuda:
            self.binding.synchronize_outputs()
        return time.perf_counter() - t0


def bench(kinds, sizes, reps: int, threads: int, cuda: bool) -> list[dict]:
    lib = get_library_path(cuda=cuda)
    rows = []
    for size_name in sizes:
        n = SIZES[size_name]
        x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
        for kind in kinds:
            runners = {
                "kernel": Runner(norm_model(kind, with_function=False), x, threads, lib, cuda),
                "builtin": Runner(builtin_model(kind), x, threads, None, cuda),
            }
            if size_name != "1M" or cuda:
                runners["inlined"] = Runner(norm_model(kind, with_function=True), x, threads, None, cuda)
            times: dict[str, list[float]] = {k: [] for k in runners}
            for _ in range(reps):
                for name, r in runners.items():
                    times[name].append(r.run())
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"kind": kind, "size": size_name, **{f"{k}_ms": v * 1e3 for k, v in med.items()}}
            row["kernel/builtin"] = med["kernel"] / med["builtin"]
            if "inlined" in med:
                row["inlined/kernel"] = med["inlined"] / med["kernel"]
            row["kernel_GBps"] = 2 * x.nbytes / med["kernel"] / 1e9
            rows.append(row)
            print_row(row)
            del runners
    return rows


def print_header(threads: int, cuda: bool, reps: int) -> None:
    info = library_info(cuda=cuda)
    where = "CUDAExecutionProvider" if cuda else f"CPU, intra_op_num_threads={threads}"
    print(f"onnxruntime {ort.__version__}; {where}; kernel ISA {info['cpu_isa']}; median of {reps} interleaved reps")
    print("baselines: builtin = ORT's own op (SiLU: Sigmoid+Mul graph); inlined = function form without library")
    print(
        f"{'act':<8} {'size':>4} {'kernel ms':>10} {'builtin ms':>11} {'inlined ms':>11} "
        f"{'kernel/builtin':>15} {'inlined/kernel':>15} {'kernel GB/s':>12}"
    )


def print_row(r: dict) -> None:
    inl = f"{r['inlined_ms']:11.3f}" if "inlined_ms" in r else f"{'-':>11}"
    sp = f"{r['inlined/kernel']:14.2f}x" if "inlined/kernel" in r else f"{'-':>15}"
    print(
        f"{r['kind']:<8} {r['size']:>4} {r['kernel_ms']:10.3f} {r['builtin_ms']:11.3f} {inl} "
        f"{r['kernel/builtin']:14.2f}x {sp} {r['kernel_GBps']:12.1f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=31)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for both (default 1: stable timings)")
    p.add_argument("--sizes", default=None, help="comma list of 1M,16M,64M (default 1M,16M; --cuda: 64M)")
    p.add_argument("--kinds", default=",".join(ACTS))
    p.add_argument("--cuda", action="store_true", help="time on the CUDA execution provider")
    p.add_argument("--json", action="store_true", help="also print one JSON line of ratios (for run_all.py)")
    a = p.parse_args(argv)
    if a.cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
        print("CUDAExecutionProvider not available in this onnxruntime", file=sys.stderr)
        return 2
    sizes = (a.sizes or ("64M" if a.cuda else "1M,16M")).split(",")
    print_header(a.threads, a.cuda, a.reps)
    rows = bench(a.kinds.split(","), sizes, a.reps, a.threads, a.cuda)
    worst = max(r["kernel/builtin"] for r in rows)
    speed = [r["inlined/kernel"] for r in rows if "inlined/kernel" in r]
    print(f"worst kernel/builtin: {worst:.2f}x (target <= 1.15x)")
    if speed:
        print(f"smallest inlined/kernel speedup: {min(speed):.2f}x (target >= 2x at 16M)")
    if a.json:
        print(
            json.dumps(
                {
                    "benchmark": "kernels",
                    "method": f"median of {a.reps} interleaved reps, {a.threads} thread(s)",
                    "ratios": json_ratios(rows),
                }
            )
        )
    return 0


def json_ratios(rows: list[dict]) -> list[dict]:
    """run_all.py's contract: one entry per ratio, with its baseline and target."""
    out = []
    for r in rows:
        out.append(
            {
                "name": f"{r['kind']} {r['size']} kernel/builtin",
                "ratio": r["kernel/builtin"],
                "baseline": "ORT built-in op (SiLU: Sigmoid+Mul)",
                "target": "≤ 1.15",
                "ok": r["kernel/builtin"] <= 1.15,
                "detail": f"{r['kernel_GBps']:.1f} GB/s",
            }
        )
        if "inlined/kernel" in r:
            out.append(
                {
                    "name": f"{r['kind']} {r['size']} inlined/kernel",
                    "ratio": r["inlined/kernel"],
                    "baseline": "kernel (speedup of the fused op over the inlined body)",
                    "target": "≥ 2" if r["size"] == "16M" else "",
                    "ok": r["inlined/kernel"] >= 2,
                }
            )
    return out


if __name__ == "__main__":
    sys.exit(main())
