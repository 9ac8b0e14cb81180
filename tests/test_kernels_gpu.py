"""CUDA kernels of libnormact_cuda.so on a GPU (marker ``gpu``; scripts/gpu_check.sh runs them).

Skipped cleanly unless onnxruntime has the CUDA execution provider, a CUDA
device actually answers, and libnormact_cuda.so was built (nvcc found).

Every session here proves the CUDA kernel ran, not the CPU kernel or the
function body: it is created with ``session.disable_cpu_ep_fallback`` (a node
left on the CPU fails the session) and profiled, and every profiled node must be
an ``ai.normact`` op (no inlined function body) on the CUDA provider.  The
values are checked against the catalogue's float64 reference and against the
library's CPU kernel (NaN positions equal, the rest close).
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from normact_onnx.catalogue import CATALOGUE, NORM_DOMAIN
from normact_onnx.runtime import InferenceSession, get_library_path, has_library

from .kernel_helpers import (
    IR_VERSION,
    OPSET,
    assert_close,
    full_attrs,
    node_model,
    perturbed_params,
    random_input,
    reference,
)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
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
DTYPES = ["f32", "f16", "bf16"]
SHAPES = [(), (0,), (1,), (7,), (3, 5, 17), (1025,), ((1 << 20) + 3,)]
# (rtol, atol) against the float64 reference; bf16 keeps 8 significant bits.
TOL = {"f32": (4e-6, 1e-7), "f16": (1.2e-3, 1e-7), "bf16": (8e-3, 1e-7)}
# CUDA against the CPU kernel: the same float32 math; they may differ by FMA contraction.
CPU_TOL = {"f32": 2e-6, "f16": 1e-3, "bf16": 8e-3}
NP = {"f32": np.float32, "f16": np.float16, "bf16": np.float32}


# ---------------------------------------------------------------- models and sessions


def model_for(kind: str, attrs: dict[str, float], dtype: str, *, chain: int = 1, shape: Any = None) -> onnx.ModelProto:
    """Norm<Act> on X; for bf16 (no numpy type) X and Y are float32 around Cast nodes, which run on CUDA too."""
    if dtype != "bf16":
        return node_model(kind, attrs, NP[dtype], with_function=False, chain=chain, shape=shape)
    op = CATALOGUE[kind].op_name
    names = ["Xb"] + [f"T{i}" for i in range(1, chain)] + ["Yb"]
    nodes = [helper.make_node("Cast", ["X"], ["Xb"], to=TensorProto.BFLOAT16)]
    nodes += [
        helper.make_node(op, [names[i]], [names[i + 1]], name=f"site{i}", domain=NORM_DOMAIN, **attrs)
        for i in range(chain)
    ]
    nodes.append(helper.make_node("Cast", ["Yb"], ["Y"], to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes,
        "bf16",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)],
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(NORM_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even) -> float32, NaN kept: what Cast does."""
    f = np.array(x, dtype=np.float32).reshape(-1)
    u = f.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(f), np.float32(np.nan), r).reshape(np.shape(x))


def cuda_session(model: onnx.ModelProto, tmp_path: Path, provider_options: dict[str, str] | None = None, **opts: Any):
    """A CUDA session that fails to build if any node would run on the CPU, profiled into tmp_path."""
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path(cuda=True))
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / f"prof{len(list(tmp_path.glob('prof*')))}")
    for k, v in opts.items():
        setattr(so, k, v)
    return ort.InferenceSession(model.SerializeToString(), so, providers=[(CUDA, provider_options or {})])


def cpu_session(model: onnx.ModelProto):
    """The library's CPU kernels on the same model (the comparison baseline)."""
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path(cuda=False))
    return ort.InferenceSession(model.SerializeToString(), so, providers=[CPU])


def profiled_nodes(sess) -> list[tuple[str, str]]:
    """(op_name, provider) of every node the profile saw run."""
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    return [
        (e["args"]["op_name"], e["args"].get("provider", ""))
        for e in events
        if e.get("cat") == "Node" and "op_name" in e.get("args", {}) and e["name"].endswith("_kernel_time")
    ]


def assert_ran_on_cuda(sess, ops: set[str]) -> None:
    nodes = profiled_nodes(sess)
    norm = {(op, p) for op, p in nodes if op not in ("Cast", "MemcpyToHost", "MemcpyFromHost")}
    assert norm, "the profile recorded no ai.normact node: nothing ran?"
    assert norm == {(op, CUDA) for op in ops}, f"expected {sorted(ops)} on {CUDA}, profile has {sorted(norm)}"


