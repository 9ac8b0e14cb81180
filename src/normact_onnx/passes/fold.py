"""Fold normalized sites back into plain activations (docs/math.md §3), in place on a ModelProto.

A site with slope 0 computes ``y = s·f(x) − s·h``. Two exact ways to make it free:

- forward, into the consumers: they read ``f`` directly by
  :func:`.affine.plan_absorb` (a = s, c = −s·h: the machinery ``rewrite
  --preserve-function`` uses for the inverse, here also through a residual
  ``Add`` whose other branch absorbs 1/s), and the site becomes the catalogue's
  plain op again (``Relu``, ``LeakyRelu(alpha)``, the Erf chain below opset 20 …).
- backward, into the layer that computes ``x`` (whatever the consumers are:
  gating ``Mul``, padded Conv, graph output): when the catalogue says
  f(x) = clip(x, lo, hi) (``clip_bounds``: ReLU, Clip/ReLU6) and s > 0,
  y = clip(s·x − s·h, s·lo − s·h, s·hi − s·h), so the producer (Conv, Gemm,
  MatMul (+Add), its output read by the site only) takes W ← s·W, b ← s·b − s·h
  (:func:`.affine.plan_produce`) and the site becomes a plain ``Clip`` with the
  new bounds; for a positively homogeneous f with h = 0 (LeakyRelu, PRelu, Abs)
  the producer takes s and the site is f.

Order: forward when it inserts no op (the exporter's op comes back, e.g. a
``Relu`` that ONNX Runtime fuses into the Gemm before it, which it does not do
for ``Clip``), else backward, else forward with one op inserted in front of a
padded Conv (``padding``) or a bias ``Add`` after a MatMul.
Sites whose affine part cannot move exactly stay normalized, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper

from ..catalogue import NORM_DOMAIN
from ..catalogue.fused import FUSED_PRE, MS, fuse_back
from ..graph import Container, const_value, constant_node_value, containers, remove_unused, unique_namer, upstream
from ..outcome import Refusal
from ..provenance import SiteRecord, mark_folded, read_records, replace_records
from ..valuetypes import infer_value_types
from .affine import FREE, HELPER_MARK, Padding, Plan, padding_of, plan_absorb, plan_produce
from .find import Site, find_in_container
from .forms import LiteralBody


@dataclass
class FoldOutcome:
    """One normalized site: folded into its consumers, or kept (with why)."""

    site: Site
    action: Literal["folded", "kept"]
    reason: str = ""
    output: str = ""  # the normalized value the consumers read
    into: Literal["producer", "consumers", ""] = ""  # folded: backward or forward

    def as_dict(self) -> dict[str, Any]:
        d = self.site.summary()
        d.update(action=self.action, reason=self.reason or None, normalized_output=self.output)
        if self.into:
            d["folded_into"] = self.into
        d.update({k: _jsonable(v) for k, v in (self.site.normalized or {}).items() if k in ("scale", "shift", "slope")})
        return d


def _jsonable(v: Any) -> Any:
    return float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()


def normalized_sites(model: onnx.ModelProto, base_dir: str | None) -> list[Site]:
    """Every normalized site, outside the ``Norm<Act>`` function bodies (those are the definitions)."""
    by_act_output = {r["act_output"]: r for r in read_records(model) if r.get("act_output")}
    sites: list[Site] = []
    for c in containers(model):
        if c.function is not None and c.function.domain == NORM_DOMAIN:
            continue
        sites.extend(s for s in find_in_container(c, base_dir, by_act_output) if s.normalized is not None)
    return sites


def _array(record: SiteRecord, key: Literal["scale", "shift", "slope"], default: float) -> np.ndarray:
    return np.asarray(record.get(key, default), dtype=np.float64)


def _tail(c: Container, act_output: str, y: str) -> list[onnx.NodeProto] | Refusal:
    """The subgraph form's affine nodes between the plain activation's output and ``y``."""
    root = c.producer.get(y)
    if root is None:
        return Refusal(f"normalized output {y!r} is not produced in this graph")
    nodes, reads = upstream(c, root, act_output)
    foreign = [i for i in reads if i not in c.initializers]
    if foreign:
        return Refusal(f"the affine tail reads {foreign[0]!r}, which is not a constant of the site")
    if len(nodes) > 8:
        return Refusal("the affine tail is not the one rewrite writes")
    ids = {id(n) for n in nodes}
    for n in nodes:
        for o in n.output:
            if o != y and (o in c.outputs or any(id(u) not in ids for u in c.consumers.get(o, ()))):
                return Refusal(f"an intermediate value of the affine tail ({o!r}) is used elsewhere")
    if any(id(u) not in ids for u in c.consumers.get(act_output, ())) or act_output in c.outputs:
        return Refusal("the plain activation's output is used outside the affine tail")
    return nodes


def _plain_nodes(site: Site, elem: int, out: str) -> list[onnx.NodeProto]:
    """The site's activation in standard ops with literal parameters, writing ``out``."""
    b = LiteralBody(site.container.opset, f"{site.name}/", elem, site.activation.with_defaults(site.params), False)
    f = site.activation.body(b, site.input)
    last = next(n for n in reversed(b.nodes) if f in n.output)
    last.output[list(last.output).index(f)] = out
    compute = [n for n in b.nodes if n.op_type != "Constant"]
    if len(compute) == 1:
        compute[0].name = site.root.name  # a one-op activation keeps the name the exporter gave it
    c = site.container
    if c.graph is None or (c.ir_version < 4 and c.parent is not None):
        return b.nodes
    for n in b.nodes:  # in a graph its literals are initializers, as exporters write them: no extra nodes
        if n.op_type == "Constant":
            value = constant_node_value(n)
            assert value is not None  # LiteralBody writes value tensors
            c.add_constant(n.output[0], value, site.root)
    return compute


