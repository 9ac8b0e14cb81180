"""What the depth study measures besides accuracy: initializations, signal propagation and spectra.

Two halves, both used by ``train_depth.py`` and checked in tests/test_depth_probes.py:

* mean-field theory by quadrature (docs/math.md §1.8): the variance map q → E φ(√q·z)², its
  fixed point, the backward gain χ = E φ'(√q*·z)² and the correlation depth ξ = −1/ln χ_c*
  (the slope of the correlation map at its stable fixed point), for weights of variance 1/fan-in;
* measurements on a real network (an ``nn.Sequential`` of Linear/activation pairs): per-layer
  pre-activation variance, per-layer backward gain, mean pairwise correlation, the singular
  values of the layer weights and of the input–output Jacobian of the hidden stack.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from normact_onnx.moments import gaussian_expectations

Fn = Callable[[np.ndarray], np.ndarray]


def init_linear(lin: torch.nn.Linear, init: str) -> None:
    """LeCun-normal (variance 1/fan-in) or He-normal (2/fan-in) weights, zero bias."""
    gain = {"lecun": 1.0, "he": 2.0}.get(init)
    if gain is None:
        raise ValueError(f"unknown init {init!r}; choose lecun or he")
    torch.nn.init.normal_(lin.weight, std=math.sqrt(gain / lin.in_features))
    torch.nn.init.zeros_(lin.bias)


# ---- mean-field theory (σ_w² folded into φ: He init of ReLU is φ = √2·relu at σ_w² = 1) ----


def variance_map(phi: Fn, q: float, kinks: tuple[float, ...] = (0.0,)) -> float:
    """q' = E φ(√q·z)² for z ~ N(0, 1): the next layer's pre-activation variance."""
    return gaussian_expectations([lambda x: phi(x) ** 2], q, kinks)[0]


def backward_gain(dphi: Fn, q: float, kinks: tuple[float, ...] = (0.0,)) -> float:
    """χ = E φ'(√q·z)²: how much the squared gradient grows per layer (1 = critical)."""
    return gaussian_expectations([lambda x: dphi(x) ** 2], q, kinks)[0]


def fixed_point(phi: Fn, q0: float = 1.0, iters: int = 200) -> float:
    """Iterate the variance map from q0: its limit (0 or inf when it vanishes or blows up)."""
    q = q0
    for _ in range(iters):
        nxt = variance_map(phi, q)
        if not math.isfinite(nxt) or nxt > 1e12:
            return math.inf
        if nxt < 1e-12:
            return 0.0
        if abs(nxt - q) < 1e-13 * max(q, 1.0):
            return nxt
        q = nxt
    return q


_GL_X, _GL_W = np.polynomial.legendre.leggauss(24)


