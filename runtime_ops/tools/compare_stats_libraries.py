"""Are two builds of the kernel library's statistics ops bit-identical?  (A check for kernel changes.)

Why: the calibration statistics must stay identical when the CPU loops are rewritten for speed (issue 24);
the tests compare the op's paths with each other, not with the previous build.  This runs the statistics
ops of both builds (``NORMACT_LIBRARY_DIR``, one child process each) under every instruction set
(``NORMACT_CPU_ISA`` generic, avx2, and the processor's best) on the same inputs — per channel with long and
short runs (row mode), odd lengths, whole-tensor, float32 and float16, with and without F — and compares
every output's bytes.  Exit status 1 and the differing outputs when any differ.

    python runtime_ops/tools/compare_stats_libraries.py OLD_LIB_DIR NEW_LIB_DIR
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

OPS = ("NormSiluStats", "NormSigmoidStats", "NormHardSwishStats", "NormReluStats", "NormGeluStats")
SHAPES = [
    ((1, 16, 128, 128), 1),
    ((2, 3, 67, 65), 1),
    ((1, 5, 1003), 1),
    ((3, 7, 9), 1),
    ((4, 333, 5), 1),
    ((1, 1, 517), 1),
    ((1, 3, 7), 1),
    ((1, 200003), None),
    ((2, 8, 300, 301), None),
]
STATS = ("size", "x_mean", "x_ss", "f_mean", "f_ss", "d_ss")


def run_child(out: str) -> None:
    """In the child: every op, shape and type through the library NORMACT_LIBRARY_DIR names; saved to ``out``."""
    from onnx import TensorProto, helper

    from normact_onnx.catalogue import NORM_DOMAIN
    from normact_onnx.ort import make_session

    rng = np.random.default_rng(1)
    res = {}
    for op in OPS:
        for shape, axis in SHAPES:
            for with_f in (False, True):
                for dt, elem in ((np.float32, TensorProto.FLOAT), (np.float16, TensorProto.FLOAT16)):
                    x = (rng.standard_normal(shape) * 4 + 0.3).astype(dt)
                    feed = {"X": x}
                    if with_f:
                        feed["F"] = (x / (1 + np.exp(-x.astype(np.float32)))).astype(dt)
                    attrs = {} if axis is None else {"axis": axis}
                    node = helper.make_node(op, list(feed), list(STATS), domain=NORM_DOMAIN, **attrs)
                    outs = [helper.make_tensor_value_info("size", TensorProto.INT64, None)]
                    outs += [helper.make_tensor_value_info(s, TensorProto.DOUBLE, None) for s in STATS[1:]]
                    ins = [helper.make_tensor_value_info(i, elem, None) for i in feed]
                    graph = helper.make_graph([node], "stats", ins, outs)
                    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(NORM_DOMAIN, 1)]
                    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
                    for s, v in zip(STATS, make_session(model.SerializeToString()).run(None, feed)):
                        res[f"{op} {shape} axis={axis} f={with_f} {dt.__name__} {s}"] = v
    np.savez(out, **res)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        run_child(sys.argv[2])
        return 0
    if len(sys.argv) != 3 or not all(Path(d, "libnormact_cpu.so").is_file() for d in sys.argv[1:]):
        print(
            "usage: compare_stats_libraries.py OLD_LIB_DIR NEW_LIB_DIR (each holding libnormact_cpu.so)",
            file=sys.stderr,
        )
        return 2
    differ = 0
    with tempfile.TemporaryDirectory() as tmp:
        for isa in ("generic", "avx2", "best"):
            saved = []
            for i, lib in enumerate(sys.argv[1:]):
                env = dict(os.environ, NORMACT_LIBRARY_DIR=str(Path(lib).resolve()))
                if isa != "best":
                    env["NORMACT_CPU_ISA"] = isa
                else:
                    env.pop("NORMACT_CPU_ISA", None)
                out = str(Path(tmp, f"{isa}{i}.npz"))
                subprocess.run([sys.executable, __file__, "--child", out], env=env, check=True)
                saved.append(np.load(out))
            old, new = saved
            bad = [k for k in old.files if old[k].tobytes() != new[k].tobytes()]
            differ += len(bad)
            print(f"{isa}: {len(old.files)} outputs, {len(bad)} differ")
            for k in bad[:10]:
                print(f"  {k}: {old[k].ravel()[:3]} vs {new[k].ravel()[:3]}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
