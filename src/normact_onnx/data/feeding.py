"""A model loaded and fed: the batches a call's :class:`.options.DataOptions` names, run in one runtime.

``compare``, ``measure_sites``, ``fold``'s self-check and ``calibrate``'s departure warning all load a model,
read batches for it the way ``calibrate`` reads them (checked against the model's inputs before the first run),
and run it in ONNX Runtime (the tool's own session, kernel library registered) or in ``onnx.reference``
(model-local functions inlined first). That is this module, so none of them reaches into another's internals.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper
from onnx.inliner import inline_local_functions
from onnx.reference import ReferenceEvaluator

from ..errors import NormactError
from ..io import ModelLike, external_locations, load_external_data, load_model_like, model_folder
from ..ort import make_session
from ..valuetypes import infer_value_types
from .inputs import InputSpec, model_inputs
from .options import DataOptions
from .readers import check_header, conform, open_source

Feeds = dict[str, np.ndarray]
RUNTIMES = ("ort", "reference")


@dataclass
class LoadedModel:
    """A model to run: its proto (weights possibly external) and where it came from."""

    proto: onnx.ModelProto
    path: Path | None
    label: str

    @classmethod
    def load(cls, model: ModelLike, label: str) -> LoadedModel:
        return cls(*load_model_like(model), label)

    @property
    def base_dir(self) -> str | None:
        return model_folder(self.path)

    @property
    def inputs(self) -> list[InputSpec]:
        return model_inputs(self.proto)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.proto.graph.output]


class Runner:
    """Runs one model in one runtime; ``extra`` values are fetched as additional outputs."""

    def __init__(self, model: LoadedModel, runtime: str, providers: list[str] | None, extra: list[str]) -> None:
        self.model, self.runtime = model, runtime
        self.names = model.output_names + [e for e in extra if e not in model.output_names]
        proto = model.proto
        if len(self.names) != len(model.output_names):
            proto = _with_outputs(proto, self.names[len(model.output_names) :])
        if runtime == "ort":
            self.run = self._ort(proto, providers)
        elif runtime == "reference":
            self.run = self._reference(proto)
        else:
            raise NormactError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")

    def outputs(self, feeds: Feeds) -> list[np.ndarray]:
        """``self.names``' values on ``feeds``; a runtime's failure is a user error naming the model."""
        try:
            return self.run(feeds)
        except NormactError:
            raise
        except Exception as e:
            raise NormactError(f"model {self.model.label} failed to run ({self.runtime}): {first_line(e)}") from None

    def _ort(self, proto: onnx.ModelProto, providers: list[str] | None) -> Callable[[Feeds], list[np.ndarray]]:
        source: Any = proto.SerializeToString()
        if self.model.path is not None and proto is self.model.proto:
            source = str(self.model.path)  # external data resolves next to the file
        elif self.model.path is not None and _has_external(proto):
            source = _save_beside(proto, self.model.path)
        try:
            sess = make_session(source, providers)
        except NormactError:
            raise
        except Exception as e:
            raise NormactError(f"{self.model.label}: onnxruntime cannot load it: {first_line(e)}") from None
        names = self.names
        return lambda feeds: sess.run(names, feeds)

    def _reference(self, proto: onnx.ModelProto) -> Callable[[Feeds], list[np.ndarray]]:
        m = onnx.ModelProto()
        m.CopyFrom(proto)
        if self.model.base_dir and _has_external(m):
            load_external_data(m, self.model.base_dir)
        try:
            ref = ReferenceEvaluator(inline_local_functions(m))
        except Exception as e:
            raise NormactError(f"{self.model.label}: onnx.reference cannot run it: {first_line(e)}") from None
        names = self.names
        return lambda feeds: [np.asarray(v) for v in ref.run(names, feeds)]


def first_line(e: BaseException) -> str:
    """An exception's first line (its type when it has no text): what a one-line user error quotes."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _has_external(m: onnx.ModelProto) -> bool:
    return bool(external_locations(m))


def _remove_if_there(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _save_beside(proto: onnx.ModelProto, path: Path) -> str:
    """An instrumented copy with external data must sit next to the data it points at."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".compare.onnx", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(proto.SerializeToString())
    atexit.register(_remove_if_there, tmp)
    return tmp


def _with_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy whose graph also outputs ``names`` (intermediate values of the main graph)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    types = infer_value_types(m)
    for n in names:
        m.graph.output.append(helper.make_tensor_value_info(n, types.elem_type(n), None))
    return m


def model_batches(
    model: LoadedModel,
    options: DataOptions,
    synthetic_batches: int,
    synthetic_batch_size: int,
) -> Iterator[Feeds]:
    """The batches ``options`` names, read as ``calibrate`` reads them, checked against ``model``'s inputs first.

    ``options.batch_size`` splits data files into batches of that many samples (synthetic: the batch
    dimension, default ``synthetic_batch_size``); ``options.batches`` caps the number of batches (default:
    all of the data; ``synthetic_batches`` synthetic ones). Arrays that name no input are left out, with one note.
    The defaults are the caller's (``compare``: 4 of 2 samples; ``fold``'s self-check: 2 of 1).
    """
    if options.data is None and not options.synthetic:
        raise NormactError("compare needs inputs: pass --data (or data=...) or --synthetic")
    specs = model_inputs(model.proto)
    options = options.with_synthetic_defaults(synthetic_batches, synthetic_batch_size)
    source = open_source(options, specs)
    limit, noted = options.batches, set[str]()
    if source.headers is not None:  # files: every batch that will run is checked before the first run
        for i, (where, header) in enumerate(source.headers()):
            if limit is not None and i >= limit:
                break
            check_header(specs, header, where, noted)
    for i, (where, batch) in enumerate(source.batches()):
        if limit is not None and i >= limit:
            return
        yield conform(specs, batch, where, noted)


def feeds_for(model: LoadedModel, feeds: Feeds) -> Feeds:
    """Another model's inputs from feeds checked against a first model; a missing one is a user error."""
    names = [i.name for i in model.inputs]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise NormactError(f"model {model.label}: data has no input {', '.join(missing)} (has {', '.join(feeds)})")
    return {n: np.asarray(feeds[n]) for n in names}
