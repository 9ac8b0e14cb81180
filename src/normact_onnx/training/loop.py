"""``finetune``: the backend-independent driver of a fine-tuning run.

It resolves the options, the data, where training starts (``--init``: auto, preserve, normalize), the site
selection and the training graph (:func:`.graph.build_train_graph`), then drives a backend (:mod:`.trainer`:
``torch`` in :mod:`.torch_backend`, ``ort`` in :mod:`.ort_backend`) step by step: each step returns the loss,
the model output and the sites' batch statistics; the host applies the gated running update (:mod:`.running`)
so the next step gets the new λ and μ. Around the steps: validation, checkpoints, progress, the export
(checked against the backend's own forward before it is put in place) and cleanup when a run fails.

A work folder holds everything a run needs to resume or be audited: ``plan.json`` (sites and settings, the
backend among them), the backend's own files (ORT: ``artifacts/``), checkpoints per epoch (weights, α,
optimizer state and the running statistics), ``log.csv`` and ``loss.png``.

Why one module past 500 lines: it is the driver only (the backends are :mod:`.ort_backend` and
:mod:`.torch_backend`, the graph :mod:`.graph`, the export :mod:`.export`); resume, init, selection, logging and
the export check share the run's settings and work folder, and are read top to bottom as one run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict, get_args

import numpy as np
import onnx

from ..api import looks_pretrained, rewrite
from ..errors import NormactError
from ..io import check_output_path, load_model
from ..methods.anact import LAMBDA_RULES, LambdaRule
from ..methods.static import Affine, Variant
from ..outpaths import beside
from ..passes.find import find_sites
from ..policy import select
from ..progress import bar as progress_bar
from ..runtime.session import open_session
from ..selection import SiteSelection
from ..verify import type_tolerance, working_dtype
from .artifacts import Optimizer
from .backend import Backend, resolve_backend
from .data import Dataset, check_labels, input_specs, load_dataset
from .export import export_model
from .graph import (
    ALPHA_PARAM,
    LAMBDA_INPUT,
    MU_INPUT,
    Method,
    PreserveHelper,
    TrainGraph,
    TrainSite,
    build_train_graph,
    trainable_copy,
)
from .losses import LOSSES, Loss, class_view, find_head
from .ort_backend import open_ort
from .prepare import fix_input_shapes
from .torch_backend import TorchTrainer, export_float64, export_own_precision, open_torch, pick_device
from .trainer import Trainer, accuracy

DataLike = str | os.PathLike | Mapping[str, np.ndarray]
PLAN = "plan.json"
Init = Literal["auto", "preserve", "normalize"]
INITS: tuple[Init, ...] = get_args(Init)
# the export against the trained graph's own forward, relative to the output's scale (_check_export). torch: issue
# 23's 1e-5, against the torch forward run in float64; where ONNX Runtime's own float32 rounding exceeds it
# (magika: 1.5e-5, its jax2tf LayerNorm), the export is checked against the trained graph in float64 instead and
# ORT's rounding on the same file bounded separately. The ORT training session's fused kernels: 1e-4, as measured.
EXPORT_TOLERANCE: dict[str, float] = {"torch": 1e-5, "ort": 1e-4}


@dataclass
class Settings:
    """Everything that defines a run (saved in plan.json; a resumed run keeps the graph-defining ones)."""

    loss: Loss = "cross-entropy"
    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: Optimizer = "adamw"
    weight_decay: float = 0.0
    method: Method = "anact"
    variant: Variant = "center-scale"
    q: float = 1.0
    lambda_rule: LambdaRule = "anact"
    centered_rho: bool = False
    seed: int = 0
    max_steps: int | None = None
    # where training starts: "preserve" keeps the model's function (rewrite --preserve-function, factor updates
    # compensated: docs/math.md §2.7), "normalize" starts every site at ANAct's Gaussian factors (a freshly
    # initialized model), "auto" picks "preserve" for a model that looks pretrained (api.looks_pretrained)
    init: Init = "auto"
    threads: int = 0  # intra-op threads of the training session (0: the runtime's default)
    backend: str = "auto"  # "torch" or "ort"; auto: ort inside an onnxruntime-training environment, else torch
    device: str | None = None  # torch backend: "cpu" or "cuda" (None: cuda when torch sees a GPU)


@dataclass
class FinetuneResult:
    output: Path | None
    workdir: Path
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch
    sites: list[dict[str, Any]] = field(default_factory=list)
    export_max_abs_diff: float | None = None
    losses: list[float] = field(default_factory=list)  # every training step
    init: str = ""  # "preserve" or "normalize": where training started (Settings.init resolved)
    notes: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        out = asdict(self)
        out["output"] = str(self.output) if self.output else None
        out["workdir"] = str(self.workdir)
        return out


class Log:
    """log.csv: one row per training step, one per validation; λ and μ of every ANAct site on each row."""

    def __init__(self, path: Path, sites: int, append: bool) -> None:
        self.path = path
        self.columns = ["epoch", "step", "split", "loss", "accuracy", "seconds"]
        self.columns += [f"lambda_{i}" for i in range(sites)] + [f"mu_{i}" for i in range(sites)]
        fresh = not (append and path.exists())
        self.fh = open(path, "w" if fresh else "a", newline="")  # noqa: SIM115 (closed by close(); lives across epochs)
        self.writer = csv.writer(self.fh)
        if fresh:
            self.writer.writerow(self.columns)

    def row(self, epoch: int, step: int, split: str, loss: float, acc: float | None, sec: float, lam, mu) -> None:
        fmt = lambda v: "" if v is None else f"{v:.6g}"  # noqa: E731
        self.writer.writerow([epoch, step, split, fmt(loss), fmt(acc), f"{sec:.3f}", *map(fmt, lam), *map(fmt, mu)])

    def close(self) -> None:
        self.fh.close()


def plot_log(csv_path: Path, png_path: Path) -> bool:
    """loss.png from log.csv: training loss per step, validation loss per epoch (False without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train: list[tuple[int, float]] = []
    val: list[tuple[int, float]] = []
    with open(csv_path, newline="") as fh:
        for r in csv.DictReader(fh):
            (train if r["split"] == "train" else val).append((int(r["step"]), float(r["loss"])))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=0.8, label="train (step)")
    if val:
        ax.plot(*zip(*val), "o-", label="validation (epoch)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


def _output_shape(tg: TrainGraph, sample: dict[str, np.ndarray], value: str | None = None) -> tuple[int, ...]:
    """The shape of ``value`` (default: the output) on two samples (λ = 1, μ = 0): the honest way to know C and rank."""
    import onnxruntime as ort

    feeds = {k: v[:2] if v.ndim else v for k, v in sample.items()}
    n = len(tg.anact_sites)
    if n:
        feeds[LAMBDA_INPUT] = np.ones(n, np.float32)
        feeds[MU_INPUT] = np.zeros(n, np.float32)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    model = tg.model
    if value and value not in {o.name for o in model.graph.output}:  # ONNX Runtime returns graph outputs only
        import onnx

        model = onnx.ModelProto()
        model.CopyFrom(tg.model)
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(value))
    sess = open_session(model, None, so, library="none")
    try:
        (out,) = sess.run([value or tg.output], feeds)
    except Exception as e:
        raise NormactError(f"the model does not run on the given data: {str(e).splitlines()[0]}") from None
    return tuple(out.shape)


