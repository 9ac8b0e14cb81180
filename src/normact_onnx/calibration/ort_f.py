"""Whether a site's statistics op may compute f from x itself, bit-identical to ONNX Runtime's own f.

Why: ONNX Runtime runs convolutions in its blocked NCHWc layout, while a custom op
sees NCHW tensors; every tensor the statistics op reads costs a full-tensor
reorder. Reading x alone and computing f inside the op saves the reorder and the
read of f (on yolov8n about a fifth of the instrumented run). The statistics must
still be those of the f the model computes, so the library computes f with ONNX
Runtime's own CPU arithmetic where it knows it (``runtime_ops/include/normact_ort_f.h``,
listed in the library's ``ort_f`` info) and this module checks that claim against
the installed ONNX Runtime once per activation and parameters: one session runs the
catalogue's standard-op body and two statistics ops on the same probe tensor, one
reading ORT's f and one reading x alone, one element per channel, so each op's
per-channel mean of f is that f, element for element; any difference (another ONNX
Runtime version, another CPU dispatch) and the site reads f as before.

A site qualifies only when its own nodes are the body's ops (``x·Sigmoid(x)``, a
``Relu`` op, …): another spelling of the activation rounds differently.
``NORMACT_ORT_F=0`` turns the computed f off (the statistics then read f).
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..catalogue import CATALOGUE, NORM_DOMAIN, NORM_DOMAIN_VERSION
from ..io import clamp_ir
from ..ort import make_session
from ..passes.find import Site
from ..passes.forms import LiteralBody
from ..runtime.library import info_at, kernel_library

ORT_F_ENV = "NORMACT_ORT_F"  # "0": every fused statistics op reads f
INSITU_ENV = "NORMACT_ORT_F_INSITU"  # "0": NormInSitu reads f even where the statistics op computes it
PROBE_OPSET = 17
STAT_OUTPUTS = 6  # size, x_mean, x_ss, f_mean, f_ss, d_ss
F_MEAN = 3  # f_ss follows it


def enabled() -> bool:
    """False when ``NORMACT_ORT_F`` says 0/false/no/off."""
    return os.environ.get(ORT_F_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def insitu_from_x() -> bool:
    """Whether ``NormInSitu`` also computes f from x where the statistics op does (its ``activation``
    attribute, same library), so ONNX Runtime does not compute the raw activation at all."""
    return os.environ.get(INSITU_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def library_ort_f() -> frozenset[str]:
    """The statistics ops (by op name, ``NormSilu``) whose x-only form computes ONNX Runtime's f; empty for a
    library without that ability (built before it), which then reads f at every site."""
    lib = kernel_library()
    if lib is None:
        return frozenset()
    try:
        return frozenset(info_at(lib).get("ort_f") or ())
    except (OSError, AttributeError, ValueError):
        return frozenset()


SPECIAL = (0.0, -0.0, np.inf, -np.inf, np.nan, 18.0, -18.0, 1e-45, -1e-45, 3.0, -3.0)
CHUNK = 64  # bulk probe values per channel of the check's statistics


def probe_values() -> np.ndarray:
    """The check's ~100k finite inputs: a dense sweep of [-30, 30] (where activations bend, clamp and
    saturate), every 128th float in ±[16, 20) (where SiLU's logistic rounds above 1 before its clamp) and
    random bit patterns (every exponent), as many as fill whole channels of ``CHUNK``."""
    dense = np.linspace(-30.0, 30.0, 1 << 16, dtype=np.float32)
    lo, hi = np.float32(16.0).view(np.uint32), np.float32(20.0).view(np.uint32)
    band = np.arange(lo, hi, 128, dtype=np.uint32).view(np.float32)
    bits = np.random.default_rng(24).integers(0, 1 << 32, size=1 << 14, dtype=np.uint64).astype(np.uint32)
    values = np.concatenate([dense, band, -band, bits.view(np.float32)])
    values = values[np.isfinite(values)]
    return values[: values.size // CHUNK * CHUNK]


def site_matches_body(site: Site) -> bool:
    """Whether the site's own nodes are the catalogue body's ops (the spelling the check measures)."""
    body = _body_ops(site.kind, _params_key(site.activation.with_defaults(site.params)))
    return Counter(n.op_type for n in site.nodes if n.op_type != "Constant") == Counter(dict(body))


def computes_ort_f(site: Site, suffix: str) -> bool:
    """Whether ``site``'s statistics op may read x alone: enabled, the library claims ONNX Runtime's f for
    its activation, the site is spelled as the body, and the probe check passed (once per kind and params)."""
    if not enabled() or site.activation.op_name not in library_ort_f():
        return False
    params = site.activation.with_defaults(site.params)
    if not all(np.ndim(v) == 0 for v in params.values()) or not site_matches_body(site):
        return False
    return check(site.kind, _params_key(params), suffix)


@functools.cache
def check(kind: str, params: tuple[tuple[str, float], ...], suffix: str) -> bool:
    """One session (about 0.05 s): the statistics of f from ops reading ORT's f and from ops reading x alone,
    compared exactly: per channel of ``CHUNK`` probe values the mean and centred sum of squares of f (one
    element of f off by an ulp moves them), and per element for the special values (a NaN would hide the
    rest of its channel).

    Equal means equal values (NaN where NaN): the statistics are sums of values, so the sign of a zero
    cannot change them.
    """
    model = _probe_model(kind, dict(params), suffix)
    feed = {"x": probe_values().reshape(1, -1, CHUNK), "s": np.asarray(SPECIAL, np.float32).reshape(1, -1, 1)}
    names = [f"{v}_{how}_{stat}" for v in feed for how in ("read", "computed") for stat in ("mean", "ss")]
    try:
        got = dict(zip(names, make_session(model.SerializeToString(), ["CPUExecutionProvider"]).run(names, feed)))
    except Exception:  # a library or runtime that cannot run the probe: read f, as before
        return False
    for v in feed:
        for stat in ("mean", "ss"):
            ref, new = (np.asarray(got[f"{v}_{how}_{stat}"], np.float64).ravel() for how in ("read", "computed"))
            if ref.size != feed[v].shape[1] or not np.all((ref == new) | (np.isnan(ref) & np.isnan(new))):
                return False
    return True


def _params_key(params: dict[str, Any]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((k, float(v)) for k, v in params.items()))


@functools.cache
def _body_ops(kind: str, params: tuple[tuple[str, float], ...]) -> tuple[tuple[str, int], ...]:
    b = _body(kind, dict(params))
    return tuple(sorted(Counter(n.op_type for n in b.nodes if n.op_type not in ("Constant", "Identity")).items()))


def _body(kind: str, params: dict[str, Any], x: str = "x") -> LiteralBody:
    """The catalogue's standard-op body of ``kind`` on ``x``, its output named ``x`` + ``_f``."""
    b = LiteralBody(PROBE_OPSET, f"probe/{x}/", TensorProto.FLOAT, params, False)
    out = CATALOGUE[kind].body(b, x)
    b.nodes.append(helper.make_node("Identity", [out], [f"{x}_f"], name=f"probe/{x}/f"))
    return b


def _probe_model(kind: str, params: dict[str, Any], suffix: str) -> onnx.ModelProto:
    """For the bulk values ``x`` [1, C, CHUNK] and the special ones ``s`` [1, S, 1]: the body, and statistics
    ops (per channel) reading its f and reading the input alone; outputs ``<x|s>_<read|computed>_<mean|ss>``."""
    act = CATALOGUE[kind]
    nodes: list[onnx.NodeProto] = []
    outputs = []
    for v in ("x", "s"):
        nodes += _body(kind, params, v).nodes
        for how, inputs in (("read", [v, f"{v}_f"]), ("computed", [v])):
            stats = [f"probe/{v}/{how}/stat{i}" for i in range(STAT_OUTPUTS)]
            stats[F_MEAN], stats[F_MEAN + 1] = f"{v}_{how}_mean", f"{v}_{how}_ss"
            outputs += stats[F_MEAN : F_MEAN + 2]
            node = helper.make_node(
                act.op_name + suffix, inputs, stats, name=f"probe/{v}/{how}", domain=NORM_DOMAIN, axis=1, **params
            )
            nodes.append(node)
    graph = helper.make_graph(
        nodes,
        "ort_f_probe",
        [helper.make_tensor_value_info(v, TensorProto.FLOAT, [1, None, None]) for v in ("x", "s")],
        [helper.make_tensor_value_info(name, TensorProto.DOUBLE, None) for name in outputs],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", PROBE_OPSET), helper.make_opsetid(NORM_DOMAIN, NORM_DOMAIN_VERSION)],
    )
    clamp_ir(model)
    return model
