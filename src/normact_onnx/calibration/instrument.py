"""Statistics inside the graph: a copy of the model that returns a few reductions per site.

For every site the copy computes, next to the activation it already has,

    Size(x),  mean(x),  Σ(x − mean x)²,  mean(f),  Σ(f − mean f)²,  Σ f'(x)²

(f'(x) from the catalogue's ``derivative_body``), reduced over the whole tensor or
over every axis but the channel axis (keepdims=1; the numpy side flattens them),
written by :class:`.stats_body.StatsBody` (shared with training). Only these small
tensors leave ONNX Runtime, so memory does not depend on the activations' size or
on the number of batches. Per-batch centring keeps the variance free of cancellation.

Sites in If branches and Loop/Scan bodies are hoisted: each statistic becomes an
extra output of the body and of its If/Loop/Scan node (a Loop/Scan stacks one
record per iteration; the other If branch returns empty records, n = 0), up to
the main graph. Sites inside model-local functions cannot return values and are
reported as not calibratable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..graph import Container, unique_namer
from ..passes.find import Site, find_sites
from ..types import FLOAT_TYPES, infer_value_types
from .stats import Moments
from .stats_body import StatsBody

STAT_NAMES = ("size", "x_mean", "x_ss", "f_mean", "f_ss", "d_ss")
CHANNEL_FIRST_OPS = {"Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "MaxPool", "AveragePool"}
NOT_FLOAT = "pre-activation is not a floating-point tensor"
HOISTABLE = ("If", "Loop", "Scan")


@dataclass
class Probe:
    """Where one site's statistics come out of the instrumented model."""

    site: Site
    depth: int
    outputs: dict[str, str]  # statistic -> main-graph output name
    channel_axis: int | None
    channel_shape: list[int]

    def read(self, values: dict[str, np.ndarray]) -> tuple[Moments, Moments, np.ndarray]:
        """One run's records (several when a Loop stacked them), merged into this batch's moments."""
        size = np.asarray(values[self.outputs["size"]], dtype=np.float64).reshape(-1)
        arrays = {k: np.asarray(values[self.outputs[k]], dtype=np.float64) for k in STAT_NAMES[1:]}
        x, f = Moments.empty(0), Moments.empty(0)
        d2_sum = None
        for i in np.flatnonzero(size > 0):  # n = 0: an If branch that did not run, or an empty tensor
            rec = {k: v.reshape(size.size, -1)[i] for k, v in arrays.items()}
            n = np.full(rec["x_mean"].shape, size[i] / rec["x_mean"].size)
            xi, fi = Moments(n, rec["x_mean"], rec["x_ss"]), Moments(n, rec["f_mean"], rec["f_ss"])
            if x.n.size == 0:
                x, f, d2_sum = Moments.empty(n.size), Moments.empty(n.size), np.zeros(n.size)
            x, f = x.merge(xi), f.merge(fi)
            d2_sum = d2_sum + rec["d_ss"]
        if d2_sum is None:
            return x, f, np.zeros(0)
        return x, f, d2_sum / np.where(x.n > 0, x.n, 1.0)


@dataclass
class Instrumented:
    model: onnx.ModelProto
    probes: list[Probe]
    skipped: dict[str, str]  # site output -> reason it has no statistics
    sites: list[Site]

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