def run_both(kind: str, attrs: dict[str, float], dtype: str, x: np.ndarray, tmp_path: Path, **kw: Any):
    """(CUDA output, CPU-kernel output) of one model; asserts the CUDA node ran on CUDA."""
    model = model_for(kind, attrs, dtype, **kw)
    sess = cuda_session(model, tmp_path)
    got = sess.run(None, {"X": x})[0]
    assert_ran_on_cuda(sess, {CATALOGUE[kind].op_name})
    return got, cpu_session(model).run(None, {"X": x})[0]


def assert_matches_cpu(got: np.ndarray, cpu: np.ndarray, dtype: str, what: str) -> None:
    g, c = np.asarray(got, np.float64), np.asarray(cpu, np.float64)
    assert np.array_equal(np.isnan(g), np.isnan(c)), f"{what}: NaN positions differ from the CPU kernel"
    ok = ~np.isnan(c)
    np.testing.assert_allclose(g[ok], c[ok], rtol=CPU_TOL[dtype], atol=1e-30, err_msg=what)


def attrs_for(kind: str, variant: str) -> dict[str, float]:
    if variant == "defaults":
        return full_attrs(kind)
    return full_attrs(kind, scale=1.7, shift=0.3, slope=0.2, **perturbed_params(kind))


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["defaults", "custom"])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_kernel_vs_reference_and_cpu(kind, variant, dtype, tmp_path):
    attrs = attrs_for(kind, variant)
    model = model_for(kind, attrs, dtype)
    sess, cpu = cuda_session(model, tmp_path), cpu_session(model)
    rtol, atol = TOL[dtype]
    for i, shape in enumerate(SHAPES):
        x = random_input(shape, NP[dtype], seed=i)
        y = sess.run(None, {"X": x})[0]
        xin = round_bf16(x) if dtype == "bf16" else x
        want, mag = reference(kind, xin, attrs)
        if dtype == "bf16":  # the output is rounded to bf16 too: half an ulp of it on top
            mag = mag + np.abs(want)
        assert_close(y, want, mag, rtol, atol * abs(attrs["scale"]), f"cuda {kind} {dtype} {shape}")
        assert_matches_cpu(y, cpu.run(None, {"X": x})[0], dtype, f"cuda vs cpu {kind} {dtype} {shape}")
    assert_ran_on_cuda(sess, {CATALOGUE[kind].op_name})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_nan_inf_match_cpu_kernel(kind, dtype, tmp_path):
    """NaN and ±Inf in every vector lane and in the scalar head/tail: same NaN positions and values as the CPU."""
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 2.0, 1e30, -1e30, 1e-30], np.float64)
    with np.errstate(over="ignore"):  # ±1e30 become ±Inf in fp16
        x = np.tile(special, 97)[:1021].astype(NP[dtype])
    got, cpu = run_both(kind, full_attrs(kind, shift=0.5), dtype, x, tmp_path)
    assert_matches_cpu(got, cpu, dtype, f"nan/inf {kind} {dtype}")
    # NaN in, NaN out, and only there: min/max propagate NaN, no fast math.
    assert np.array_equal(np.isnan(got), np.isnan(x)), f"{kind} {dtype}: NaN where the input has none, or lost"


@pytest.mark.parametrize("dtype", DTYPES)
def test_grid_stride_loops(dtype, tmp_path):
    """2^24 + 3 elements: the grid (one wave) goes round the grid-stride loop many times on any GPU."""
    x = random_input(((1 << 24) + 3,), NP[dtype], seed=11)
    attrs = full_attrs("gelu", scale=1.5, shift=0.2, slope=0.1)
    got, cpu = run_both("gelu", attrs, dtype, x, tmp_path)
    assert_matches_cpu(got, cpu, dtype, f"loop {dtype}")


def test_every_op_runs_its_cuda_kernel(tmp_path):
    """One node per catalogue op in a chain: the profile shows each one as its ai.normact op on CUDA."""
    ops = [CATALOGUE[k].op_name for k in KINDS]
    names = ["X"] + [f"T{i}" for i in range(1, len(ops))] + ["Y"]
    nodes = [
        helper.make_node(op, [names[i]], [names[i + 1]], name=f"n{i}", domain=NORM_DOMAIN, scale=0.5)
        for i, op in enumerate(ops)
    ]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4097]) for n in ("X", "Y")]
    graph = helper.make_graph(nodes, "all", vi[:1], vi[1:])
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(NORM_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)
    sess = cuda_session(model, tmp_path)
    x = random_input((4097,), np.float32, seed=5)
    got = sess.run(None, {"X": x})[0]
    assert_ran_on_cuda(sess, set(ops))
    assert_matches_cpu(got, cpu_session(model).run(None, {"X": x})[0], "f32", "all ops chained")


