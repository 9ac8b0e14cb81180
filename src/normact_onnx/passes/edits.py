"""Batched edits to one container, applied in a single rebuild of its node list.

Passes decide first and edit after: replacements, deletions, insertions and new
or changed constants are collected here and committed together, so node order
stays topological and untouched nodes keep their exact bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph import Container


@dataclass
class Edits:
    container: Container
    replace: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)
    delete: set[int] = field(default_factory=set)
    before: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)
    after: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)  # new or replaced, by name
    drop_initializers: set[str] = field(default_factory=set)
    drop_value_info: set[str] = field(default_factory=set)
    declare: list[onnx.ValueInfoProto] = field(default_factory=list)  # new graph inputs for IR < 4 initializers

    @property
    def empty(self) -> bool:
        return not (self.replace or self.delete or self.before or self.after or self.initializers)

    def add_constant(self, name: str, value: np.ndarray, anchor: onnx.NodeProto) -> None:
        """A new constant visible to ``anchor``: an initializer in graphs, a Constant node in functions."""
        tensor = numpy_helper.from_array(value, name)
        c = self.container
        if c.graph is not None and (c.ir_version >= 4 or c.parent is None):
            self.initializers[name] = tensor
            if c.ir_version < 4:  # the checker wants every initializer listed as a graph input below IR 4
                self.declare.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
        else:  # functions, and subgraphs below IR 4 (whose inputs are the loop's or branch's own)
            self.before.setdefault(id(anchor), []).append(
                helper.make_node("Constant", [], [name], name=name, value=tensor)
            )

    def commit(self) -> None:
        c = self.container
        if self.empty and not self.drop_initializers:
            return
        new_nodes: list[onnx.NodeProto] = []
        for node in c.nodes:
            key = id(node)
            new_nodes.extend(self.before.get(key, ()))
            if key in self.replace:
                new_nodes.extend(self.replace[key])
            elif key not in self.delete:
                new_nodes.append(detached(node))
            new_nodes.extend(self.after.get(key, ()))
        del c.nodes[:]
        c.nodes.extend(new_nodes)
        g = c.graph
        if g is not None:
            if self.drop_initializers:
                kept = [detached(t) for t in g.initializer if t.name not in self.drop_initializers]
                del g.initializer[:]
                g.initializer.extend(kept)
            # replaced in place and released one at a time: a big model's new weights are never held twice
            for t in g.initializer:
                new = self.initializers.pop(t.name, None)
                if new is not None:
                    t.CopyFrom(new)
                    del new
            while self.initializers:
                g.initializer.add().CopyFrom(self.initializers.pop(next(iter(self.initializers))))
            if self.declare:
                g.input.extend(self.declare)
                self.declare = []
            if self.drop_value_info:
                vi = [detached(v) for v in g.value_info if v.name not in self.drop_value_info]
                del g.value_info[:]
                g.value_info.extend(vi)
        c.index(c.opset)


def detached(msg):
    """A copy that survives clearing the repeated field it came from."""
    out = type(msg)()
    out.CopyFrom(msg)
    return out