def fold_sites(
    model: onnx.ModelProto, base_dir: str | None, padding: str = "pad", select: Callable[[Site], bool] | None = None
) -> list[FoldOutcome]:
    """Fold every (selected) normalized site whose affine part moves exactly into its consumers."""
    strategy = padding_of(padding)
    _adopt_finetune_tails(model, base_dir)
    sites = [s for s in normalized_sites(model, base_dir) if select is None or select(s)]
    if not sites:
        return []
    fresh = unique_namer(model)
    types = infer_value_types(model)
    before = {i.name for i in model.graph.initializer}
    outcomes = []
    fused_ok = any(i.domain == MS for i in model.opset_import)  # ORT's fused ops may come back
    for s in sites:
        elem = types.elem_type(s.input)
        _refresh_input(s)
        outcomes.append(_fold_one(s, base_dir, fresh, strategy, elem))
        if fused_ok and outcomes[-1].action == "folded":
            _fuse_back(s, outcomes[-1].output)
    if any(o.action == "folded" for o in outcomes):
        # the constants of the helpers a fold removed (restore Mul/Add, Pad) go; the model's own unused ones stay
        remove_unused(model, initializers=before & _helper_constants(before), domain=NORM_DOMAIN)
        mark_folded(model, {(o.site.path, o.output) for o in outcomes if o.action == "folded"})
    return outcomes


# ``finetune``'s export writes the trained S·(f − H) of a preserved (subgraph-form) site between the activation and
# the rewrite's own tail, in nodes named ``<act_output>/normact_finetune_…`` (training/export.py)
_FINETUNE_MARK = "/normact_finetune_"
_AFFINE_OPS = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}


def _adopt_finetune_tails(model: onnx.ModelProto, base_dir: str | None) -> None:
    """Make the fine-tuned affine in front of a site's tail part of that site: the record's ``act_output``
    becomes the activation's own output again and its constants the composition s₀·(S·(f − H) − h₀) =
    s₀S·(f − (H + h₀/S)), read off the written nodes. The graph is unchanged and the record describes it
    exactly, so the usual fold removes both affines at once (or keeps the site as it is)."""
    records = read_records(model)
    changed = False
    for c in containers(model):
        for r in records:
            a = r.get("act_output")
            if not a or r.get("graph") != c.path or r.get("form") != "subgraph" or np.any(r.get("slope", 0.0)):
                continue
            chain = _finetune_chain(c, a, base_dir)
            if chain is None:
                continue
            f, g0, g1 = chain
            slope = g1 - g0  # g(f) = slope·f + g0, elementwise
            if np.any(slope == 0):
                continue
            s0, h0 = _array(r, "scale", 1.0), _array(r, "shift", 0.0)
            r["act_output"], r["scale"], r["shift"] = f, _jsonable(s0 * slope), _jsonable((h0 - g0) / slope)
            changed = True
    if changed:
        replace_records(model, records)


