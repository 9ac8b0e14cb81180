"""The fused statistics ops (ai.normact::<Op>Stats) against the catalogue and the standard-op path.

* every kernel derivative ``df`` (normact_math.h) against the catalogue's numpy ``df``, driven
  by the catalogue: per-channel statistics of a [1, N] tensor give f'(x)² per element (and f(x):
  ONNX Runtime's own where the library computes it, else the catalogue's);
* on the bundled models, the fused path's statistics against a float64 numpy reference of the
  same activations (x and f to 1e-9 relative; Σf'² to 1e-6: f' is float32 in the kernel) and
  against the standard-op path (float32 reductions: agreement to their own rounding).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from normact_onnx.calibration import collect
from normact_onnx.calibration.instrument import fused_stats_suffix, instrument
from normact_onnx.calibration.ort_f import library_ort_f
from normact_onnx.calibration.stats import Moments
from normact_onnx.catalogue import CATALOGUE, NORM_DOMAIN
from normact_onnx.data.options import DataOptions
from normact_onnx.ort import make_session
from normact_onnx.passes.forms import LiteralBody

from .conftest import MODELS

SUFFIX = fused_stats_suffix()
pytestmark = pytest.mark.skipif(SUFFIX is None, reason="kernel library with statistics ops not available")
KINDS = sorted(k for k, a in CATALOGUE.items() if a.derivative_body is not None)
STATS = ("size", "x_mean", "x_ss", "f_mean", "f_ss", "d_ss")


def stats_model(kind: str, params: dict, axis: int | None, with_f: bool, elem: int = TensorProto.FLOAT):
    act = CATALOGUE[kind]
    attrs = {k: float(v) for k, v in act.with_defaults(params).items()}
    if axis is not None:
        attrs["axis"] = axis
    inputs = ["X", "F"] if with_f else ["X"]
    node = helper.make_node(act.op_name + SUFFIX, inputs, list(STATS), domain=NORM_DOMAIN, **attrs)
    outs = [helper.make_tensor_value_info("size", TensorProto.INT64, None)]
    outs += [helper.make_tensor_value_info(s, TensorProto.DOUBLE, None) for s in STATS[1:]]
    graph = helper.make_graph([node], "stats", [helper.make_tensor_value_info(i, elem, None) for i in inputs], outs)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(NORM_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def run(model, feed):
    return dict(zip(STATS, make_session(model.SerializeToString()).run(None, feed)))


def ort_f_of(kind: str, params: dict, x: np.ndarray) -> np.ndarray:
    """f(x) as ONNX Runtime computes the catalogue's standard-op body."""
    b = LiteralBody(17, "f/", TensorProto.FLOAT, CATALOGUE[kind].with_defaults(params), False)
    out = CATALOGUE[kind].body(b, "x")
    graph = helper.make_graph(
        b.nodes,
        "f",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return make_session(model.SerializeToString()).run(None, {"x": x})[0]


def grid(kind: str, params: dict) -> np.ndarray:
    """x over [-12, 12] plus tails, away from the kinks (where f' is one-sided by convention)."""
    act = CATALOGUE[kind]
    x = np.concatenate([np.linspace(-12, 12, 6001), [-80.0, -30.0, 30.0, 80.0]]).astype(np.float32)
    kinks = np.asarray(act.kinks(act.with_defaults(params)), dtype=np.float64)
    if kinks.size:
        x = x[np.min(np.abs(x[:, None] - kinks[None, :]), axis=1) > 1e-3]
    return x


def perturbed(kind: str) -> dict:
    out = {}
    for k, v in CATALOGUE[kind].params.items():
        out[k] = float(np.sign(v) * 2.5) if abs(v) > 1e30 else float(np.float32(v * 1.3 + 0.1))
    return out


@pytest.mark.parametrize("variant", ["defaults", "custom"])
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_derivative_matches_catalogue(kind, variant):
    params = {} if variant == "defaults" else perturbed(kind)
    act = CATALOGUE[kind]
    x = grid(kind, params)
    got = run(stats_model(kind, params, 1, False), {"X": x[None, :]})
    xd = x.astype(np.float64)
    full = {k: np.float32(v) for k, v in act.with_defaults(params).items()}
    want_df = np.abs(act.df(xd, full))
    got_df = np.sqrt(got["d_ss"].reshape(-1))
    np.testing.assert_allclose(got_df, want_df, rtol=3e-6, atol=3e-7, err_msg=f"{kind} f'")
    np.testing.assert_array_equal(got["x_mean"].reshape(-1), xd)
    if act.op_name in library_ort_f():  # without F the op computes ONNX Runtime's own f (tests/test_calibration_ort_f)
        np.testing.assert_array_equal(got["f_mean"].reshape(-1), ort_f_of(kind, params, x).astype(np.float64))
    else:
        np.testing.assert_allclose(got["f_mean"].reshape(-1), act.f(xd, full), rtol=2e-6, atol=1e-6)  # test_kernels
    assert np.all(got["x_ss"] == 0) and np.all(got["f_ss"] == 0) and int(got["size"]) == x.size


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("axis", [None, 1, -1])
@pytest.mark.parametrize("with_f", [False, True])
def test_stats_against_float64(dtype, axis, with_f):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 24, 30, 29)) * 3 + 1).astype(dtype)
    act = CATALOGUE["gelu"]
    xd = x.astype(np.float64)
    f = act.f(xd).astype(dtype)
    fd = f.astype(np.float64) if with_f else act.f(xd)
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    feed = {"X": x, "F": f} if with_f else {"X": x}
    got = run(stats_model("gelu", {}, axis, with_f, elem), feed)
    red = None if axis is None else tuple(a for a in range(4) if a != axis % 4)
    mx, mf = xd.mean(axis=red, keepdims=True), fd.mean(axis=red, keepdims=True)
    want = {
        "x_mean": mx,
        "x_ss": ((xd - mx) ** 2).sum(axis=red, keepdims=True),
        "f_mean": mf,
        "f_ss": ((fd - mf) ** 2).sum(axis=red, keepdims=True),
        "d_ss": (act.df(xd) ** 2).sum(axis=red, keepdims=True),
    }
    assert int(got["size"]) == x.size
    for k, w in want.items():
        w = w.reshape([1] * 4) if axis is None else w
        assert got[k].shape == w.shape, k
        exact = k.startswith("x") or (with_f and k.startswith("f"))
        np.testing.assert_allclose(got[k], w, rtol=1e-12 if exact else 3e-6, err_msg=k)