def _data_shapes(train: Dataset, batch: int) -> dict[str, tuple[int, ...]]:
    """Each data input's shape in a training batch: ``batch`` samples of the data's own size."""
    return {k: (batch, *v.shape[1:]) for k, v in train.inputs.items()}


def _plan(
    tg: TrainGraph, settings: Settings, selection: dict[str, Any], model_path: str, shapes: dict[str, tuple[int, ...]]
) -> dict[str, Any]:
    return {
        "model": model_path,
        "settings": asdict(settings),
        "selection": selection,
        "output": tg.output,
        "input_shapes": {k: list(v) for k, v in shapes.items()},
        "sites": [{**s.as_dict(), "params": s.params, "gaussian": list(s.gaussian)} for s in tg.sites],
    }


def _sites_from_plan(plan: dict[str, Any]) -> list[TrainSite]:
    out = []
    for d in plan["sites"]:
        aff = Affine(d["scale"], d["shift"], d["slope"]) if "scale" in d else None
        s = TrainSite(d["index"], d["name"], d["kind"], d["params"], d["output"], d["method"], aff)
        s.gaussian = tuple(d["gaussian"])
        if d.get("reference") is not None:
            s.reference = (float(d["reference"][0]), float(d["reference"][1]))
        s.helpers = [PreserveHelper(**h) for h in d.get("helpers", [])]
        if d.get("tail") is not None:
            s.tail = (float(d["tail"][0]), float(d["tail"][1]))
        out.append(s)
    return out


