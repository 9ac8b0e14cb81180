"""The ONNX Runtime training backend (``finetune --backend ort``; the ``[train]`` environment).

The training graph becomes onnxruntime-training artifacts (:mod:`.artifacts`: training, eval and optimizer models,
the initial checkpoint) in ``<workdir>/artifacts``; one step feeds a batch, the labels and every ANAct site's λ and
μ, and the optimizer model updates the weights and α (AdamW in Hugging Face's form, ``adam_mode`` 1, ε = 1e-6).
The training graph's batch axis is fixed (ORT 1.19 mis-sizes gradients of symbolic Paddle graphs), so evaluation
pads a smaller batch (:meth:`OrtTrainer.forward`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NormactError
from .artifacts import Artifacts, explain_ort_error, generate
from .backend import require_training
from .graph import LAMBDA_INPUT, MU_INPUT, STATS_OUTPUT, TrainGraph
from .running import RunningStats
from .trainer import Trainer, property_keys, running_properties


class OrtTrainer(Trainer):
    """Owns the ORT training session of one work folder."""

    def __init__(self, tg: TrainGraph, art: Artifacts, settings: Any, checkpoint: Path) -> None:
        require_training()
        from onnxruntime import SessionOptions
        from onnxruntime.training.api import CheckpointState, Module, Optimizer

        self.tg, self.settings = tg, settings
        self._CheckpointState = CheckpointState
        self.state = CheckpointState.load_checkpoint(str(checkpoint))
        so = SessionOptions()
        so.log_severity_level = 3  # the training session logs every graph transformer at INFO otherwise
        if settings.threads:
            so.intra_op_num_threads = settings.threads
        self.module = Module(str(art.training), self.state, str(art.eval), device="cpu", session_options=so)
        self.optimizer = Optimizer(str(art.optimizer), self.module)
        self.optimizer.set_learning_rate(settings.lr)
        self.inputs = list(self.module.input_names())
        self.outputs = list(self.module.output_names())
        props = self.state.properties
        if "normact.sites" in props:
            self.running = RunningStats.from_properties({k: props[k] for k in property_keys(props)})
            self.epoch, self.step = int(props["normact.epoch"]), int(props["normact.step"])
        else:
            self.running = RunningStats.start([s.gaussian for s in tg.anact_sites], [s.primed for s in tg.anact_sites])
            self.epoch = self.step = 0

    def _feeds(self, x: dict[str, np.ndarray], y: np.ndarray) -> list[np.ndarray]:
        lam, mu = self.running.feeds(self.settings.lambda_rule)
        named = {**x, LAMBDA_INPUT: lam, MU_INPUT: mu, "labels": y, "target": y}
        return [named[n] for n in self.inputs]

    def _named(self, outs: Any) -> dict[str, np.ndarray]:
        outs = outs if isinstance(outs, list | tuple) else [outs]
        named = dict(zip(self.outputs, outs))
        named["loss"] = outs[0]
        return named

    def train_step(self, x: dict[str, np.ndarray], y: np.ndarray) -> dict[str, np.ndarray]:
        self.module.train()
        out = self._named(self.module(*self._feeds(x, y)))
        self.optimizer.step()
        self.module.lazy_reset_grad()
        if self.tg.anact_sites:
            self.running.update(out[STATS_OUTPUT], self.settings.centered_rho)
        self.step += 1
        return out

    def forward(self, x: dict[str, np.ndarray], y: np.ndarray) -> dict[str, np.ndarray]:
        """Eval-mode outputs; a batch smaller than the graph's fixed one is padded.

        It is padded with copies of its first sample and the output cut back. In eval mode samples are
        independent and every loss is a mean over samples of equal size, so the padded loss is
        L = (S + p·l₀)/B, and the batch's own mean S/k follows from l₀, the loss of a batch of first-sample copies.
        """
        self.module.eval()
        k, full = len(y), self.tg.batch
        if full is None or k >= full:
            return self._named(self.module(*self._feeds(x, y)))

        fill = np.concatenate([np.arange(k), np.zeros(full - k, np.int64)])
        first = np.zeros(full, np.int64)
        padded = {n: v[fill] if v.ndim else v for n, v in x.items()}
        copies = {n: v[first] if v.ndim else v for n, v in x.items()}
        out = self._named(self.module(*self._feeds(padded, y[fill])))
        l0 = float(self._named(self.module(*self._feeds(copies, y[first])))["loss"])
        loss = (float(out["loss"]) * full - (full - k) * l0) / k
        out["loss"] = np.array(loss, np.float32)
        out[self.tg.output] = out[self.tg.output][:k]
        return out

    def parameters(self) -> dict[str, np.ndarray]:
        return {name: np.array(p.data) for name, p in self.state.parameters}

    def save(self, path: Path) -> None:
        for k, v in running_properties(self.running, self.epoch, self.step).items():
            self.state.properties[k] = v
        tmp = path.with_name(path.name + ".tmp")
        self._CheckpointState.save_checkpoint(self.state, str(tmp), True)
        os.replace(tmp, path)


def open_ort(tg: TrainGraph, settings: Any, work: Path, resume: bool, label_rank: int) -> OrtTrainer:
    """The ORT session of ``work``: new artifacts for a fresh run, the last checkpoint's for ``resume``."""
    art = Artifacts(work / "artifacts")
    last = work / "checkpoints" / "last"
    if resume:
        if not (art.exist() and last.exists()):
            raise NormactError(f"--resume: {work} has no checkpoint yet")
        checkpoint = last
    else:
        shutil.rmtree(art.folder, ignore_errors=True)
        generate(tg, art.folder, settings.loss, settings.optimizer, settings.weight_decay, label_rank)
        checkpoint = art.checkpoint
    try:
        return OrtTrainer(tg, art, settings, checkpoint)
    except Exception as e:
        raise NormactError(explain_ort_error(str(e), "could not start the training session")) from None
