"""One activation site: which nodes compute it, from which input, in which scope (what :mod:`.find` returns)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ..catalogue import CATALOGUE, Activation
from ..graph import Container
from ..provenance import SiteRecord


@dataclass(eq=False)
class Site:
    """One activation occurrence: which nodes compute it, from which input, in which scope."""

    container: Container
    kind: str
    params: dict[str, Any]
    nodes: list[onnx.NodeProto]  # the activation's nodes; the last one writes ``output``
    input: str
    output: str
    written_as: str  # "op Relu", "pattern x·Sigmoid(x)", "normalized NormRelu"
    const_nodes: list[onnx.NodeProto] = field(default_factory=list)  # Constant nodes only this site reads
    normalized: SiteRecord | None = None  # prior rewrite's record, when already normalized
    skip: str | None = None  # why it is not rewritten by default (gate, graph output)
    unfused: tuple[list[onnx.NodeProto], onnx.NodeProto] | None = None  # a fused op's (pre-activation, activation)

    @property
    def activation(self) -> Activation:
        return CATALOGUE[self.kind]

    @property
    def root(self) -> onnx.NodeProto:
        return self.nodes[-1]

    @property
    def name(self) -> str:
        return self.root.name or self.output

    @property
    def path(self) -> str:
        return self.container.path

    def summary(self) -> dict[str, Any]:
        params = {
            k: (float(v) if np.ndim(v) == 0 else f"per-channel{list(np.shape(v))}") for k, v in self.params.items()
        }
        return {
            "name": self.name,
            "kind": self.kind,
            "params": params,
            "written_as": self.written_as,
            "graph": self.path,
            "input": self.input,
            "output": self.output,
            "normalized": self.normalized is not None,
            "skipped": self.skip,
        }