class FinetuneKeywords(TypedDict, total=False):
    """The keywords of :func:`finetune` besides the :class:`Settings` fields, declared once (PEP 692)."""

    labels: str
    val: DataLike | None
    output: str | os.PathLike | None
    workdir: str | os.PathLike | None
    resume: bool
    selection: SiteSelection | None
    include: Any
    exclude: Any
    nodes: str | None
    all_sites: bool
    output_name: str | None
    freeze: str | None
    fold: bool
    verify: bool
    progress: bool


def finetune(model: str | os.PathLike, data: DataLike, **kwargs: Any) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` (an ``.npz`` path or arrays by input name) and export the inference model.

    Keywords: ``labels`` (the labels array, default ``y``), ``val`` (validation data), ``output`` (default
    ``MODEL.tuned.onnx``), ``workdir`` (default ``OUTPUT.train``), ``resume`` (continue from the last checkpoint
    there; its graph-defining settings win), the sites to train as one :class:`..selection.SiteSelection`
    (``selection=``, what ``rewrite`` and ``calibrate`` take) or as the loose ``include``/``exclude``/``nodes``/
    ``all_sites``, ``output_name`` (the graph output the loss reads), ``freeze`` (a regex of weights kept fixed),
    ``fold``, ``verify``, ``progress``; and every :class:`Settings` field (loss, epochs, batch_size, lr,
    optimizer, weight_decay, method, variant, q, lambda_rule, centered_rho, seed, max_steps, init, threads,
    backend, device). An unknown keyword is a ``TypeError``.

    A work folder this run created is removed again when the run fails; one that existed before
    (``--workdir`` given, ``--resume``) is kept as it is.
    """
    known = set(FinetuneKeywords.__annotations__) | set(Settings.__dataclass_fields__)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"finetune() got unexpected keyword(s) {unknown}")
    selection = kwargs.pop("selection", None)
    if selection is not None:
        loose = [k for k in ("include", "exclude", "nodes", "all_sites") if kwargs.get(k) not in (None, False)]
        if loose:
            raise TypeError(f"finetune(): give the sites as selection= or as {', '.join(loose)}, not both")
        kwargs.update(_selection_keys(selection))
    out_path, work = _paths(Path(model), kwargs.get("output"), kwargs.get("workdir"))
    check_output_path(out_path)
    existed = work.exists()
    try:
        return _finetune(model, data, **kwargs)
    except BaseException:
        if not existed:
            shutil.rmtree(work, ignore_errors=True)
        raise


def _selection_keys(selection: SiteSelection) -> dict[str, Any]:
    """A :class:`SiteSelection` as the plain keys ``plan.json`` records (kinds sorted, so a plan reads the same)."""
    return {
        "include": sorted(selection.include) if selection.include is not None else None,
        "exclude": sorted(selection.exclude) if selection.exclude is not None else None,
        "nodes": selection.nodes,
        "all_sites": selection.all_sites,
    }


def _paths(path: Path, output: str | os.PathLike | None, workdir: str | os.PathLike | None) -> tuple[Path, Path]:
    """The inference model's path (default ``<model>.tuned.onnx``) and the work folder (``<output>.train``)."""
    out_path = Path(output) if output is not None else beside(path, ".tuned.onnx")
    work = Path(workdir) if workdir is not None else beside(out_path, ".train")
    return out_path, work


def _finetune(
    model: str | os.PathLike,
    data: DataLike,
    *,
    labels: str = "y",
    val: DataLike | None = None,
    output: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    resume: bool = False,
    include: Any = None,
    exclude: Any = None,
    nodes: str | None = None,
    all_sites: bool = False,
    output_name: str | None = None,
    freeze: str | None = None,
    fold: bool = False,
    verify: bool = True,
    progress: bool = True,
    **options: Any,
) -> FinetuneResult:
    """The run itself (:func:`finetune` adds the keyword check and the cleanup of a failed run).

    ``options`` are :class:`Settings` fields (loss, epochs, batch_size, lr, optimizer,
    weight_decay, method, variant, q, lambda_rule, centered_rho, seed, max_steps).
    With ``resume=True`` the run continues from the last checkpoint in ``workdir``
    (its graph-defining settings win; epochs/lr/max_steps may be changed).
    """
    unknown = set(options) - set(Settings.__dataclass_fields__)
    if unknown:
        raise TypeError(f"finetune() got unexpected option(s) {sorted(unknown)}")
    settings = Settings(**options)
    _check_settings(settings)
    path = Path(model)
    src = load_model(path)
    out_path, work = _paths(path, output, workdir)
    if out_path.resolve() == path.resolve():
        raise NormactError(f"refusing to overwrite the input {path}; choose another -o")
    selection = {"include": include, "exclude": exclude, "nodes": nodes, "all_sites": all_sites, "freeze": freeze}

    base_dir = str(path.parent)
    tg = None
    if resume:
        plan_file = work / PLAN
        if not plan_file.exists():
            raise NormactError(f"--resume: {work} has no {PLAN}; nothing to resume")
        plan = json.loads(plan_file.read_text())
        keep = {
            k: plan["settings"][k]
            for k in (
                "loss",
                "method",
                "variant",
                "q",
                "lambda_rule",
                "centered_rho",
                "optimizer",
                "weight_decay",
                "batch_size",
                "seed",
                "init",
                "backend",  # the checkpoints are the backend's own format
            )
            if k in plan["settings"]
        }
        settings = Settings(**{**asdict(settings), **keep})
        selection = plan["selection"]
    backend: Backend = resolve_backend(settings.backend)
    settings.backend = backend
    if backend == "torch":
        settings.device = pick_device(settings.device)  # --device cuda without a GPU stops here, before any work
    elif settings.device not in (None, "cpu"):
        raise NormactError("--device applies to the torch backend; the ort backend trains on the CPU")
    init, why = _resolve_init(settings, src, base_dir, selection)
    notes = []
    if init == "preserve":
        if why:
            notes.append(
                f"{path.name} looks pretrained ({why}): fine-tuning keeps its function (rewrite --preserve-function, "
                "factor updates compensated); --init normalize starts from ANAct's Gaussian factors instead"
            )
            print(f"finetune: {notes[-1]}", file=sys.stderr)
        src = _preserved(src, base_dir, settings, selection)
    settings.init = init
    tg = build_train_graph(
        src,
        base_dir,
        method=settings.method,
        variant=settings.variant,
        q=settings.q,
        centered_rho=settings.centered_rho,
        output=output_name,
        preserve=init == "preserve",
        backend=backend,
        **selection,
    )
    if resume:
        tg.sites = _sites_from_plan(plan)

    specs = input_specs(tg.model, tg.data_inputs)
    train = load_dataset(data, labels, specs, "--data")
    find_head(tg.model, tg.output, settings.loss)  # a head the loss cannot use stops here, before any data work
    shape = _output_shape(tg, {**train.inputs, **train.fixed})
    if settings.loss == "cross-entropy":
        shape = class_view(shape)  # [N, C, 1, 1] classifiers: labels [N]
    check_labels(train, settings.loss, tg.output, shape)
    val_ds = None
    if val is not None:
        val_ds = load_dataset(val, labels, specs, "--val")
        check_labels(val_ds, settings.loss, tg.output, shape)

    # every training batch is full (the trailing partial one is dropped: both backends take the same steps); the ORT
    # training graph has the batch's concrete shape (ORT 1.19 mis-sizes gradients of symbolic Paddle graphs) and
    # pads in evaluation (OrtTrainer.forward); torch reads shapes from the tensors
    tg.batch = min(settings.batch_size, len(train))
    shapes = _data_shapes(train, tg.batch)
    listed = {k: list(v) for k, v in shapes.items()}
    if resume and plan.get("input_shapes", listed) != listed:
        raise NormactError(
            f"--resume: the training graph was built for batches of shape {plan['input_shapes']}; this data gives "
            f"{listed}: resume with the same data and --batch-size"
        )
    for name, size in shapes.items():
        if val_ds is not None and val_ds.inputs[name].shape[1:] != size[1:]:
            raise NormactError(
                f"--val: input {name!r} has samples of shape {list(val_ds.inputs[name].shape[1:])}, the training data "
                f"{list(size[1:])}; the training graph is built for the training data's shape"
            )
    if backend == "ort":
        fix_input_shapes(tg.model, shapes, tg.prepared)

    # a failed run removes what it created: the work folder (unless it was there before) and a partial output
    created_work = not resume and not work.exists()
    had_output = out_path.exists()
    try:
        last = work / "checkpoints" / "last"
        if not resume:
            if work.exists() and (work / PLAN).exists():
                shutil.rmtree(work / "checkpoints", ignore_errors=True)
            work.mkdir(parents=True, exist_ok=True)
            plan_text = json.dumps(_plan(tg, settings, selection, str(path), shapes), indent=2, default=str)
            (work / PLAN).write_text(plan_text)
        (work / "checkpoints").mkdir(exist_ok=True)
        trainer = _open(backend, tg, settings, work, resume, len(train.labels.shape))
        result = _run(trainer, train, val_ds, settings, work, progress, resume)
        result.init, result.notes = init, notes
        trainer.save(last)

        # the last training-graph outputs, to check the export against
        probe_ds = val_ds or train
        px, py = next(probe_ds.batches(min(tg.batch, len(probe_ds)), drop_last=False))
        # the torch backend's reference is its forward in float64 (docs/torch-backend.md §3, Export)
        wide = trainer.forward_float64(px, py) if isinstance(trainer, TorchTrainer) else None
        expected = (wide or trainer.forward(px, py))[tg.output]
        params = trainer.parameters()
        lam, mu = trainer.running.feeds(settings.lambda_rule)
        alpha = params.get(ALPHA_PARAM, np.zeros(0, np.float32))
        weights = {k: v for k, v in params.items() if k != ALPHA_PARAM}
        provenance: dict[str, Any] = {
            "method": settings.method,
            "lambda_rule": settings.lambda_rule,
            "steps": trainer.step,
            "epochs": trainer.epoch,
            "backend": backend,
        }
        # written beside, checked against the backend's own forward, then put in place: an export that does not
        # reproduce the trained model is never left at -o
        staged = out_path.with_name(f".{out_path.name}.unchecked.onnx")
        try:
            export_model(
                src,
                base_dir,
                tg.sites,
                weights,
                lam,
                mu,
                alpha,
                staged,
                provenance=provenance,
                fold=fold,
                verify=verify,
            )
            save_arrays(work / "export_check.npz", {**px, "expected": expected})
            exact = export_float64 if wide is not None else None
            if wide is None and isinstance(trainer, TorchTrainer):  # a 16-bit model: its own precision is the reference
                exact = export_own_precision
            result.export_max_abs_diff = _check_export(
                staged, px, tg.output, expected, EXPORT_TOLERANCE[backend], exact
            )
            os.replace(staged, out_path)
        finally:
            staged.unlink(missing_ok=True)
        result.output = out_path
        result.sites = [
            {
                **s.as_dict(),
                **(
                    {"lambda": float(lam[s.index]), "mu": float(mu[s.index]), "alpha": float(alpha[s.index])}
                    if s.method == "anact"
                    else {}
                ),
            }
            for s in tg.sites
        ]
        (work / "result.json").write_text(json.dumps(result.report(), indent=2))
        return result
    except BaseException:
        if created_work:
            shutil.rmtree(work, ignore_errors=True)
        if not had_output:
            out_path.unlink(missing_ok=True)
        raise


def _open(backend: Backend, tg: TrainGraph, settings: Settings, work: Path, resume: bool, label_rank: int) -> Trainer:
    """The backend's trainer (each imports its runtime only here)."""
    if backend == "torch":
        return open_torch(tg, settings, work, resume, label_rank)
    return open_ort(tg, settings, work, resume, label_rank)


def _check_settings(s: Settings) -> None:
    if s.loss not in LOSSES:
        raise NormactError(f"unknown --loss {s.loss!r}; choose one of {', '.join(LOSSES)}")
    if s.lambda_rule not in LAMBDA_RULES:
        raise NormactError(f"unknown --lambda-rule {s.lambda_rule!r}; choose one of {', '.join(LAMBDA_RULES)}")
    if s.epochs < 1 or s.batch_size < 1:
        raise NormactError("--epochs and --batch-size must be at least 1")
    if not s.lr >= 0:  # 0: the factors' running update alone (the weights and α stay)
        raise NormactError(f"--lr must be 0 or positive, got {s.lr}")
    if s.init not in INITS:
        raise NormactError(f"unknown --init {s.init!r}; choose one of {', '.join(INITS)}")


def _resolve_init(
    s: Settings, model: onnx.ModelProto, base_dir: str, selection: dict[str, Any]
) -> tuple[Init, str | None]:
    """``preserve`` or ``normalize``, and why ``auto`` chose ``preserve`` (the reason api.looks_pretrained gives).

    ``--method none`` trains the model as it is: nothing to preserve. A model that ``rewrite`` already normalized
    keeps the function it was given (its normalized sites are compensated, not restarted).
    """
    if s.method == "none" or s.init == "normalize":
        return "normalize", None
    if s.init == "preserve":
        return "preserve", None
    full = trainable_copy(model, base_dir)
    picked = select(find_sites(full, base_dir), SiteSelection.parse(**_site_keys(selection)), lambda _: Affine(1, 0, 0))
    kept = sum(1 for o in picked if o.action == "normalized")
    if kept:  # an earlier rewrite's function (--preserve-function or not): fine-tuning starts from it
        return "preserve", f"{kept} site(s) an earlier rewrite normalized"
    why = looks_pretrained(full, [o.site for o in picked if o.action != "skipped"], base_dir)
    return ("preserve", why) if why else ("normalize", None)


def _site_keys(selection: dict[str, Any]) -> dict[str, Any]:
    return {k: selection.get(k) for k in ("include", "exclude", "nodes")} | {
        "all_sites": bool(selection.get("all_sites"))
    }


def _preserved(model: onnx.ModelProto, base_dir: str, s: Settings, selection: dict[str, Any]) -> onnx.ModelProto:
    """``rewrite --preserve-function`` in memory: the selected sites at static constants, the inverse in their
    consumers. Already normalized sites stay as they are; sites it cannot preserve are trained as they are."""
    full = trainable_copy(model, base_dir)
    return rewrite(full, preserve_function=True, variant=s.variant, q=s.q, verify=False, **_site_keys(selection))


def _run(
    tr: Trainer, train: Dataset, val: Dataset | None, s: Settings, work: Path, progress: bool, resume: bool
) -> FinetuneResult:
    result = FinetuneResult(None, work)
    log = Log(work / "log.csv", len(tr.tg.anact_sites), append=resume)
    t0 = time.perf_counter()
    steps_per_epoch = train.steps(s.batch_size)
    try:
        while tr.epoch < s.epochs and (s.max_steps is None or tr.step < s.max_steps):
            rng = np.random.default_rng(s.seed + tr.epoch)  # reproducible order, also after resume
            bar = progress_bar(steps_per_epoch, f"epoch {tr.epoch + 1}/{s.epochs}", progress, unit="step")
            run_loss, run_acc, seen = 0.0, 0.0, 0
            for x, y in train.batches(s.batch_size, rng):
                if s.max_steps is not None and tr.step >= s.max_steps:
                    break
                out = tr.train_step(x, y)
                loss = float(out["loss"])
                acc = accuracy(out[tr.tg.output], y) if s.loss == "cross-entropy" else None
                result.losses.append(loss)
                seen += 1
                run_loss += loss
                run_acc += acc or 0.0
                lam, mu = tr.running.feeds(s.lambda_rule)
                log.row(tr.epoch + 1, tr.step, "train", loss, acc, time.perf_counter() - t0, lam, mu)
                if not math.isfinite(loss):
                    raise NormactError(f"the loss became {loss} at step {tr.step}: lower --lr")
                bar.update()
                postfix = {"loss": f"{run_loss / seen:.4f}"}
                if acc is not None:
                    postfix["acc"] = f"{run_acc / seen:.4f}"
                bar.set_postfix(postfix)
            bar.close()
            tr.epoch += 1
            row: dict[str, float | None] = {"epoch": tr.epoch, "step": tr.step, "train_loss": run_loss / max(seen, 1)}
            if s.loss == "cross-entropy":
                row["train_accuracy"] = run_acc / max(seen, 1)
            if val is not None:
                vloss, vacc = tr.evaluate(val)
                lam, mu = tr.running.feeds(s.lambda_rule)
                log.row(tr.epoch, tr.step, "val", vloss, vacc, time.perf_counter() - t0, lam, mu)
                row.update(val_loss=vloss, val_accuracy=vacc)
                if progress:
                    shown = f"val loss {vloss:.4f}" + (f"  val acc {vacc:.4f}" if vacc is not None else "")
                    print(f"epoch {tr.epoch}: {shown}", file=sys.stderr)
            result.history.append(row)
            tr.save(work / "checkpoints" / f"epoch_{tr.epoch}")
            tr.save(work / "checkpoints" / "last")
    finally:
        log.close()
    plot_log(work / "log.csv", work / "loss.png")
    return result


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez(path, **arrays)`` without its own parameters in the way: through ``**`` an input named ``file``
    would raise a TypeError after the whole training and one named ``allow_pickle`` would vanish from the file."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)


def _check_export(
    path: Path,
    x: dict[str, np.ndarray],
    output: str,
    expected: np.ndarray,
    rel: float,
    exact: Callable[[Path, dict[str, np.ndarray], str], np.ndarray | None] | None = None,
) -> float:
    """Run the exported model on the probe batch: it must reproduce the training graph's last outputs.

    The bound is ``rel`` of the output's scale (its largest magnitude, at least 1), or a few of float16's ε for a
    model that computes in float16 (:func:`..verify.type_tolerance`: ppocr_cls converted to float16 missed 1e-5
    by 1.5 of its ulps). Where ONNX Runtime's result is
    further off than that, two things can be at fault, and each is measured on its own:

    - with ``exact`` (the torch backend, whose ``expected`` is its forward in float64): the export evaluated in
      float64 (``exact(path, x, output)``) must equal ``expected`` to ``rel`` — the file is the trained function —
      and ONNX Runtime's float32 result may differ from that exact value of the same file by its own rounding, up
      to 10× the bound (magika's LayerNorm: 1.5e-5); for a float16 model the same, with the file evaluated by torch
      in float16 in place of float64 (two float16 kernels differ by ~10 ulps through ppocr_cls);
    - otherwise, 4× what ONNX Runtime disagrees with itself by on the export (graph optimizations on vs off),
      counted up to 10× the bound.

    So the check never loosens without limit, and never because of the export itself.
    """
    import onnxruntime as ort

    def run(level: Any) -> np.ndarray:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = level
        sess = open_session(str(path), None, so, library="none")
        return np.asarray(sess.run([output], x)[0], np.float64)

    got = run(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if not got.size:
        return 0.0
    diff = float(np.max(np.abs(got - expected)))
    working = working_dtype(onnx.load(str(path), load_external_data=False))
    if working is not None:  # a float16 model rounds at float16's ε (9.8e-4), whatever its I/O type
        rel = type_tolerance(working, rel)
    base = rel * max(1.0, float(np.max(np.abs(expected))))
    if diff <= base:
        return diff
    wide = exact(path, x, output) if exact is not None else None
    if wide is not None:
        own = float(np.max(np.abs(wide - expected)))
        rounding = float(np.max(np.abs(got - wide)))
        if own <= base and rounding <= 10 * base:
            return diff
        precision = "float32" if working is None or working.itemsize >= 4 else str(working)
        raise NormactError(
            f"the exported model differs from the training graph by {diff:.3g} (> {base:.3g}; in "
            f"{'float64' if precision == 'float32' else 'torch at ' + precision} by {own:.3g}, ONNX Runtime's "
            f"{precision} rounding {rounding:.3g})"
        )
    spread = float(np.max(np.abs(run(ort.GraphOptimizationLevel.ORT_DISABLE_ALL) - got)))
    tol = max(base, 4 * min(spread, 10 * base))
    if not diff <= tol:
        raise NormactError(f"the exported model differs from the training graph by {diff:.3g} (> {tol:.3g})")
    return diff


__all__ = ["FinetuneResult", "Settings", "finetune", "plot_log"]
