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
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..api import rewrite
from ..catalogue import NORM_DOMAIN
from ..deploy import fold as fold_model
from ..graph import containers, unique_namer
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


def _with_weights(model: onnx.ModelProto, base_dir: str | None, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` (user functions inlined, as in training) with trained initializers swapped in."""
    m = trainable_copy(model, base_dir)

    def trained(t: onnx.TensorProto, name: str) -> onnx.TensorProto:
        value = np.asarray(weights[name]).astype(helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(t.dims)
        return numpy_helper.from_array(value, t.name)

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
