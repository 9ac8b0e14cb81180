"""Training data: arrays by input name plus labels, checked against the model before any step runs.

Every mismatch a user can make (a missing input, labels of another length, an
empty file, labels that do not fit the loss or the output) is a NormactError
naming what was expected and what was given, so a bad run stops in its first
second instead of after an artifact build or inside ONNX Runtime.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..data.inputs import InputSpec, model_inputs
from ..data.readers import check_header
from ..errors import NormactError
from .losses import LOSSES


@dataclass
class Dataset:
    """Input arrays (by model input name) and labels, all with the same first dimension."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    source: str
    fixed: dict[str, np.ndarray] = field(default_factory=dict)  # scalar inputs, fed unchanged to every batch

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(
        self, size: int, rng: np.random.Generator | None = None, drop_last: bool = True
    ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """Mini-batches, shuffled by ``rng`` when given.

        ``drop_last`` drops a trailing partial batch (when there is at least one full
        one): ANAct's gate compares batch statistics, and a tiny last batch is noise.
        """
        n = len(self)
        order = rng.permutation(n) if rng is not None else np.arange(n)
        stop = n - n % size if drop_last and n >= size else n
        for start in range(0, stop, size):
            idx = order[start : start + size]
            yield {**{k: v[idx] for k, v in self.inputs.items()}, **self.fixed}, self.labels[idx]

    def steps(self, size: int, drop_last: bool = True) -> int:
        n = len(self)
        return n // size if drop_last and n >= size else -(-n // size)


def _arrays(data: str | os.PathLike | Mapping[str, np.ndarray], flag: str) -> tuple[dict[str, np.ndarray], str]:
    if isinstance(data, Mapping):
        return {k: np.asarray(v) for k, v in data.items()}, "the data"
    p = Path(data)
    if not p.exists():
        raise NormactError(f"{flag} {p}: no such file")
    if p.suffix != ".npz":
        raise NormactError(f"{flag} {p}: expected an .npz file of arrays keyed by input name (and the labels)")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}, str(p)
    except (ValueError, OSError) as e:
        raise NormactError(f"{flag} {p}: not a readable .npz ({e})") from None


def input_specs(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[np.dtype, list[int | None]]]:
    """dtype and shape (None for symbolic dimensions) of each named graph input (read by :mod:`..data.inputs`)."""
    return {s.name: (s.dtype, s.fixed_shape) for s in model_inputs(model) if s.name in names}


def load_dataset(
    data: str | os.PathLike | Mapping[str, np.ndarray],
    labels: str,
    specs: dict[str, tuple[np.dtype, list[int | None]]],
    flag: str = "--data",
) -> Dataset:
    """Read and check a data set: every model input present with a fitting shape, labels of the same length.

    The inputs are checked by the same rule as every other data the tool reads (:func:`..data.readers.check_header`:
    names, kinds of dtype, shapes, no empty input), with the sample axis left free: a data set holds N samples,
    the training graph runs batches of its own size. A wrong shape is said first, in the data set's terms
    (``N×8``), before that rule sees it.
    """
    arrays, source = _arrays(data, flag)
    keys = ", ".join(sorted(arrays)) or "none"
    if labels not in arrays:
        raise NormactError(f"--labels {labels!r}: no such array in {source} (arrays: {keys})")
    y = arrays[labels]
    if y.ndim == 0:
        raise NormactError(f"labels {labels!r} in {source} are a scalar; expected one label per sample")
    n = y.shape[0]
    if n == 0:
        raise NormactError(f"{source} is empty: {labels!r} has 0 samples")
    for name, (_, dims) in specs.items():  # the shape in training's words (N: the data set's own sample count)
        a = arrays.get(name)
        if a is not None and (a.ndim != len(dims) or any(d not in (None, s) for d, s in zip(dims[1:], a.shape[1:]))):
            want = "×".join("N" if d is None else str(d) for d in [None, *dims[1:]][: len(dims)])
            raise NormactError(f"input {name!r} in {source} has shape {a.shape}; the model expects {want}")
    check_header(_sample_specs(specs), {k: (a.shape, a.dtype) for k, a in arrays.items()}, source)
    inputs, fixed = {}, {}
    for name, (dtype, dims) in specs.items():
        a = arrays[name]
        if not dims:  # a scalar input (a sample rate, a threshold): the same value for every batch
            fixed[name] = np.ascontiguousarray(a, dtype=dtype)
            continue
        if a.shape[0] != n:
            raise NormactError(f"{source}: input {name!r} has {a.shape[0]} samples but labels {labels!r} have {n}")
        inputs[name] = np.ascontiguousarray(a, dtype=dtype)
    for name, a in {**inputs, labels: y}.items():  # NaN/Inf would only show up later as a diverging loss
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            rows = np.flatnonzero(~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)) if a.ndim else [0]
            raise NormactError(
                f"{source}: {name!r} holds NaN or Inf values (sample {int(rows[0])} and {len(rows) - 1} more); "
                "clean the data or drop those samples"
            )
    return Dataset(inputs, y, source, fixed)


