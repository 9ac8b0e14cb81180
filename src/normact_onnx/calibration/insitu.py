"""In-situ calibration (docs/math.md §4.2): every selected site normalizes with its batch's statistics.

Statistics measured on the original network describe a network that the rewrite
is about to change: once a site is normalized, every site after it sees other
inputs, and on a deep pretrained network the error compounds layer by layer.
So the instrumented copy does what batch normalization does in training mode:
each site the written model will normalize computes ``y = scale·(f(x) − shift −
slope·x)`` from *this batch's* moments of x and f and hands y to the layers
after it, while the same moments leave the graph to be merged exactly across
batches (:mod:`.stats`). The written constants are the merged ones, so every
site is measured where it sits, in the network as it will be.

The per-batch constants follow the same formulas as the written ones
(:func:`normact_onnx.methods.static.measured_affine`,
:func:`normact_onnx.methods.anact.lambda_of`), written here in ONNX ops on the
batch's float32 statistics, with a small epsilon where a batch could divide by
zero (a dead unit, a constant input).

When the kernel library has it, a float32 site with the library's statistics op
is normalized by one ``ai.normact::NormInSitu`` node instead (:func:`fused_normalized`):
the same float32 operations in the same order on the same statistics, so the same
bits, without the ~25 scalar ops per site and the two elementwise passes of the graph
(ONNX Runtime's per-node cost and session creation grow with them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onnx import TensorProto, helper

from ..catalogue import NORM_DOMAIN
from ..errors import NormactError
from ..methods import METHODS
from ..methods.anact import check_lambda_rule
from ..methods.static import MEASURED_VARIANTS as VARIANTS
from .stats_body import StatsBody

EPS = 1e-12


@dataclass(frozen=True)
class Normalizer:
    """How the selected sites normalize during calibration, which is how the written model will."""

    method: str = "anact"
    lambda_rule: str = "anact"
    centered_rho: bool = False
    variant: str = "center-scale"
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise NormactError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        check_lambda_rule(self.lambda_rule)
        if self.variant not in VARIANTS:
            raise NormactError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.method == "static" and self.variant == "ratio" and self.ratio is None:
            raise NormactError("--variant ratio needs --ratio r")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise NormactError(f"--ratio must lie in [0, 1), got {self.ratio}")

    @property
    def needs_cross(self) -> bool:
        """Whether the sites need the x·f co-moment (the static variants with a linear term)."""
        return self.method == "static" and self.variant != "center-scale"

    def as_dict(self) -> dict[str, object]:
        if self.method == "anact":
            return {"method": "anact", "lambda_rule": self.lambda_rule, "centered_rho": self.centered_rho}
        out: dict[str, object] = {"method": "static", "variant": self.variant}
        if self.variant == "ratio":
            out["ratio"] = self.ratio
        return out


def batch_normalized(
    b: StatsBody, stats: dict[str, str], x: str, f: str, y: str, elem: int, norm: Normalizer, stat_elem: int
) -> None:
    """Append nodes that write ``y`` = the site normalized with this batch's statistics.

    The builder's own element type must be float32 (its constants are).
    ``stats``: statistic -> local value (``size`` int64, the rest of type ``stat_elem``:
    float64 from the fused op, float32 from standard ops), shaped to broadcast against x.
    """

    def flt(v: str) -> str:
        return v if stat_elem == TensorProto.FLOAT else b.op("Cast", v, to=TensorProto.FLOAT)

    eps = b.tensor(EPS)
    count = b.op("Cast", stats["size"], to=TensorProto.FLOAT)
    n = b.op("Div", count, b.op("Cast", b.op("Size", stats["x_mean"]), to=TensorProto.FLOAT))  # per channel
    var_x = b.op("Div", flt(stats["x_ss"]), n)
    var_f = b.op("Div", flt(stats["f_ss"]), n)
    mean_f = flt(stats["f_mean"])
    slope = None
    if norm.method == "anact":
        m2 = var_f if norm.centered_rho else b.op("Add", var_f, b.op("Mul", mean_f, mean_f))
        rho = b.op("Div", m2, b.op("Add", var_x, eps))
        drho = b.op("Div", flt(stats["d_ss"]), n)
        two = b.tensor(2.0)
        if norm.lambda_rule == "anact":
            num = b.op("Add", b.op("Add", rho, drho), eps)
            den = b.op("Add", b.op("Mul", two, b.op("Mul", rho, drho)), eps)
            scale = b.op("Sqrt", b.op("Div", num, den))
        else:
            scale = b.op("Sqrt", b.op("Div", two, b.op("Add", b.op("Add", rho, drho), eps)))
        shift = mean_f
    elif norm.variant == "center-scale":
        scale = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var_f, eps)))
        shift = mean_f
    else:
        cov = b.op("Div", flt(stats["xf_ss"]), n)
        beta = b.op("Div", cov, b.op("Add", var_x, eps))  # the regression slope: E f' under a Gaussian
        linear = b.op("Mul", b.op("Mul", beta, beta), var_x)
        resid = b.op("Max", b.op("Sub", var_f, linear), eps)
        if norm.variant == "zeta-zero":
            slope, scale = beta, b.op("Reciprocal", b.op("Sqrt", resid))
        else:  # ratio r, capped per batch at r_max = q·b²/v, where the family meets center-scale
            r = b.op("Min", b.tensor(float(norm.ratio or 0.0)), b.op("Div", linear, b.op("Add", var_f, eps)))
            keep = b.op("Sub", b.tensor(1.0), r)
            away = b.op("Sqrt", b.op("Div", b.op("Mul", r, resid), b.op("Add", b.op("Mul", keep, var_x), eps)))
            slope = b.op("Sub", beta, b.op("Mul", b.op("Sign", beta), away))
            scale = b.op("Sqrt", b.op("Div", keep, resid))
        shift = b.op("Sub", mean_f, b.op("Mul", slope, flt(stats["x_mean"])))

    def typed(v: str) -> str:
        return v if elem == TensorProto.FLOAT else b.op("Cast", v, to=elem)

    centred = f if slope is None else b.op("Sub", f, b.op("Mul", typed(slope), x))
    b.op("Mul", b.op("Sub", centred, typed(shift)), typed(scale))
    last = b.nodes[-1]
    last.output[0] = y
    last.name = y


def fused_rule(norm: Normalizer) -> int | None:
    """NormInSitu's ``rule`` for this normalizer, or None when only the standard-op graph computes it."""
    if norm.method == "anact":
        return 0 if norm.lambda_rule == "anact" else 1  # 1: xavier, sqrt(2 / (rho + rho'))
    return 2 if norm.variant == "center-scale" else None


