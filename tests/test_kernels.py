"""The fused ai.normact kernels (runtime_ops/) against the catalogue.

Three-way agreement on random inputs: kernel (library registered) vs the
catalogue's numpy reference vs the model-local function body (stock ONNX
Runtime, no library); dispatch (profiling shows the kernel, not the body);
NaN/Inf; bad input; the library's op table vs the catalogue; the load-time
runtime version check.  GPU tests live in test_kernels_gpu.py.

Runs against the installed package's library, or a local CMake build when
NORMACT_LIBRARY_DIR points at it.  Without a library the module is skipped,
except in CI (CI set), where that is a failure.
"""

from __future__ import annotations

import ctypes
import json
import math
import os

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from normact_onnx.catalogue import CATALOGUE, NORM_DOMAIN, NORM_DOMAIN_VERSION
from normact_onnx.errors import NormactError
from normact_onnx.runtime import (
    InferenceSession,
    KernelLibraryNotFound,
    get_library_path,
    library_info,
)
from normact_onnx.runtime import library as library_mod

from .kernel_helpers import (
    assert_close,
    full_attrs,
    node_model,
    perturbed_params,
    random_input,
    reference,
)

try:
    LIB = get_library_path()
except KernelLibraryNotFound as exc:
    if os.environ.get("CI"):
        raise
    pytest.skip(f"kernel library not built: {exc}", allow_module_level=True)

KINDS = sorted(CATALOGUE)
SHAPES = [(), (0,), (1,), (7,), (2, 0, 3), (3, 5, 17), (4, 33, 257)]  # 33924 elems: ParallelFor path
DTYPES = [np.float32, np.float16]
# (rtol, atol): |got − want| ≤ rtol·|scale|·(|f| + |shift| + |slope·x|) + atol·|scale|, see
# reference().  The float32 atol covers cancellation inside f (alpha·x + beta ≈ 0 in HardSigmoid,
# x/6 + 0.5 ≈ 0 in HardSwish) and the float64 reference's own cancellation in far tails (1 + tanh).
KERNEL_TOL = {np.float32: (2e-6, 1e-7), np.float16: (1.2e-3, 1e-7)}
BODY_TOL = {np.float32: (1e-4, 1e-6), np.float16: (1.5e-2, 2e-3)}


def session(model, *, library: bool, providers=("CPUExecutionProvider",), **opts):
    so = ort.SessionOptions()
    # Every tensor its own allocation rather than a slice of ONNX Runtime's arena, so that under
    # AddressSanitizer (scripts/sanitize_kernels.sh) a kernel touching past its output's end is reported.
    so.enable_cpu_mem_arena = False
    for k, v in opts.items():
        setattr(so, k, v)
    if library:
        so.register_custom_ops_library(LIB)
    return ort.InferenceSession(model.SerializeToString(), so, providers=list(providers))