def _sample_specs(specs: dict[str, tuple[np.dtype, list[int | None]]]) -> list[InputSpec]:
    """The inputs as :mod:`..data` checks them, the leading (sample) axis of any size."""
    return [
        InputSpec(name, np.dtype(dtype), [None, *dims[1:]] if dims else []) for name, (dtype, dims) in specs.items()
    ]


def check_labels(ds: Dataset, loss: str, output_name: str, output_shape: tuple[int, ...]) -> None:
    """Labels against the loss and one sample batch's output shape; converts them to the loss's dtype."""
    if loss not in LOSSES:
        raise NormactError(f"unknown --loss {loss!r}; choose one of {', '.join(LOSSES)}")
    per_sample = tuple(output_shape[1:])
    y = ds.labels
    if loss == "cross-entropy":
        if len(output_shape) < 2 or output_shape[-1] < 2:
            raise NormactError(
                f"--loss cross-entropy needs class scores (N×C, C ≥ 2) but output {output_name!r} has shape "
                f"{output_shape}; choose the scores with --output-name (a classifier's first output may be its label, "
                "as skl2onnx writes it) or use --loss mse for regression outputs"
            )
        classes = output_shape[-1]
        if y.shape[1:] == per_sample:
            raise NormactError(
                f"labels have shape {y.shape}, like the output: one-hot or scores? cross-entropy wants class "
                f"indices of shape {(y.shape[0], *per_sample[:-1])} (e.g. labels.argmax(-1))"
            )
        if y.shape[1:] != per_sample[:-1]:
            raise NormactError(
                f"labels have shape {y.shape}; for output {output_name!r} of shape {output_shape} cross-entropy "
                f"wants class indices of shape {(y.shape[0], *per_sample[:-1])}"
            )
        integral = np.issubdtype(y.dtype, np.integer) or (np.all(np.isfinite(y)) and np.all(y == np.round(y)))
        if not integral:
            raise NormactError("cross-entropy labels must be integer class indices; got non-integer values")
        if y.size and (y.min() < 0 or y.max() >= classes):
            raise NormactError(
                f"labels range over [{int(y.min())}, {int(y.max())}] but output {output_name!r} has {classes} classes"
            )
        ds.labels = y.astype(np.int64)
    else:
        if y.shape[1:] != per_sample:
            if y.ndim == 1 and per_sample == (1,):
                ds.labels = y.reshape(-1, 1)
            else:
                raise NormactError(
                    f"--loss {loss} wants targets shaped like output {output_name!r} ({('N', *per_sample)}); "
                    f"labels have shape {y.shape}"
                )
        ds.labels = ds.labels.astype(np.float32)
        if loss == "bce" and ds.labels.size and not (ds.labels.min() >= 0 and ds.labels.max() <= 1):
            raise NormactError(
                f"--loss bce wants targets in [0, 1]; labels range over [{ds.labels.min():g}, {ds.labels.max():g}]"
            )
