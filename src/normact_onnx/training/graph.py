"""The trainable base model: every selected site rewritten for ONNX Runtime training.

Only ``onnx`` and the catalogue are needed here (no onnxruntime-training), so
the graph can be built, inspected and run forward in the regular environment.

An ANAct site (docs/math.md §2.3) becomes, in gradient-safe standard ops::

    f  = catalogue body(x)                                   (literal params)
    y  = (λ_i + 0.3·tanh(α_i)) · (f − μ_i)
    s_i = [mean f, mean f², mean f'², mean x, var x]         (batch statistics)

λ and μ are graph inputs (``normact_lambda``, ``normact_mu``, one entry per
site): the host loop owns the gated running update, so they carry no gradient,
like batch-norm statistics. α is one trainable initializer (``normact_alpha``,
one entry per site). The statistics of all sites leave the graph as one small
output (``normact_stats``, shape ``[sites·5]``), so a training step returns a
few floats per site and never raw activations.

A static site is the literal normalized form (fixed constants, nothing fed).

Why one module past 500 lines: the sites' training forms (ANAct, static, preserved with its compensation and
the helpers that follow the factors) and the choice of what trains are written into one graph in one pass; the
gradient-safety rewrites of the rest of the graph are :mod:`.prepare`, the export :mod:`.export`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, helper, numpy_helper

from .. import methods
from ..calibration.stats_body import StatsBody
from ..catalogue import CATALOGUE, NORM_DOMAIN
from ..errors import NormactError
from ..graph import Container, attr_value, const_value, default_opset, remove_unused
from ..methods.static import Affine
from ..moments import gaussian_moments
from ..outcome import Refusal
from ..passes.affine import is_helper
from ..passes.find import Site, find_sites
from ..passes.forms import literal_site
from ..policy import select, static_constants
from ..provenance import SiteRecord
from ..selection import SiteSelection
from ..valuetypes import FLOAT_TYPES, infer_value_types
from .prepare import Preparation, is_weight_input, lift_weight_constants, prepare

LAMBDA_INPUT = "normact_lambda"
MU_INPUT = "normact_mu"
ALPHA_PARAM = "normact_alpha"
STATS_OUTPUT = "normact_stats"
STATS_FIELDS = ("mean_f", "mean_f2", "mean_d2", "mean_x", "var_x")
ALPHA_AMPLITUDE = 0.3  # y = (λ + 0.3·tanh α)(f − μ): the paper's bounded learnable correction
MAX_TRAIN_IR = 10  # onnxruntime-training 1.19 reads IR ≤ 10
MAX_TRAIN_OPSET = 21  # … and opsets ≤ 21
SiteMethod = methods.Method  # how one site trains: the methods rewrite and calibrate offer (defined once there)
Method = Literal[SiteMethod, "none"]  # "none": fine-tune the model as it is
METHODS: tuple[Method, ...] = get_args(Method)


@dataclass
class PreserveHelper:
    """Nodes ``rewrite --preserve-function`` wrote after a site, tied to its factors S, H (docs/math.md §2.7).

    ``pad``: a ``Pad`` whose fill is the site's output at f = 0 (−S·H); ``restore``: the ``Mul`` (1/S) and/or
    ``Add`` (H) that give a gate f back; ``shift``: a depthwise 1×1 ``Conv`` (weight 1) adding S·H in front of
    a ConvTranspose. ``outputs``: each node's output, in order (the same names in the training graph and in
    the model the export starts from).
    """

    kind: Literal["pad", "restore", "shift"]
    outputs: list[str]
    ops: list[str]


@dataclass
class TrainSite:
    """One site of the training graph: where it came from and how it is trained."""

    index: int  # position in normact_lambda / normact_mu / normact_alpha / normact_stats (ANAct only)
    name: str
    kind: str
    params: dict[str, Any]
    output: str  # the site's output value (same name as in the input model)
    method: SiteMethod
    affine: Affine | None = None  # static constants
    prior: SiteRecord | None = None  # record of an earlier normalization (function form)
    gaussian: tuple[float, float, float] = (1.0, 1.0, 0.0)  # ρ, ρ', μ for x ~ N(0, 1): the running stats' start
    input: str = ""  # the pre-activation value
    primed: bool = False  # the running statistics start at an earlier normalization's constants (prior_start)
    # (s₀, h₀) of a compensated site (docs/math.md §2.7): its consumers read s₀·(y/λ + μ − h₀), so moving λ, μ
    # leaves the function as it is; None: the site's output goes to its consumers as it is
    reference: tuple[float, float] | None = None
    # preserve's helpers after a compensated site, kept at the site's current factors (docs/math.md §2.7)
    helpers: list[PreserveHelper] = field(default_factory=list)
    tail: tuple[float, float] | None = None  # (s₀, h₀) of a subgraph-form site's literal tail (its helpers read it)

    def as_dict(self) -> dict[str, Any]:
        out = {"index": self.index, "name": self.name, "kind": self.kind, "output": self.output, "method": self.method}
        if self.affine is not None:
            out.update(self.affine.as_dict())
        if self.reference is not None:
            out["reference"] = list(self.reference)
        if self.helpers:
            out["helpers"] = [asdict(h) for h in self.helpers]
        if self.tail is not None:
            out["tail"] = list(self.tail)
        return out


@dataclass
class TrainGraph:
    """The base model for ``generate_artifacts`` and what the host loop needs to drive it."""

    model: onnx.ModelProto
    sites: list[TrainSite]
    output: str  # the model output the loss is computed on
    data_inputs: list[str]
    trainable: list[str]
    method: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (site, why) left as they are
    prepared: Preparation = field(default_factory=Preparation)  # ops rewritten for training, opset raised
    batch: int | None = None  # the batch axis the training graph was fixed to (prepare.fix_input_shapes)

    @property
    def anact_sites(self) -> list[TrainSite]:
        return [s for s in self.sites if s.method == "anact"]

    @property
    def extra_inputs(self) -> list[str]:
        return [LAMBDA_INPUT, MU_INPUT] if self.anact_sites else []


def gaussian_start(kind: str, params: dict[str, Any], centered: bool = False) -> tuple[float, float, float]:
    """ρ, ρ', μ for x ~ N(0, 1) (docs/math.md §2.6 table): the running statistics before the first batch."""
    act = CATALOGUE[kind]
    try:
        m = gaussian_moments(act, 1.0, act.with_defaults(params))
    except Exception:  # per-channel parameters or no closed form: a neutral start, replaced by batch 1
        return 1.0, 1.0, 0.0
    rho = m.v if centered else m.m2
    return float(rho), float(m.d2), float(m.m1)


