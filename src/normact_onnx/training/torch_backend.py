"""The PyTorch backend (``finetune --backend torch``): the training graph executed by :class:`.torch_graph.TorchGraph`.

It runs the very graph the ORT backend hands to onnxruntime-training (:func:`.graph.build_train_graph` plus the
loss of :func:`.losses.with_loss`): the sites in their gradient-safe form, λ and μ per site fed as tensors (no
gradient, like batch-norm statistics), α per site as the ``normact_alpha`` parameter, the preserved path's
compensation written in the same λ, μ (docs/math.md §2.7), the statistics output for the host's gated update.
The trainable set is the graph's (:attr:`.graph.TrainGraph.trainable`: what prepare.py's ``WEIGHT_INPUTS`` names,
minus ``--freeze``, reachable from the loss); every other tensor has ``requires_grad`` off.

The optimizer is onnxruntime-training's formula, so both backends take the same steps: AdamW in Hugging Face's
form (``adam_mode`` 1: ε added to √v before the bias correction, which goes into the step size; weight decay
after the update) and plain SGD. Shapes are read from the tensors, so no batch is padded.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NormactError
from . import torch_graph
from .backend import require_torch
from .graph import ALPHA_PARAM, LAMBDA_INPUT, MU_INPUT, STATS_OUTPUT, TrainGraph
from .losses import LOSS_OUTPUT, find_head, with_loss
from .running import RunningStats
from .trainer import Trainer, property_keys, running_properties

ADAM_BETAS = (0.9, 0.999)  # onnxblock.optim.AdamW's defaults, which the ORT backend's artifacts use
ADAM_EPS = 1e-6


class OrtAdamW:
    """AdamW as onnxruntime-training's ``AdamWOptimizer`` computes it (``adam_mode`` 1, bias correction on).

    Per step t: m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², p ← p − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m/(√v + ε), then
    p ← p − lr·wd·p. torch.optim.AdamW adds ε to √v̂ instead (after the correction) and decays first; at ε = 1e-6
    and the small gradients of fine-tuning that is a visible difference, hence this class.

    Why it runs torch's fused AdamW kernel anyway: written out op by op, the update is seven passes over every
    weight (a third of MiniLM's step: its 11.7M-entry embedding), the fused kernel one. Its step
    p ← p − lr/(1−β₁ᵗ) · m/(√v/√(1−β₂ᵗ) + ε′) is ORT's exactly when ε′ = ε/√(1−β₂ᵗ), so ε′ is set per step; its
    weight decay stays off and ORT's decay after the update is one more (foreach) pass. Every parameter shares the
    step count t, as in ORT, so a parameter without a gradient in some step does not shift its bias correction.
    """

    def __init__(self, params: list[Any], lr: float, weight_decay: float) -> None:
        torch = require_torch()
        self.params, self.lr, self.weight_decay = params, lr, weight_decay
        self.t = 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.fused = torch.optim.AdamW(
            params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0, fused=bool(params)
        )
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in params]
        for p, m, v, t in zip(params, self.m, self.v, self.steps):
            self.fused.state[p] = {"step": t, "exp_avg": m, "exp_avg_sq": v}  # shared: state_dict reads m, v

    def step(self) -> None:
        torch = require_torch()
        self.t += 1
        b2 = ADAM_BETAS[1]
        self.fused.param_groups[0]["eps"] = ADAM_EPS / math.sqrt(1.0 - b2**self.t)
        for count in self.steps:
            count.fill_(self.t - 1)  # the kernel adds one: every parameter at t
        self.fused.step()
        if self.weight_decay:
            with torch.no_grad():
                stepped = [p for p in self.params if p.grad is not None]
                if stepped:
                    torch._foreach_mul_(stepped, 1.0 - self.lr * self.weight_decay)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        for mine, saved in zip(self.m + self.v, list(state["m"]) + list(state["v"])):
            mine.copy_(saved)


class Sgd:
    """p ← p − lr·g (onnxruntime-training's ``SGDOptimizerV2``; no momentum, no decay)."""

    def __init__(self, params: list[Any], lr: float) -> None:
        self.params, self.lr = params, lr

    def step(self) -> None:
        torch = require_torch()
        with torch.no_grad():
            for p in self.params:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-self.lr)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def pick_device(device: str | None) -> str:
    """``cpu``, or ``cuda`` when asked for (or by default) and torch sees a GPU; asked for without one: an error."""
    torch = require_torch()
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise NormactError("--device cuda: torch sees no CUDA GPU here (a CPU build, or no driver); use --device cpu")
    if device not in ("cpu", "cuda"):
        raise NormactError(f"unknown --device {device!r}; choose cpu or cuda")
    return device


class TorchTrainer(Trainer):
    """The training graph as a torch module, its optimizer and the running statistics of one work folder."""

    def __init__(self, tg: TrainGraph, settings: Any, label_rank: int, checkpoint: Path | None) -> None:
        torch = require_torch()
        TorchGraph = torch_graph.torch_graph_class()
        self.tg, self.settings = tg, settings
        self.device = pick_device(settings.device)
        if settings.threads:
            torch.set_num_threads(settings.threads)
        head = find_head(tg.model, tg.output, settings.loss)
        if head.label in tg.data_inputs:
            raise NormactError(f"the model has an input named {head.label!r}, which the {settings.loss} loss needs")
        if not tg.trainable:
            raise NormactError("the model has no trainable weights (no float initializers read by a layer)")
        self.label = head.label
        self.graph = TorchGraph(with_loss(tg.model, head, label_rank)).to(self.device)
        self.outputs = list(self.graph.plan.outputs)
        assert self.outputs[0] == LOSS_OUTPUT  # with_loss puts the loss first
        self.graph.differentiate([LOSS_OUTPUT])  # the statistics and the output are read, never differentiated
        trainable = set(tg.trainable)
        self.trained: dict[str, Any] = {}
        for key, p in self.graph.named_initializers():
            p.requires_grad_(key in trainable)
            if key in trainable:
                self.trained[key] = p
        params = list(self.trained.values())
        self.optimizer: OrtAdamW | Sgd = (
            Sgd(params, settings.lr)
            if settings.optimizer == "sgd"
            else OrtAdamW(params, settings.lr, settings.weight_decay)
        )
        self.running = RunningStats.start([s.gaussian for s in tg.anact_sites], [s.primed for s in tg.anact_sites])
        self.epoch = self.step = 0
        if checkpoint is not None:
            self._load(checkpoint)

    def _run(self, x: dict[str, np.ndarray], y: np.ndarray) -> list[Any]:
        feeds: dict[str, Any] = {**x, self.label: y}
        if self.tg.anact_sites:
            lam, mu = self.running.feeds(self.settings.lambda_rule)
            feeds[LAMBDA_INPUT], feeds[MU_INPUT] = lam, mu
        return list(self.graph(feeds))

    def _named(self, outs: list[Any]) -> dict[str, np.ndarray]:
        named = {n: o.detach().cpu().numpy() for n, o in zip(self.outputs, outs)}
        named["loss"] = named[LOSS_OUTPUT]
        return named

    def train_step(self, x: dict[str, np.ndarray], y: np.ndarray) -> dict[str, np.ndarray]:
        for p in self.trained.values():
            p.grad = None
        outs = self._run(x, y)
        outs[0].backward()
        self.optimizer.step()
        out = self._named(outs)
        if self.tg.anact_sites:
            self.running.update(out[STATS_OUTPUT], self.settings.centered_rho)
        self.step += 1
        return out

    def forward(self, x: dict[str, np.ndarray], y: np.ndarray) -> dict[str, np.ndarray]:
        torch = require_torch()
        with torch.no_grad():
            return self._named(self._run(x, y))

    def forward_float64(self, x: dict[str, np.ndarray], y: np.ndarray) -> dict[str, np.ndarray] | None:
        """:meth:`forward` computed in float64 (:meth:`.TorchGraph.forward_float64`): the export check's reference;
        None for a model that computes in 16 bits."""
        feeds: dict[str, Any] = {**x, self.label: y}
        if self.tg.anact_sites:
            lam, mu = self.running.feeds(self.settings.lambda_rule)
            feeds[LAMBDA_INPUT], feeds[MU_INPUT] = lam, mu
        outs = self.graph.forward_float64(feeds)
        return None if outs is None else self._named(outs)

    def parameters(self) -> dict[str, np.ndarray]:
        return {k: p.detach().cpu().numpy() for k, p in self.trained.items()} | (
            {} if ALPHA_PARAM in self.trained else self._alpha()
        )

    def _alpha(self) -> dict[str, np.ndarray]:
        """α frozen by --freeze is still part of the export (its initial zeros)."""
        if ALPHA_PARAM not in self.graph.index:
            return {}
        return {ALPHA_PARAM: self.graph.parameter(ALPHA_PARAM).detach().cpu().numpy()}

    def save(self, path: Path) -> None:
        torch = require_torch()
        state = {
            "params": {k: p.detach().cpu() for k, p in self.trained.items()},
            "optimizer": self.optimizer.state_dict(),
            "properties": running_properties(self.running, self.epoch, self.step),
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def _load(self, path: Path) -> None:
        torch = require_torch()
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:
            raise NormactError(f"--resume: {path} is not a torch-backend checkpoint ({type(e).__name__})") from None
        missing = set(self.trained) - set(state["params"])
        if missing:
            raise NormactError(f"--resume: {path} lacks the trained tensor(s) {', '.join(sorted(missing)[:3])}")
        with torch.no_grad():
            for k, p in self.trained.items():
                p.copy_(state["params"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        props = state["properties"]
        self.running = RunningStats.from_properties({k: props[k] for k in property_keys(props)})
        self.epoch, self.step = int(props["normact.epoch"]), int(props["normact.step"])


def export_float64(path: Path, x: dict[str, np.ndarray], output: str) -> np.ndarray | None:
    """The exported model at ``path``, evaluated by :class:`.torch_graph.TorchGraph` in float64 on ``x``: the export
    check's exact value of the file (None for a model that computes in 16 bits)."""
    import onnx

    graph = torch_graph.torch_graph_class()(onnx.load(str(path)))
    outs = graph.forward_float64(x)
    if outs is None:
        return None
    return np.asarray(outs[graph.plan.outputs.index(output)].cpu().numpy(), np.float64)


def export_own_precision(path: Path, x: dict[str, np.ndarray], output: str) -> np.ndarray:
    """The exported model at ``path`` evaluated by :class:`.torch_graph.TorchGraph` in the precision it computes in:
    the export check's value of the file for a 16-bit model, whose training graph is not run in float64 either."""
    import onnx
    import torch

    graph = torch_graph.torch_graph_class()(onnx.load(str(path)))
    with torch.no_grad():
        outs = graph(x)
    return np.asarray(outs[graph.plan.outputs.index(output)].cpu().numpy(), np.float64)


def open_torch(tg: TrainGraph, settings: Any, work: Path, resume: bool, label_rank: int) -> TorchTrainer:
    """The torch trainer of ``work``: fresh, or from the last checkpoint for ``resume``."""
    last = work / "checkpoints" / "last"
    if resume and not last.exists():
        raise NormactError(f"--resume: {work} has no checkpoint yet")
    return TorchTrainer(tg, settings, label_rank, last if resume else None)


__all__ = ["OrtAdamW", "TorchTrainer", "export_float64", "export_own_precision", "open_torch", "pick_device"]