@pytest.fixture(params=["native", "avx2", "generic"])
def cpu_isa(request, monkeypatch):
    """Run each numeric test with the best loops for this CPU, the AVX2 loops and the baseline loops.

    NORMACT_CPU_ISA caps the instruction set at kernel creation; on a CPU
    without AVX-512 "native" and "avx2" run the same code, which is harmless.
    """
    if request.param == "native":
        monkeypatch.delenv("NORMACT_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("NORMACT_CPU_ISA", request.param)
    return request.param


# --------------------------------------------------------------------------------------- table


def test_library_op_table_matches_catalogue():
    """The built library's table (NormactLibraryInfo) is the catalogue's: ops, kinds, attribute defaults.

    tests/test_op_table.py checks the generated header against the catalogue without a build; this checks
    the library that is loaded was compiled from such a header.
    """
    info = library_info()
    assert info["domain"] == NORM_DOMAIN and info["opset"] == NORM_DOMAIN_VERSION
    ops = info["ops"]
    assert set(ops) == {a.op_name for a in CATALOGUE.values()}
    assert info["kinds"] == {a.op_name: kind for kind, a in CATALOGUE.items()}
    for act in CATALOGUE.values():
        assert list(ops[act.op_name]) == list(act.params), act.op_name  # in order: the functor's a, b
        for name, default in act.params.items():
            assert np.float32(ops[act.op_name][name]) == np.float32(default), (act.op_name, name)


# ------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("variant", ["defaults", "custom"])
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_vs_reference_vs_body(kind, variant, dtype, cpu_isa):
    if variant == "defaults":
        attrs = full_attrs(kind)
    else:
        attrs = full_attrs(kind, scale=1.7, shift=0.3, slope=0.2, **perturbed_params(kind))
    kernel = session(node_model(kind, attrs, dtype, with_function=False), library=True)
    try:
        body = session(node_model(kind, attrs, dtype, with_function=True), library=False)
        body_error = None
    except Exception as exc:  # the catalogue body may not exist for this type (reported, see below)
        body, body_error = None, exc
    krtol, katol = KERNEL_TOL[dtype]
    brtol, batol = BODY_TOL[dtype]
    for i, shape in enumerate(SHAPES):
        x = random_input(shape, dtype, seed=i)
        y = kernel.run(None, {"X": x})[0]
        assert y.dtype == dtype and y.shape == x.shape
        want, mag = reference(kind, x, attrs)
        assert_close(y, want, mag, krtol, katol * abs(attrs["scale"]), f"{kind} {shape} kernel vs numpy")
        if body is not None:
            yb = body.run(None, {"X": x})[0]
            # The body runs standard ops in the tensor's own precision (fp16 ops for
            # fp16): compare it with the kernel at the body's (looser) tolerance.
            assert_close(
                y, yb.astype(np.float64), mag, brtol, batol * abs(attrs["scale"]), f"{kind} {shape} kernel vs body"
            )
    if body_error is not None:
        pytest.xfail(
            f"kernel checked; the catalogue's function body does not load for {np.dtype(dtype)}: "
            f"{str(body_error).splitlines()[0][:200]}"
        )


# Where each approximation in normact_approx.h keeps its relative accuracy down the tail.
TAIL_RANGE = {"sigmoid": 88.0, "silu": 88.0, "tanh": 10.0, "gelu": 13.0}


@pytest.mark.parametrize("kind", sorted(TAIL_RANGE))
def test_tails_relative_accuracy(kind, cpu_isa):
    """f alone (scale 1, shift 0) over ±[1e-6, tail] on a log grid: relative error ≤ 2e-6 everywhere."""
    attrs = full_attrs(kind)
    mag = np.geomspace(1e-6, TAIL_RANGE[kind], 20001)
    x = np.concatenate([-mag[::-1], [0.0], mag]).astype(np.float32)
    y = session(node_model(kind, attrs, np.float32, with_function=False), library=True).run(None, {"X": x})[0]
    want, mag = reference(kind, x, attrs)
    if kind == "gelu":  # the catalogue's 0.5·x·(1 + erf) cancels for x << 0: use erfc
        x64 = x.astype(np.float64)
        want = x64 * 0.5 * np.vectorize(math.erfc)(-x64 / math.sqrt(2.0))
        mag = np.abs(want)
    assert_close(y, want, mag, 2e-6, 0.0, f"{kind} tails")


@pytest.mark.parametrize("kind", KINDS)
def test_in_place_chain(kind):
    """Three chained nodes: ONNX Runtime may run them in place (GetMayInplace), results unchanged."""
    attrs = full_attrs(kind, scale=0.9, shift=0.1)
    sess = session(node_model(kind, attrs, np.float32, with_function=False, chain=3), library=True)
    x = random_input((1 << 16,), np.float32, seed=7)
    want = x
    for _ in range(3):
        want = reference(kind, want.astype(np.float32), attrs)[0].astype(np.float32)
    y = sess.run(None, {"X": x})[0]
    # Each stage's float32 input differs from the reference's by rounding: compare loosely.
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("kind", KINDS)
def test_nan_and_inf(kind, dtype, cpu_isa):
    """NaN propagates; ±Inf give the limits of the math (e.g. silu(−inf) = 0, softsign(inf) = 1)."""
    attrs = full_attrs(kind, scale=1.0, shift=0.5)  # slope 0: no 0·inf in the affine tail
    sess = session(node_model(kind, attrs, dtype, with_function=False), library=True)
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, np.nan] * 5, dtype=dtype)  # 40: vector + tail
    y = sess.run(None, {"X": x})[0]
    # The limit at ±inf is the reference at a huge finite argument, rounded to the tensor's type.
    finite = np.where(np.isinf(x.astype(np.float64)), np.sign(x.astype(np.float64)) * 1e300, x)
    with np.errstate(over="ignore"):  # the reference at ±1e300 overflows the tensor type: that is the point
        want = reference(kind, finite, attrs)[0].astype(dtype)
    assert np.array_equal(np.isnan(y), np.isnan(x)), f"{kind}: NaN pattern {y}"
    ok = ~np.isnan(x)
    np.testing.assert_allclose(y[ok].astype(np.float64), want[ok].astype(np.float64), rtol=2e-3, atol=1e-6)


def test_bfloat16_runs():
    """bfloat16 is supported too (math in float32, RNE rounding of the result)."""
    sess = session(
        node_model("gelu", full_attrs("gelu"), TensorProto.BFLOAT16, with_function=False, shape=[64]), library=True
    )
    assert sess.get_inputs()[0].type == "tensor(bfloat16)"


# ------------------------------------------------------------------------------------ dispatch


def _profiled_op_types(model, library: bool, tmp_path) -> list[str]:
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / ("lib" if library else "nolib"))
    if library:
        so.register_custom_ops_library(LIB)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sess.run(None, {"X": random_input((256,), np.float32, seed=0)})
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    return [e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})]


