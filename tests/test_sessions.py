"""The one session factory (runtime.session.open_session) and its two library policies.

The public ``InferenceSession`` requires the kernel library (a deployment asked for the kernels); the tool's own
sessions (``ort.make_session``: verification, calibration, compare) register it when it was built and otherwise run
the model-local function bodies; both refuse nothing else differently, and the tool's sessions never fall back to
the CPU silently when a requested provider is missing.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from normact_onnx.errors import NormactError
from normact_onnx.ort import make_session
from normact_onnx.runtime import InferenceSession, KernelLibraryNotFound, has_library
from normact_onnx.runtime import library as library_mod
from normact_onnx.runtime.session import open_session

from .kernel_helpers import full_attrs, node_model, random_input, reference


@pytest.fixture
def silu_model():
    model = node_model("silu", full_attrs("silu", scale=2.0), np.float32, with_function=True, shape=[5])
    x = random_input((5,), np.float32, seed=1)
    want, _ = reference("silu", x, full_attrs("silu", scale=2.0))
    return model, x, want


@pytest.fixture
def no_library(monkeypatch, tmp_path):
    """As if the kernel library had not been built: nothing to find anywhere."""
    monkeypatch.setattr(library_mod, "_candidate_dirs", lambda: [tmp_path])


def test_tool_sessions_run_the_function_bodies_without_the_library(silu_model, no_library):
    model, x, want = silu_model
    got = make_session(model.SerializeToString()).run(None, {"X": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    got = open_session(model).run(None, {"X": x})[0]  # the factory's default policy: "if-built"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_public_session_requires_the_library(silu_model, no_library):
    model, _, _ = silu_model
    with pytest.raises(KernelLibraryNotFound, match=r"libnormact_cpu\.so"):
        InferenceSession(model)
    with pytest.raises(KernelLibraryNotFound):
        open_session(model, library="required")


@pytest.mark.skipif(not has_library(), reason="kernel library not built")
def test_fused_nodes_without_bodies_run_in_both_kinds_of_session(silu_model):
    model, x, want = silu_model
    del model.functions[:]  # only the library can run Norm<Act> now
    for sess in (make_session(model.SerializeToString()), InferenceSession(model)):
        np.testing.assert_allclose(sess.run(None, {"X": x})[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_tool_sessions_refuse_a_missing_provider_instead_of_the_cpu(silu_model):
    model, _, _ = silu_model
    with pytest.raises(NormactError, match="CUDAExecutionProvider is not available"):
        make_session(model.SerializeToString(), ["CUDAExecutionProvider"])


@pytest.mark.skipif(not has_library(), reason="kernel library not built")
def test_caller_options_get_the_library_and_keep_their_settings(silu_model):
    model, x, want = silu_model
    del model.functions[:]  # runs only if the library was registered on the caller's options
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = open_session(model, sess_options=so)
    assert so.intra_op_num_threads == 1
    np.testing.assert_allclose(sess.run(None, {"X": x})[0], want, rtol=1e-5, atol=1e-6)
