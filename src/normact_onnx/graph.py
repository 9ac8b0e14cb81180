"""A read-mostly index over every node container of a model.

A *container* is anything that holds a node list: the main graph, each If/Loop/Scan
body (recursively) and each model-local function. Passes work per container with
producer/consumer maps, resolve constants (initializers, ``Constant`` nodes, outer
scopes) and count implicit uses of outer-scope values by subgraphs as consumers,
so "this value has no other consumer" is true across scopes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, numpy_helper

from .io import tensor_array

SMALL_CONST = 4096  # elements: constants larger than this are never read while matching


@dataclass(eq=False)
class Container:
    """One node list with its scope: a graph (main or subgraph) or a model-local function."""

    path: str
    nodes: Any  # RepeatedCompositeFieldContainer[NodeProto]
    graph: onnx.GraphProto | None = None
    function: onnx.FunctionProto | None = None
    parent: Container | None = None
    owner: onnx.NodeProto | None = None  # the If/Loop/Scan node holding this subgraph
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=lambda: defaultdict(list))
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)
    inputs: set[str] = field(default_factory=set)
    ir_version: int = 0  # below 4, a graph's initializers are also listed as its inputs (defaults, not overrides)

    @property
    def opset(self) -> int:
        return self._opset

    def index(self, default_opset: int) -> None:
        """(Re)build the maps after the node list changed."""
        self._opset = default_opset
        self.producer.clear()
        self.consumers.clear()
        for node in self.nodes:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
            for name in outer_names(node):
                self.consumers[name].append(node)
        if self.graph is not None:
            self.initializers = {t.name: t for t in self.graph.initializer}
            self.outputs = {o.name for o in self.graph.output}
            self.inputs = {i.name for i in self.graph.input}
        else:
            self.outputs = set(self.function.output)
            self.inputs = set(self.function.input)

    def is_local(self, name: str) -> bool:
        return name in self.producer or name in self.initializers or name in self.inputs


def _subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == AttributeProto.GRAPHS:
            for i, g in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", g


def outer_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from enclosing scopes (implicit inputs of the node)."""
    used: set[str] = set()
    for _, g in _subgraphs(node):
        local = {i.name for i in g.input} | {t.name for t in g.initializer}
        for n in g.node:
            local.update(o for o in n.output if o)
        for n in g.node:
            used.update(i for i in n.input if i and i not in local)
            used.update(outer_names(n) - local)
        used.update(o.name for o in g.output if o.name not in local)
    return used


def default_opset(opset_imports: Any) -> int:
    for o in opset_imports:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


def containers(model: onnx.ModelProto) -> list[Container]:
    """Every container of the model, parents before children, indexed."""
    out: list[Container] = []
    opset = default_opset(model.opset_import)

    def walk(c: Container, opset: int) -> None:
        c.index(opset)
        out.append(c)
        for i, node in enumerate(c.nodes):
            for attr_name, g in _subgraphs(node):
                # an unnamed node is known by its first output: stable when passes insert nodes before it
                label = node.name or f"{node.op_type}#{node.output[0] if node.output and node.output[0] else i}"
                sub = Container(f"{c.path}/{label}.{attr_name}", g.node, graph=g, parent=c, owner=node)
                sub.ir_version = model.ir_version
                walk(sub, opset)

    walk(Container("main", model.graph.node, graph=model.graph, ir_version=model.ir_version), opset)
    for f in model.functions:
        walk(Container(f"function {f.domain}::{f.name}", f.node, function=f), default_opset(f.opset_import))
    return out


