"""Depth reproduction (static-normalization paper, arXiv 1905.01369; docs/math.md §1): how deep does a plain MLP train?

Plain MLPs, no normalization layers, no residual connections, width 256, on
MNIST: ReLU vs static-normalized ReLU (center-scale, zeta-zero) vs ANAct ReLU,
the same fixed step budget for each, several seeds. Reports the final training
loss and the test accuracy per depth and the largest depth each trains (test
accuracy > 90%). LeCun-normal weights (variance 1/fan-in), zero biases — the
initialization the papers' Gaussian analysis assumes. Adam by default: with SGD the
static variants' backward gain per layer (scale²·E(f' − slope)² = 1.47 for center-scale,
2.75 for zeta-zero) makes every tried learning rate diverge at depth ≥ 10 (``--optimizer sgd``).

Runs through the PyTorch reference module (:mod:`normact_onnx.training.reference`),
whose ANAct update was checked step for step against the ONNX Runtime training
path in tests/test_training.py: 60 trainings of up to 100 layers are minutes in
eager PyTorch and much longer through ONNX Runtime training on two cores.

    PYTHONPATH=src python benchmarks/train_depth.py [--steps 400] [--seeds 3] [--out benchmarks/]
    # per-method learning rates (a bare number is the default), two processes of one thread each:
    PYTHONPATH=src python benchmarks/train_depth.py --lr 1e-3,anact=3e-4 --jobs 2 --threads 1 --name train_depth_400

A run counts as diverged (final loss NaN, stopped early) when its training loss is
not finite or stays above ``--diverge`` (default 1e3; chance level is ln 10 = 2.3)
for 50 consecutive steps.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import mnist

from normact_onnx.catalogue import CATALOGUE
from normact_onnx.methods.static import static_affine
from normact_onnx.training.reference import ANAct, Static, commit_all

METHODS = ("relu", "center-scale", "zeta-zero", "anact")
LABELS = {"relu": "ReLU", "center-scale": "static center-scale", "zeta-zero": "static zeta-zero", "anact": "ANAct"}


def activation(method: str) -> torch.nn.Module:
    if method == "relu":
        return torch.nn.ReLU()
    if method == "anact":
        return ANAct("relu", derivative=lambda x: (x > 0).to(x.dtype))
    a = static_affine(CATALOGUE["relu"], {}, 1.0, method)
    return Static("relu", a.scale, a.shift, a.slope)


def mlp(depth: int, width: int, method: str) -> torch.nn.Sequential:
    """``depth`` hidden layers (Linear + activation) and a linear read-out; LeCun-normal init."""
    layers: list[torch.nn.Module] = []
    fan_in = 784
    for _ in range(depth):
        lin = torch.nn.Linear(fan_in, width)
        torch.nn.init.normal_(lin.weight, std=1.0 / math.sqrt(fan_in))
        torch.nn.init.zeros_(lin.bias)
        layers += [lin, activation(method)]
        fan_in = width
    head = torch.nn.Linear(fan_in, 10)
    torch.nn.init.normal_(head.weight, std=1.0 / math.sqrt(fan_in))
    torch.nn.init.zeros_(head.bias)
    return torch.nn.Sequential(*layers, head)


def parse_lr(text: str) -> dict[str, float]:
    """'1e-3' or '1e-3,anact=3e-4,zeta-zero=1e-4': a bare number is every other method's rate."""
    rates, default = {}, 1e-3
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            default = float(name)
        elif name.strip() not in METHODS:
            raise SystemExit(f"--lr: unknown method {name!r} (one of {', '.join(METHODS)})")
        else:
            rates[name.strip()] = float(value)
    return {m: rates.get(m, default) for m in METHODS}


