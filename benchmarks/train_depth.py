"""Depth reproduction (static-normalization paper, arXiv 1905.01369; docs/math.md §1): how deep does a plain MLP train?

Plain MLPs, no normalization layers, no residual connections, on MNIST: ReLU with
LeCun init and with He init (the fair baseline) vs static-normalized ReLU
(center-scale, zeta-zero, zeta-zero-unscaled) vs ANAct ReLU. Every (depth, method)
trains for ``--epochs`` full epochs at each rate of a per-method learning-rate grid
and several seeds; each run records an anytime curve (training loss of the last
interval, test loss and accuracy on a fixed 2000-image test subset, every
``--eval-every`` steps), the final accuracy on the full 10k test set, and probes at
initialization and after training (benchmarks/depth_probes.py): per-layer
pre-activation variance, backward gain and pairwise correlation, singular values
of the weights and of the hidden stack's input-output Jacobian.

A run **converges** when its final test accuracy reaches 90%; robustness is the
fraction of (seed, lr) runs per (method, depth) that converge. A run **diverges**
(stopped early, no final accuracy) when its training loss is not finite or stays
above ``--diverge`` (default 1e3; chance level is ln 10 = 2.3) for 50 steps.

Runs through the PyTorch reference module (:mod:`normact_onnx.training.reference`),
whose ANAct update was checked step for step against the ONNX Runtime training
path in tests/test_training.py.

    PYTHONPATH=src python benchmarks/train_depth.py --depths 10,30,50 --width 128 --epochs 2 --seeds 3 \
        --name train_depth_epochs
    PYTHONPATH=src python benchmarks/train_depth.py --report --name train_depth_epochs   # tables + plots

Methods: ``relu`` (the ``--init`` given, LeCun by default, as the papers' Gaussian analysis
assumes), ``relu-he`` (He init), ``center-scale``, ``zeta-zero``, ``zeta-zero-unscaled``, ``anact``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import depth_probes as probes
from datasets import mnist
from machine import machine

from normact_onnx.catalogue import CATALOGUE
from normact_onnx.methods.static import static_affine
from normact_onnx.training.reference import ANAct, Static, commit_all

METHODS = ("relu", "relu-he", "center-scale", "zeta-zero", "zeta-zero-unscaled", "anact")
LABELS = {
    "relu": "ReLU (LeCun init)",
    "relu-he": "ReLU (He init)",
    "center-scale": "static center-scale",
    "zeta-zero": "static zeta-zero",
    "zeta-zero-unscaled": "static zeta-zero, unscaled",
    "anact": "ANAct",
}
STATIC = ("center-scale", "zeta-zero", "zeta-zero-unscaled")


def activation(method: str) -> torch.nn.Module:
    if method in ("relu", "relu-he"):
        return torch.nn.ReLU()
    if method == "anact":
        return ANAct("relu", derivative=lambda x: (x > 0).to(x.dtype))
    a = static_affine(CATALOGUE["relu"], {}, 1.0, method)
    return Static("relu", a.scale, a.shift, a.slope)


def method_init(method: str, init: str) -> str:
    return "he" if method == "relu-he" else init


def mlp(depth: int, width: int, method: str, init: str = "lecun") -> torch.nn.Sequential:
    """``depth`` hidden layers (Linear + activation) and a linear read-out (always LeCun), zero biases."""
    layers: list[torch.nn.Module] = []
    fan_in = 784
    for _ in range(depth):
        lin = torch.nn.Linear(fan_in, width)
        probes.init_linear(lin, method_init(method, init))
        layers += [lin, activation(method)]
        fan_in = width
    head = torch.nn.Linear(fan_in, 10)
    probes.init_linear(head, "lecun")
    return torch.nn.Sequential(*layers, head)


def phi(method: str, init: str):
    """The numpy activation (with σ_w² folded in) and its derivative, for the mean-field theory."""
    relu = lambda x: np.maximum(x, 0.0)  # noqa: E731
    step = lambda x: (x > 0).astype(np.float64)  # noqa: E731
    if method in ("relu", "relu-he"):
        g = math.sqrt(2.0) if method_init(method, init) == "he" else 1.0
        return (lambda x: g * relu(x)), (lambda x: g * step(x))
    if method == "anact":  # λ = √2 for ReLU at any scale (ρ = ρ' = 1/2); μ = E relu at the running q
        lam, mu = math.sqrt(2.0), 1.0 / math.sqrt(2.0 * math.pi)
        return (lambda x: lam * (relu(x) - mu)), (lambda x: lam * step(x))
    a = static_affine(CATALOGUE["relu"], {}, 1.0, method)
    return (lambda x: a.scale * (relu(x) - a.shift - a.slope * x)), (lambda x: a.scale * (step(x) - a.slope))


def theory(method: str, init: str) -> dict:
    """Mean-field numbers at σ_w² = 1 (He folded into φ): fixed point q*, χ there, correlation depth."""
    f, df = phi(method, init)
    q_star = 1.0 if method in ("relu", "relu-he") else probes.fixed_point(f)
    q_eval = q_star if 0 < q_star < math.inf else 1.0
    return {
        "q_star": q_star,
        "chi": probes.backward_gain(df, q_eval),
        "chi_at_q1": probes.backward_gain(df, 1.0),
        **probes.correlation_depth(f, q_eval, df),
    }


def parse_lr(text: str) -> dict[str, float]:
    """'1e-3' or '1e-3,anact=3e-4,zeta-zero=1e-4': a bare number is every other method's centre rate."""
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


