"""What a model must be fed: the name, element type and shape of each input, read from the graph once.

Every reader of a model's inputs (calibration and compare data checks, synthetic batches, the verification's
random inputs, the fine-tuning data) uses :func:`model_inputs`, so an input is described one way everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from ..errors import NormactError

Dim = int | str | None  # a size, a symbolic name, or unknown


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: list[Dim] | None  # None: rank unknown

    def describe(self) -> str:
        return format_shape(self.shape) if self.shape is not None else "any shape"

    @property
    def fixed_shape(self) -> list[int | None]:
        """The shape with symbolic and unknown dimensions as None ([] when the rank is unknown)."""
        return [d if isinstance(d, int) else None for d in self.shape or []]


def format_shape(shape: Iterable[Any]) -> str:
    """``[N, 3, ?]``: symbolic names as written, unknown sizes as ``?``."""
    return "[" + ", ".join(str(d) if d not in (None, "") else "?" for d in shape) + "]"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (inputs that are also initializers are optional and left out)."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise NormactError(f"input {vi.name!r} is not a tensor; calibration feeds tensors only")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        shape = None
        if tt.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        out.append(InputSpec(vi.name, dtype, shape))
    return out