def instrument(model: onnx.ModelProto, base_dir: str | None, per_channel: bool = False) -> Instrumented:
    """A copy of ``model`` with statistics outputs for every calibratable site (the input is not modified)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    sites = find_sites(m, base_dir)
    types = infer_value_types(m)
    fresh = unique_namer(m)
    hoister = _Hoister(m, fresh)
    probes: list[Probe] = []
    skipped: dict[str, str] = {}
    cache: dict[tuple[int, str, int | None], dict[str, str]] = {}  # (container, x, axis): x statistics already built
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
        local = _site_statistics(site, types.elem_type(site.input), rank, axis, fresh, cache)
        if rank is None:
            keep_shape = [1]
        else:
            keep_shape = [channels if d == axis and isinstance(channels, int) else 1 for d in range(rank)]
        outs = hoister.hoist(site.container, local, keep_shape)
        channel_shape = [] if axis is None else [-1] + [1] * (rank - 1 - axis)
        probes.append(Probe(site, depth, outs, axis, channel_shape))
    return Instrumented(m, probes, skipped, sites)


def _not_calibratable(site: Site, types: Any) -> str | None:
    if site.normalized is not None:
        return "already normalized"
    if site.activation.derivative_body is None:
        return f"{site.kind} has no derivative body in the catalogue"
    if site.container.function is not None:
        return "inside a model-local function (its values cannot be returned); inline the function to calibrate it"
    scope = site.container
    while scope.parent is not None:
        if scope.owner.op_type not in HOISTABLE:
            return f"inside a {scope.owner.op_type} body (only If, Loop and Scan bodies can return statistics)"
        scope = scope.parent
    elem = types.elem_type(site.input)
    if elem not in FLOAT_TYPES:
        return NOT_FLOAT
    return None


def _site_statistics(
    site: Site,
    elem: int,
    rank: int | None,
    axis: int | None,
    fresh: Callable[[str], str],
    cache: dict[tuple[int, str, int | None], dict[str, str]],
) -> dict[str, str]:
    """Append the reduction nodes for one site to its container; return statistic -> local value name."""
    c = site.container
    params = site.activation.with_defaults(site.params)
    b = StatsBody(c.opset, fresh(f"{site.name}/normact_stats") + "/", TensorProto.FLOAT, params, False)
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
    out["f_mean"], out["f_ss"] = centred(b.to_float(site.output, elem))
    out["d_ss"] = b.reduce("ReduceSumSquare", b.derivative(site, x), axes)
    c.nodes.extend(b.nodes)
    return out


class _Hoister:
    """Makes values of a (nested) subgraph available as main-graph outputs."""

    def __init__(self, model: onnx.ModelProto, fresh: Callable[[str], str]) -> None:
        self.model, self.fresh = model, fresh
        self.done: dict[str, str] = {}  # local value -> main-graph output (sites sharing x share its statistics)

    def hoist(self, c: Container, values: dict[str, str], keep_shape: list[int]) -> dict[str, str]:
        new = {stat: name for stat, name in values.items() if name not in self.done}
        if new:
            out = self._hoist(c, new, keep_shape)
            self.done.update({new[stat]: out[stat] for stat in new})
        return {stat: self.done[name] for stat, name in values.items()}

    def _hoist(self, c: Container, values: dict[str, str], keep_shape: list[int]) -> dict[str, str]:
        while c.parent is not None:
            owner = c.owner
            if owner.op_type == "If":
                values = self._through_if(c, owner, values, keep_shape)
            else:
                values = self._through_loop(c, owner, values)
            c = c.parent
        for stat, name in values.items():
            self.model.graph.output.append(_value_info(name, stat == "size"))
        return dict(values)

    def _through_loop(self, c: Container, owner: onnx.NodeProto, values: dict[str, str]) -> dict[str, str]:
        """New scan outputs: the body appends them last, the node stacks them per iteration."""
        out = {}
        for stat, name in values.items():
            c.graph.output.append(_value_info(name, stat == "size"))
            out[stat] = self.fresh(f"{name}__iters")
            owner.output.append(out[stat])
        if owner.op_type == "Scan":
            for a in owner.attribute:
                if a.name in ("scan_output_axes", "scan_output_directions"):
                    a.ints.extend([0] * len(values))
        return out

    def _through_if(
        self, c: Container, owner: onnx.NodeProto, values: dict[str, str], keep_shape: list[int]
    ) -> dict[str, str]:
        """Both branches must return the same outputs: the other one returns empty records (n = 0)."""
        branch = c.path.rsplit(".", 1)[-1]  # graph.containers names a body <owner>.<attribute>
        other_name = "else_branch" if branch == "then_branch" else "then_branch"
        other = next(a.g for a in owner.attribute if a.name == other_name)
        out = {}
        for stat, name in values.items():
            is_size = stat == "size"
            empty = self.fresh(f"{name}__empty")
            value = np.zeros((), np.int64) if is_size else np.zeros(keep_shape, np.float32)
            other.node.append(
                helper.make_node("Constant", [], [empty], name=empty, value=numpy_helper.from_array(value, empty))
            )
            c.graph.output.append(_value_info(name, is_size))
            other.output.append(_value_info(empty, is_size))
            out[stat] = self.fresh(f"{name}__if")
            owner.output.append(out[stat])
        return out


def _value_info(name: str, is_size: bool) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64 if is_size else TensorProto.FLOAT, None)
