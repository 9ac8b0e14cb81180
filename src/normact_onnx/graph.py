"""An index over every node container of a model, and the one way passes edit one.

A *container* is anything that holds a node list: the main graph, each If/Loop/Scan
body (recursively) and each model-local function. Passes work per container with
producer/consumer maps, resolve constants (initializers, ``Constant`` nodes, outer
scopes) and count implicit uses of outer-scope values by subgraphs as consumers,
so "this value has no other consumer" is true across scopes.

Passes change a model only through a container's edit methods (``insert_before``,
``replace``, ``set_input``, ``add_constant`` …). Each edit lands in the protobuf at once,
in place, and keeps the maps true, so a pass reads what earlier edits wrote (a weight
two plans scale in turn, a value a plan renamed) without any pending-edit layer.
Untouched nodes are never copied: they keep their bytes. Positions are found through
sortable keys kept beside the node list, so an edit costs no scan of the list and a
pass over thousands of sites stays linear.

Why one module past 500 lines: the container index and its edit methods keep the producer/consumer maps and
position keys true together; an edit outside this class could leave them stale, so they stay in one place.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, helper, numpy_helper

from .domains import is_standard
from .io import tensor_array

SMALL_CONST = 4096  # elements: constants larger than this are never read while matching
_GAP = 1 << 20  # spacing of fresh position keys: twenty insertions at one spot before a renumbering


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
    children: list[Container] = field(default_factory=list)  # the bodies of this container's nodes
    # the node list mirrored (its wrappers kept alive, so identities hold) with ascending position keys
    _order: list[onnx.NodeProto] = field(default_factory=list)
    _keys: list[int] = field(default_factory=list)
    _key: dict[int, int] = field(default_factory=dict)
    _opset: int = 0

    @property
    def opset(self) -> int:
        return self._opset

    def index(self, default_opset: int) -> None:
        """(Re)build the maps from the node list."""
        self._opset = default_opset
        self.producer.clear()
        self.consumers.clear()
        self._order = list(self.nodes)
        self._keys = [i * _GAP for i in range(len(self._order))]
        self._key = {id(n): k for n, k in zip(self._order, self._keys)}
        for node in self._order:
            self._add(node)
        if self.graph is not None:
            self.initializers = {t.name: t for t in self.graph.initializer}
            self.outputs = {o.name for o in self.graph.output}
            self.inputs = {i.name for i in self.graph.input}
        elif self.function is not None:
            self.outputs = set(self.function.output)
            self.inputs = set(self.function.input)

    def is_local(self, name: str) -> bool:
        return name in self.producer or name in self.initializers or name in self.inputs

    # ---- edits --------------------------------------------------------------------------------------------------

    def position(self, node: onnx.NodeProto) -> int:
        """Where ``node`` is in the node list (a lookup, no scan)."""
        key = self._key.get(id(node))
        i = bisect_left(self._keys, key) if key is not None else len(self._keys)
        if i == len(self._order) or self._order[i] is not node:
            raise ValueError(f"{node.op_type} node {node.name or node.output[:1]} is not in {self.path}")
        return i

    def insert(self, index: int, new: Sequence[onnx.NodeProto]) -> list[onnx.NodeProto]:
        """Put copies of ``new`` at ``index`` of the node list; returns the nodes as they now are in the graph."""
        if not new:
            return []
        keys = self._fresh_keys(index, len(new))
        placed = []
        for j, (node, key) in enumerate(zip(new, keys)):
            self.nodes.insert(index + j, node)
            n = self.nodes[index + j]
            self._order.insert(index + j, n)
            self._keys.insert(index + j, key)
            self._key[id(n)] = key
            self._add(n)
            placed.append(n)
        return placed

    def insert_before(self, anchor: onnx.NodeProto, new: Sequence[onnx.NodeProto]) -> list[onnx.NodeProto]:
        return self.insert(self.position(anchor), new)

    def insert_after(self, anchor: onnx.NodeProto, new: Sequence[onnx.NodeProto]) -> list[onnx.NodeProto]:
        return self.insert(self.position(anchor) + 1, new)

    def replace(self, node: onnx.NodeProto, new: Sequence[onnx.NodeProto]) -> list[onnx.NodeProto]:
        """``new`` where ``node`` was; ``node`` leaves the graph (the object keeps its fields)."""
        i = self.position(node)
        self._delete(i)
        return self.insert(i, new)

    def remove(self, nodes: Iterable[onnx.NodeProto]) -> None:
        for node in nodes:
            self._delete(self.position(node))

    def set_input(self, node: onnx.NodeProto, index: int, name: str) -> None:
        """Make ``node`` read ``name`` as its input ``index`` (missing optional inputs become empty)."""
        while len(node.input) <= index:
            node.input.append("")
        if node.input[index]:
            self._unuse(node.input[index], node)
        node.input[index] = name
        if name:
            self.consumers[name].append(node)

    def set_output(self, node: onnx.NodeProto, index: int, name: str) -> None:
        """Make ``node`` write ``name`` as its output ``index``; one past its last output adds an output."""
        if index == len(node.output):
            node.output.append("")
        old = node.output[index]
        if self.producer.get(old) is node:
            del self.producer[old]
        node.output[index] = name
        if name:
            self.producer[name] = node

    def set_attribute(self, node: onnx.NodeProto, name: str, value: Any) -> None:
        """Give ``node``'s attribute ``name`` a new value (in place, or added); not for subgraph attributes."""
        attr = helper.make_attribute(name, value)
        if attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
            raise ValueError("a subgraph attribute needs its containers rebuilt: edit the body's nodes instead")
        for a in node.attribute:
            if a.name == name:
                a.CopyFrom(attr)
                return
        node.attribute.append(attr)

    def add_output(self, info: onnx.ValueInfoProto) -> None:
        """Return one more value from this graph (a body's new output, or the model's)."""
        if self.graph is None:
            raise ValueError(f"{self.path} is a function: its outputs are fixed by its callers")
        self.graph.output.append(info)
        self.outputs.add(info.name)

    def rename_input(self, node: onnx.NodeProto, old: str, new: str) -> None:
        """Every read of ``old`` by ``node`` reads ``new``: its inputs and, as an outer value, in its subgraphs.

        The caller checks :func:`renamable_in_subgraphs` first.
        """
        self._drop(node)
        for i, v in enumerate(node.input):
            if v == old:
                node.input[i] = new
        _rename_outer(node, old, new)
        self._add(node)
        for child in self.children:
            if child.owner is node:
                child.reindex_tree()

    def reindex_tree(self) -> None:
        self.index(self.opset)
        for child in self.children:
            child.reindex_tree()

    def add_constant(self, name: str, value: np.ndarray, anchor: onnx.NodeProto) -> None:
        """A new constant visible to ``anchor``: an initializer in graphs, a Constant node before it in functions."""
        tensor = numpy_helper.from_array(value, name)
        if self.graph is not None and (self.ir_version >= 4 or self.parent is None):
            self.graph.initializer.append(tensor)
            self.initializers[name] = self.graph.initializer[len(self.graph.initializer) - 1]
            if self.ir_version < 4:  # the checker wants every initializer listed as a graph input below IR 4
                self.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
                self.inputs.add(name)
        else:  # functions, and subgraphs below IR 4 (whose inputs are the loop's or branch's own)
            self.insert_before(anchor, [helper.make_node("Constant", [], [name], name=name, value=tensor)])

    def set_constant(self, name: str, value: np.ndarray) -> None:
        """Give this container's initializer or ``Constant`` node ``name`` a new value, in place."""
        tensor = numpy_helper.from_array(value, name)
        init = self.initializers.get(name)
        if init is not None:
            init.CopyFrom(tensor)  # in place: a big model's new weights are never held twice
            return
        node = self.producer[name]
        node.CopyFrom(helper.make_node("Constant", [], [name], name=node.name, value=tensor))

    def drop_value_info(self, names: Collection[str]) -> None:
        """Forget the recorded types of values that no longer exist."""
        if self.graph is None or not names:
            return
        for i in reversed(range(len(self.graph.value_info))):
            if self.graph.value_info[i].name in names:
                del self.graph.value_info[i]

    def _fresh_keys(self, index: int, count: int) -> list[int]:
        keys = self._keys
        lo = keys[index - 1] if index > 0 else (keys[0] if keys else 0) - (count + 1) * _GAP
        hi = keys[index] if index < len(keys) else lo + (count + 1) * _GAP
        step = (hi - lo) // (count + 1)
        if step == 0:  # this spot is full: spread every key again
            self._keys = [i * _GAP for i in range(len(self._order))]
            self._key = {id(n): k for n, k in zip(self._order, self._keys)}
            return self._fresh_keys(index, count)
        return [lo + step * (j + 1) for j in range(count)]

    def _delete(self, i: int) -> None:
        node = self._order[i]
        self._drop(node)
        del self.nodes[i]
        del self._order[i]
        del self._keys[i]
        del self._key[id(node)]

    def _add(self, node: onnx.NodeProto) -> None:
        for name in node.output:
            if name:
                self.producer[name] = node
        for name in (*node.input, *outer_names(node)):
            if name:
                self.consumers[name].append(node)

    def _drop(self, node: onnx.NodeProto) -> None:
        for name in node.output:
            if name and self.producer.get(name) is node:
                del self.producer[name]
        for name in (*node.input, *outer_names(node)):
            if name:
                self._unuse(name, node)

    def _unuse(self, name: str, node: onnx.NodeProto) -> None:
        users = self.consumers.get(name, [])
        for k, n in enumerate(users):
            if n is node:
                del users[k]
                break
        if not users:
            self.consumers.pop(name, None)


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