def _finetune_chain(c: Container, a: str, base_dir: str | None) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(f, g(0), g(1)) when ``a`` is computed from the value f by finetune's elementwise affine nodes g."""
    nodes: list[tuple[onnx.NodeProto, int]] = []  # each node and the position of the chain's value in its inputs
    value = a
    while True:
        n = c.producer.get(value)
        if n is None or n.op_type not in _AFFINE_OPS or not any(_FINETUNE_MARK in x for x in (n.name, *n.input)):
            break
        free = [i for i, x in enumerate(n.input) if const_value(c, x, base_dir) is None]
        if len(free) != 1 or len(c.consumers.get(n.input[free[0]], ())) != 1:
            return None
        nodes.append((n, free[0]))
        value = n.input[free[0]]
    if not nodes:
        return None
    ends = []
    for start in (0.0, 1.0):
        v = np.asarray(start, np.float64)
        for n, at in reversed(nodes):
            args = [
                v if i == at else np.asarray(const_value(c, x, base_dir), np.float64) for i, x in enumerate(n.input)
            ]
            v = _AFFINE_OPS[n.op_type](*args)
        ends.append(v)
    return value, ends[0], ends[1]


def _helper_constants(names: set[str]) -> set[str]:
    """The initializers named as this tool names its helpers' constants."""
    return {n for n in names if HELPER_MARK in n}


def _fuse_back(s: Site, y: str) -> None:
    """A site the rewrite split out of an ONNX Runtime fused op (its input is the ``__normact_pre`` value) becomes
    that fused op again once folded: the layer and the plain activation, one node as the model had it."""
    if not s.input.endswith(FUSED_PRE):
        return
    c = s.container
    layer, root = c.producer.get(s.input), c.producer.get(y)
    if layer is None or root is None or s.input in c.outputs:
        return
    act, reads = upstream(c, root, s.input)
    ids = {id(n) for n in act}
    inner = {o for n in act for o in n.output if o != y}
    if any(id(u) not in ids for v in (s.input, *inner) for u in c.consumers.get(v, ())) or inner & c.outputs:
        return
    if any(r not in c.initializers and getattr(c.producer.get(r), "op_type", "") != "Constant" for r in reads):
        return
    fused = fuse_back(layer, s.kind, act, y)
    if fused is None:
        return
    c.remove(act)
    c.replace(layer, [fused])
    c.drop_value_info({s.input, *inner})


def _refresh_input(s: Site) -> None:
    """The site's input as its nodes read it now: folding an earlier site may have dropped the restore
    ``Mul``/``Add`` that ``--preserve-function`` put in front of it, and renamed what it reads."""
    if any(s.input in n.input for n in s.nodes):
        return
    c = s.container
    made = {o for n in s.nodes for o in n.output}
    reads = {
        i
        for n in s.nodes
        for i in n.input
        if i and i not in made and i not in c.initializers and getattr(c.producer.get(i), "op_type", "") != "Constant"
    }
    if len(reads) == 1:
        s.input = reads.pop()


def _fold_one(s: Site, base_dir: str | None, fresh: Callable[[str], str], padding: Padding, elem: int) -> FoldOutcome:
    rec = s.normalized or {}
    scale, shift, slope = _array(rec, "scale", 1.0), _array(rec, "shift", 0.0), _array(rec, "slope", 0.0)
    subgraph = s.root.domain != NORM_DOMAIN
    y = rec.get("output", s.output) if subgraph else s.output
    outcome = FoldOutcome(s, "kept", output=y)
    if np.any(slope != 0):
        outcome.reason = "slope ≠ 0 (zeta-zero/ratio variant): the linear term needs the pre-activation"
        return outcome
    if np.any(scale == 0):
        outcome.reason = "scale is 0"
        return outcome
    if max(scale.ndim, shift.ndim) > 0 and sum(d > 1 for d in np.broadcast_shapes(scale.shape, shift.shape)) > 1:
        outcome.reason = "constants vary along more than one axis"
        return outcome
    c = s.container
    tail = _tail(c, s.output, y) if subgraph else []
    if isinstance(tail, Refusal):
        outcome.reason = tail.reason
        return outcome
    # 1. forward when nothing is inserted (the site stays the exporter's op, e.g. Relu that ORT fuses into Gemm);
    # 2. backward into the producing layer (free whatever the consumers are); 3. forward with one op inserted
    plan = plan_absorb(c, y, scale, -scale * shift, base_dir, fresh, FREE, residual=True)
    if isinstance(plan, Refusal):
        backward = _plan_backward(s, scale, shift, y, base_dir, fresh, elem)
        if isinstance(backward, _Backward):
            backward.plan()
            c.replace(s.root, backward.nodes)
            c.remove([*backward.drop, *tail])
            if subgraph:
                c.drop_value_info({s.output, *(o for n in (*backward.drop, *tail) for o in n.output if o != y)})
            outcome.action, outcome.into = "folded", "producer"
            return outcome
        plan = plan_absorb(c, y, scale, -scale * shift, base_dir, fresh, padding, residual=True)
        if isinstance(plan, Refusal):
            outcome.reason = plan.reason if backward is None else f"{plan.reason}; backward: {backward.reason}"
            return outcome
    plan()
    if subgraph:  # the exporter's own op writes the normalized name again; the affine tail goes
        root = onnx.NodeProto()
        root.CopyFrom(s.root)
        root.output[0] = y
        c.replace(s.root, [root])
        c.remove(tail)
        c.drop_value_info({s.output, *(o for n in tail for o in n.output if o != y)})
    else:
        c.replace(s.root, _plain_nodes(s, elem, y))
    outcome.action, outcome.into = "folded", "consumers"
    return outcome


