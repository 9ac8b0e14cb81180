"""ANAct reproduction (arXiv 2208.13315; docs/math.md §2) through ``normact-onnx finetune`` (ONNX Runtime training).

A small CNN on Fashion-MNIST, trained from scratch with the same budget:
Swish vs ANAct-Swish and ReLU vs ANAct-ReLU, several seeds, test accuracy
mean ± std. Baselines train the plain exported model (``--method none``), the
normalized runs rewrite every hidden activation into ANAct (``--method anact``);
both go through the same ONNX Runtime training loop and AdamW.

Also times one training step of the same network through ONNX Runtime training
and in PyTorch eager (the reference ANAct module for the normalized one).

Needs the training environment:

    PYTHONPATH=src train-env/bin/python benchmarks/train_anact.py [--steps 400] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import fashion_mnist

from normact_onnx.training import finetune
from normact_onnx.training.reference import ANAct, commit_all

CONFIGS = (("silu", "none"), ("silu", "anact"), ("relu", "none"), ("relu", "anact"))
NAMES = {
    ("silu", "none"): "Swish",
    ("silu", "anact"): "ANAct-Swish",
    ("relu", "none"): "ReLU",
    ("relu", "anact"): "ANAct-ReLU",
}


class CNN(torch.nn.Module):
    """conv16 → act → pool → conv32 → act → pool → fc64 → act → fc10: three hidden activation sites."""

    def __init__(self, act: type[torch.nn.Module] | None = None, anact: str | None = None) -> None:
        super().__init__()
        make = (lambda: ANAct(anact)) if anact else act
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), make(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), make(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 64), make(), torch.nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


ACTS = {"silu": torch.nn.SiLU, "relu": torch.nn.ReLU}


def export(kind: str, seed: int, path: Path) -> CNN:
    torch.manual_seed(seed)
    net = CNN(ACTS[kind])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.zeros(2, 1, 28, 28),),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
            opset_version=17,
            dynamo=False,
        )
    return net


def accuracy_runs(args: argparse.Namespace, train, test, work: Path) -> list[dict]:
    rows = []
    for kind, method in CONFIGS:
        for seed in range(args.seeds):
            path = work / f"{kind}_{seed}.onnx"
            export(kind, seed, path)
            t0 = time.perf_counter()
            res = finetune(
                path,
                {"x": train[0], "y": train[1]},
                val={"x": test[0], "y": test[1]},
                output=work / f"{kind}_{method}_{seed}.tuned.onnx",
                method=method,
                epochs=1,
                max_steps=args.steps,
                batch_size=args.batch,
                lr=args.lr,
                seed=seed,
                progress=False,
                threads=args.threads,
            )
            h = res.history[-1]
            rows.append(
                {
                    "config": NAMES[kind, method],
                    "seed": seed,
                    "test_accuracy": h["val_accuracy"],
                    "test_loss": h["val_loss"],
                    "train_loss": h["train_loss"],
                    "seconds": time.perf_counter() - t0,
                    "curve": res.losses[:: max(1, args.steps // 100)],
                }
            )
            print(
                f"{NAMES[kind, method]:12s} seed {seed}: test acc {h['val_accuracy']:.4f} ({rows[-1]['seconds']:.0f}s)",
                flush=True,
            )
    return rows


def step_timing(args: argparse.Namespace, train, work: Path) -> list[dict]:
    """Median time of one training step: ONNX Runtime training vs PyTorch eager, same network and batch."""
    import onnx

    from normact_onnx.training.artifacts import generate
    from normact_onnx.training.graph import build_train_graph
    from normact_onnx.training.loop import Settings, Trainer

    torch.set_num_threads(args.threads)
    x, y = train[0][: args.batch], train[1][: args.batch]
    out = []
    for kind, method in CONFIGS:
        path = work / f"time_{kind}.onnx"
        plain = export(kind, 0, path)
        tg = build_train_graph(onnx.load(str(path)), str(work), method=method)
        art = generate(tg, work / f"art_{kind}_{method}", "cross-entropy", "adamw")
        tr = Trainer(tg, art, Settings(lr=1e-3, threads=args.threads), work, art.checkpoint)
        ort_t = _median(lambda tr=tr: tr.train_step({"x": x}, y), args.reps)
        net = CNN(anact=kind) if method == "anact" else plain
        if method == "anact":
            net.load_state_dict(plain.state_dict(), strict=False)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)

        def torch_step(net: torch.nn.Module = net, opt: torch.optim.Optimizer = opt, xt=xt, yt=yt) -> None:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt), yt).backward()
            opt.step()
            commit_all(net)

        torch_t = _median(torch_step, args.reps)
        out.append(
            {"config": NAMES[kind, method], "ort_ms": 1e3 * ort_t, "torch_ms": 1e3 * torch_t, "ratio": ort_t / torch_t}
        )
        print(
            f"step {NAMES[kind, method]:12s}: ORT training {1e3 * ort_t:.2f} ms, PyTorch eager "
            f"{1e3 * torch_t:.2f} ms, ratio {ort_t / torch_t:.2f}",
            flush=True,
        )
    return out


def _median(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = p.parse_args()
    train, test = fashion_mnist()
    mean, std = train[0].mean(), train[0].std()
    train = ((train[0] - mean) / std, train[1])
    test = ((test[0] - mean) / std, test[1])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        timing = [] if args.skip_timing else step_timing(args, train, work)
        rows = [] if args.skip_accuracy else accuracy_runs(args, train, test, work)
    out = Path(args.out)
    part = "timing" if args.skip_accuracy else "accuracy" if args.skip_timing else "all"
    (out / f"train_anact_{part}.json").write_text(
        json.dumps({"args": vars(args), "runs": rows, "timing": timing}, indent=1)
    )
    print()
    print("| config | test accuracy (mean ± std) | seeds |")
    print("|---|---|---|")
    for name in NAMES.values():
        acc = np.array([r["test_accuracy"] for r in rows if r["config"] == name])
        if acc.size:
            print(f"| {name} | {100 * acc.mean():.2f} ± {100 * acc.std():.2f}% | {acc.size} |")
    plot(rows, max(1, args.steps // 100), out / "train_anact.png")


def plot(rows: list[dict], stride: int, path: Path) -> None:
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in NAMES.values():
        curves = np.array([r["curve"] for r in rows if r["config"] == name])
        ax.plot(np.arange(curves.shape[1]) * stride, curves.mean(0), label=name, ls="--" if "ANAct" in name else "-")
    ax.set(
        xlabel="step",
        ylabel="training loss (mean over seeds)",
        yscale="log",
        title="Fashion-MNIST CNN, ONNX Runtime training",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
