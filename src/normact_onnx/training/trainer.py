"""What a fine-tuning backend gives the driver (:mod:`.loop`): one small interface, two implementations.

A backend runs the training graph of :func:`.graph.build_train_graph` with the loss of :func:`.losses.with_loss`
(the same graph for both, so they train the same thing): :mod:`.ort_backend` through onnxruntime-training's
artifacts, :mod:`.torch_backend` through :class:`.torch_graph.TorchGraph`. Each step returns the loss, the model
output and the ANAct sites' batch statistics; the host's gated running update (:mod:`.running`) is shared, and so is
everything around the steps (options, data, init, selection, validation, logs, export: :mod:`.loop`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .data import Dataset
from .graph import TrainGraph
from .running import RunningStats

CHECKPOINT_KEYS = ("rho", "rho_d", "mu", "accepted")


class Trainer:
    """One backend's session over one work folder: steps, eval-mode forward, parameters, checkpoints.

    Subclasses set ``tg``, ``settings``, ``running``, ``epoch`` and ``step`` and implement the four methods
    that raise here; :meth:`evaluate` is shared.
    """

    tg: TrainGraph
    settings: Any  # loop.Settings (imported there: this module sits below the driver)
    running: RunningStats
    epoch: int
    step: int

    def train_step(self, x: dict[str, np.ndarray], y: np.ndarray) -> dict[str, np.ndarray]:
        """One optimizer step; returns ``loss``, the model output and ``normact_stats`` as numpy arrays."""
        raise NotImplementedError

    def forward(self, x: dict[str, np.ndarray], y: np.ndarray) -> dict[str, np.ndarray]:
        """Eval-mode outputs of one batch (any size) with the current λ, μ; the running statistics stay."""
        raise NotImplementedError

    def parameters(self) -> dict[str, np.ndarray]:
        """The current value of every trained tensor by initializer name (``normact_alpha`` included)."""
        raise NotImplementedError

    def save(self, path: Path) -> None:
        """A checkpoint at ``path`` (written beside and renamed: never half a checkpoint)."""
        raise NotImplementedError

    def evaluate(self, ds: Dataset) -> tuple[float, float | None]:
        """Mean loss over ``ds`` and, under cross-entropy, the accuracy per labelled position."""
        total, correct, count = 0.0, 0, 0
        for x, y in ds.batches(self.tg.batch or self.settings.batch_size, drop_last=False):
            out = self.forward(x, y)
            total += float(out["loss"]) * len(y)
            count += len(y)
            if self.settings.loss == "cross-entropy":
                correct += int((predicted(out[self.tg.output], y) == y).sum())
        acc = (
            correct / (count * max(1, int(np.prod(ds.labels.shape[1:]))))
            if self.settings.loss == "cross-entropy"
            else None
        )
        return total / count, acc


def predicted(out: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Class indices shaped like the labels (the output may carry singleton axes its logits do not)."""
    return out.reshape(*y.shape, -1).argmax(-1)


def accuracy(out: np.ndarray, y: np.ndarray) -> float:
    return float((predicted(out, y) == y).mean())


def running_properties(running: RunningStats, epoch: int, step: int) -> dict[str, float | int]:
    """The running statistics and the position of a run, as flat checkpoint properties (both backends)."""
    return {**running.to_properties(), "normact.epoch": epoch, "normact.step": step}


def property_keys(props: Any) -> list[str]:
    """The keys :meth:`RunningStats.from_properties` reads, for a checkpoint of ``normact.sites`` sites."""
    n = int(props["normact.sites"])
    keys = ["normact.sites", "normact.batches"]
    for i in range(n):
        keys += [f"normact.{k}.{i}" for k in CHECKPOINT_KEYS]
    return keys