# ---------------------------------------------------------------- memory layout


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize(
    "x_off, y_off, same",
    [(1, 1, False), (3, 3, False), (1, 2, False), (0, 1, False), (1, 1, True), (5, 5, True)],
    ids=["head1", "head3", "scalar", "y-only", "inplace1", "inplace5"],
)
def test_misaligned_iobinding(dtype, x_off, y_off, same, tmp_path):
    """Tensors at element offsets (IOBinding into larger buffers): right values, nothing written outside Y."""
    n, pad, sentinel = 1029, 16, 7.0
    np_t = NP[dtype]
    esize = np.dtype(np_t).itemsize
    attrs = full_attrs("silu", scale=1.2, shift=0.1)
    model = model_for("silu", attrs, dtype)
    sess = cuda_session(model, tmp_path)
    x = random_input((n,), np_t, seed=21)
    xbuf = np.full(n + pad, sentinel, np_t)
    xbuf[x_off : x_off + n] = x
    xv = ort.OrtValue.ortvalue_from_numpy(xbuf, "cuda", 0)
    yv = xv if same else ort.OrtValue.ortvalue_from_numpy(np.full(n + pad, sentinel, np_t), "cuda", 0)
    io = sess.io_binding()
    io.bind_input("X", "cuda", 0, np_t, [n], xv.data_ptr() + x_off * esize)
    io.bind_output("Y", "cuda", 0, np_t, [n], yv.data_ptr() + y_off * esize)
    sess.run_with_iobinding(io)
    out = yv.numpy()
    assert_ran_on_cuda(sess, {"NormSilu"})
    want = cpu_session(model).run(None, {"X": x})[0]
    assert_matches_cpu(out[y_off : y_off + n], want, dtype, f"offsets x+{x_off} y+{y_off}")
    outside = np.concatenate([out[:y_off], out[y_off + n :]])
    assert np.all(outside == sentinel), "the kernel wrote outside Y"


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_chain(dtype, tmp_path):
    """Four nodes in a chain (ONNX Runtime may reuse each input buffer as the output)."""
    attrs = full_attrs("tanh", scale=1.1, shift=0.05)
    x = random_input((3, 1000, 7), NP[dtype], seed=4)
    got, cpu = run_both("tanh", attrs, dtype, x, tmp_path, chain=4)
    assert_matches_cpu(got, cpu, dtype, f"chain {dtype}")


def test_huge_tensor_beyond_2_31_elements(tmp_path):
    """2^31 + 5 fp16 elements (64-bit indices end to end): checked on a stride and the last 1M."""
    n = (1 << 31) + 5
    base = random_input((1 << 16,), np.float16, seed=9)
    x = np.resize(base, n)
    attrs = full_attrs("gelu", scale=0.9, shift=0.1)
    model = model_for("gelu", attrs, "f16")
    sess = cuda_session(model, tmp_path)
    got = sess.run(None, {"X": x})[0]
    assert_ran_on_cuda(sess, {"NormGelu"})
    cpu = cpu_session(model)
    for sl in (slice(0, n, 9973), slice(n - (1 << 20), n)):
        assert_matches_cpu(got[sl], cpu.run(None, {"X": np.ascontiguousarray(x[sl])})[0], "f16", f"huge {sl}")


# ---------------------------------------------------------------- streams and graphs


def test_cuda_graph_capture_and_replay(tmp_path):
    """enable_cuda_graph: the kernel is captured once and replayed on new input values."""
    n = 65539
    attrs = full_attrs("softplus", scale=1.3, shift=0.2)
    model = model_for("softplus", attrs, "f32", shape=[n])
    sess = cuda_session(model, tmp_path, {"enable_cuda_graph": "1"})
    cpu = cpu_session(model)
    x0 = random_input((n,), np.float32, seed=1)
    xv = ort.OrtValue.ortvalue_from_numpy(x0, "cuda", 0)
    yv = ort.OrtValue.ortvalue_from_numpy(np.zeros(n, np.float32), "cuda", 0)
    io = sess.io_binding()
    io.bind_ortvalue_input("X", xv)
    io.bind_ortvalue_output("Y", yv)
    for seed in (1, 2, 3):  # the first run captures, the later ones replay
        x = random_input((n,), np.float32, seed=seed)
        xv.update_inplace(x)
        sess.run_with_iobinding(io)
        assert_matches_cpu(yv.numpy(), cpu.run(None, {"X": x})[0], "f32", f"graph replay {seed}")
    assert_ran_on_cuda(sess, {"NormSoftplus"})


