"""Statistics inside the graph: a copy of the model that returns a few reductions per site.

For every site the copy computes, next to the activation it already has,

    Size(x),  mean(x),  Σ(x − mean x)²,  mean(f),  Σ(f − mean f)²,  Σ f'(x)²

(f'(x) from the catalogue's ``derivative_body``), reduced over the whole tensor or
over every axis but the channel axis (keepdims=1; the numpy side flattens them).
Two interchangeable ways to compute them, with the same outputs and meaning:

* fused (when the kernel library is registered): one ``ai.normact::<Op>Stats``
  node per site reads x and f once and returns all six (count as int64, the rest
  float64 from double accumulators); f' from the library's ``df`` in
  ``normact_math.h``. Where the library computes ONNX Runtime's own f bit for
  bit (checked against the installed runtime, :mod:`.ort_f`) the node reads x
  alone: the same statistics without the read of f and its layout reorder.
  Sites whose parameters are tensors (per-channel PRelu) or whose type the
  library lacks (double) use the standard ops.
* standard ops, written by :class:`.stats_body.StatsBody` (shared with training):
  about six float32 passes over each tensor; runs on any ONNX runtime.

``NORMACT_FUSED_STATS=0`` forces the standard ops. Only these small tensors leave
ONNX Runtime, so memory does not depend on the activations' size or on the number
of batches. Per-batch centring keeps the variance free of cancellation.

Sites in If branches and Loop/Scan bodies are hoisted: each statistic becomes an
extra output of the body and of its If/Loop/Scan node (a Loop/Scan stacks one
record per iteration; the other If branch returns empty records, n = 0), up to
the main graph. Sites inside model-local functions cannot return values and are
reported as not calibratable.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..catalogue import NORM_DOMAIN, NORM_DOMAIN_VERSION
from ..graph import Container, attr_value, unique_namer
from ..passes.find import Site, find_sites
from ..passes.unfuse import split_fused_sites
from ..runtime.library import info_at, kernel_library
from ..streaming import Moments, merge_cross
from ..valuetypes import FLOAT_TYPES, infer_value_types
from .insitu import Normalizer, batch_normalized, fused_normalized, fused_rule
from .ort_f import computes_ort_f, insitu_from_x
from .stats_body import StatsBody

STAT_NAMES = ("size", "x_mean", "x_ss", "f_mean", "f_ss", "d_ss")
CROSS = "xf_ss"  # Σ (x − mean x)(f − mean f): only when the static variants with a linear term need it
CHANNEL_FIRST_OPS = {"Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "MaxPool", "AveragePool"}
NOT_FLOAT = "pre-activation is not a floating-point tensor"
HOISTABLE = ("If", "Loop", "Scan")
FUSED_ENV = "NORMACT_FUSED_STATS"  # "0": standard ops even when the library has the statistics ops
FUSED_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def fused_stats_suffix() -> str | None:
    """The library's statistics-op suffix (``NormRelu`` + suffix) when calibration can use them, else None."""
    if os.environ.get(FUSED_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    lib = kernel_library()
    if lib is None:
        return None
    try:
        return info_at(lib).get("stats_suffix") or None
    except (OSError, AttributeError, ValueError):
        return None


def fused_insitu_op() -> str | None:
    """The library's in-situ normalization op (``NormInSitu``) when calibration can use it, else None."""
    lib = kernel_library() if fused_stats_suffix() is not None else None
    if lib is None:
        return None
    try:
        return info_at(lib).get("insitu_op") or None
    except (OSError, AttributeError, ValueError):
        return None


@dataclass
class Probe:
    """Where one site's statistics come out of the instrumented model."""

    site: Site
    depth: int
    outputs: dict[str, str]  # statistic -> main-graph output name
    channel_axis: int | None
    channel_shape: list[int]
    fused: bool = False  # statistics from one ai.normact <Op>Stats node

    def read(self, values: dict[str, np.ndarray]) -> tuple[Moments, Moments, np.ndarray, np.ndarray | None]:
        """One run's records (several when a Loop stacked them), merged into this batch's moments.

        Returns the moments of x and f, the mean of f'², and the x·f co-moment (None when not measured).
        """
        size = np.asarray(values[self.outputs["size"]], dtype=np.float64).reshape(-1)
        names = [k for k in (*STAT_NAMES[1:], CROSS) if k in self.outputs]
        arrays = {k: np.asarray(values[self.outputs[k]], dtype=np.float64) for k in names}
        x, f = Moments.empty(0), Moments.empty(0)
        d2_sum = xf = None
        for i in np.flatnonzero(size > 0):  # n = 0: an If branch that did not run, or an empty tensor
            rec = {k: v.reshape(size.size, -1)[i] for k, v in arrays.items()}
            n = np.full(rec["x_mean"].shape, size[i] / rec["x_mean"].size)
            xi, fi = Moments(n, rec["x_mean"], rec["x_ss"]), Moments(n, rec["f_mean"], rec["f_ss"])
            if x.n.size == 0:  # the first record (usually the only one) needs no merge
                x, f, d2_sum, xf = xi, fi, rec["d_ss"], rec.get(CROSS)
                continue
            if xf is not None:
                xf = merge_cross(x, f, xf, xi, fi, rec[CROSS])
            x, f = x.merge(xi), f.merge(fi)
            d2_sum = d2_sum + rec["d_ss"]
        if d2_sum is None:
            return x, f, np.zeros(0), None
        return x, f, d2_sum / np.where(x.n > 0, x.n, 1.0), xf


@dataclass
class Instrumented:
    model: onnx.ModelProto
    probes: list[Probe]
    skipped: dict[str, str]  # site output -> reason it has no statistics
    sites: list[Site]
    fused: bool = False  # whether the library's statistics ops were used (for some or all sites)
    in_situ: list[str] = field(default_factory=list)  # sites normalized with batch statistics in the copy
    computed_f: list[str] = field(default_factory=list)  # sites whose statistics op computes ORT's f from x (ort_f)

    @property
    def output_names(self) -> list[str]:
        return [name for p in self.probes for name in p.outputs.values()]


def channel_axis_for(site: Site, rank: int | None) -> int | None:
    """The channel axis of a site's tensor: 1 for images (rank ≥ 4) and conv-like producers, else the last."""
    if rank is None or rank < 2:
        return None
    producer = site.container.producer.get(site.input)
    if rank >= 4 or (producer is not None and producer.op_type in CHANNEL_FIRST_OPS):
        return 1
    return rank - 1


def instrument(
    model: onnx.ModelProto,
    base_dir: str | None,
    per_channel: bool = False,
    fused: bool | None = None,
    normalize: Normalizer | None = None,
    selected: Callable[[Site], bool] | None = None,
    fused_insitu: bool = True,
    ort_f: bool = True,
) -> Instrumented:
    """A copy of ``model`` with statistics outputs for every calibratable site (the input is not modified).

    ``fused``: use the kernel library's statistics ops (None: when the library has them and
    ``NORMACT_FUSED_STATS`` is not 0; False: standard ops only); the copy then needs the
    library registered to run. ``normalize``: in-situ calibration (:mod:`.insitu`): the sites
    ``selected`` accepts (all calibratable ones when None) pass this batch's
    normalized value on to the rest of the network instead of the raw activation;
    ``fused_insitu``: a float32 site with fused statistics is normalized by the library's
    ``NormInSitu`` op when it has one (same bits as the standard-op graph; False: the graph).
    ``ort_f``: a fused statistics op reads x alone where the library computes ONNX Runtime's CPU f bit
    for bit (:mod:`.ort_f`; False: every op reads f, as a run whose activations are not on the CPU needs).
    """
    suffix = fused_stats_suffix() if fused is None or fused else None
    if fused and suffix is None:
        raise ValueError("fused statistics need the kernel library with statistics ops")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    split_fused_sites(m, base_dir)  # ONNX Runtime's fused ops: the pre-activation must exist to be measured
    sites = find_sites(m, base_dir)
    types = infer_value_types(m)
    fresh = unique_namer(m)
    hoister = _Hoister(fresh)
    probes: list[Probe] = []
    skipped: dict[str, str] = {}
    in_situ: list[str] = []
    computed_f: list[str] = []
    cache: dict[tuple[int, str, int | None], dict[str, str]] = {}  # (container, x, axis): x statistics already built
    cross = normalize is not None and normalize.needs_cross
    insitu_op = fused_insitu_op() if suffix is not None and fused_insitu and normalize is not None else None
    for depth, site in enumerate(sites):
        why = _not_calibratable(site, types)
        if why:
            skipped[site.output] = why
            continue
        shape = types.shape.get(site.input)
        rank = len(shape) if shape is not None else None
        axis = channel_axis_for(site, rank) if per_channel else None
        channels = shape[axis] if axis is not None and shape is not None else None
        if per_channel and axis is None:
            skipped[site.output] = "per-channel statistics need the pre-activation's rank (shape inference gave none)"
            continue
        elem = types.elem_type(site.input)
        normalizer = normalize if normalize is not None and (selected is None or selected(site)) else None
        f = site.output
        if normalizer is not None:  # the raw activation gets a new name; its old name becomes the normalized value
            f = fresh(f"{site.output}__normact_raw")
            site.container.set_output(site.root, 0, f)
            in_situ.append(site.output)
        fused_suffix = suffix if suffix is not None and _fusable(site, elem) else None
        use_fused = fused_suffix is not None
        b = StatsBody(site.container.opset, fresh(f"{site.name}/normact_stats") + "/", TensorProto.FLOAT, {}, False)
        if fused_suffix is not None:
            read_f = not (ort_f and computes_ort_f(site, fused_suffix))
            if not read_f:
                computed_f.append(site.output)
            local = _fused_statistics(site, f if read_f else None, axis, fused_suffix, fresh, b)
        else:
            local = _site_statistics(site, f, elem, rank, axis, fresh, cache, b)
        axes = None if axis is None else [a for a in range(rank or 0) if a != axis]
        stat_elem = TensorProto.DOUBLE if use_fused else TensorProto.FLOAT
        if cross:
            local[CROSS] = _cross_statistic(b, site.input, f, elem, local, stat_elem, axes)
            if stat_elem != TensorProto.FLOAT:  # one element type for every hoisted statistic
                local[CROSS] = b.op("Cast", local[CROSS], to=stat_elem)
        drop_raw = False
        if normalizer is not None:
            if insitu_op and use_fused and elem == TensorProto.FLOAT and fused_rule(normalizer) is not None:
                from_x = None
                if site.output in computed_f and insitu_from_x():
                    params = {k: float(v) for k, v in site.activation.with_defaults(site.params).items()}
                    from_x = (site.input, site.activation.op_name, params)
                fused_normalized(b, local, f, site.output, normalizer, insitu_op, axis, from_x)
                drop_raw = from_x is not None
            else:
                batch_normalized(b, local, site.input, f, site.output, elem, normalizer, stat_elem)
        c = site.container
        c.insert_after(site.root, b.nodes)  # right after the site: the normalized value feeds the layers after it
        if drop_raw:  # nothing reads the raw activation now: ORT need not compute it
            _drop_raw_activation(site, f)
        if rank is None:
            keep_shape = [1]
        else:
            keep_shape = [channels if d == axis and isinstance(channels, int) else 1 for d in range(rank)]
        # the statistics' shape as far as it is known (a symbolic channel count stays symbolic), for Scan bodies
        stat_shape: list[int | str | None] | None = None
        if rank is not None:
            stat_shape = [channels if d == axis else 1 for d in range(rank)]
        outs = hoister.hoist(c, local, keep_shape, stat_elem, stat_shape)
        channel_shape = [] if axis is None or rank is None else [-1] + [1] * (rank - 1 - axis)
        probes.append(Probe(site, depth, outs, axis, channel_shape, use_fused))
    any_fused = any(p.fused for p in probes)
    if any_fused and not any(o.domain == NORM_DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(NORM_DOMAIN, NORM_DOMAIN_VERSION))
    return Instrumented(m, probes, skipped, sites, any_fused, in_situ, computed_f)


def _fusable(site: Site, elem: int) -> bool:
    """Whether the library's statistics op computes this site: a float type it has, scalar parameters."""
    if elem not in FUSED_TYPES:
        return False
    params = site.activation.with_defaults(site.params)
    return all(np.ndim(v) == 0 for v in params.values())


def _fused_statistics(
    site: Site, f: str | None, axis: int | None, suffix: str, fresh: Callable[[str], str], b: StatsBody
) -> dict[str, str]:
    """One ``<Op>Stats`` node reading x and f (the site's raw output; None: x alone, the op computes ONNX
    Runtime's f): statistic -> local value name."""
    name = fresh(f"{site.name}/normact_stats")
    outs = {stat: fresh(f"{name}/{stat}") for stat in STAT_NAMES}
    params = site.activation.with_defaults(site.params)
    attrs: dict[str, Any] = {k: float(v) for k, v in params.items()}
    if axis is not None:
        attrs["axis"] = axis
    node = helper.make_node(
        site.activation.op_name + suffix,
        [site.input] if f is None else [site.input, f],
        [outs[stat] for stat in STAT_NAMES],
        name=name,
        domain=NORM_DOMAIN,
        **attrs,
    )
    b.nodes.append(node)
    return outs


def _drop_raw_activation(site: Site, f: str) -> None:
    """Remove the site's nodes once nothing reads the raw activation ``f`` (every in-situ reader computes it
    from x): ONNX Runtime would otherwise still compute it, and reorder it out of its NCHWc layout."""
    c = site.container
    if c.consumers.get(f) or f in c.outputs:
        return
    dead = True
    while dead:
        dead = False
        for node in list(site.nodes):
            if _placed(c, node) and not any(c.consumers.get(o) or o in c.outputs for o in node.output if o):
                c.remove([node])
                dead = True


def _placed(c: Container, node: onnx.NodeProto) -> bool:
    try:
        c.position(node)
    except ValueError:
        return False
    return True


def _cross_statistic(
    b: StatsBody, x: str, f: str, elem: int, local: dict[str, str], stat_elem: int, axes: list[int] | None
) -> str:
    """Σ (x − mean x)(f − mean f), keepdims like the other statistics, as float32."""

    def centred(v: str, mean: str) -> str:
        mean = mean if stat_elem == TensorProto.FLOAT else b.op("Cast", mean, to=TensorProto.FLOAT)
        return b.op("Sub", b.to_float(v, elem), mean)

    product = b.op("Mul", centred(x, local["x_mean"]), centred(f, local["f_mean"]))
    return b.reduce("ReduceSum", product, axes)


def _not_calibratable(site: Site, types: Any) -> str | None:
    if site.normalized is not None:
        return "already normalized"
    if site.activation.derivative_body is None:
        return f"{site.kind} has no derivative body in the catalogue"
    if site.container.function is not None:
        return "inside a model-local function (its values cannot be returned); inline the function to calibrate it"
    scope = site.container
    while scope.parent is not None:
        owner, _ = _body(scope)
        if owner.op_type not in HOISTABLE:
            return f"inside a {owner.op_type} body (only If, Loop and Scan bodies can return statistics)"
        scope = scope.parent
    elem = types.elem_type(site.input)
    if elem not in FLOAT_TYPES:
        return NOT_FLOAT
    return None


def _site_statistics(
    site: Site,
    f: str,
    elem: int,
    rank: int | None,
    axis: int | None,
    fresh: Callable[[str], str],
    cache: dict[tuple[int, str, int | None], dict[str, str]],
    b: StatsBody,
) -> dict[str, str]:
    """Reduction nodes for one site, appended to ``b``; returns statistic -> local value name."""
    c = site.container
    b.params = site.activation.with_defaults(site.params)
    axes = None if axis is None else [a for a in range(rank or 0) if a != axis]

    def centred(v: str) -> tuple[str, str]:
        mean = b.reduce("ReduceMean", v, axes)
        return mean, b.reduce("ReduceSumSquare", b.op("Sub", v, mean), axes)

    key = (id(c), site.input, axis)
    x = b.to_float(site.input, elem)
    if key in cache:
        out = dict(cache[key])
    else:
        out = {"size": b.op("Size", site.input)}
        out["x_mean"], out["x_ss"] = centred(x)
        cache[key] = dict(out)
    out["f_mean"], out["f_ss"] = centred(b.to_float(f, elem))
    out["d_ss"] = b.reduce("ReduceSumSquare", b.derivative(site, x), axes)
    return out


class _Hoister:
    """Makes values of a (nested) subgraph available as main-graph outputs, through the containers' edits."""

    def __init__(self, fresh: Callable[[str], str]) -> None:
        self.fresh = fresh
        self.elem: int = TensorProto.FLOAT
        self.done: dict[str, str] = {}  # local value -> main-graph output (sites sharing x share its statistics)

    def hoist(
        self,
        c: Container,
        values: dict[str, str],
        keep_shape: list[int],
        elem: int = TensorProto.FLOAT,
        shape: list[int | str | None] | None = None,
    ) -> dict[str, str]:
        """``elem``: the element type of the statistics other than size (int64); ``shape``: theirs, when known."""
        new = {stat: name for stat, name in values.items() if name not in self.done}
        if new:
            self.elem = elem
            out = self._hoist(c, new, keep_shape, shape)
            self.done.update({new[stat]: out[stat] for stat in new})
        return {stat: self.done[name] for stat, name in values.items()}

    def _hoist(
        self, c: Container, values: dict[str, str], keep_shape: list[int], shape: list[int | str | None] | None
    ) -> dict[str, str]:
        stacked = 0  # the Loop/Scan levels the values have passed, each stacking them per iteration
        while c.parent is not None:
            owner, _ = _body(c)
            if owner.op_type == "If":
                values = self._through_if(c, owner, values, keep_shape)
            else:
                values = self._through_loop(c, owner, values, shape, stacked)
                stacked += 1
            c = c.parent
        for stat, name in values.items():
            c.add_output(_value_info(name, stat == "size", self.elem))
        return dict(values)

    def _through_loop(
        self,
        c: Container,
        owner: onnx.NodeProto,
        values: dict[str, str],
        shape: list[int | str | None] | None,
        stacked: int,
    ) -> dict[str, str]:
        """New scan outputs: the body appends them last, the node stacks them per iteration.

        ONNX Runtime runs a Scan only when every body output has a shape (a Loop does without): the
        statistics declare theirs there, size one fewer dimension (a scalar per record). Shape
        inference cannot give it when a statistic comes from the library's op, which has none. Each
        Loop/Scan the values passed on the way adds a leading dimension of unknown length.
        """
        parent = _parent(c)
        out = {}
        for stat, name in values.items():
            dims: list[int | str | None] | None = None
            if owner.op_type == "Scan" and shape is not None:
                dims = [None] * stacked + ([] if stat == "size" else shape)
            c.add_output(_value_info(name, stat == "size", self.elem, dims))
            out[stat] = self.fresh(f"{name}__iters")
            parent.set_output(owner, len(owner.output), out[stat])
        if owner.op_type == "Scan":
            for attr in ("scan_output_axes", "scan_output_directions"):
                given = attr_value(owner, attr)
                if given is not None:  # absent: every scan output stacks along axis 0, forwards
                    parent.set_attribute(owner, attr, [*given, *[0] * len(values)])
        return out

    def _through_if(
        self, c: Container, owner: onnx.NodeProto, values: dict[str, str], keep_shape: list[int]
    ) -> dict[str, str]:
        """Both branches must return the same outputs: the other one returns empty records (n = 0)."""
        parent = _parent(c)
        branch = c.path.rsplit(".", 1)[-1]  # graph.containers names a body <owner>.<attribute>
        other_name = "else_branch" if branch == "then_branch" else "then_branch"
        other = next(k for k in parent.children if k.owner is owner and k.path.rsplit(".", 1)[-1] == other_name)
        out = {}
        for stat, name in values.items():
            is_size = stat == "size"
            empty = self.fresh(f"{name}__empty")
            dtype = helper.tensor_dtype_to_np_dtype(self.elem)
            value = np.zeros((), np.int64) if is_size else np.zeros(keep_shape, dtype)
            tensor = numpy_helper.from_array(value, empty)
            other.insert(len(other.nodes), [helper.make_node("Constant", [], [empty], name=empty, value=tensor)])
            c.add_output(_value_info(name, is_size, self.elem))
            other.add_output(_value_info(empty, is_size, self.elem))
            out[stat] = self.fresh(f"{name}__if")
            parent.set_output(owner, len(owner.output), out[stat])
        return out


def _parent(c: Container) -> Container:
    if c.parent is None:
        raise ValueError(f"{c.path} is the main graph, not a body")
    return c.parent


def _body(c: Container) -> tuple[onnx.NodeProto, onnx.GraphProto]:
    """The If/Loop/Scan node holding a nested container and the body graph (every nested container has both)."""
    if c.owner is None or c.graph is None:
        raise ValueError(f"{c.path} is not the body of a node")
    return c.owner, c.graph


def _value_info(
    name: str, is_size: bool, elem: int = TensorProto.FLOAT, shape: list[int | str | None] | None = None
) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64 if is_size else elem, shape)