def _r(v, digits: int = 5):
    """Round floats (and lists of them) for a compact JSON record."""
    if isinstance(v, list):
        return [_r(x, digits) for x in v]
    if isinstance(v, dict):
        return {k: _r(x, digits) for k, x in v.items()}
    if isinstance(v, float):
        return float(f"{v:.{digits}g}") if math.isfinite(v) else (None if math.isnan(v) else v)
    return v


def probe(net: torch.nn.Sequential, xp: torch.Tensor) -> dict:
    return {
        **probes.propagation(net, xp),
        "weights": probes.weight_spectra(net),
        "jacobian_sv": probes.jacobian_spectrum(net, xp[:4]),
    }


def evaluate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    net.eval()
    with torch.no_grad():
        out = net(x)
        loss = float(torch.nn.functional.cross_entropy(out, y))
        acc = float((out.argmax(1) == y).float().mean())
    net.train()
    return loss, acc


def run(depth: int, method: str, seed: int, factor: float, data, args: argparse.Namespace) -> dict:
    (x, y), (xt, yt) = data
    lr = parse_lr(args.lr)[method] * factor
    torch.manual_seed(seed)
    net = mlp(depth, args.width, method, args.init)
    ev = torch.Generator().manual_seed(1234)
    sub = torch.randperm(len(yt), generator=ev)[:2000]
    xs, ys = xt[sub], yt[sub]
    init_probe = probe(net, xs[:256])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    per_epoch = len(y) // args.batch
    total = per_epoch * args.epochs
    curve = {"step": [], "train_loss": [], "test_loss": [], "test_acc": []}
    window: list[float] = []
    above, step, diverged = 0, 0, False
    first_loss = None
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        order = rng.permutation(len(y))
        for b in range(per_epoch):
            idx = torch.from_numpy(order[b * args.batch : (b + 1) * args.batch])
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            value = loss.item()
            first_loss = value if first_loss is None else first_loss
            above = above + 1 if args.diverge and value > args.diverge else 0
            if not math.isfinite(value) or above >= 50:
                diverged = True
                break
            loss.backward()
            opt.step()
            commit_all(net)
            window.append(value)
            step += 1
            if step % args.eval_every == 0 or step == total:
                tl, ta = evaluate(net, xs, ys)
                for k, v in zip(curve, (step, float(np.mean(window)), tl, ta), strict=True):
                    curve[k].append(v)
                window = []
        if diverged:
            break
    _, acc = evaluate(net, xt, yt)
    train_loss = float("nan") if diverged else curve["train_loss"][-1]
    return _r(
        {
            "depth": depth,
            "method": method,
            "init": method_init(method, args.init),
            "seed": seed,
            "lr": lr,
            "lr_factor": factor,
            "steps_done": step,
            "diverged": diverged,
            "first_loss": first_loss,
            "final_loss": train_loss,
            "test_accuracy": acc if not diverged else float("nan"),
            "converged": bool(not diverged and acc >= args.threshold),
            "seconds": time.perf_counter() - t0,
            "curve": curve,
            "probe_init": init_probe,
            "probe_end": probe(net, xs[:256]) if not diverged else None,
        }
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="10,30,50")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", default="3e-4,center-scale=1e-3,zeta-zero=3e-5", help="centre Adam rate per method")
    p.add_argument("--lr-factors", default="1,0.3333,3", help="the grid: centre rate times each factor")
    p.add_argument("--init", choices=("lecun", "he"), default="lecun", help="init of every method but relu-he")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--threshold", type=float, default=0.9, help="test accuracy that counts as converged")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--diverge", type=float, default=1e3, help="stop when the loss stays above this (0: never)")
    p.add_argument("--name", default="train_depth", help="output stem: <name>.json, <name>_*.png")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent))
    p.add_argument("--report", action="store_true", help="only rebuild tables and plots from <name>.json")
    p.add_argument("--resume", action="store_true", help="keep the runs already in <name>.json, run the rest")
    p.add_argument(
        "--order",
        choices=("centre-first", "seed"),
        default="centre-first",
        help="centre-first: the first factor on every seed, then the rest seed by seed; seed: seed by seed",
    )
    p.add_argument("--merge", default="", help="with --report: also the runs of these stems (comma-separated)")
    args = p.parse_args()
    parse_lr(args.lr)
    methods = [m.strip() for m in args.methods.split(",")]
    if not set(methods) <= set(METHODS):
        raise SystemExit(f"--methods: one of {', '.join(METHODS)}")
    out = Path(args.out)
    if args.report:
        saved = json.loads((out / f"{args.name}.json").read_text())
        for stem in filter(None, args.merge.split(",")):
            more = json.loads((out / f"{stem}.json").read_text())
            saved["runs"] += more["runs"]
            saved["theory"] = {**more["theory"], **saved["theory"]}
        report(saved, out, args.name)
        return
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # vanishing ReLU signals at depth are denormals: 50× slower arithmetic
    (x, y), (xt, yt) = mnist()
    mean, std = x.mean(), x.std()
    data = (
        (torch.from_numpy((x - mean) / std), torch.from_numpy(y)),
        (torch.from_numpy((xt - mean) / std), torch.from_numpy(yt)),
    )
    depths = [int(d) for d in args.depths.split(",")]
    factors = [float(f) for f in args.lr_factors.split(",")]
    record = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "args": vars(args),
        "theory": {m: _r(theory(m, args.init)) for m in methods},
        "runs": [],
    }
    path = out / f"{args.name}.json"
    if args.resume and path.exists():
        record["runs"] = json.loads(path.read_text())["runs"]
    done = {(r["depth"], r["method"], r["seed"], r["lr_factor"]) for r in record["runs"]}
    # the centre rate for every seed first, then the rest of the grid seed by seed: an interrupted
    # sweep still has every depth and method on several seeds
    first = [(d, m, s, factors[0]) for s in range(args.seeds) for d in depths for m in methods]
    rest = [(d, m, s, f) for s in range(args.seeds) for f in factors[1:] for d in depths for m in methods]
    if args.order == "seed":
        first, rest = [], [(d, m, s, f) for s in range(args.seeds) for f in factors for d in depths for m in methods]
    for d, m, s, f in first + rest:
        if (d, m, s, _r(f)) in done:
            continue
        r = run(d, m, s, f, data, args)
        record["runs"].append(r)
        path.write_text(json.dumps(record, separators=(",", ":")))
        print(
            f"depth {d:3d} {m:18s} seed {s} lr {r['lr']:.3g}: loss {r['final_loss']} acc {r['test_accuracy']} "
            f"({r['steps_done']} steps, {r['seconds']:.1f}s)",
            flush=True,
        )
    report(record, out, args.name)