def _cudart() -> Any:
    for name in ("libcudart.so.12", "libcudart.so.13", "libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def test_user_compute_stream(tmp_path):
    """A compute stream of the caller's (user_compute_stream): the kernel runs on it."""
    cudart = _cudart()
    if cudart is None:
        pytest.skip("no libcudart to create a stream with")
    stream = ctypes.c_void_p()
    assert cudart.cudaStreamCreateWithFlags(ctypes.byref(stream), 1) == 0  # cudaStreamNonBlocking
    try:
        attrs = full_attrs("mish", scale=0.8)
        model = model_for("mish", attrs, "f16")
        opts = {"has_user_compute_stream": "1", "user_compute_stream": str(stream.value)}
        sess = cuda_session(model, tmp_path, opts)
        x = random_input((4096, 33), np.float16, seed=8)
        got = sess.run(None, {"X": x})[0]
        assert_ran_on_cuda(sess, {"NormMish"})
        assert_matches_cpu(got, cpu_session(model).run(None, {"X": x})[0], "f16", "user stream")
        del sess
    finally:
        assert cudart.cudaStreamSynchronize(stream) == 0
        cudart.cudaStreamDestroy(stream)


# ---------------------------------------------------------------- statistics ops, sessions, errors


def test_stats_op_in_a_cuda_session_runs_on_the_host(tmp_path):
    """Norm<Act>Stats has no CUDA kernel yet: in a CUDA session ONNX Runtime assigns it to the CPU provider
    and copies its input, produced on the device by a Norm node, to the host (a Memcpy node). The
    statistics equal those of a CPU session."""
    op = CATALOGUE["gelu"].op_name
    stats = ["size", "x_mean", "x_ss", "f_mean", "f_ss", "d_ss"]
    nodes = [
        helper.make_node(op, ["X"], ["T"], domain=NORM_DOMAIN, scale=1.2),
        helper.make_node(op + "Stats", ["T"], stats, domain=NORM_DOMAIN, axis=1),
    ]
    outs = [helper.make_tensor_value_info("size", TensorProto.INT64, None)]
    outs += [helper.make_tensor_value_info(s, TensorProto.DOUBLE, None) for s in stats[1:]]
    graph = helper.make_graph(nodes, "stats", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)], outs)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(NORM_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path(cuda=True))
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "stats")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=[CUDA, CPU])
    x = random_input((8, 16, 33), np.float32, seed=6)
    got = sess.run(None, {"X": x})
    nodes_run = set(profiled_nodes(sess))
    assert (op, CUDA) in nodes_run and (op + "Stats", CPU) in nodes_run, nodes_run
    assert any(name.startswith("Memcpy") for name, _ in nodes_run), nodes_run
    for g, c, name in zip(got, cpu_session(model).run(None, {"X": x}), stats):
        np.testing.assert_allclose(g, c, rtol=1e-6, err_msg=name)


def test_inference_session_picks_cuda_library():
    model = node_model("silu", full_attrs("silu"), np.float32, shape=[8])
    sess = InferenceSession(model, providers=[CUDA, CPU])
    assert sess.get_providers()[0] == CUDA
    x = random_input((8,), np.float32, seed=2)
    np.testing.assert_allclose(sess.run(None, {"X": x})[0], reference("silu", x, full_attrs("silu"))[0], rtol=1e-5)


WRONG_ARCH = os.environ.get("NORMACT_CUDA_WRONG_ARCH_LIBRARY")


@pytest.mark.skipif(not WRONG_ARCH, reason="NORMACT_CUDA_WRONG_ARCH_LIBRARY not set (scripts/gpu_check.sh sets it)")
def test_no_code_for_this_gpu_fails_at_session_creation():
    """A library built for another architecture only: the session is refused, naming what the library carries."""
    assert WRONG_ARCH is not None
    so = ort.SessionOptions()
    so.register_custom_ops_library(WRONG_ARCH)
    model = node_model("relu", full_attrs("relu"), np.float32, with_function=False, shape=[4])
    with pytest.raises(Exception, match=r"has no code for this GPU, sm_\d+.*carries CUDA architectures"):
        ort.InferenceSession(model.SerializeToString(), so, providers=[CUDA])