def prior_start(record: SiteRecord | None) -> tuple[float, float, float] | None:
    """Running statistics that reproduce an earlier normalization's constants at step 0 (or None).

    A site that ``rewrite`` (with ``--preserve-function``: the next layers absorb the inverse) left as
    scale·(f − shift) starts training at exactly that map: ρ = ρ' = 1/scale² gives λ = scale under both
    λ rules, μ = shift. So the step-0 loss of the preserved model is the original model's.
    """
    if not record or "scale" not in record or np.ndim(record["scale"]) or np.ndim(record.get("shift", 0.0)):
        return None  # per-channel constants: no scalar start
    if np.ndim(record.get("slope", 0.0)) or float(record.get("slope", 0.0)) != 0.0:
        return None
    scale = float(record["scale"])
    if not scale > 0:
        return None
    rho = 1.0 / (scale * scale)
    return rho, rho, float(record.get("shift", 0.0))


def _anact_nodes(
    site: Site,
    index: int,
    elem: int,
    opset: int,
    reference: tuple[float, float] | None = None,
    tail: tuple[float, float] | None = None,
) -> tuple[list[onnx.NodeProto], str, tuple[str, str]]:
    """Nodes of one ANAct site (output name kept), the name of its [5] statistics vector, and the names of its
    current gain S and output at f = 0, v₀ = −S·H (what preserve's helpers must follow; see :func:`_follow`).

    With a ``reference`` (s₀, h₀) the site's consumers read z = y·(s₀/λ) + s₀·(μ − h₀) instead of y: the
    compensation written in the same λ, μ the site is fed, so z = s₀·(1 + 0.3·tanh α/λ)·(f − μ) + s₀·(μ − h₀)
    whatever the running update makes of λ and μ (docs/math.md §2.7). ``tail`` (s₀, h₀): a subgraph-form
    site's literal tail s₀·(z − h₀), which the S, v₀ returned include (the helpers read the tail's output).

    The statistics use calibration's :class:`StatsBody`, but as whole-batch means for the host's running
    update rather than calibration's mergeable centred sums (see :mod:`normact_onnx.calibration.stats_body`).
    """
    act = site.activation
    b = StatsBody(opset, f"normact/{index}/", elem, act.with_defaults(site.params), gradient_safe=True)
    x = site.input
    f = act.body(b, x)
    idx = b.ints([index])

    def pick(vector: str) -> str:  # [S] → [1] of this site, cast to the activation's type
        v = b.op("Gather", vector, idx, axis=0)
        return v if elem == TensorProto.FLOAT else b.op("Cast", v, to=elem)

    lam, mu, alpha = pick(LAMBDA_INPUT), pick(MU_INPUT), pick(ALPHA_PARAM)
    scale = b.op("Add", lam, b.op("Mul", b.const(ALPHA_AMPLITUDE), b.op("Tanh", alpha)))
    y = b.op("Mul", b.op("Sub", f, mu), scale)
    factors = ("", "")
    if reference is not None:
        s0, h0 = reference
        gain = b.op("Div", b.const(s0), lam)  # s₀/λ
        offset = b.op("Mul", b.op("Sub", mu, b.const(h0)), b.const(s0))  # s₀·(μ − h₀)
        b.op("Add", b.op("Mul", y, gain), offset)
        b.nodes[-1].output[0] = site.output  # the site keeps its output name: consumers stay untouched
        gain_now = b.op("Mul", scale, gain)  # z = S·f + v₀ with S = s·s₀/λ, v₀ = s₀·(μ − h₀) − S·μ
        zero = b.op("Sub", offset, b.op("Mul", gain_now, mu))
        if tail is not None:  # the tail s₀·(z − h₀) after it
            zero = b.op("Mul", b.op("Sub", zero, b.const(tail[1])), b.const(tail[0]))
            gain_now = b.op("Mul", gain_now, b.const(tail[0]))
        factors = (gain_now, zero)
    else:
        b.nodes[-1].output[0] = site.output

    d = b.derivative(site, x)
    mean_x = b.mean_all(x)
    centred = b.op("Sub", b.op("Reshape", x, b.ints([-1])), mean_x)
    stats = [
        b.mean_all(f),
        b.mean_all(b.op("Mul", f, f)),
        b.mean_all(b.op("Mul", d, d)),
        mean_x,
        b.mean_all(b.op("Mul", centred, centred)),
    ]
    vec = b.op("Concat", *[b.to_float(s) for s in stats], axis=0)
    return b.nodes, vec, factors


