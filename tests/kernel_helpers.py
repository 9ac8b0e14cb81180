"""Shared helpers for the kernel tests (tests/test_kernels*.py) and the benchmark.

Everything about an activation comes from the catalogue (numpy reference,
parameter names and defaults, ONNX body): this module holds no per-activation
table of its own.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from normact_onnx.catalogue import CATALOGUE, NORM_DOMAIN
from normact_onnx.passes.forms import norm_function

OPSET = 21
IR_VERSION = 10
ELEM = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def node_model(
    kind: str,
    attrs: dict[str, float] | None,
    dtype: Any = np.float32,
    *,
    with_function: bool = True,
    op_name: str | None = None,
    shape: list[Any] | None = None,
    chain: int = 1,
) -> onnx.ModelProto:
    """A model with ``chain`` consecutive ``ai.normact::Norm<Act>`` nodes on input X.

    ``with_function`` adds the model-local function (the body ONNX Runtime runs
    when the library is not registered); ``attrs=None`` writes no attributes.
    ``shape=None`` leaves the input's rank unknown so one model takes any shape.
    """
    name = op_name or CATALOGUE[kind].op_name
    elem = ELEM[np.dtype(dtype).type] if not isinstance(dtype, int) else dtype
    names = ["X"] + [f"T{i}" for i in range(1, chain)] + ["Y"]
    nodes = [
        helper.make_node(name, [names[i]], [names[i + 1]], name=f"site{i}", domain=NORM_DOMAIN, **(attrs or {}))
        for i in range(chain)
    ]
    graph = helper.make_graph(
        nodes,
        f"{name}_test",
        [helper.make_tensor_value_info("X", elem, shape)],
        [helper.make_tensor_value_info("Y", elem, shape)],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(NORM_DOMAIN, 1)],
        ir_version=IR_VERSION,
    )
    if with_function:
        model.functions.append(norm_function(kind, OPSET))
    return model


def full_attrs(kind: str, scale: float = 1.0, shift: float = 0.0, slope: float = 0.0, **params: float):
    """Every attribute of the node: the affine triple plus the activation's parameters (defaults filled).

    Values are rounded to float32, as the node's attributes store them, so the
    float64 reference sees exactly the constants the kernel uses.
    """
    act = CATALOGUE[kind]
    out = {"scale": scale, "shift": shift, "slope": slope, **act.with_defaults(params)}
    return {k: float(np.float32(v)) for k, v in out.items()}


def perturbed_params(kind: str) -> dict[str, float]:
    """Non-default activation parameters derived from the defaults (no second table)."""
    out = {}
    for k, v in CATALOGUE[kind].params.items():
        v = float(v)
        out[k] = float(np.sign(v) * 2.5) if abs(v) > 1e30 else v * 1.3 + 0.1
    return out


def reference(kind: str, x: np.ndarray, attrs: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(expected, magnitude) in float64 from the catalogue's numpy forward.

    magnitude = |scale|·(|f| + |shift| + |slope·x|) bounds the rounding error of
    the affine tail, so tolerances are relative to it.
    """
    act = CATALOGUE[kind]
    x64 = np.asarray(x, dtype=np.float64)
    params = {k: attrs[k] for k in act.params if k in attrs}
    with np.errstate(all="ignore"):
        f = np.asarray(act.f(x64, params), dtype=np.float64)
        scale, shift, slope = attrs.get("scale", 1.0), attrs.get("shift", 0.0), attrs.get("slope", 0.0)
        sx = slope * x64 if slope != 0.0 else np.zeros_like(x64)
        y = scale * (f - shift - sx)
        mag = abs(scale) * (np.abs(f) + abs(shift) + np.abs(sx))
    return y, mag


def assert_close(got: np.ndarray, want: np.ndarray, mag: np.ndarray, rtol: float, atol: float, what: str) -> None:
    """|got − want| ≤ rtol·mag + atol elementwise, NaN only where expected."""
    got64 = np.asarray(got, dtype=np.float64)
    assert got64.shape == want.shape, f"{what}: shape {got64.shape} != {want.shape}"
    nan_got, nan_want = np.isnan(got64), np.isnan(want)
    assert np.array_equal(nan_got, nan_want), f"{what}: NaN mismatch at {np.argwhere(nan_got != nan_want)[:5]}"
    ok = ~nan_want
    with np.errstate(all="ignore"):
        err = np.abs(got64[ok] - want[ok])
        err = np.where(got64[ok] == want[ok], 0.0, err)  # equal infinities
        bound = rtol * mag[ok] + atol
    bad = err > bound
    if bad.any():
        i = int(np.argmax(np.where(bad, err / np.maximum(bound, 1e-300), 0)))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.size} elements off; worst: got {got64[ok][i]!r}, "
            f"want {want[ok][i]!r} (err {err[i]:.3g} > bound {bound[i]:.3g})"
        )


def random_input(shape: tuple[int, ...], dtype: Any, seed: int) -> np.ndarray:
    """N(0, 3²) values plus saturated tails (±20, ±50, ±100) so every branch is hit."""
    rng = np.random.default_rng(seed)
    x = np.asarray(rng.standard_normal(shape) * 3.0, dtype=np.float64)
    if x.size >= 8:
        flat = x.reshape(-1)
        idx = rng.choice(flat.size, size=min(6, flat.size), replace=False)
        flat[idx] = np.array([20.0, -20.0, 50.0, -50.0, 100.0, -100.0])[: idx.size]
    return np.asarray(x, dtype=dtype).reshape(shape)


def cpu_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))