@dataclass
class _Backward:
    """A decided backward fold: the producer's plan, the nodes replacing the site's root (writing
    ``y``), and the site's other nodes, which go."""

    plan: Plan
    nodes: list[onnx.NodeProto]
    drop: list[onnx.NodeProto]


def _plan_backward(
    s: Site,
    scale: np.ndarray,
    shift: np.ndarray,
    y: str,
    base_dir: str | None,
    fresh: Callable[[str], str],
    elem: int,
) -> _Backward | Refusal | None:
    """Fold into the layer computing the site's input, or why not.

    None: the activation is neither a clip of its input nor (with shift 0) homogeneous.
    """
    act = s.activation
    params = act.with_defaults(s.params)
    bounds = act.clip_bounds(params) if act.clip_bounds is not None else None
    homogeneous = act.homogeneous and not np.any(shift != 0)
    if bounds is None and not homogeneous:
        return None
    if np.any(scale <= 0):
        return Refusal("the scale is not positive")
    c = s.container
    ids = {id(n) for n in s.nodes}
    if s.input in c.outputs or any(id(u) not in ids for u in c.consumers.get(s.input, ())):
        return Refusal("the layer output it reads is also used elsewhere")
    if scale.size > 1 or shift.size > 1:  # per-channel: along a Conv's output channels (axis 1 of NCHW…)
        layer = c.producer.get(s.input)
        w = const_value(c, layer.input[1], base_dir, limit=None) if layer is not None and len(layer.input) > 1 else None
        if layer is None or layer.op_type != "Conv" or w is None or w.ndim < 3:
            return Refusal("per-channel constants fold backward only into a Conv")
        spatial = (1,) * (w.ndim - 2)
        if any(
            v.size > 1 and v.shape not in ((w.shape[0], *spatial), (1, w.shape[0], *spatial)) for v in (scale, shift)
        ):
            return Refusal("per-channel constants are not laid out along the Conv's output channels")
    dtype = helper.tensor_dtype_to_np_dtype(elem) if elem else np.dtype(np.float32)
    if homogeneous or bounds is None:  # s·f(x) = f(s·x): the producer takes the scale, the site is plain f
        plan = plan_produce(c, s.input, scale, 0.0, base_dir, fresh)
        if isinstance(plan, Refusal):
            return plan
        if s.root.domain == NORM_DOMAIN:
            return _Backward(plan, _plain_nodes(s, elem, y), [])
        root = onnx.NodeProto()
        root.CopyFrom(s.root)
        root.output[0] = y
        return _Backward(plan, [root], [])
    lo_v, hi_v = (scale * (b - shift) if np.isfinite(b) else np.asarray(b, np.float64) for b in bounds)
    if not all(np.all(v == np.ravel(v)[0]) for v in (lo_v, hi_v)):
        return Refusal("per-channel constants give per-channel bounds (Clip takes scalars)")
    lo, hi = float(np.ravel(lo_v)[0]), float(np.ravel(hi_v)[0])
    if c.opset < 6:
        return Refusal(f"opset {c.opset} has no Clip with these bounds")
    plan = plan_produce(c, s.input, scale, -scale * shift, base_dir, fresh)
    if isinstance(plan, Refusal):
        return plan
    name = s.root.name or None
    drop = [*s.nodes[:-1], *s.const_nodes]  # the site is one new node now
    if lo == 0.0 and hi == np.inf:
        return _Backward(plan, [helper.make_node("Relu", [s.input], [y], name=name)], drop)
    if c.opset < 11:
        big = float(np.finfo(np.float32).max)
        clip = helper.make_node("Clip", [s.input], [y], name=name, min=max(lo, -big), max=min(hi, big))
        return _Backward(plan, [clip], drop)
    inputs = [s.input, "", ""]
    for i, (v, tag) in enumerate(((lo, "min"), (hi, "max")), start=1):
        if np.isfinite(v):
            inputs[i] = fresh(f"{y}_normact_{tag}")
            c.add_constant(inputs[i], np.asarray(v, dtype=dtype), s.root)
    while inputs[-1] == "":
        inputs.pop()
    return _Backward(plan, [helper.make_node("Clip", inputs, [y], name=name)], drop)