# ops that a scalar affine map of their (first) input passes through unchanged: op(a·u + c) = a·op(u) + c
# (a > 0 for the max pools; passes/affine.py looks through the same ones when it writes or folds a map)
_MAP_PRESERVING = (
    "MaxPool", "GlobalMaxPool", "GlobalAveragePool", "ReduceMean", "Identity", "Dropout", "Flatten", "Reshape",
    "Transpose", "Squeeze", "Unsqueeze", "Resize", "Upsample", "Split", "Slice", "Gather", "Expand", "Tile",
    "DepthToSpace", "SpaceToDepth",
)  # fmt: skip


def _close(value: Any, want: float) -> bool:
    v = np.asarray(value, np.float64)
    return v.size > 0 and bool(np.allclose(v, want, rtol=1e-5, atol=1e-12))


def find_preserve_helpers(c: Container, value: str, s0: float, h0: float) -> list[PreserveHelper]:
    """The helpers ``rewrite --preserve-function`` wrote for the site whose output ``value`` is s₀·(f − h₀).

    Looked for among the readers of ``value`` and, through map-preserving ops, of what they compute; a node
    counts only if it is named as this tool names its helpers and its constants are this site's (a Pad fill of
    −s₀·h₀, a restore 1/s₀ then h₀, a shift s₀·h₀): anything else is the model's and trains as it is.
    """
    found: list[PreserveHelper] = []
    todo, seen = [value], set()
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        for n in list({id(n): n for n in c.consumers.get(v, [])}.values()):
            if n.domain not in ("", "ai.onnx") or not n.input:
                continue
            h = _helper_at(c, n, v, s0, h0)
            if h is not None:
                found.append(h)
            elif n.op_type in _MAP_PRESERVING and n.input[0] == v and v not in n.input[1:]:
                todo.extend(o for o in (n.output if n.op_type == "Split" else n.output[:1]) if o)
    return found


