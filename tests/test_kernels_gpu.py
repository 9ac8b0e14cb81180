"""CUDA kernels of libnormact_cuda.so against the catalogue (needs a GPU).

Skipped cleanly unless onnxruntime has the CUDA execution provider, a CUDA
device actually answers, and libnormact_cuda.so was built (nvcc found).
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from normact_onnx.catalogue import CATALOGUE
from normact_onnx.runtime import InferenceSession, get_library_path, has_library

from .kernel_helpers import assert_close, full_attrs, node_model, perturbed_params, random_input, reference

CUDA = "CUDAExecutionProvider"
pytestmark = pytest.mark.gpu


def _why_no_gpu() -> str | None:
    if CUDA not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider"
    if not has_library(cuda=True):
        return "libnormact_cuda.so not built (no nvcc at build time)"
    try:  # the provider can be compiled in with no device (or driver) present
        model = node_model("relu", {}, np.float32, with_function=False, shape=[1])
        so = ort.SessionOptions()
        so.register_custom_ops_library(get_library_path(cuda=True))
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=[CUDA])
        if sess.get_providers()[0] != CUDA:
            return "CUDAExecutionProvider did not initialize (no device?)"
        sess.run(None, {"X": np.zeros(1, np.float32)})
    except Exception as exc:
        return f"no usable CUDA device: {str(exc).splitlines()[0][:160]}"
    return None


_REASON = _why_no_gpu()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

KINDS = sorted(CATALOGUE)
SHAPES = [(), (0,), (1,), (7,), (3, 5, 17), (1025,), ((1 << 20) + 3,)]
TOL = {np.float32: (4e-6, 1e-7), np.float16: (1.2e-3, 1e-7)}


def cuda_session(model, **opts):
    so = ort.SessionOptions()
    for k, v in opts.items():
        setattr(so, k, v)
    so.register_custom_ops_library(get_library_path(cuda=True))
    return ort.InferenceSession(model.SerializeToString(), so, providers=[CUDA, "CPUExecutionProvider"])


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("variant", ["defaults", "custom"])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_kernel_vs_reference(kind, variant, dtype):
    attrs = (
        full_attrs(kind)
        if variant == "defaults"
        else full_attrs(kind, scale=1.7, shift=0.3, slope=0.2, **perturbed_params(kind))
    )
    sess = cuda_session(node_model(kind, attrs, dtype, with_function=True))
    rtol, atol = TOL[dtype]
    for i, shape in enumerate(SHAPES):
        x = random_input(shape, dtype, seed=i)
        y = sess.run(None, {"X": x})[0]
        want, mag = reference(kind, x, attrs)
        assert_close(y, want, mag, rtol, atol * abs(attrs["scale"]), f"cuda {kind} {shape}")


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_nan_inf(kind):
    attrs = full_attrs(kind, shift=0.5)
    sess = cuda_session(node_model(kind, attrs, np.float32, with_function=False))
    x = np.array([np.nan, np.inf, -np.inf, 0.0, 1.0, -1.0, np.nan, 2.0] * 9, dtype=np.float32)
    y = sess.run(None, {"X": x})[0]
    finite = np.where(np.isinf(x), np.sign(x) * 1e300, x.astype(np.float64))
    with np.errstate(over="ignore"):
        want = reference(kind, finite, attrs)[0].astype(np.float32)
    assert np.array_equal(np.isnan(y), np.isnan(x))
    ok = ~np.isnan(x)
    np.testing.assert_allclose(y[ok], want[ok], rtol=2e-5, atol=1e-6)


def test_cuda_node_runs_on_cuda_ep(tmp_path):
    """The function-form node is assigned to the CUDA EP and runs as the fused kernel."""
    model = node_model("gelu", full_attrs("gelu", scale=1.5, shift=0.2), np.float32, shape=[4096])
    sess = cuda_session(model, enable_profiling=True, profile_file_prefix=str(tmp_path / "p"))
    sess.run(None, {"X": random_input((4096,), np.float32, seed=0)})
    with open(sess.end_profiling()) as f:
        events = [e for e in json.load(f) if e.get("cat") == "Node" and "op_name" in e.get("args", {})]
    assert {e["args"]["op_name"] for e in events} == {"NormGelu"}
    assert {e["args"].get("provider") for e in events} == {CUDA}


def test_inference_session_picks_cuda_library():
    model = node_model("silu", full_attrs("silu"), np.float32, shape=[8])
    sess = InferenceSession(model, providers=[CUDA, "CPUExecutionProvider"])
    assert sess.get_providers()[0] == CUDA
    x = random_input((8,), np.float32, seed=2)
    np.testing.assert_allclose(sess.run(None, {"X": x})[0], reference("silu", x, full_attrs("silu"))[0], rtol=1e-5)
