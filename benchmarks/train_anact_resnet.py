"""ANAct paper's claim (arXiv 2208.13315; docs/math.md §2): NSwish (ANAct-Swish) vs Swish on a residual CNN.

A small pre-defined ResNet (stem conv, three BasicBlock stages with batch normalization
and identity/1×1 shortcuts, global average pool, linear head), trained from scratch with
the same budget, data order and initial weights for both activations: every activation
(stem, inside and after each block) is Swish, or ANAct-Swish (the reference module
:class:`normact_onnx.training.reference.ANAct`, checked step for step against the ONNX
Runtime training path in tests/test_training.py). Per seed it records the anytime curve
(mean training loss of each epoch, accuracy on a fixed 2000-image test subset after each
epoch) and the final accuracy on the full test set; the comparison is a paired t-test over
seeds with a 95% CI of the mean difference, Cohen's d_z, and Welch's test.

Data: the best set obtainable offline here is Fashion-MNIST (Debian's dataset-fashion-mnist;
no package on the registries reachable from this machine ships CIFAR-10/100 or Tiny
ImageNet: the candidates download at run time). ``--train-subset`` trains on the first N
training images (the whole test set is always used).

    PYTHONPATH=src python benchmarks/train_anact_resnet.py --seeds 5 --epochs 5 --train-subset 10000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import fashion_mnist
from machine import machine
from significance import paired_test

from normact_onnx.training.reference import ANAct, commit_all

CONFIGS = ("swish", "nswish")
LABELS = {"swish": "Swish", "nswish": "NSwish (ANAct-Swish)"}


def _silu_grad(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def make_act(config: str) -> torch.nn.Module:
    return torch.nn.SiLU() if config == "swish" else ANAct("silu", derivative=_silu_grad)


class Block(torch.nn.Module):
    """conv3-BN-act-conv3-BN, plus the shortcut (1×1 conv + BN when the shape changes), then act."""

    def __init__(self, cin: int, cout: int, stride: int, config: str) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = torch.nn.BatchNorm2d(cout)
        self.a1 = make_act(config)
        self.c2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = torch.nn.BatchNorm2d(cout)
        self.short = (
            torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else torch.nn.Identity()
        )
        self.a2 = make_act(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a2(self.b2(self.c2(self.a1(self.b1(self.c1(x))))) + self.short(x))


class ResNet(torch.nn.Module):
    """Stem (conv3, stride 2, BN, act); stages of ``blocks`` blocks at widths w, 2w, 4w (stride 2 between); pool; fc."""

    def __init__(
        self, config: str, width: int = 16, blocks: int = 1, classes: int = 10, channels: int = 1, stride: int = 2
    ) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [
            torch.nn.Conv2d(channels, width, 3, stride, 1, bias=False),
            torch.nn.BatchNorm2d(width),
            make_act(config),
        ]
        cin = width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks):
                layers.append(Block(cin, cout, 2 if i > 0 and j == 0 else 1, config))
                cin = cout
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def evaluate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    net.eval()
    loss, hits = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            out = net(x[i : i + batch])
            loss += float(F.cross_entropy(out, y[i : i + batch], reduction="sum"))
            hits += int((out.argmax(1) == y[i : i + batch]).sum())
    net.train()
    return loss / len(y), hits / len(y)


def run(config: str, seed: int, data, args: argparse.Namespace) -> dict:
    (x, y), (xt, yt) = data
    torch.manual_seed(seed)  # the same initial weights for both configs: ANAct adds only α and buffers
    net = ResNet(config, args.width, args.blocks)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(y) // args.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps_per_epoch * args.epochs)
    rng = np.random.default_rng(seed)
    sub = torch.from_numpy(np.random.default_rng(1234).permutation(len(yt))[:2000])
    curve: dict[str, list[float]] = {"epoch": [], "train_loss": [], "test_loss": [], "test_acc": []}
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        order = rng.permutation(len(y))
        losses = []
        for b in range(steps_per_epoch):
            idx = torch.from_numpy(order[b * args.batch : (b + 1) * args.batch])
            opt.zero_grad()
            loss = F.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            commit_all(net)
            losses.append(loss.item())
        tl, ta = evaluate(net, xt[sub], yt[sub])
        for k, v in zip(curve, (epoch + 1, float(np.mean(losses)), tl, ta), strict=True):
            curve[k].append(v)
        print(
            f"  {config} seed {seed} epoch {epoch + 1}: train loss {curve['train_loss'][-1]:.4f} "
            f"test acc (2k) {ta:.4f} ({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    test_loss, test_acc = evaluate(net, xt, yt)
    return {
        "config": config,
        "seed": seed,
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "final_train_loss": curve["train_loss"][-1],
        "seconds": time.perf_counter() - t0,
        "curve": curve,
    }


def summary(rows: list[dict]) -> dict:
    by = {c: {r["seed"]: r for r in rows if r["config"] == c} for c in CONFIGS}
    seeds = sorted(set(by["swish"]) & set(by["nswish"]))
    out = {}
    if len(seeds) >= 2:
        for key in ("test_accuracy", "final_train_loss"):
            a = [by["swish"][s][key] for s in seeds]
            b = [by["nswish"][s][key] for s in seeds]
            out[key] = paired_test(a, b)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak rate (one-cycle schedule)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--blocks", type=int, default=1, help="BasicBlocks per stage")
    p.add_argument("--train-subset", type=int, default=0, help="train on the first N images (0: all 60k)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="train_anact_resnet")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent))
    p.add_argument("--report", action="store_true", help="only rebuild the table and plot from <name>.json")
    args = p.parse_args()
    out = Path(args.out)
    if args.report:
        saved = json.loads((out / f"{args.name}.json").read_text())
        report(saved, out / f"{args.name}.png")
        return
    torch.set_num_threads(args.threads)
    (x, y), (xt, yt) = fashion_mnist()
    if args.train_subset:
        x, y = x[: args.train_subset], y[: args.train_subset]
    mean, std = x.mean(), x.std()
    data = (
        (torch.from_numpy((x - mean) / std), torch.from_numpy(y)),
        (torch.from_numpy((xt - mean) / std), torch.from_numpy(yt)),
    )
    record: dict = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "args": vars(args),
        "data": "Fashion-MNIST (Debian dataset-fashion-mnist)",
        "runs": [],
    }
    for seed in range(args.seeds):  # seed-major: a stopped run still holds complete pairs
        for config in CONFIGS:
            record["runs"].append(run(config, seed, data, args))
            record["summary"] = summary(record["runs"])
            (out / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    report(record, out / f"{args.name}.png")


def report(saved: dict, path: Path) -> None:
    rows = saved["runs"]
    print("| config | test accuracy (full test set, mean ± std) | final-epoch training loss | seeds |")
    print("|---|---|---|---|")
    for c in CONFIGS:
        acc = np.array([r["test_accuracy"] for r in rows if r["config"] == c])
        tl = np.array([r["final_train_loss"] for r in rows if r["config"] == c])
        if acc.size:
            print(
                f"| {LABELS[c]} | {100 * acc.mean():.2f} ± {100 * acc.std(ddof=1 if acc.size > 1 else 0):.2f}% "
                f"| {tl.mean():.4f} ± {tl.std(ddof=1 if tl.size > 1 else 0):.4f} | {acc.size} |"
            )
    for key, s in saved.get("summary", {}).items():
        lo, hi = s["ci95"]
        print(
            f"NSwish − Swish, {key}: {s['mean_diff']:+.4g} (95% CI {lo:+.4g} … {hi:+.4g}), paired t p = "
            f"{s['p_paired']:.3g}, Welch p = {s['p_welch']:.3g}, d_z = {s['cohen_dz']:.2f}, n = {s['n']}"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for i, c in enumerate(CONFIGS):
        for j, r in enumerate(r for r in rows if r["config"] == c):
            cur = r["curve"]
            kw = {"color": f"C{i}", "alpha": 0.7, "lw": 1, "label": LABELS[c] if j == 0 else None}
            axes[0].plot(cur["epoch"], cur["train_loss"], **kw)
            axes[1].plot(cur["epoch"], [100 * v for v in cur["test_acc"]], **kw)
    axes[0].set(xlabel="epoch", ylabel="training loss (epoch mean)", yscale="log")
    axes[1].set(xlabel="epoch", ylabel="test accuracy (%, 2k subset)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
