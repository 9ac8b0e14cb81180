"""Rewrite selected sites into their normalized form, in place on a ModelProto.

The pass knows no activation by name: constants come from a method callback
(static moments, calibrated statistics), ONNX comes from the catalogue through
:mod:`.forms`, and the optional function-preserving step from :mod:`.affine`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard

import numpy as np
import onnx
from onnx import helper

from ..catalogue import NORM_DOMAIN, NORM_DOMAIN_VERSION
from ..catalogue.fused import FUSED
from ..graph import default_opset, remove_unused, unique_namer
from ..methods.static import Affine
from ..outcome import Refusal
from ..provenance import read_records, site_record, stamp
from ..valuetypes import infer_value_types
from .affine import Restore, plan_absorb
from .find import Site
from .forms import (
    GENERIC_OPSET,
    MIN_FUNCTION_IR,
    MIN_FUNCTION_OPSET,
    LiteralBody,
    affine_literal_tail,
    conv_affine_tail,
    norm_function,
    norm_node,
)

Form = Literal["function", "subgraph", "custom-op", "layout"]
# layout: the function form, except at the sites .kernel_form finds ONNX Runtime runs fused in its NCHWc layout
FORMS: tuple[Form, ...] = ("function", "subgraph", "custom-op", "layout")
Action = Literal["rewritten", "skipped", "normalized"]  # "normalized": it already was


def is_form(text: str) -> TypeGuard[Form]:
    return text in FORMS


@dataclass
class SiteOutcome:
    """What happened to one site: rewritten (with constants and form) or why not."""

    site: Site
    action: Action
    reason: str = ""
    affine: Affine | None = None
    form: Form | Literal[""] = ""
    refused: bool = False  # selected, but its constants (or --preserve-function) could not be had: ``reason`` says why
    conv_tail: int = 0  # > 0: subgraph form, the affine a 1×1 depthwise Conv over this many channels (.kernel_form)

    def as_dict(self) -> dict[str, Any]:
        d = self.site.summary()
        d.update(action=self.action, reason=self.reason or None, form=self.form or None)
        if self.affine is not None:
            d.update(self.affine.as_dict())
        return d


@dataclass
class Plan:
    """The selected sites with their constants, and the provenance to stamp."""

    outcomes: list[SiteOutcome]
    method: dict[str, Any]
    form: Form = "function"
    preserve_function: bool = False
    notes: list[str] = field(default_factory=list)


def apply_plan(model: onnx.ModelProto, plan: Plan, base_dir: str | None) -> None:
    """Edit ``model`` so every outcome marked "rewritten" is normalized; downgrade the rest with reasons."""
    todo = [o for o in plan.outcomes if o.action == "rewritten"]
    if not todo:
        return
    fresh = unique_namer(model)
    opset = default_opset(model.opset_import)
    types = infer_value_types(model)
    read_as: dict[int, str] = {}  # sites whose input is now the explicit inverse of an earlier site's affine
    if plan.preserve_function:
        restore = Restore(types, fresh)
        for o in todo:
            why = _preserve(o, base_dir, fresh, restore)
            if why is not None:
                o.action, o.reason, o.refused = "skipped", f"--preserve-function: {why.reason}", True
        todo = [o for o in todo if o.action == "rewritten"]
        by_name = {t: n for (_, t), n in restore.made.items()}
        for o in todo:
            restored = restore.made.get((id(o.site.container), o.site.input))
            if restored is None and not any(o.site.input in n.input for n in o.site.nodes):
                restored = by_name.get(o.site.input)  # an outer value, renamed inside this subgraph
            if restored is not None:
                read_as[id(o.site)] = o.site.input
                o.site.input = restored

    functions = {(f.domain, f.name) for f in model.functions}
    fn_elem: dict[str, int | None] = {}
    records = read_records(model)
    orphans: set[str] = set()
    need_domain: list[Any] = [model.opset_import]
    for o in todo:
        site, c, affine = o.site, o.site.container, _constants(o)
        elem = types.elem_type(site.output if site.unfused else read_as.get(id(site), site.input))
        pre: list[onnx.NodeProto] = []
        if site.unfused:  # a fused op: its layer written out, then the site (split now: preserve may have
            # pointed the fused node at a restored input)
            parts = FUSED[(site.root.domain, site.root.op_type)](site.root, site.input)
            assert not isinstance(parts, Refusal), parts  # find_sites split it already
            pre, act = parts
            site.unfused = (pre, act)
        form = _choose_form(plan.form, model, opset, o, affine, elem, fn_elem)
        o.form = form
        doc = f"normact {plan.method.get('method', '')} {plan.method.get('variant', '')}".strip()
        record = site_record(site.path, site.name, site.kind, site.output, form, plan.method, affine.as_dict())
        if form == "subgraph":
            f_name = fresh(f"{site.output}__normact_f")
            root = onnx.NodeProto()
            root.CopyFrom(site.unfused[1] if site.unfused else site.root)
            root.output[0] = f_name
            b = LiteralBody(c.opset, f"{site.name}/normact_", elem, {}, False)
            if o.conv_tail:
                conv_affine_tail(b, f_name, affine, o.conv_tail, out=site.output)
            else:
                affine_literal_tail(b, site.input, f_name, affine, out=site.output)
            c.replace(site.root, [*pre, root, *b.nodes])
            record["act_output"] = f_name
        else:
            # a split fused op: its layer keeps the fused node's name, the Norm op takes the activation's
            name = site.unfused[1].name if site.unfused else site.root.name
            node = norm_node(site.activation, site.input, site.output, affine, site.params, name, doc)
            c.replace(site.root, [*pre, node])
            c.remove(site.nodes[:-1] + site.const_nodes)
            c.drop_value_info({out for n in site.nodes[:-1] for out in n.output})
            if not pre:
                orphans.update(i for n in site.nodes for i in n.input if i != site.input)
            if form == "function":
                key = (NORM_DOMAIN, site.activation.op_name)
                if key not in functions:
                    functions.add(key)
                    model.functions.append(norm_function(site.kind, opset, fn_elem.get(site.activation.op_name)))
            if c.function is not None:
                need_domain.append(c.function.opset_import)
        records.append(record)
    remove_unused(model, initializers=orphans)
    if any(o.form in ("function", "custom-op") for o in todo):
        for imports in need_domain:
            if not any(i.domain == NORM_DOMAIN for i in imports):
                imports.append(helper.make_opsetid(NORM_DOMAIN, NORM_DOMAIN_VERSION))
    stamp(model, records)


def _constants(o: SiteOutcome) -> Affine:
    if o.affine is None:
        raise AssertionError(f"site {o.site.name} is to be rewritten without constants")
    return o.affine


DOUBLE_REASON = "float64: written as standard ops (the Norm<Act> functions are typed for float, float16, bfloat16)"


def _choose_form(
    wanted: Form,
    model: onnx.ModelProto,
    opset: int,
    o: SiteOutcome,
    affine: Affine,
    elem: int,
    fn_elem: dict[str, int | None],
) -> Form:
    """The requested form, or the subgraph form where the requested one cannot express the site."""
    scalar = affine.is_scalar and all(np.ndim(v) == 0 for v in o.site.params.values())
    if wanted == "subgraph":
        return wanted
    if wanted == "layout":  # its other sites: the function form
        wanted = "function"
    if elem == onnx.TensorProto.DOUBLE:
        o.reason = DOUBLE_REASON
        return "subgraph"
    if not scalar:
        o.reason = "per-channel constants: written as standard ops"
        return "subgraph"
    if wanted == "custom-op":
        return wanted
    if model.ir_version < MIN_FUNCTION_IR or opset < MIN_FUNCTION_OPSET:
        why = f"function form needs IR ≥ {MIN_FUNCTION_IR} and opset ≥ {MIN_FUNCTION_OPSET}: standard ops"
        o.reason = f"{why}; {o.reason}" if o.conv_tail else why
        return "subgraph"
    if o.conv_tail:  # chosen by .kernel_form (its reason says why)
        return "subgraph"
    if opset < GENERIC_OPSET:  # functions are typed below opset 15: one element type per op
        op = o.site.activation.op_name
        if fn_elem.setdefault(op, elem) != elem:
            o.reason = "a second element type below opset 15: standard ops"
            return "subgraph"
    else:
        fn_elem.setdefault(o.site.activation.op_name, None)
    return "function"


def _preserve(o: SiteOutcome, base_dir: str | None, fresh: Callable[[str], str], restore: Restore) -> Refusal | None:
    """Fold the inverse of the site's affine into its consumers, or say why that is not exact.

    Exact everywhere: a padded Conv gets an explicit ``Pad`` with the value that
    stands for zero, and a consumer that cannot absorb the inverse (a gating
    ``Mul``, a ``Concat``, a nonlinearity) reads it written explicitly in front.
    """
    aff = _constants(o)
    if np.any(np.asarray(aff.slope) != 0):
        return Refusal("slope ≠ 0 (zeta-zero/ratio variant): the inverse needs the pre-activation")
    if np.any(np.asarray(aff.scale) == 0):
        return Refusal("scale is 0")
    plan = plan_absorb(
        o.site.container,
        o.site.output,
        1.0 / np.asarray(aff.scale, dtype=np.float64),
        aff.shift,
        base_dir,
        fresh,
        "pad",
        restore=restore,
    )
    if isinstance(plan, Refusal):
        return plan
    plan()
    return None