def _locals(g: onnx.GraphProto) -> set[str]:
    return {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}


def renamable_in_subgraphs(node: onnx.NodeProto, name: str) -> bool:
    """True when no subgraph of ``node`` defines ``name`` itself (so every use there is the outer value)."""
    for _, g in _subgraphs(node):
        if name in _locals(g) or not all(renamable_in_subgraphs(n, name) for n in g.node):
            return False
    return True


def _rename_outer(node: onnx.NodeProto, old: str, new: str) -> None:
    """Point every use of the outer value ``old`` inside ``node``'s subgraphs at ``new``."""
    for _, g in _subgraphs(node):
        for n in g.node:
            for i, v in enumerate(n.input):
                if v == old:
                    n.input[i] = new
            _rename_outer(n, old, new)
        for o in g.output:
            if o.name == old:  # a branch that returns the outer value itself
                o.name = new


def default_opset(opset_imports: Any) -> int:
    for o in opset_imports:
        if is_standard(o):
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
                c.children.append(sub)
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
        dims = [data.shape[i] if d == 0 and not attr_value(node, "allowzero", 0) else d for i, d in enumerate(axes)]
        return data.reshape(dims)
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
        if node is not None and node.op_type in ("ConstantOfShape", *_SHAPING) and is_standard(node):
            try:
                return _computed_constant(scope, node, base_dir, limit, depth)
            except (ValueError, IndexError):  # an inconsistent constant subgraph is not ours to judge
                return None
        if node is not None and node.op_type in ("Identity", "Cast") and is_standard(node):
            # converters often write a constant through Identity or a Cast (tf2onnx, paddle2onnx)
            value = _const(scope, node.input[0], base_dir, limit, depth + 1) if node.input else None
            if value is None or node.op_type == "Identity":
                return value
            to = attr_value(node, "to")
            return value.astype(onnx.helper.tensor_dtype_to_np_dtype(to)) if to else None
        if node is not None:
            if node.op_type == "Constant" and is_standard(node):
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