def _grid(span: float = 9.0, pieces: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Piecewise Gauss–Legendre nodes and N(0, 1)-weighted weights on [−span, span] (kink at 0 is an edge)."""
    ends = np.linspace(-span, span, pieces + 1)
    a, b = ends[:-1, None], ends[1:, None]
    x = (0.5 * (b - a) * _GL_X + 0.5 * (b + a)).ravel()
    w = (0.5 * (b - a) * _GL_W).ravel() * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return x, w


def correlation_map(phi: Fn, q: float, c: float) -> float:
    """c' = E φ(u1)φ(u2) / E φ(u)² for (u1, u2) Gaussian, variance q each, correlation c."""
    z, w = _grid()
    s = math.sqrt(q)
    u1 = s * z[:, None]
    u2 = s * (c * z[:, None] + math.sqrt(max(1.0 - c * c, 0.0)) * z[None, :])
    num = float(w @ (phi(u1) * phi(u2)) @ w)
    return num / float(w @ phi(s * z) ** 2)


def correlation_depth(phi: Fn, q: float, dphi: Fn | None = None) -> dict[str, float]:
    """Stable fixed point c* of the correlation map, its slope χ_c* and ξ = −1/ln χ_c* (layers).

    ξ is how many layers it takes two inputs' correlation to settle at c*: short ξ means
    inputs become indistinguishable (c* = 1, ordered) or decorrelated (c* < 1, chaotic) fast.
    """
    c = 0.5
    for _ in range(200):
        nxt = correlation_map(phi, q, c)
        if abs(nxt - c) < 1e-7:
            c = nxt
            break
        c = nxt
    if c > 1.0 - 1e-3 and dphi is not None:  # c* = 1: slope q·E φ'² / E φ² there (Price), 1 for ReLU
        c = 1.0
        slope = q * backward_gain(dphi, q) / variance_map(phi, q)
    else:
        h = 1e-4
        slope = (correlation_map(phi, q, c + h) - correlation_map(phi, q, c - h)) / (2 * h)
    xi = -1.0 / math.log(slope) if 0 < slope < 1 - 1e-9 else math.inf
    return {"c_star": c, "chi_c": slope, "depth": xi}


# ---- measurements on a network ----


def hidden_pairs(net: torch.nn.Sequential) -> list[tuple[torch.nn.Linear, torch.nn.Module]]:
    """The (Linear, activation) pairs of an MLP built as Linear, act, Linear, act, …, head."""
    mods = list(net)
    return [(mods[i], mods[i + 1]) for i in range(0, len(mods) - 1, 2)]


def propagation(net: torch.nn.Sequential, x: torch.Tensor, seed: int = 0) -> dict[str, list[float]]:
    """Per hidden layer: pre-activation variance, mean pairwise cosine correlation, backward gain.

    The backward gain of layer l is E δ_l² / E δ_{l+1}² for δ = ∂(r·logits)/∂(pre-activation), r a
    fixed Gaussian cotangent: the measured counterpart of χ (one value per layer transition).
    """
    pre: list[torch.Tensor] = []
    h = x
    was = net.training
    net.eval()
    with torch.enable_grad():
        for lin, act in hidden_pairs(net):
            z = lin(h)
            z.retain_grad()
            pre.append(z)
            h = act(z)
        out = list(net)[-1](h)
        r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        (out * r).sum().backward()
    net.train(was)
    var = [float(z.detach().pow(2).mean()) for z in pre]
    grads = [float(z.grad.pow(2).mean()) for z in pre]
    gains = [grads[i] / grads[i + 1] if grads[i + 1] > 0 else math.nan for i in range(len(grads) - 1)]
    corr = []
    for z in pre:
        u = torch.nn.functional.normalize(z.detach(), dim=1)
        g = u @ u.T
        n = g.shape[0]
        corr.append(float((g.sum() - g.diagonal().sum()) / (n * (n - 1))))
    net.zero_grad(set_to_none=True)
    return {"q": var, "backward_gain": gains, "correlation": corr}


def weight_spectra(net: torch.nn.Sequential) -> dict[str, list[float]]:
    """Singular values of each hidden-to-hidden weight matrix: max, median, min per layer."""
    out: dict[str, list[float]] = {"max": [], "median": [], "min": []}
    for lin, _ in hidden_pairs(net)[1:]:
        s = torch.linalg.svdvals(lin.weight.detach().double())
        out["max"].append(float(s.max()))
        out["median"].append(float(s.median()))
        out["min"].append(float(s.min()))
    return out


def jacobian_spectrum(net: torch.nn.Sequential, x: torch.Tensor) -> list[float] | None:
    """Singular values of ∂(last pre-activation)/∂(first pre-activation), descending, averaged over rows of x.

    The product of every hidden layer's W·diag(φ'): its spread is what dynamical isometry asks to be
    narrow (ReLU's zeros make the smallest ones ~0). None when the network's signal is not finite.
    """
    pairs = hidden_pairs(net)
    if len(pairs) < 2:
        return None
    was = net.training
    net.eval()

    def stack(z: torch.Tensor) -> torch.Tensor:
        h = pairs[0][1](z)
        for lin, act in pairs[1:-1]:
            h = act(lin(h))
        return pairs[-1][0](h)

    spectra = []
    with torch.no_grad():
        first = pairs[0][0](x)
    for z in first:
        jac = torch.autograd.functional.jacobian(stack, z, vectorize=True)
        if not torch.isfinite(jac).all():
            net.train(was)
            return None
        spectra.append(torch.linalg.svdvals(jac.double()))
    net.train(was)
    return [float(v) for v in torch.stack(spectra).mean(0)]
