"""The node builder for in-graph statistics of x, f(x) and f'(x) at a site.

Shared by calibration's instrumented copy (:mod:`.instrument`) and the training
graph's per-batch statistics (:mod:`normact_onnx.training.graph`): int64
constants, casts to float, opset-correct reductions and the catalogue's
derivative body. What each reduces differs on purpose: calibration returns
Size, per-batch means and centred sums of squares (optionally per channel,
keepdims, hoisted out of If/Loop/Scan) for exact merging on the host; training
returns five whole-tensor means per site as one vector that feeds the host's
running update.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..errors import NormactError
from ..passes.find import Site
from ..passes.forms import LiteralBody

REDUCE_AXES_AS_INPUT = 18  # ReduceMean/ReduceSumSquare take axes as an input from opset 18


class StatsBody(LiteralBody):
    """A literal builder that also writes int64 constants, float casts, reductions and f'(x)."""

    def ints(self, values: list[int]) -> str:
        out = self.fresh("ints")
        t = numpy_helper.from_array(np.asarray(values, dtype=np.int64), out)
        self.nodes.append(helper.make_node("Constant", [], [out], name=out, value=t))
        return out

    def to_float(self, x: str, elem: int | None = None) -> str:
        """``x`` (of type ``elem``, the builder's own by default) as float32."""
        elem = self.elem_type if elem is None else elem
        return x if elem == TensorProto.FLOAT else self.op("Cast", x, to=TensorProto.FLOAT)

    def reduce(self, op: str, x: str, axes: list[int] | None, keepdims: int = 1) -> str:
        """A reduction over ``axes`` (all when None) in the form this opset wants."""
        if axes is None:
            return self.op(op, x, keepdims=keepdims)
        if self.opset >= REDUCE_AXES_AS_INPUT or (op == "ReduceSum" and self.opset >= 13):
            return self.op(op, x, self.ints(axes), keepdims=keepdims)
        return self.op(op, x, axes=axes, keepdims=keepdims)

    def mean_all(self, x: str) -> str:
        """Mean over every element as a [1] tensor."""
        return self.reduce("ReduceMean", self.op("Reshape", x, self.ints([1, -1])), [1], keepdims=0)

    def derivative(self, site: Site, x: str) -> str:
        """f'(x) from the site's catalogue entry."""
        body = site.activation.derivative_body
        if body is None:
            raise NormactError(f"the catalogue has no ONNX derivative for {site.kind}: ANAct cannot measure ρ' there")
        return body(self, x)