def run(depth: int, method: str, seed: int, data, args: argparse.Namespace) -> dict:
    (x, y), (xt, yt) = data
    steps, batch, lr = args.steps, args.batch, parse_lr(args.lr)[method]
    torch.manual_seed(seed)
    net = mlp(depth, args.width, method)
    if args.optimizer == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    rng = np.random.default_rng(seed)
    losses = []
    above = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = rng.integers(0, len(y), batch)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        above = above + 1 if args.diverge and loss.item() > args.diverge else 0
        if not torch.isfinite(loss) or above >= 50:
            losses.append(float("nan"))
            break
        loss.backward()
        opt.step()
        commit_all(net)
        losses.append(loss.item())
    net.eval()
    with torch.no_grad():
        acc = float((net(xt).argmax(1) == yt).float().mean())
    tail = [v for v in losses[-50:] if math.isfinite(v)]
    return {
        "depth": depth,
        "method": method,
        "seed": seed,
        "lr": lr,
        "steps_done": len(losses),
        "final_loss": float(np.mean(tail)) if tail and math.isfinite(losses[-1]) else float("nan"),
        "test_accuracy": acc,
        "seconds": time.perf_counter() - t0,
        "curve": losses[:: max(1, steps // 100)],
    }


_DATA = None  # set in the parent before the worker processes fork


def _work(task: tuple[int, str, int, argparse.Namespace]) -> dict:
    torch.set_num_threads(task[3].threads)
    torch.set_flush_denormal(True)
    return run(task[0], task[1], task[2], _DATA, task[3])


def main() -> None:
    global _DATA
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="10,20,30,50,100")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", default="1e-3", help="Adam/SGD rate, or per method: 1e-3,anact=3e-4,...")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="sgd: with momentum 0.9")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads per process")
    p.add_argument("--jobs", type=int, default=1, help="trainings run in parallel processes")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--diverge", type=float, default=1e3, help="stop when the loss stays above this (0: never)")
    p.add_argument("--name", default="train_depth", help="output stem: <name>.json, <name>.png")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent))
    p.add_argument("--report", action="store_true", help="only rebuild table and plot from train_depth.json")
    args = p.parse_args()
    args.lr = str(args.lr)
    parse_lr(args.lr)
    methods = [m.strip() for m in args.methods.split(",")]
    if not set(methods) <= set(METHODS):
        raise SystemExit(f"--methods: one of {', '.join(METHODS)}")
    out = Path(args.out)
    if args.report:
        saved = json.loads((out / f"{args.name}.json").read_text())
        depths = [int(d) for d in saved["args"]["depths"].split(",")]
        print(table(saved["runs"], depths, saved["args"]["seeds"]))
        plot(saved["runs"], depths, out / f"{args.name}.png")
        return
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # vanishing ReLU signals at depth 100 are denormals: 50× slower arithmetic
    (x, y), (xt, yt) = mnist()
    mean, std = x.mean(), x.std()
    data = _DATA = (
        (torch.from_numpy((x - mean) / std), torch.from_numpy(y)),
        (torch.from_numpy((xt - mean) / std), torch.from_numpy(yt)),
    )
    depths = [int(d) for d in args.depths.split(",")]
    # seed-major: an interrupted sweep still covers every depth
    tasks = [(d, m, s, args) for s in range(args.seeds) for d in depths for m in methods]
    rows = []
    if args.jobs > 1:
        pool = multiprocessing.get_context("fork").Pool(args.jobs)
        results = pool.imap(_work, tasks)
    else:
        results = (run(d, m, s, data, a) for d, m, s, a in tasks)
    for r in results:
        rows.append(r)
        (out / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "runs": rows}, indent=1))
        print(
            f"depth {r['depth']:3d} {r['method']:13s} seed {r['seed']} lr {r['lr']:g}: loss {r['final_loss']:.4f} "
            f"acc {r['test_accuracy']:.4f} ({r['steps_done']} steps, {r['seconds']:.1f}s)",
            flush=True,
        )
    if args.jobs > 1:
        pool.close()
    print()
    print(table(rows, depths, args.seeds))
    plot(rows, depths, out / f"{args.name}.png")


def table(rows: list[dict], depths: list[int], seeds: int) -> str:
    lines = [
        "| method | " + " | ".join(f"depth {d}: loss / acc" for d in depths) + " | deepest > 90% (all seeds) |",
        "|---|" + "---|" * (len(depths) + 1),
    ]
    for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        cells, deepest = [], "none"
        for d in depths:
            rs = [r for r in rows if r["method"] == method and r["depth"] == d]
            if not rs:
                cells.append("–")
                continue
            loss = np.array([r["final_loss"] for r in rs])
            acc = np.array([r["test_accuracy"] for r in rs])
            bad = int(np.isnan(loss).sum())
            lo = "diverged" if bad == len(loss) else _num(np.nanmean(loss)) + (f" ({bad} div.)" if bad else "")
            cells.append(f"{lo} / {100 * acc.mean():.1f} ± {100 * acc.std():.1f}%")
            if (acc > 0.9).all():
                deepest = str(d)
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {deepest} |")
    return "\n".join(lines)


def _num(v: float) -> str:
    return f"{v:.3f}" if v < 100 else f"{v:.1e}"


def plot(rows: list[dict], depths: list[int], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        have = [d for d in depths if any(r["method"] == method and r["depth"] == d for r in rows)]
        if not have:
            continue
        acc = [[r["test_accuracy"] for r in rows if r["method"] == method and r["depth"] == d] for d in have]
        loss = [np.array([r["final_loss"] for r in rows if r["method"] == method and r["depth"] == d]) for d in have]
        axes[0].errorbar(
            have,
            [100 * np.mean(a) for a in acc],
            [100 * np.std(a) for a in acc],
            marker="o",
            capsize=3,
            label=LABELS[method],
        )
        axes[1].plot(
            have, [np.nanmean(v) if not np.isnan(v).all() else np.nan for v in loss], marker="o", label=LABELS[method]
        )
    axes[0].axhline(90, color="grey", ls="--", lw=0.8)
    axes[0].set(xlabel="depth (hidden layers)", ylabel="test accuracy (%)", xscale="log", title="MNIST, width 256")
    axes[1].set(xlabel="depth (hidden layers)", ylabel="final training loss", xscale="log", yscale="log")
    for ax in axes:
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