def upstream(c: Container, root: onnx.NodeProto, stop: str) -> tuple[list[onnx.NodeProto], list[str]]:
    """The nodes computing ``root`` back to the value ``stop`` (``root`` first), and what they read from outside.

    The second list holds, in the order met, the values read on the way that no node of ``c``
    computes (initializers, inputs, outer values), ``stop`` excluded.
    """
    nodes: list[onnx.NodeProto] = []
    reads: list[str] = []
    stack, seen = [root], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        nodes.append(n)
        for i in n.input:
            if not i or i == stop:
                continue
            p = c.producer.get(i)
            if p is None:
                reads.append(i)
            else:
                stack.append(p)
    return nodes, reads


def remove_unused(
    model: onnx.ModelProto, *, initializers: bool | Collection[str] = False, domain: str | None = None
) -> None:
    """Remove what a pass left without a user, in place (kept entries keep their bytes).

    ``initializers``: main-graph initializers nothing reads (True: any; a collection: only those,
    so a model's own unused weights stay); one that is also a graph input stays (its default).
    ``domain``: the model-local functions of that domain nothing calls, and its opset import
    (the model's and each function's) once no node of that domain is left.
    """
    cs = containers(model)
    if initializers:
        used: set[str] = {o.name for o in model.graph.output}
        for c in cs:
            used.update(c.consumers)
        g = model.graph
        keep = {i.name for i in g.input} | used
        for k in reversed(range(len(g.initializer))):
            name = g.initializer[k].name
            if name not in keep and (initializers is True or name in initializers):
                del g.initializer[k]
    if domain is None:
        return
    called = {(n.domain, n.op_type) for c in cs for n in c.nodes}
    for k in reversed(range(len(model.functions))):
        f = model.functions[k]
        if f.domain == domain and (f.domain, f.name) not in called:
            del model.functions[k]
    if any(d == domain for d, _ in called):
        return
    for imports in (model.opset_import, *(f.opset_import for f in model.functions)):
        for k in reversed(range(len(imports))):
            if imports[k].domain == domain:
                del imports[k]


def unique_namer(model: onnx.ModelProto) -> Callable[[str], str]:
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