def _helper_at(c: Container, n: onnx.NodeProto, v: str, s0: float, h0: float) -> PreserveHelper | None:
    """``n`` (reading ``v``) as one of preserve's helpers of a site at s₀, h₀, or None."""
    if not is_helper(n) or any(o in c.outputs for o in n.output):
        return None

    def const(name: str) -> np.ndarray | None:
        return const_value(c, name) if name else None

    if n.op_type == "Pad" and n.input[0] == v and attr_value(n, "mode", "constant") == "constant":
        if c.opset < 11:
            fill: Any = attr_value(n, "value", 0.0)
        elif (len(n.input) > 3 and n.input[3]) or len(n.input) < 2 or const(n.input[1]) is None:
            return None
        else:
            fill = const(n.input[2]) if len(n.input) > 2 and n.input[2] else 0.0
        return PreserveHelper("pad", [n.output[0]], ["Pad"]) if fill is not None and _close(fill, -s0 * h0) else None
    if n.op_type in ("Mul", "Add") and len(n.input) == 2 and list(n.input).count(v) == 1:
        k = const(n.input[1] if n.input[0] == v else n.input[0])
        if k is None or k.size != 1 or not _close(k, 1 / s0 if n.op_type == "Mul" else h0):
            return None
        chain = [n]
        readers = c.consumers.get(n.output[0], [])
        if n.op_type == "Mul" and len(readers) == 1 and is_helper(readers[0]) and readers[0].op_type == "Add":
            add, out = readers[0], n.output[0]
            if len(add.input) == 2 and list(add.input).count(out) == 1 and add.output[0] not in c.outputs:
                d = const(add.input[1] if add.input[0] == out else add.input[0])
                if d is not None and d.size == 1 and _close(d, h0):
                    chain.append(add)
        if (chain[-1].op_type == "Mul" and h0 != 0) or (chain[0].op_type == "Add" and s0 != 1):
            return None  # half a restore: not this site's
        return PreserveHelper("restore", [x.output[0] for x in chain], [x.op_type for x in chain])
    if n.op_type == "Conv" and n.input[0] == v and len(n.input) == 3 and v not in n.input[1:]:
        w, bias = const(n.input[1]), const(n.input[2])
        if w is None or bias is None or w.ndim < 3 or any(d != 1 for d in w.shape[1:]) or not np.all(w == 1):
            return None
        if int(attr_value(n, "group", 1)) != w.shape[0] or any(attr_value(n, "pads", [0])):
            return None
        if any(s != 1 for s in attr_value(n, "strides", [1])) or attr_value(n, "auto_pad", "NOTSET") != "NOTSET":
            return None
        return PreserveHelper("shift", [n.output[0]], ["Conv"]) if _close(bias, s0 * h0) else None
    return None