def test_empty_tensor_and_bad_axis():
    got = run(stats_model("relu", {}, None, False), {"X": np.zeros((0, 3), np.float32)})
    assert int(got["size"]) == 0 and got["x_mean"].shape == (1, 1)
    with pytest.raises(Exception, match="axis 3 is out of range"):
        run(stats_model("relu", {}, 3, False), {"X": np.zeros((2, 3), np.float32)})


# ------------------------------------------------------------------------- the calibration paths

BUNDLED = {
    "cnn_relu.torchscript.onnx": (4, 1, 28, 28),
    "mobilenet_like.torchscript.onnx": (4, 3, 32, 32),
    "transformer_gelu.torchscript.onnx": (3, 64, 32),
    "transformer_gelu_tanh.torchscript.onnx": (3, 64, 32),
    "silu_net.torchscript.onnx": None,
    "hardswish_net.torchscript.onnx": None,
}


def model_batches(name: str, n: int = 3):
    model = onnx.load(str(MODELS / name))
    shape = BUNDLED[name]
    inp = model.graph.input[0]
    if shape is None:
        shape = [d.dim_value or 4 for d in inp.type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    return model, [{inp.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def reference(model, batches, per_channel):
    """float64 numpy statistics of the activations ORT computes (site x and f as extra outputs)."""
    inst = instrument(model, None, per_channel, fused=False)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = []
    for p in inst.probes:
        names += [p.site.input, p.site.output]
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(names))
    from normact_onnx.calibration.run import OPTIMIZATION

    sess = make_session(m.SerializeToString(), optimize=OPTIMIZATION)  # the very values calibration sees
    out = {}
    for b in batches:
        vals = dict(zip(dict.fromkeys(names), sess.run(list(dict.fromkeys(names)), b)))
        for p in inst.probes:
            x, f = (vals[p.site.input].astype(np.float64), vals[p.site.output].astype(np.float64))
            ax = p.channel_axis
            if ax is not None:
                x, f = (np.moveaxis(v, ax, 0).reshape(v.shape[ax], -1) for v in (x, f))
            else:
                x, f = x.reshape(1, -1), f.reshape(1, -1)
            act = p.site.activation
            d2 = (act.df(x, p.site.params) ** 2).sum(axis=1)
            n = np.full(x.shape[0], x.shape[1], np.float64)
            mx, mf = x.mean(axis=1), f.mean(axis=1)
            xm = Moments(n, mx, ((x - mx[:, None]) ** 2).sum(axis=1))
            fm = Moments(n, mf, ((f - mf[:, None]) ** 2).sum(axis=1))
            prev = out.get(p.site.output)
            if prev is None:
                out[p.site.output] = (xm, fm, d2)
            else:
                out[p.site.output] = (prev[0].merge(xm), prev[1].merge(fm), prev[2] + d2)
    return {k: (x, f, d2 / x.n) for k, (x, f, d2) in out.items()}


def close(a, b, rtol, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.maximum(np.abs(b), 1e-12 * max(1.0, float(np.max(np.abs(b), initial=0.0))))
    err = float(np.max(np.abs(a - b) / scale, initial=0.0))
    assert err <= rtol, f"{what}: relative difference {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_fused_matches_reference_and_standard(name, per_channel, monkeypatch):
    model, batches = model_batches(name)
    assert all(p.fused for p in instrument(model, None, per_channel).probes)
    fused = collect(model, DataOptions(batches), per_channel=per_channel)
    monkeypatch.setenv("NORMACT_FUSED_STATS", "0")
    standard = collect(model, DataOptions(batches), per_channel=per_channel)
    ref = reference(model, batches, per_channel)
    assert set(fused.sites) == set(standard.sites) == set(ref)
    for key, s in fused.sites.items():
        t, (rx, rf, rd2) = standard.sites[key], ref[key]
        np.testing.assert_array_equal(s.x.n, t.x.n)
        # fused: float64 sums of the very same float32 values
        for what, got, want in [("x mean", s.x.mean, rx.mean), ("x M2", s.x.m2, rx.m2),
                                ("f mean", s.f.mean, rf.mean), ("f M2", s.f.m2, rf.m2)]:  # fmt: skip
            close(got, want, 1e-9, f"{key} fused {what}")
        close(s.d2, rd2, 2e-6, f"{key} fused E f'^2")  # f' in float32 (normact_math.h)
        # standard ops: float32 reductions, equal to their rounding
        pairs = [("x mean", t.x.mean, rx.mean), ("x M2", t.x.m2, rx.m2), ("f mean", t.f.mean, rf.mean)]
        pairs += [("f M2", t.f.m2, rf.m2), ("E f'^2", t.d2, rd2)]
        for what, got, want in pairs:
            close(got, want, 2e-3, f"{key} standard {what}")


@pytest.mark.parametrize("name", ["if_branch.torchscript.onnx", "loop_body.torchscript.onnx"])
def test_fused_hoisted_sites_match_standard(name, monkeypatch):
    model = onnx.load(str(MODELS / name))
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(2):
        feed = {}
        for inp in model.graph.input:
            t = inp.type.tensor_type
            shape = [d.dim_value or 3 for d in t.shape.dim]
            if t.elem_type == TensorProto.BOOL:
                feed[inp.name] = np.array(True)
            elif t.elem_type == TensorProto.INT64:
                feed[inp.name] = np.array(3, np.int64).reshape(shape) if shape else np.array(3, np.int64)
            else:
                feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
        feeds.append(feed)
    inst = instrument(model, None)
    if not any(p.fused for p in inst.probes):
        pytest.skip("no hoisted site")
    fused = collect(model, DataOptions(feeds))
    monkeypatch.setenv("NORMACT_FUSED_STATS", "0")
    standard = collect(model, DataOptions(feeds))
    assert set(fused.sites) == set(standard.sites)
    for key, s in fused.sites.items():
        t = standard.sites[key]
        np.testing.assert_array_equal(s.x.n, t.x.n)
        for got, want in [(s.x.mean, t.x.mean), (s.x.m2, t.x.m2), (s.f.mean, t.f.mean), (s.f.m2, t.f.m2), (s.d2, t.d2)]:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=key)
