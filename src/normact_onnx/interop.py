"""Models as users hold them: a path, an ``onnx.ModelProto``, an ``onnx_ir.Model``, an onnx-graphsurgeon ``Graph``.

The passes edit protobuf (benchmarks/README.md, ``bench_ir.py``: an IR round trip
changes bytes outside the rewritten sites). Users who build or edit models with
``onnx_ir`` (the ONNX project's IR, under onnxscript and the PyTorch exporter) or
with NVIDIA's onnx-graphsurgeon hand their object to the public API as it is:
:func:`~normact_onnx.io.load_model_like` converts it to a ``ModelProto`` on the
way in, and :func:`same_type` gives a returned ``ModelProto`` back as the type
given. Neither library is a dependency: an object of one exists only if its
library is imported already, so it is recognized through ``sys.modules`` and
nothing is imported otherwise.

- ``onnx_ir.Model``: ``onnx_ir.serde`` both ways (the IR wraps the protobuf's
  tensors on the way back, without copying them). Tensors the IR left in external
  data files are read into the ``ModelProto`` (an in-memory model has no folder
  to resolve them against); the caller's model is not changed.
- onnx-graphsurgeon ``Graph``: ``export_onnx``/``import_onnx``. A Graph holds no
  model metadata, so the provenance a rewrite records (``normact.sites``) does not
  survive in one: function-form sites are still recognized by their op, sites of
  the subgraph form and folded sites are not.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import onnx

from .errors import NormactError

P = ParamSpec("P")
R = TypeVar("R")


def _ir_model(obj: Any) -> bool:
    ir = sys.modules.get("onnx_ir")
    return ir is not None and isinstance(obj, ir.Model)


def _gs_graph(obj: Any) -> bool:
    gs = sys.modules.get("onnx_graphsurgeon")
    return gs is not None and isinstance(obj, gs.Graph)


def is_foreign(obj: Any) -> bool:
    """Whether ``obj`` is a model of a library the passes do not edit directly (converted by :func:`to_proto`)."""
    return _ir_model(obj) or _gs_graph(obj)


def to_proto(model: Any) -> onnx.ModelProto:
    """A new ``ModelProto`` computing what ``model`` (an ``onnx_ir.Model`` or a GraphSurgeon ``Graph``) computes."""
    if _ir_model(model):
        return _from_ir(model)
    if _gs_graph(model):
        import onnx_graphsurgeon as gs

        try:
            return gs.export_onnx(model)
        except Exception as e:  # GraphSurgeon checks types and names while exporting
            raise NormactError(f"the onnx-graphsurgeon Graph does not export to ONNX: {_line(e)}") from None
    raise TypeError(f"not an onnx_ir.Model or onnx-graphsurgeon Graph: {type(model).__name__}")


def like(proto: onnx.ModelProto, original: Any) -> Any:
    """``proto`` in the type ``original`` was given as (``proto`` itself for a path or a ``ModelProto``)."""
    if _ir_model(original):
        import onnx_ir as ir

        return ir.serde.deserialize_model(proto)
    if _gs_graph(original):
        import onnx_graphsurgeon as gs

        return gs.import_onnx(proto)
    return proto


def same_type(param: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Give a ``ModelProto`` the decorated function returns back as the type its argument ``param`` had.

    The function itself takes any of these types (:func:`normact_onnx.io.load_model_like` converts
    them); the ``details=True`` records keep their ``ModelProto``.
    """

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            given = signature.bind(*args, **kwargs).arguments.get(param)
            out = fn(*args, **kwargs)
            return like(out, given) if isinstance(out, onnx.ModelProto) and is_foreign(given) else out

        return call

    return decorate


def _from_ir(model: Any) -> onnx.ModelProto:
    import onnx_ir as ir

    if not any(isinstance(v.const_value, ir.ExternalTensor) for g in model.graphs() for v in g.initializers.values()):
        return ir.serde.serialize_model(model)
    # the serialized tensors would only say where their data is, relative to a folder a ModelProto has not got:
    # a copy of the model (the caller's is not changed) takes its external tensors into memory first
    copy = model.clone()
    try:
        ir.external_data.load_to_model(copy)
    except OSError as e:
        raise NormactError(f"the onnx_ir model's external data cannot be read ({_line(e)})") from None
    return ir.serde.serialize_model(copy)


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
