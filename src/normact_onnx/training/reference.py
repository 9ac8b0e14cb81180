"""A PyTorch reference of ANAct (docs/math.md §2.4) with the same update timing as the ONNX Runtime loop.

Written independently of the ONNX path on purpose: f is a torch function and
f' comes from autograd, not from the catalogue's ONNX derivative body, so a
match between the two trainings checks the graph builder, the statistics and
the host loop rather than restating them. It also drives the depth sweep in
benchmarks/, where eager PyTorch is the faster way to run 60 small trainings.

Timing: ``forward`` uses the running λ, μ and stashes the batch statistics;
``commit()`` (call it after the optimizer step, as the ORT loop updates after
each step) applies the gated rule. ``update_in_forward=True`` is the paper's
own timing (the batch updates the running values before they are used).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..streaming import GATE, MOMENTUM
from .graph import gaussian_start

AMPLITUDE = 0.3

TORCH_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "elu": F.elu,
    "softplus": F.softplus,
    "mish": F.mish,
    "hard_swish": F.hardswish,
}


class ANAct(torch.nn.Module):
    """y = (λ + 0.3·tanh α)·(f(x) − μ); λ, μ from gated running statistics (buffers), α learnable.

    f' for ρ' comes from autograd unless a closed-form ``derivative`` is given
    (the depth benchmark passes one for ReLU: one autograd call per site and
    step is most of the cost of a 100-layer step).
    """

    # buffers (registered in __init__, so they move with .to() and live in state_dict); declared for the type checker,
    # which otherwise sees nn.Module's ``Tensor | Module`` attribute lookup
    rho: torch.Tensor
    rho_d: torch.Tensor
    mu: torch.Tensor
    batches: torch.Tensor

    def __init__(
        self,
        kind: str,
        start: tuple[float, float, float] | None = None,
        rule: str = "anact",
        centered: bool = False,
        update_in_forward: bool = False,
        derivative: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.kind, self.f, self.derivative = kind, TORCH_ACTIVATIONS[kind], derivative
        self.rule, self.centered, self.update_in_forward = rule, centered, update_in_forward
        rho, rho_d, mu = start if start is not None else _gaussian_start(kind, centered)
        self.alpha = torch.nn.Parameter(torch.zeros(()))
        self.register_buffer("rho", torch.tensor(rho, dtype=torch.float64))
        self.register_buffer("rho_d", torch.tensor(rho_d, dtype=torch.float64))
        self.register_buffer("mu", torch.tensor(mu, dtype=torch.float64))
        self.register_buffer("batches", torch.tensor(0))
        self._pending: tuple[float, float, float] | None = None

    def lam(self) -> torch.Tensor:
        r, d = self.rho, self.rho_d
        return torch.sqrt((r + d) / (2 * r * d)) if self.rule == "anact" else torch.sqrt(2 / (r + d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fx = self.f(x)
        if self.training:
            self._pending = self._batch_stats(x, fx)
            if self.update_in_forward:
                self.commit()
        lam, mu = self.lam().to(x.dtype), self.mu.to(x.dtype)
        return (lam + AMPLITUDE * torch.tanh(self.alpha)) * (fx - mu)

    @torch.no_grad()
    def _batch_stats(self, x: torch.Tensor, fx: torch.Tensor) -> tuple[float, float, float] | None:
        if self.derivative is not None:
            d = self.derivative(x.detach())
        else:
            with torch.enable_grad():
                xd = x.detach().requires_grad_(True)
                (d,) = torch.autograd.grad(self.f(xd).sum(), xd)
        fx = fx.detach().double()
        var_x = x.detach().double().var(unbiased=False)
        mean_f = fx.mean()
        num = (fx * fx).mean() - (mean_f * mean_f if self.centered else 0.0)
        rho, rho_d = float(num / var_x), float((d.double() ** 2).mean())
        ok = math.isfinite(rho) and math.isfinite(rho_d) and var_x > 1e-12 and rho > 0 and rho_d > 0
        return (rho, rho_d, float(mean_f)) if ok else None

    @torch.no_grad()
    def commit(self) -> None:
        """Apply the stashed batch statistics by the gated running rule."""
        if self._pending is None:
            return
        rho, rho_d, mu = self._pending
        self._pending = None
        if int(self.batches) == 0:
            for buf, new in ((self.rho, rho), (self.rho_d, rho_d), (self.mu, mu)):
                buf.fill_(new)
        else:
            for buf, new in ((self.rho, rho), (self.rho_d, rho_d)):
                if GATE[0] * float(buf) <= new <= GATE[1] * float(buf):
                    buf.mul_(MOMENTUM).add_((1 - MOMENTUM) * new)
            self.mu.mul_(MOMENTUM).add_((1 - MOMENTUM) * mu)
        self.batches += 1


def commit_all(model: torch.nn.Module) -> None:
    """After each optimizer step: every ANAct site takes its batch into the running statistics."""
    for m in model.modules():
        if isinstance(m, ANAct):
            m.commit()


class Static(torch.nn.Module):
    """A statically normalized activation: scale·(f(x) − shift − slope·x) with fixed constants."""

    def __init__(self, kind: str, scale: float, shift: float, slope: float = 0.0) -> None:
        super().__init__()
        self.f, self.scale, self.shift, self.slope = TORCH_ACTIVATIONS[kind], scale, shift, slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (self.f(x) - self.shift - self.slope * x)


def _gaussian_start(kind: str, centered: bool) -> tuple[float, float, float]:
    return gaussian_start(kind, {}, centered)