@pytest.mark.parametrize("kind", ["relu", "gelu", "silu"])
def test_function_form_dispatches_to_kernel(kind, tmp_path):
    """One model, two runtimes: the body without the library, the fused kernel with it."""
    act = CATALOGUE[kind]
    model = node_model(kind, full_attrs(kind, scale=1.5, shift=0.2, slope=0.1), np.float32, shape=[256])
    with_lib = _profiled_op_types(model, True, tmp_path)
    without = _profiled_op_types(model, False, tmp_path)
    assert with_lib and set(with_lib) == {act.op_name}, with_lib
    assert act.op_name not in without and {"Sub", "Mul"} <= set(without), without


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("elem", [TensorProto.INT32, TensorProto.DOUBLE], ids=["int32", "double"])
def test_wrong_dtype_is_a_clear_error(elem):
    model = node_model("relu", full_attrs("relu"), elem, with_function=False, shape=[4])
    # ONNX Runtime rejects the model at load time, naming the op and the type (no crash).
    with pytest.raises(Exception, match=r"(?s)tensor\((int32|double)\).*NormRelu"):
        session(model, library=True)


def test_unknown_op_name_is_a_clear_error():
    model = node_model("relu", {}, np.float32, with_function=False, op_name="NormNoSuchAct", shape=[4])
    with pytest.raises(Exception, match="NormNoSuchAct"):
        session(model, library=True)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_attributes_use_defaults(kind):
    sess = session(node_model(kind, None, np.float32, with_function=False), library=True)
    x = random_input((1000,), np.float32, seed=3)
    want, mag = reference(kind, x, full_attrs(kind))
    assert_close(sess.run(None, {"X": x})[0], want, mag, *KERNEL_TOL[np.float32], f"{kind} defaults")


def test_int_attribute_is_rejected():
    model = node_model("leaky_relu", {"alpha": 1}, np.float32, with_function=False, shape=[4])
    with pytest.raises(Exception, match=r"alpha.*must be a float"):
        session(model, library=True).run(None, {"X": np.zeros(4, np.float32)})


def test_old_runtime_gets_an_error_status_not_a_crash():
    """RegisterCustomOps on a runtime older than 1.17: an OrtStatus naming both versions."""
    lib = ctypes.CDLL(LIB)
    captured = []
    create_status_t = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p)

    @create_status_t
    def create_status(code, msg):
        captured.append((code, msg))
        return 0x5151

    api_v1 = (ctypes.c_void_p * 4)()  # OrtApi: CreateStatus is its first entry
    api_v1[0] = ctypes.cast(create_status, ctypes.c_void_p)
    get_api_t = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)
    version = ctypes.create_string_buffer(b"1.16.3")
    asked = []

    @get_api_t
    def get_api(v):
        asked.append(v)
        return ctypes.addressof(api_v1) if v <= 16 else None

    get_version_t = ctypes.CFUNCTYPE(ctypes.c_void_p)

    @get_version_t
    def get_version():
        return ctypes.addressof(version)

    class OrtApiBase(ctypes.Structure):
        _fields_ = [("GetApi", get_api_t), ("GetVersionString", get_version_t)]

    base = OrtApiBase(get_api, get_version)
    lib.RegisterCustomOps.restype = ctypes.c_void_p
    lib.RegisterCustomOps.argtypes = [ctypes.c_void_p, ctypes.POINTER(OrtApiBase)]
    assert lib.RegisterCustomOps(None, ctypes.byref(base)) == 0x5151
    assert asked == [1]  # never asked for an API the runtime lacks
    ((code, msg),) = captured
    assert code != 0 and b"1.16.3" in msg and b"onnxruntime >= 1.17" in msg


# ------------------------------------------------------------------------------- python side


def test_library_not_found_is_a_normact_error(monkeypatch, tmp_path):
    monkeypatch.setattr(library_mod, "_candidate_dirs", lambda: [tmp_path])
    with pytest.raises(KernelLibraryNotFound, match=r"libnormact_cpu\.so") as info:
        get_library_path()
    assert isinstance(info.value, NormactError)


def test_inference_session_registers_library(tmp_path):
    model = node_model("silu", full_attrs("silu", scale=2.0), np.float32, with_function=False, shape=[5])
    x = random_input((5,), np.float32, seed=1)
    want, _ = reference("silu", x, full_attrs("silu", scale=2.0))
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    for m in (model, model.SerializeToString(), str(path), path):
        y = InferenceSession(m).run(None, {"X": x})[0]
        np.testing.assert_allclose(y, want, rtol=1e-5)


def test_rewrite_custom_op_form_runs_with_the_library_and_matches_the_function_form(tmp_path):
    """`rewrite --form custom-op`: fused nodes only (no function bodies), for runtimes that load the library."""
    from normact_onnx.api import rewrite

    from .conftest import MODELS, random_feeds, run_model

    path = MODELS / "mobilenet_like.torchscript.onnx"
    out = tmp_path / "co.onnx"
    res = rewrite(path, out, form="custom-op", details=True)
    assert {o.form for o in res.rewritten} == {"custom-op"} and len(res.verification) == len(res.rewritten)
    import onnx

    m = onnx.load(str(out))
    assert not m.functions and any(n.domain == "ai.normact" for n in m.graph.node)
    feeds = random_feeds(path)
    got = InferenceSession(str(out)).run(None, feeds)[0]
    want = run_model(rewrite(path), feeds)[0]  # function form in stock ORT (bodies inlined)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