def _follow(c: Container, h: PreserveHelper, gain: str, zero: str, prefix: str) -> None:
    """Rewrite helper ``h`` in the training graph so that it follows the site's current S (``gain``) and
    v₀ = −S·H (``zero``): a Pad fills with v₀ (Pad(u − v₀, 0) + v₀: every part has a gradient in both
    backends), a restore computes (u − v₀)/S = f, a shift u − v₀ = S·f. At α = 0 they compute what they did."""
    nodes = [c.producer[o] for o in h.outputs]
    first, last = nodes[0], nodes[-1]
    u = next(i for i in first.input if const_value(c, i) is None) if h.kind == "restore" else first.input[0]
    out = last.output[0]

    def node(op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> onnx.NodeProto:
        name = f"{prefix}{len(new)}"
        new.append(helper.make_node(op, inputs, [output or name], name=name, **attrs))
        return new[-1]

    new: list[onnx.NodeProto] = []
    centred = node("Sub", [u, zero]).output[0]
    if h.kind == "pad":
        pad = onnx.NodeProto()
        pad.CopyFrom(first)
        pad.output[0] = f"{prefix}padded"
        if c.opset < 11:
            pad.input[0] = centred
            for a in pad.attribute:
                if a.name == "value":
                    a.f = 0.0
        else:
            pad.ClearField("input")
            pad.input.extend([centred, first.input[1]])
        new.append(pad)
        node("Add", [pad.output[0], zero], out)
    elif h.kind == "restore":
        node("Div", [centred, gain], out)
    else:
        new[-1].output[0] = out
    c.replace(first, new)
    c.remove(nodes[1:])


def _static_nodes(site: Site, affine: Affine, elem: int, opset: int) -> list[onnx.NodeProto]:
    return literal_site(
        site.activation, site.input, site.output, affine, site.params, elem, f"{site.name}/normact_", True, opset
    )


def _is_main(site: Site) -> bool:
    return site.container.parent is None and site.container.function is None


def trainable_copy(model: onnx.ModelProto, base_dir: str | None) -> onnx.ModelProto:
    """A copy with external weights read in and user functions inlined (their sites become main-graph sites)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if base_dir is not None:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(m, base_dir)
    foreign = [(f.domain, f.name) for f in m.functions if f.domain != NORM_DOMAIN]
    if foreign:
        m = onnx.inliner.inline_selected_functions(m, foreign)
    return m


def _readers(graph: onnx.GraphProto, bodies: bool) -> list[onnx.NodeProto]:
    """The nodes of ``graph``, and with ``bodies`` those of its If/Loop/Scan bodies too (they read outer weights)."""
    out = []
    for n in graph.node:
        out.append(n)
        if bodies:
            for a in n.attribute:
                for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                    out.extend(_readers(g, True))
    return out


def _trainable(model: onnx.ModelProto, freeze: str | None, bodies: bool = False) -> list[str]:
    """Float initializers that are weights (see :data:`WEIGHT_INPUTS`), minus those ``freeze`` matches.

    Everything else, ``Constant`` nodes and shape-computing values included, is frozen: ONNX Runtime
    then never builds a gradient towards it. ``bodies``: weights read inside If/Loop bodies count too
    (the torch backend differentiates through them; ONNX Runtime training has no gradient for them).
    """
    import re

    inits = {t.name: t for t in model.graph.initializer if t.data_type in FLOAT_TYPES}
    pattern = re.compile(freeze) if freeze else None
    weights: set[str] = set()
    for n in _readers(model.graph, bodies):
        if is_helper(n):  # preserve's helpers hold the site's factors (or follow them): never trained apart
            continue
        for pos, name in enumerate(n.input):
            t = inits.get(name)
            if t is None:
                continue
            if is_weight_input(n.op_type, pos, list(t.dims)):
                weights.add(name)
    out = []
    for name in inits:
        if pattern and pattern.search(name):
            continue
        if name == ALPHA_PARAM or name in weights:
            out.append(name)
    return out


def _ancestors(model: onnx.ModelProto, output: str) -> set[str]:
    """Every value ``output`` is computed from (main graph; subgraph bodies count through their node)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    seen: set[str] = set()
    todo = [output]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producers.get(name)
        if node is None:
            continue
        todo.extend(i for i in node.input if i)
        for a in node.attribute:  # outer values read inside If/Loop/Scan bodies
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                todo.extend(i for n in g.node for i in n.input if i)
    return seen


def _check_versions(model: onnx.ModelProto) -> None:
    opset = default_opset(model.opset_import)
    if opset > MAX_TRAIN_OPSET:
        raise NormactError(
            f"model opset {opset} is newer than onnxruntime-training 1.19 supports (≤ {MAX_TRAIN_OPSET}); "
            "re-export the model at a lower opset"
        )


def build_train_graph(
    model: onnx.ModelProto,
    base_dir: str | None = None,
    *,
    method: str = "anact",
    variant: str = "center-scale",
    q: float = 1.0,
    centered_rho: bool = False,
    include: Any = None,
    exclude: Any = None,
    nodes: str | None = None,
    all_sites: bool = False,
    output: str | None = None,
    freeze: str | None = None,
    preserve: bool = False,
    backend: str = "ort",
) -> TrainGraph:
    """Rewrite the sites of ``model`` for training; the input model is not modified.

    ``method``: ``anact`` (adaptive, docs/math.md §2), ``static`` (fixed constants of
    ``variant`` at ``q``) or ``none`` (train the model as it is). Sites that an
    earlier ``rewrite``/``calibrate`` normalized in the function form are
    re-normalized adaptively under ``anact`` and keep their constants otherwise.
    ``preserve`` (the function-preserving path, after ``rewrite --preserve-function``):
    such sites' consumers read the running factors' compensation (:func:`_anact_nodes`),
    so the factors' updates never change the function, and sites no earlier rewrite
    normalized train as they are. ``backend``: ``ort`` checks onnxruntime-training's
    opset limit; ``torch`` has none and also trains weights read inside If/Loop bodies.
    """
    if method not in METHODS:
        raise NormactError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if backend == "ort":
        _check_versions(model)
    m = trainable_copy(model, base_dir)
    outputs = [o.name for o in m.graph.output]
    if output is None:
        output = outputs[0]
    elif output not in outputs:
        raise NormactError(f"--output-name {output!r} is not a model output; outputs: {', '.join(outputs)}")

    lifted = lift_weight_constants(m)
    sites = find_sites(m, base_dir)
    if method == "none":  # nothing new is normalized; an earlier rewrite's Norm sites keep their constants below
        sites = [s for s in sites if s.normalized is not None]
    fixed = static_constants(q, variant)

    def constants(site: Site) -> Affine | Refusal:
        if not _is_main(site):
            return Refusal("inside an If/Loop/Scan body: trained as it is")
        if preserve:
            return Refusal("--preserve-function could not keep its function here: trained as it is")
        return fixed(site) if method == "static" else Affine(1.0, 0.0, 0.0)

    outcomes = select(sites, SiteSelection.parse(include, exclude, nodes, all_sites), constants)
    # function-form sites of earlier rewrites: adaptive under anact, their own constants under static
    own_constants: set[int] = set()  # id(site) of those that keep their constants
    for o in outcomes:
        rec = o.site.normalized
        # the subgraph form (models below IR 8 / opset 12): the plain activation, then literal Sub/Mul; under
        # preserve the activation trains adaptively in front of that tail (reference (1, 0)), the tail stays
        tail = rec is not None and rec.get("act_output") == o.site.output and preserve and method == "anact"
        if (
            o.action == "normalized"
            and rec is not None
            and _is_main(o.site)
            and (o.site.root.domain == NORM_DOMAIN or tail)
        ):
            o.action = "rewritten"
            # under preserve, a site without a scalar start (per-channel constants) keeps its constants; under
            # none every one does (its literal form: the function body's CastLike has no gradient in ORT 1.19)
            if method in ("static", "none") or (preserve and prior_start(rec) is None):
                own_constants.add(id(o.site))
            o.affine = (
                Affine(rec["scale"], rec["shift"], rec["slope"]) if id(o.site) in own_constants else Affine(1, 0, 0)
            )
    types = infer_value_types(m)
    opset = default_opset(m.opset_import)
    train_sites: list[TrainSite] = []
    stats: list[str] = []
    skipped = [(o.site.name, o.reason) for o in outcomes if o.action == "skipped"]
    for o in outcomes:
        if o.action != "rewritten":
            continue
        site = o.site
        c: Container = site.container
        elem = types.elem_type(site.input)
        prior = site.normalized
        if method == "anact" and id(site) not in own_constants:
            index = len(train_sites)
            primed = prior_start(prior)
            reference: tuple[float, float] | None = None
            literal_tail: tuple[float, float] | None = None
            helpers: list[PreserveHelper] = []
            if preserve and primed is not None and prior is not None:
                s0, h0 = float(prior["scale"]), float(prior.get("shift", 0.0))
                subgraph_form = prior.get("act_output") == site.output  # its own tail applies s₀, h₀
                reference = (1.0, 0.0) if subgraph_form else (s0, h0)
                literal_tail = (s0, h0) if subgraph_form else None
                helpers = find_preserve_helpers(c, prior.get("output", site.output), s0, h0)
            new_nodes, vec, (gain, zero) = _anact_nodes(site, index, elem, opset, reference, literal_tail)
            stats.append(vec)
            ts = TrainSite(index, site.name, site.kind, dict(site.params), site.output, "anact", prior=prior)
            ts.reference = reference
            ts.helpers = helpers
            ts.tail = literal_tail
            ts.gaussian = primed or gaussian_start(site.kind, site.params, centered_rho)
            ts.primed = primed is not None
            ts.input = site.input
        else:
            assert o.affine is not None  # a rewritten outcome carries its constants
            new_nodes = _static_nodes(site, o.affine, elem, opset)
            ts = TrainSite(-1, site.name, site.kind, dict(site.params), site.output, "static", o.affine, prior)
        c.replace(site.root, new_nodes)
        c.remove(site.nodes[:-1] + site.const_nodes)
        c.drop_value_info({out for n in site.nodes[:-1] for out in n.output})
        for k, h in enumerate(ts.helpers):
            _follow(c, h, gain, zero, f"normact/{ts.index}/follow{k}/")
        train_sites.append(ts)

    anact = [s for s in train_sites if s.method == "anact"]
    if anact:
        _add_anact_io(m, stats, len(anact))
    if m.functions:  # Norm<Act> functions of sites left alone, and any the rewrite no longer uses
        m = onnx.inliner.inline_local_functions(m)
        del m.functions[:]
    remove_unused(m, domain=NORM_DOMAIN)  # the domain's import, once no node of it is left
    weights = _trainable(
        m, freeze, bodies=backend == "torch"
    )  # read off the ops as exported: prepare() rewrites some into plain ops
    m, prep = prepare(m, base_dir)
    prep.lifted = lifted
    remove_unused(m, initializers=True)
    m.ir_version = min(m.ir_version, MAX_TRAIN_IR)
    initializers = {t.name for t in m.graph.initializer}
    data_inputs = [
        i.name for i in m.graph.input if i.name not in initializers and i.name not in (LAMBDA_INPUT, MU_INPUT)
    ]
    reach = _ancestors(m, output)  # weights the loss cannot see get no gradient (multi-head detectors)
    trainable = [t for t in weights if t in reach]
    return TrainGraph(m, train_sites, output, data_inputs, trainable, method, skipped, prep)


def _add_anact_io(m: onnx.ModelProto, stats: list[str], n: int) -> None:
    g = m.graph
    g.input.extend(
        [
            helper.make_tensor_value_info(LAMBDA_INPUT, TensorProto.FLOAT, [n]),
            helper.make_tensor_value_info(MU_INPUT, TensorProto.FLOAT, [n]),
        ]
    )
    g.initializer.append(numpy_helper.from_array(np.zeros(n, dtype=np.float32), ALPHA_PARAM))
    g.node.append(helper.make_node("Concat", stats, [STATS_OUTPUT], name="normact/stats", axis=0))
    g.output.append(helper.make_tensor_value_info(STATS_OUTPUT, TensorProto.FLOAT, [n * len(STATS_FIELDS)]))
