"""ONNX Runtime training artifacts for a :class:`~.graph.TrainGraph` (needs onnxruntime-training).

``generate_artifacts`` writes the training, eval and optimizer models and the
initial checkpoint. With onnx ≥ 1.18 it stamps the current IR version (14 with
onnx 1.23) on the optimizer model, which onnxruntime-training 1.19 refuses to
load; every artifact is therefore clamped to IR ≤ 10 after generation (the
graphs use nothing newer, the opsets are the model's own).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import onnx

from ..errors import NormactError
from .backend import require_training
from .graph import MAX_TRAIN_IR, STATS_OUTPUT, TrainGraph
from .losses import LOSS_OUTPUT, find_head, with_loss

Optimizer = Literal["adamw", "sgd"]
OPTIMIZERS: tuple[Optimizer, ...] = get_args(Optimizer)


@dataclass(frozen=True)
class Artifacts:
    folder: Path

    @property
    def training(self) -> Path:
        return self.folder / "training_model.onnx"

    @property
    def eval(self) -> Path:
        return self.folder / "eval_model.onnx"

    @property
    def optimizer(self) -> Path:
        return self.folder / "optimizer_model.onnx"

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint"

    def exist(self) -> bool:
        return all(p.exists() for p in (self.training, self.eval, self.optimizer, self.checkpoint))


def clamp_artifact_ir(path: Path, max_ir: int = MAX_TRAIN_IR) -> None:
    """Rewrite ``path`` with IR ≤ ``max_ir`` if it was stamped newer (nothing else changes)."""
    m = onnx.load(str(path), load_external_data=False)
    if m.ir_version > max_ir:
        m.ir_version = max_ir
        path.write_bytes(m.SerializeToString())


_NO_BUILDER = re.compile(r"gradient builder has not been registered: (\S+) for node (\S+)")
_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+?)Grad\(\d+\) node with name '(.+?)_Grad/")
_FIX = "freeze the layers before it (--freeze REGEX on their weights) or train on an earlier output (--output-name)"


def explain_ort_error(text: str, what: str) -> str:
    """One line from an onnxruntime-training failure: which node, why, and what to do."""
    m = _NO_BUILDER.search(text)
    if m:
        return f"node {m.group(2)!r} ({m.group(1)}) has no gradient in onnxruntime-training 1.19: {_FIX}"
    m = _NO_KERNEL.search(text)
    if m:
        return f"node {m.group(2)!r} ({m.group(1)}) has no CPU gradient kernel in onnxruntime-training 1.19: {_FIX}"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    first = lines[-1] if lines and "onnxruntime_src" in lines[0] else (lines[0] if lines else "unknown error")
    first = re.sub(r"^.*?\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first)
    return f"onnxruntime-training {what}: {first}"


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[list[str]]:
    """Swallow what native code writes to fd 2 (the gradient builder logs every transformer at INFO).

    The captured text is handed back so a failure can still show it.
    """
    captured: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def generate(
    tg: TrainGraph,
    folder: Path,
    loss: str,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    label_rank: int | None = None,
) -> Artifacts:
    """Build the artifacts: loss on ``tg.output``; the output and the site statistics kept as extra outputs."""
    training = require_training()
    from onnxruntime.training import artifacts as art
    from onnxruntime.training import onnxblock

    if optimizer not in OPTIMIZERS:
        raise NormactError(f"unknown --optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    head = find_head(tg.model, tg.output, loss)
    if head.label in tg.data_inputs:
        raise NormactError(f"the model has an input named {head.label!r}, which the {loss} loss needs for its labels")
    if not tg.trainable:
        raise NormactError("the model has no trainable weights (no float initializers read by a layer)")
    model = with_loss(tg.model, head, label_rank)
    optim = art.OptimType.SGD if optimizer == "sgd" else onnxblock.optim.AdamW(weight_decay=weight_decay)
    folder.mkdir(parents=True, exist_ok=True)
    extra = [tg.output] + ([STATS_OUTPUT] if tg.anact_sites else [])
    trainable = set(tg.trainable)
    frozen = [t.name for t in tg.model.graph.initializer if t.name not in trainable]
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.WARNING)  # generate_artifacts logs every file at INFO
    try:
        with _quiet_native_stderr():
            art.generate_artifacts(
                model,
                requires_grad=tg.trainable,
                frozen_params=frozen,
                loss=None,  # the loss is in the graph already (losses.with_loss), in the model's opset
                optimizer=optim,
                artifact_directory=str(folder),
                loss_input_names=[LOSS_OUTPUT],
                additional_output_names=extra,
            )
    except NormactError:
        raise
    except Exception as e:
        why = explain_ort_error(str(e) or type(e).__name__, "could not build the training graph")
        raise NormactError(why) from None
    finally:
        logging.getLogger().setLevel(level)
    out = Artifacts(folder)
    for p in (out.training, out.eval, out.optimizer):
        clamp_artifact_ir(p)
    del training
    return out
