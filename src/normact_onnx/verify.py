"""Self-verification of a rewritten model: checker, ONNX Runtime load, and every site numerically.

Each rewritten site is copied into one small model (its new nodes, the constants
they read, the Norm functions) and run by ONNX Runtime on random inputs; the
result must match the catalogue's numpy reference ``scale·(f(x) − shift − slope·x)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .data.inputs import model_inputs
from .data.synthetic import resolve_shapes, synthetic_batch
from .errors import NormactError
from .graph import const_value, containers, upstream
from .io import clamp_ir
from .ort import make_session
from .passes.affine import QUANTIZER_WAY_OUT, QUANTIZERS
from .passes.normalize import SiteOutcome
from .valuetypes import infer_value_types


def check_model_file(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise NormactError(f"verification failed: onnx checker: {str(e).strip().splitlines()[0]}") from None


def ort_load(path: Path, shown: Path | None = None) -> None:
    """ONNX Runtime loads the file at ``path`` (a temporary name; errors name ``shown``, the destination)."""
    try:
        make_session(str(path), config={"session.disable_prepacking": "1"})  # a load check: no packed weight copies
    except NormactError:
        raise
    except Exception as e:
        why = str(e).splitlines()[0].replace(str(path), str(shown or path))
        raise NormactError(f"verification failed: onnxruntime cannot load the result: {why}") from None


def _probe_shape(shape: list | None, const_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if shape:
        dims = tuple(d if isinstance(d, int) and d > 0 else 2 for d in shape)
        if int(np.prod(dims)) <= 1 << 16:
            return dims
        return tuple(min(d, 8) if i != 1 else d for i, d in enumerate(dims))
    biggest = max(const_shapes, key=len, default=())
    return (2, *biggest) if biggest else (64,)


def check_sites(
    model: onnx.ModelProto, outcomes: list[SiteOutcome], base_dir: str | None, seed: int = 0
) -> list[dict[str, Any]]:
    """Run every rewritten site in isolation and compare with the numpy reference; raise on mismatch."""
    done = [o for o in outcomes if o.action == "rewritten"]
    if not done:
        return []
    rng = np.random.default_rng(seed)
    types = infer_value_types(model)
    by_path = {c.path: c for c in containers(model)}
    positions: dict[str, tuple[list[onnx.NodeProto], dict[int, int]]] = {}  # per container, built once
    nodes: list[onnx.NodeProto] = []
    inits: dict[str, onnx.TensorProto] = {}
    inputs, outputs, feeds, refs = [], [], {}, []
    for i, o in enumerate(done):
        s, a = o.site, o.affine
        assert a is not None  # a rewritten outcome carries its constants
        c = by_path[s.path]
        producer = c.producer[s.output]
        if s.path not in positions:
            held = list(c.nodes)  # keeps the wrappers alive, so their ids stay valid
            positions[s.path] = (held, {id(n): k for k, n in enumerate(held)})
        chain = _chain(c, s.input, producer, positions[s.path][1])
        consts = sorted(
            {n for node in chain for n in node.input if n and n != s.input and not any(n in m.output for m in chain)}
        )
        rename = {s.input: f"x{i}", s.output: f"y{i}"}
        for n in consts:
            val = const_value(c, n, base_dir, limit=None)
            if val is None:
                raise NormactError(f"verification failed: site {s.name}: input {n!r} is not a constant")
            rename[n] = f"c{i}_{len(inits)}"
            inits[rename[n]] = numpy_helper.from_array(val, rename[n])
        for k, node in enumerate(chain):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"s{i}_{k}_{node.name}"
            for j, n in enumerate(copy.input):
                copy.input[j] = rename.get(n, n if not n else f"s{i}_{n}")
            for j, n in enumerate(copy.output):
                copy.output[j] = rename.get(n, f"s{i}_{n}")
            nodes.append(copy)
        elem = types.elem_type(s.input)
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        shapes = [np.shape(v) for v in (a.scale, a.shift, a.slope, *s.params.values())]
        shape = types.shape.get(s.input) or ([2, o.conv_tail, 3, 3] if o.conv_tail else None)  # a Conv reads N, C, H, W
        x = (rng.standard_normal(_probe_shape(shape, shapes)) * 3).astype(dtype)
        feeds[f"x{i}"] = x
        inputs.append(helper.make_tensor_value_info(f"x{i}", elem, x.shape))
        outputs.append(helper.make_tensor_value_info(f"y{i}", elem, None))
        refs.append((s, a, x))
    graph = helper.make_graph(nodes, "normact_verify", inputs, outputs, list(inits.values()))
    probe = helper.make_model(graph, opset_imports=list(model.opset_import), functions=list(model.functions))
    probe.ir_version = max(model.ir_version, 8 if model.functions else model.ir_version)
    clamp_ir(probe)
    try:
        got = make_session(probe.SerializeToString()).run(None, feeds)
    except Exception as e:
        raise NormactError(f"verification failed: rewritten sites do not run: {str(e).splitlines()[0]}") from None
    report = []
    for (s, a, x), y in zip(refs, got):
        x64 = x.astype(np.float64)
        want = np.asarray(a.scale) * (s.activation.f(x64, s.params) - np.asarray(a.shift) - np.asarray(a.slope) * x64)
        tol = 1e-4 if x.dtype == np.float32 else 2e-2
        err = float(np.max(np.abs(y.astype(np.float64) - want) / (1.0 + np.abs(want)))) if y.size else 0.0
        report.append({"name": s.name, "max_rel_err": err})
        if not err <= tol:
            raise NormactError(f"verification failed: site {s.name} ({s.kind}) is off by {err:.3g} (tolerance {tol})")
    return report


def _chain(c: Any, x: str, root: onnx.NodeProto, order: dict[int, int]) -> list[onnx.NodeProto]:
    """The nodes between ``x`` and ``root`` (inclusive), in ``order`` (node positions): the rewritten site."""
    return sorted(upstream(c, root, x)[0], key=lambda n: order[id(n)])


NOISE_FACTOR = 10.0  # outputs may differ by this multiple of the model's own float noise
ULP_FACTOR = 8.0  # a preserved output may differ by this many of its type's epsilons (of the output's scale)


def type_tolerance(dtype: np.dtype, tolerance: float) -> float:
    """``tolerance`` or, for a type coarser than that (float16: ε = 9.8e-4), ULP_FACTOR·ε of the type.

    The inverse folded into the next layer rounds once more in the model's own precision: float16 cannot
    hold a 1e-4 agreement, and its rounding is not seen as "float noise" (ORT's fusions do not change it).
    """
    return max(tolerance, ULP_FACTOR * float(np.finfo(dtype).eps)) if np.issubdtype(dtype, np.floating) else tolerance


CHECK_CAP = 1e-2  # ...but never by more than this fraction of their scale (a wider check catches nothing)


def float_noise(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[np.ndarray]) -> list[float]:
    """How far ``model``'s outputs move when ONNX Runtime's graph optimizations are switched off.

    Fusions reorder float operations, so this is the rounding noise the model
    itself carries on these inputs: a rewrite that moves outputs by a small
    multiple of it has not changed what the model computes.
    """
    plain = make_session(model.SerializeToString(), optimize=False).run(None, feeds)
    return [float(np.max(np.abs(_f64(a) - _f64(b)), initial=0.0)) for a, b in zip(outputs, plain)]


def _f64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return np.nan_to_num(x.astype(np.float64)) if np.issubdtype(x.dtype, np.number) else np.zeros(x.shape)


def probe_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """One batch of synthetic inputs by the shared rules (:mod:`normact_onnx.data.synthetic`)."""
    specs = model_inputs(model)
    return synthetic_batch(specs, resolve_shapes(specs, {}, 1), np.random.default_rng(seed))


def working_dtype(model: onnx.ModelProto) -> np.dtype | None:
    """The coarsest floating type the model computes in: of its weights (initializers, Constant values) and casts.

    A float16 model exported with float32 inputs and outputs (``keep_io_types``: a Cast at each end)
    computes in float16: its outputs carry float16's rounding though their type is float32. None: no
    floating weights or casts.
    """
    types = [t.data_type for t in model.graph.initializer]
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "Constant" and a.name == "value":
                types.append(a.t.data_type)
            elif node.op_type == "Cast" and a.name == "to":
                types.append(a.i)
    coarsest: np.dtype | None = None
    for elem in set(types):
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
        except (KeyError, TypeError, ValueError):  # bfloat16, float8: numpy has no such type
            continue
        if np.issubdtype(dtype, np.floating) and (coarsest is None or np.finfo(dtype).eps > np.finfo(coarsest).eps):
            coarsest = dtype
    return coarsest


def _quantized(model: onnx.ModelProto) -> str:
    """Why a function-preserving rewrite of a quantized model moves its outputs, and what to do: or ''."""
    quantizer = next((n for n in model.graph.node if n.op_type in QUANTIZERS), None)
    if quantizer is None:
        return ""
    return (
        f": the model quantizes values downstream of the sites ({quantizer.op_type} "
        f"'{quantizer.name or quantizer.output[0]}'), and the float rounding of the restored values moves some "
        f"across quantization steps; {QUANTIZER_WAY_OUT}"
    )


def _absolute_floor(dtype: np.dtype, working: np.dtype | None) -> float:
    """The least absolute difference a preserve check may flag: one epsilon of the coarser of the output's and the
    computation's type.

    ONNX Runtime's float activation kernels are accurate in absolute terms near 0, not relative: its float32 Sigmoid
    steps by ~3e-8 around 3e-4, so a wake-word score of 3e-4 moves by 2e-4 of itself when a folded inverse moves its
    logit by one rounding. The optimized-vs-plain noise cannot see that (both runs use the same kernel). Outputs of
    order 1 or above are unaffected: there ``tolerance`` × scale is far above one epsilon.
    """
    eps = float(np.finfo(dtype).eps)
    return max(eps, float(np.finfo(working).eps)) if working is not None else eps


def _precision(dtype: np.dtype, working: np.dtype | None) -> str:
    if working is None or np.finfo(working).eps <= np.finfo(dtype).eps:
        return str(dtype)
    return f"{dtype} outputs of {working} weights"


def check_whole_model(
    original: onnx.ModelProto, rewritten: onnx.ModelProto, preserve: bool, tolerance: float = 1e-4
) -> dict[str, Any]:
    """Run the whole rewritten model against the original on probe inputs; raise when it broke.

    Fails when an output is NaN/Inf where the original's is finite (a guard
    normalized by mistake does that), and, for a function-preserving rewrite,
    when an output differs by more than ``tolerance`` of its scale and more
    than ``NOISE_FACTOR`` times the model's own float noise (absolute ``tolerance``
    for an output that is all zeros) and more than one epsilon of its type
    (:func:`_absolute_floor`), and always when it differs by more than
    ``CHECK_CAP`` of its scale (then the message asks for real inputs). When the original
    does not run on synthetic inputs, the check is skipped and says so.
    """
    try:
        feeds = probe_feeds(original)
        want = make_session(original.SerializeToString()).run(None, feeds)
    except Exception as e:
        return {"skipped": f"the original model does not run on synthetic inputs ({str(e).splitlines()[0][:200]})"}
    try:
        got = make_session(rewritten.SerializeToString()).run(None, feeds)
    except Exception as e:
        raise NormactError(f"verification failed: the rewritten model does not run: {str(e).splitlines()[0]}") from None
    names = [o.name for o in original.graph.output]
    noise = float_noise(original, feeds, want) if preserve else [0.0] * len(want)
    worst = 0.0
    working = working_dtype(original) if preserve else None
    tolerances: dict[str, float] = {}
    for name, a, b, n in zip(names, want, got, noise):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise NormactError(f"verification failed: output {name!r} has shape {b.shape}, the original's {a.shape}")
        if not np.issubdtype(a.dtype, np.inexact):
            continue
        broken = np.isfinite(a) & ~np.isfinite(b)
        if np.any(broken):
            raise NormactError(
                f"verification failed: output {name!r} is NaN/Inf at {int(broken.sum())} of {a.size} values where "
                "the original's is finite; nothing written"
            )
        if preserve:
            scale = float(np.max(np.abs(_f64(a)), initial=0.0))
            err = float(np.max(np.abs(_f64(a) - _f64(b)), initial=0.0))
            rel = err / max(scale, 1e-30)
            worst = max(worst, rel)
            tol = type_tolerance(a.dtype, tolerance)
            if working is not None:  # float32 outputs of a float16 computation: float16's precision
                tol = max(tol, type_tolerance(working, tolerance))
            tolerances[name] = tol
            derived = max(tol * (scale or 1.0), NOISE_FACTOR * n, _absolute_floor(a.dtype, working))
            if err > min(derived, CHECK_CAP * (scale or 1.0)):
                noisy = derived > CHECK_CAP * (scale or 1.0)
                hint = (
                    f"; the model's own float noise on synthetic inputs ({n / max(scale, 1e-30):.3g} of the scale) "
                    f"is above the {CHECK_CAP:g} a check may allow: check the result on real inputs "
                    "(normact-onnx compare MODEL OUT --data …) and write it with --no-verify"
                    if noisy
                    else ""
                )
                raise NormactError(
                    f"verification failed: --preserve-function changed output {name!r} by {rel:.3g} of its scale "
                    f"(tolerance {tol:g} for {_precision(a.dtype, working)}, float noise {n:.3g}){hint}"
                    f"{_quantized(original)}; nothing written"
                )
    return {"outputs": names, "max_rel_to_scale": worst, "tolerance": tolerances} if preserve else {"outputs": names}