def fused_normalized(
    b: StatsBody,
    stats: dict[str, str],
    f: str,
    y: str,
    norm: Normalizer,
    op: str,
    axis: int | None,
    from_x: tuple[str, str, dict[str, float]] | None = None,
) -> None:
    """One ``NormInSitu`` node writing ``y`` from float32 ``f`` and the fused statistics (float64, count int64).

    Bit-identical to :func:`batch_normalized` on the same inputs (tests/test_insitu_fused.py).
    ``from_x`` (x, activation op name, its params): the node reads x and computes ONNX Runtime's f itself
    (``calibration/ort_f.py`` decides where that is exact), so ``f`` is not read.
    """
    rule = fused_rule(norm)
    if rule is None:
        raise NormactError(f"{op} does not compute {norm.method} {norm.variant}")
    attrs: dict[str, Any] = {"rule": rule, "centered": int(norm.centered_rho), "epsilon": EPS}
    if axis is not None:
        attrs["axis"] = axis
    inputs = [f, stats["size"], stats["x_mean"], stats["x_ss"], stats["f_mean"], stats["f_ss"], stats["d_ss"]]
    if from_x is not None:
        inputs[0] = ""  # F absent
        inputs.append(from_x[0])
        attrs.update(from_x[2], activation=from_x[1])
    b.nodes.append(helper.make_node(op, inputs, [y], name=y, domain=NORM_DOMAIN, **attrs))