def _cell(rs: list[dict]) -> str:
    acc = np.array([r["test_accuracy"] if r["test_accuracy"] is not None else np.nan for r in rs], dtype=float)
    div = int(sum(r["diverged"] for r in rs))
    if div == len(rs):
        return "diverged"
    text = f"{100 * np.nanmean(acc):.1f} ± {100 * np.nanstd(acc):.1f}"
    return text + (f" ({div} div.)" if div else "")


def tables(saved: dict) -> str:
    """Best-rate accuracy per depth, robustness, and the probes' backward gain, as markdown."""
    runs = saved["runs"]
    depths = sorted({r["depth"] for r in runs})
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    out = ["Test accuracy (%) at the centre rate (mean ± std over seeds; final training loss):", ""]
    out += ["| method (rate) | " + " | ".join(f"depth {d}" for d in depths) + " |", "|---|" + "---|" * len(depths)]
    for m in methods:
        cells, rate = [], None
        for d in depths:
            rs = [r for r in runs if r["method"] == m and r["depth"] == d and r["lr_factor"] == 1.0]
            if not rs:
                cells.append("–")
                continue
            rate = rs[0]["lr"]
            loss = [r["final_loss"] for r in rs if r["final_loss"] is not None]
            cells.append(f"{_cell(rs)} ({_g(float(np.mean(loss))) if loss else '–'}; {len(rs)} seeds)")
        out.append(f"| {LABELS[m]} ({_g(rate)}) | " + " | ".join(cells) + " |")
    out += ["", "Test accuracy (%) at each depth's best rate (mean ± std over seeds; rate in brackets):", ""]
    out += ["| method | " + " | ".join(f"depth {d}" for d in depths) + " |", "|---|" + "---|" * len(depths)]
    for m in methods:
        cells = []
        for d in depths:
            by_lr: dict[float, list[dict]] = {}
            for r in runs:
                if r["method"] == m and r["depth"] == d:
                    by_lr.setdefault(r["lr"], []).append(r)
            if not by_lr:
                cells.append("–")
                continue
            score = lambda rs: np.mean([r["test_accuracy"] or 0.0 for r in rs])  # noqa: E731
            lr, rs = max(by_lr.items(), key=lambda kv: score(kv[1]))
            cells.append(f"{_cell(rs)} ({lr:.2g}, {len(rs)} seeds)")
        out.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    out += ["", "Robustness: converged (≥ 90% test accuracy) / (seed, lr) runs:", ""]
    out += ["| method | " + " | ".join(f"depth {d}" for d in depths) + " |", "|---|" + "---|" * len(depths)]
    for m in methods:
        cells = []
        for d in depths:
            rs = [r for r in runs if r["method"] == m and r["depth"] == d]
            cells.append(f"{sum(r['converged'] for r in rs)} / {len(rs)}" if rs else "–")
        out.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    have = sorted({r["depth"] for r in runs if r["seed"] == 0})
    out += ["", "Signal propagation at init, seed 0 (theory: mean field at σ_w² = 1, He folded into φ; measured:", ""]
    out[-2] += " probes on 256 test images; Jacobian: hidden stack, mean over 4 images):"
    out += [
        "| depth | method | theory q* | theory χ at q* | ξ (c*) | measured gain (geo. mean) | measured ξ "
        "| q at layer 1 / last | Jacobian σ_max / σ_median init | after training |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for deep in have[-2:]:
        for m in methods:
            th = saved["theory"][m]
            rs = [r for r in runs if r["method"] == m and r["depth"] == deep and r["seed"] == 0]
            if not rs:
                continue
            pi = rs[0]["probe_init"]
            gains = np.array([g for g in pi["backward_gain"] if g], dtype=float)
            geo = float(np.exp(np.mean(np.log(gains)))) if gains.size else float("nan")
            pe = next((r["probe_end"] for r in rs if r["probe_end"] and r["probe_end"]["jacobian_sv"]), None)
            out.append(
                f"| {deep} | {LABELS[m]} | {_g(th['q_star'])} | {_g(th['chi'])} | {_g(th['depth'])} "
                f"({_g(th['c_star'])}) | {_g(geo)} | {_g(measured_correlation_depth(pi['correlation'], th['c_star']))} "
                f"| {_g(pi['q'][0])} / {_g(pi['q'][-1])} "
                f"| {_sv(pi['jacobian_sv'])} | {_sv(pe['jacobian_sv']) if pe else '–'} |"
            )
    out += ["", "Hidden-to-hidden weight singular values, seed 0, mean over layers (init → after training):", ""]
    out += ["| depth | method | σ_max | σ_median | σ_min |", "|---|---|---|---|---|"]
    for deep in have[-2:]:
        for m in methods:
            rs = [r for r in runs if r["method"] == m and r["depth"] == deep and r["seed"] == 0 and r["probe_end"]]
            if not rs:
                continue
            a, b = rs[0]["probe_init"]["weights"], rs[0]["probe_end"]["weights"]
            cells = [f"{_g(np.mean(a[k]))} → {_g(np.mean(b[k]))}" for k in ("max", "median", "min")]
            out.append(f"| {deep} | {LABELS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def measured_correlation_depth(corr: list[float], c_star: float) -> float | None:
    """−1/slope of ln(c_l − c*) against l, over the layers before c_l is within 0.05 of c* (None if < 3 points).

    Only for a stable c* < 1 (the chaotic sites); ReLU's approach to c* = 1 is a power law, not exponential.
    """
    if c_star is None or c_star > 0.5:
        return None
    gap = [c - c_star for c in corr]
    stop = next((i for i, g in enumerate(gap) if g < 0.05), len(gap))
    if stop < 3:
        return None
    slope = np.polyfit(np.arange(stop), np.log(gap[:stop]), 1)[0]
    return float(-1.0 / slope) if slope < 0 else math.inf


def _g(v) -> str:
    if v is None:
        return "–"
    v = float(v)
    return "∞" if math.isinf(v) else f"{v:.3g}"


def _sv(s: list[float] | None) -> str:
    return f"{_g(s[0])} / {_g(s[len(s) // 2])}" if s else "not finite"


def report(saved: dict, out: Path, name: str) -> None:
    print(tables(saved))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plots)")
        return
    runs = saved["runs"]
    depths = sorted({r["depth"] for r in runs})
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    fig, axes = plt.subplots(2, len(depths), figsize=(4.2 * len(depths), 7), squeeze=False)
    for j, d in enumerate(depths):
        for m in methods:
            by_lr: dict[float, list[dict]] = {}
            for r in runs:
                if r["method"] == m and r["depth"] == d:
                    by_lr.setdefault(r["lr"], []).append(r)
            if not by_lr:
                continue
            lr, rs = max(by_lr.items(), key=lambda kv: np.mean([r["test_accuracy"] or 0.0 for r in kv[1]]))
            for k, (key, ax) in enumerate((("train_loss", axes[0, j]), ("test_acc", axes[1, j]))):
                for i, r in enumerate(rs):
                    c = r["curve"]
                    vals = [100 * v if key == "test_acc" else v for v in c[key]]
                    ax.plot(
                        c["step"],
                        vals,
                        color=f"C{METHODS.index(m)}",
                        alpha=0.8,
                        lw=1,
                        label=f"{LABELS[m]} ({lr:.2g})" if i == 0 and k == 0 else None,
                    )
        axes[0, j].set(title=f"depth {d} (best rate per method)", yscale="log", ylabel="training loss")
        axes[1, j].set(xlabel="step", ylabel="test accuracy (%, 2k subset)", ylim=(0, 100))
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}_curves.png", dpi=50)
    plt.close(fig)
    deep = max(r["depth"] for r in runs if r["seed"] == 0)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for m in methods:
        rs = [r for r in runs if r["method"] == m and r["depth"] == deep and r["seed"] == 0]
        if not rs:
            continue
        col = f"C{METHODS.index(m)}"
        pi = rs[0]["probe_init"]
        axes[0].plot(range(1, len(pi["q"]) + 1), pi["q"], color=col, label=LABELS[m])
        axes[1].plot(range(1, len(pi["backward_gain"]) + 1), pi["backward_gain"], color=col)
        if pi["jacobian_sv"]:
            axes[2].plot(pi["jacobian_sv"], color=col, ls="--")
        pe = next((r["probe_end"] for r in rs if r["probe_end"] and r["probe_end"]["jacobian_sv"]), None)
        if pe:
            axes[2].plot(pe["jacobian_sv"], color=col)
    axes[0].set(xlabel="layer", ylabel="pre-activation E z² at init", yscale="log", title=f"depth {deep}, seed 0")
    axes[1].set(xlabel="layer", ylabel="backward gain E δ_l² / E δ_l+1²", yscale="log", ylim=(0.1, 10))
    axes[2].set(
        xlabel="index",
        ylabel="Jacobian singular value",
        yscale="log",
        ylim=(1e-12, 1e14),
        title="dashed: init, solid: after training",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}_spectra.png", dpi=70)
    plt.close(fig)


if __name__ == "__main__":
    main()
