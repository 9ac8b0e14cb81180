"""The inference model after fine-tuning: trained weights, frozen constants, the ``Norm<Act>`` form.

At inference an ANAct site is again ``y = scale·(f(x) − shift)`` with
``scale = λ + 0.3·tanh α`` and ``shift = μ`` (docs/math.md §2.3), so the export is the
ordinary rewrite pass with those constants: the same function form, metadata
and verification as ``rewrite``, loadable in the regular ``[cpu]``/``[gpu]``
environment. Sites an earlier rewrite had already put in the function form get
their attributes updated in place. Optionally :func:`normact_onnx.deploy.fold`
then moves the affine part into the next layers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..api import rewrite
from ..catalogue import NORM_DOMAIN
from ..deploy import fold as fold_model
from ..graph import Container, const_value, containers, unique_namer
from ..io import atomic_path, clamp_ir, write_model
from ..methods.static import Affine
from ..outcome import Refusal
from ..passes.find import Site, find_sites
from ..passes.forms import LiteralBody, affine_literal_tail
from ..provenance import update_constants
from ..valuetypes import infer_value_types
from .graph import ALPHA_AMPLITUDE, TrainSite, trainable_copy

META_FINETUNE = "normact.finetune"


def site_constants(sites: list[TrainSite], lam: np.ndarray, mu: np.ndarray, alpha: np.ndarray) -> dict[str, Affine]:
    """Frozen constants per site output: static sites keep theirs, ANAct ones freeze λ + 0.3·tanh α and μ.

    A compensated site (reference s₀, h₀: docs/math.md §2.7) fed its consumers
    z = s₀·(s/λ)·(f − μ) + s₀·(μ − h₀), one affine map of f: S·(f − H) with S = s₀·s/λ and
    H = μ − λ·(μ − h₀)/s. Those are its constants, so its consumers (which absorbed the
    inverse of s₀, h₀) stay as they are; at α = 0 they are s₀, h₀ themselves.
    """
    out: dict[str, Affine] = {}
    for s in sites:
        if s.method == "anact":
            lam_i, mu_i = float(lam[s.index]), float(mu[s.index])
            scale = lam_i + ALPHA_AMPLITUDE * float(np.tanh(alpha[s.index]))
            if s.reference is not None:
                s0, h0 = s.reference
                out[s.output] = Affine(s0 * scale / lam_i, mu_i - lam_i * (mu_i - h0) / scale, 0.0)
                continue
            out[s.output] = Affine(scale, mu_i, 0.0)
        elif s.affine is not None:
            out[s.output] = s.affine
    return out


def flush_subnormals(value: np.ndarray) -> np.ndarray:
    """``value`` with its subnormal float32/float64 values set to zero (anything else returned as it is).

    Training can leave weights of magnitude below the smallest normal float (|w| < 1.2e-38 in float32: a decayed
    weight that once was tiny). They change no output measurably, but a CPU computes with them through a slow
    microcode path: 1,043 of them in one PP-OCRv5 detector weight made the folded model 1.16× slower than the
    original, and 0.99× once zeroed (benchmarks/README.md, the pretrained path). float16 is left alone: its
    subnormals reach 6e-5, values a half-precision model does compute with (and CPUs widen it to float32 anyway).
    """
    if value.dtype not in (np.float32, np.float64) or not value.size:
        return value
    tiny = np.finfo(value.dtype).tiny
    small = (value != 0) & (np.abs(value) < tiny)
    if not small.any():
        return value
    out = value.copy()
    out[small] = 0
    return out


def _with_weights(model: onnx.ModelProto, base_dir: str | None, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` (user functions inlined, as in training) with trained initializers swapped in."""
    m = trainable_copy(model, base_dir)

    def trained(t: onnx.TensorProto, name: str) -> onnx.TensorProto:
        value = np.asarray(weights[name]).astype(helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(t.dims)
        return numpy_helper.from_array(flush_subnormals(value), t.name)

    for t in m.graph.initializer:
        if t.name in weights:
            t.CopyFrom(trained(t, t.name))
    for n in m.graph.node:  # weights that the exporter stored as Constant nodes (lifted for training)
        if n.op_type == "Constant" and n.output and n.output[0] in weights:
            for a in n.attribute:
                if a.name == "value":
                    a.t.CopyFrom(trained(a.t, n.output[0]))
    return m


def _update_function_sites(m: onnx.ModelProto, constants: dict[str, Affine]) -> set[str]:
    """Set scale/shift/slope on Norm<Act> nodes of earlier rewrites; returns the outputs it handled."""
    done = set()
    for site in find_sites(m):
        if site.normalized is None or site.root.domain != NORM_DOMAIN or site.output not in constants:
            continue
        aff = constants[site.output]
        for a in site.root.attribute:
            if a.name in ("scale", "shift", "slope"):
                a.f = float(getattr(aff, a.name))
        done.add(site.output)
    if done:
        update_constants(m, {out: constants[out].as_dict() for out in done}, "anact-finetune")
    return done


def update_tail_sites(m: onnx.ModelProto, sites: list[TrainSite], constants: dict[str, Affine], done: set[str]) -> None:
    """Subgraph-form sites trained in front of their tail (reference (1, 0)): S·(f − H) written between the
    activation and the tail that applies the rewrite's s₀, h₀ (exact; ``fold`` absorbs both)."""
    todo = {s.output for s in sites if s.reference == (1.0, 0.0) and s.output in constants} - done
    if not todo:
        return
    main = containers(m)[0]
    fresh, types = unique_namer(m), infer_value_types(m)
    for out in todo:
        node = main.producer.get(out)
        aff = constants[out]
        if node is None:
            continue
        done.add(out)  # written here, or nothing to write: an identity
        if aff.scale == 1.0 and aff.shift == 0.0:
            continue
        f = fresh(f"{out}__normact_finetune")
        node.output[0] = f
        b = LiteralBody(main.opset, f"{out}/normact_finetune_", types.elem_type(out), {}, False)
        affine_literal_tail(b, f, f, aff, out=out)
        main.insert_after(node, b.nodes)


def follow_helpers(m: onnx.ModelProto, sites: list[TrainSite], constants: dict[str, Affine]) -> None:
    """Write each compensated site's preserve helpers from its final S, H, as the training graph computed them.

    A Pad fills with −S·H (the site's output at f = 0), a restore multiplies by 1/S and adds H, a shift adds
    S·H (docs/math.md §2.7). So every helper is again the exact inverse of the site, and ``fold`` removes
    both, as it does after ``--preserve-function``. A subgraph-form site's helpers read its tail's output:
    S, H composed with the tail's s₀, h₀.
    """
    main, fresh = containers(m)[0], unique_namer(m)
    for s in sites:
        if not s.helpers or s.output not in constants:
            continue
        aff = constants[s.output]
        scale, shift = float(np.float32(aff.scale)), float(np.float32(aff.shift))  # as the site's record holds them
        if s.tail is not None:
            s0, h0 = s.tail
            scale, shift = s0 * scale, shift + h0 / scale
        for h in s.helpers:
            nodes = [main.producer[o] for o in h.outputs if o in main.producer]
            if len(nodes) != len(h.outputs):
                continue
            if h.kind == "pad":
                _set_pad_fill(main, nodes[0], -scale * shift, fresh)
            elif h.kind == "shift":
                _set_operand(main, nodes[0], 2, scale * shift)
            else:
                _set_restore(main, nodes, 1.0 / scale, shift, fresh)


def _set_operand(c: Container, node: onnx.NodeProto, index: int, value: float) -> None:
    """Give the constant input ``index`` of ``node`` the value ``value`` everywhere (its own dtype and shape)."""
    name = node.input[index]
    old = const_value(c, name)
    assert old is not None  # found as a constant when the training graph was built
    c.set_constant(name, np.full(old.shape, value, dtype=old.dtype))


def _set_pad_fill(c: Container, pad: onnx.NodeProto, value: float, fresh: Callable[[str], str]) -> None:
    if c.opset < 11:
        c.set_attribute(pad, "value", float(value))
    elif len(pad.input) > 2 and pad.input[2]:
        _set_operand(c, pad, 2, value)
    else:  # preserve wrote no fill (its value was 0): a new one
        name = fresh(f"{pad.name}_value")
        c.add_constant(name, np.asarray(value, np.float32), pad)
        c.set_input(pad, 2, name)


def _set_restore(
    c: Container, chain: list[onnx.NodeProto], inverse: float, shift: float, fresh: Callable[[str], str]
) -> None:
    """The restore Mul(1/S) → Add(H); the half preserve left out (s₀ = 1 or h₀ = 0) is written now."""
    ops = {n.op_type: n for n in chain}
    for op, value in (("Mul", inverse), ("Add", shift)):
        node = ops.get(op)
        if node is not None:
            _set_operand(c, node, 1 if const_value(c, node.input[1]) is not None else 0, value)
            continue
        anchor = chain[0] if op == "Mul" else chain[-1]
        k, out = fresh(f"{anchor.name}_normact_restore_{op.lower()}"), fresh(f"{anchor.name}_normact_restored")
        ref = const_value(c, next(i for i in anchor.input if const_value(c, i) is not None))
        c.add_constant(k, np.asarray(value, ref.dtype if ref is not None else np.float32), anchor)
        if op == "Mul":  # in front of the Add: it reads the site's value, the Add reads the product
            u = next(i for i in anchor.input if const_value(c, i) is None)
            node = helper.make_node("Mul", [u, k], [out], name=fresh(f"{anchor.name}_normact_restore_Mul"))
            c.insert_before(anchor, [node])
            c.set_input(anchor, list(anchor.input).index(u), out)
        else:  # after the Mul: its readers read the sum
            name = fresh(f"{anchor.name}_normact_restore_Add")
            node = helper.make_node("Add", [out, k], [anchor.output[0]], name=name)
            c.set_output(anchor, 0, out)
            c.insert_after(anchor, [node])


def export_model(
    model: onnx.ModelProto,
    base_dir: str | None,
    sites: list[TrainSite],
    weights: dict[str, np.ndarray],
    lam: np.ndarray,
    mu: np.ndarray,
    alpha: np.ndarray,
    output: Path,
    *,
    provenance: dict[str, Any],
    fold: bool = False,
    verify: bool = True,
) -> onnx.ModelProto:
    """Write the fine-tuned inference model to ``output`` and return it."""
    constants = site_constants(sites, lam, mu, alpha)
    m = _with_weights(model, base_dir, weights)
    updated = _update_function_sites(m, constants)
    update_tail_sites(m, sites, constants, updated)
    follow_helpers(m, sites, constants)
    per_site = [
        {**s.as_dict(), **(constants[s.output].as_dict() if s.output in constants else {})}
        | (
            {"lambda": float(lam[s.index]), "mu": float(mu[s.index]), "alpha": float(alpha[s.index])}
            if s.method == "anact"
            else {}
        )
        for s in sites
    ]
    m.metadata_props.append(
        onnx.StringStringEntryProto(key=META_FINETUNE, value=json.dumps({**provenance, "sites": per_site}))
    )

    def pick(site: Site) -> Affine | Refusal:
        if site.output in updated:
            return Refusal("already normalized")
        return constants[site.output] if site.output in constants else Refusal("not trained as a normalized site")

    method = {"method": "anact-finetune" if provenance.get("method") == "anact" else provenance.get("method", "")}
    target = output if not fold else output.with_name(f".{output.name}.unfolded.onnx")
    # Only sites trained in normalized form and not yet updated in place get rewritten; with none left (every
    # site already normalized, or --method none on a plain model) the model is written as it is: asking
    # rewrite would make every site a refusal, which it rightly treats as an error.
    pending = any(s.output in constants and s.output not in updated for s in sites)
    out = rewrite(m, target, constants=pick, all_sites=True, method=method, verify=verify) if pending else m
    if not target.exists():  # nothing left to rewrite: write as is
        clamp_ir(out)
        with atomic_path(target) as tmp:
            write_model(out, tmp)
    if fold:
        try:
            out = fold_model(str(target), output, verify=verify)
        finally:
            target.unlink(missing_ok=True)
    return out