def attr_value(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def constant_node_value(node: onnx.NodeProto, base_dir: str | None = None) -> np.ndarray | None:
    """The value of a ``Constant`` node, whichever attribute holds it."""
    for a in node.attribute:
        if a.ref_attr_name:
            return None
        if a.name == "value":
            return numpy_helper.to_array(a.t, base_dir or "")
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(a.floats, dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(a.ints, dtype=np.int64)
    return None


def tensor_size(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims)) if len(t.dims) else 1


_SHAPING = ("Reshape", "Squeeze", "Unsqueeze", "Flatten")


def _computed_constant(
    scope: Container, node: onnx.NodeProto, base_dir: str | None, limit: int | None, depth: int
) -> np.ndarray | None:
    """A constant that a small constant subgraph computes: ``ConstantOfShape`` and reshapes of constants.

    Exporters write weights this way (a zero bias as ``ConstantOfShape``, a
    ``Constant`` reshaped to the layer's layout); they are constants as much as
    initializers are.
    """
    if node.op_type == "ConstantOfShape":
        shape = _const(scope, node.input[0], base_dir, None, depth + 1) if node.input else None
        if shape is None or (limit is not None and int(np.prod(shape)) > limit):
            return None
        attr = next((a for a in node.attribute if a.name == "value"), None)
        fill = numpy_helper.to_array(attr.t) if attr is not None else np.zeros(1, np.float32)
        return np.full([int(d) for d in shape], fill.reshape(-1)[0], dtype=fill.dtype)
    data = _const(scope, node.input[0], base_dir, limit, depth + 1) if node.input else None
    if data is None:
        return None
    if node.op_type == "Flatten":
        axis = int(attr_value(node, "axis", 1)) % max(data.ndim, 1)
        return data.reshape(int(np.prod(data.shape[:axis])), -1)
    axes = attr_value(node, "axes")
    if len(node.input) > 1 and node.input[1]:
        arg = _const(scope, node.input[1], base_dir, None, depth + 1)
        if arg is None:
            return None
        axes = [int(v) for v in np.ravel(arg)]
    if node.op_type == "Reshape":
        if axes is None:
            return None
        shape = [data.shape[i] if d == 0 and not attr_value(node, "allowzero", 0) else d for i, d in enumerate(axes)]
        return data.reshape(shape)
    if node.op_type == "Squeeze":
        return np.squeeze(data, axis=tuple(axes)) if axes else np.squeeze(data)
    out_rank = data.ndim + len(axes or ())
    return np.expand_dims(data, tuple(a % out_rank for a in axes)) if axes else None


def const_value(c: Container, name: str, base_dir: str | None = None, limit: int | None = SMALL_CONST):
    """The value of ``name`` if it is a constant visible from ``c`` (None otherwise).

    Tensors over ``limit`` elements are not read (None), so matching never touches weights.
    """
    return _const(c, name, base_dir, limit, 0)


def _const(c: Container, name: str, base_dir: str | None, limit: int | None, depth: int) -> np.ndarray | None:
    if depth > 8:  # constant subgraphs are short; deeper chains are computations
        return None
    scope: Container | None = c
    while scope is not None:
        node = scope.producer.get(name)
        if node is not None and node.op_type in ("ConstantOfShape", *_SHAPING) and node.domain in ("", "ai.onnx"):
            try:
                return _computed_constant(scope, node, base_dir, limit, depth)
            except (ValueError, IndexError):  # an inconsistent constant subgraph is not ours to judge
                return None
        if node is not None and node.op_type in ("Identity", "Cast") and node.domain in ("", "ai.onnx"):
            # converters often write a constant through Identity or a Cast (tf2onnx, paddle2onnx)
            value = _const(scope, node.input[0], base_dir, limit, depth + 1) if node.input else None
            if value is None or node.op_type == "Identity":
                return value
            to = attr_value(node, "to")
            return value.astype(onnx.helper.tensor_dtype_to_np_dtype(to)) if to else None
        if node is not None:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value" and limit is not None and tensor_size(a.t) > limit:
                        return None
                return constant_node_value(node, base_dir)
            return None
        t = scope.initializers.get(name)
        if t is not None:
            if limit is not None and tensor_size(t) > limit:
                return None
            return tensor_array(t, base_dir)
        if name in scope.inputs:
            return None
        scope = scope.parent
    return None


def unique_namer(model: onnx.ModelProto) -> Any:
    """A function giving fresh value/node names that collide with nothing in the model."""
    taken: set[str] = set()

    def collect(g: onnx.GraphProto) -> None:
        taken.update(i.name for i in g.input)
        taken.update(t.name for t in g.initializer)
        for n in g.node:
            taken.update(n.output)
            taken.add(n.name)
            for _, sg in _subgraphs(n):
                collect(sg)

    collect(model.graph)
    for f in model.functions:
        taken.update(f.input)
        for n in f.node:
            taken.update(n.output)
            taken.add(n.name)

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    return fresh


def structure_fingerprint(model: onnx.ModelProto) -> str:
    """A short hash of what the model computes structurally, not of its weights or its file.

    Every container's nodes as (domain, op type, input and output value names), the graph's
    inputs and outputs and the initializers' names and shapes: calibration statistics are keyed
    by value names, so they belong to exactly this skeleton. Re-saving the model (or moving its
    weights to external data) keeps the hash; another model, or the same one re-exported with
    other names, changes it. Weights are never read.
    """
    import hashlib
    import json

    parts: list[Any] = [
        [i.name for i in model.graph.input],
        [o.name for o in model.graph.output],
        sorted((t.name, list(t.dims)) for t in model.graph.initializer),
    ]
    for c in containers(model):
        parts.append([c.path, [[n.domain, n.op_type, list(n.input), list(n.output)] for n in c.nodes]])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
