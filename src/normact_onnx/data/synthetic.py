"""Synthetic inputs for a model: one rule for calibrate, compare, fold and rewrite's whole-model check.

Symbolic dimensions are resolved by name where the name means something (the
same name is the same size in every input: ``batch`` in ``input`` and in
``state``) and independently where it does not (``?``, empty, ``unk__…``,
``None``: exporters write those for unrelated sizes, so a 48×192 image input is
not forced square). Sizes the user gives (``--shape``) fix the names they carry.
Unresolved sizes: the batch size for the leading axis, 64 for the spatial axes
of float inputs of rank ≥ 3 (images), 512 for the second axis of a float input
of rank 2 (a signal: audio frames need more than a few samples), 16 elsewhere.

Values: floats N(0, 1); integers and booleans in {0, 1} (valid token ids,
masks and segment ids alike), except scalar integer inputs named as a sample
rate (``sr``, ``sample_rate``), which get 16000 (0/1 would select a wrong
branch); ``--value NAME=V`` fills any input with V.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, TypeGuard

import numpy as np

from ..errors import NormactError

_MEANINGLESS = re.compile(r"^(\?|unk__\d+|none|-1|)$", re.IGNORECASE)
_SAMPLE_RATE = re.compile(r"^(sr|sample_?rate|sampling_?rate)$", re.IGNORECASE)
SPATIAL = 64
SIGNAL = 512
OTHER = 16
SAMPLE_RATE = 16000


def meaningful(dim: Any) -> TypeGuard[str]:
    """A symbolic dimension whose name identifies one size across the model's inputs."""
    return isinstance(dim, str) and not _MEANINGLESS.match(dim.strip())


def _default(spec: Any, axis: int, batch_size: int) -> int:
    rank = len(spec.shape)
    if axis == 0 and rank > 1:
        return batch_size
    if spec.dtype.kind == "f" and rank >= 3 and axis >= 2:
        return SPATIAL
    if spec.dtype.kind == "f" and rank == 2 and axis == 1:
        return SIGNAL
    return OTHER


def resolve_shapes(specs: list[Any], given: dict[str, list[int]], batch_size: int = 1) -> dict[str, list[int]]:
    """Concrete shapes for every input: ``given`` ones as they are, the rest by the rules above."""
    unknown = sorted(set(given) - {s.name for s in specs})
    if unknown:
        raise NormactError(f"--shape {unknown[0]}: the model has no such input ({', '.join(s.name for s in specs)})")
    sizes: dict[str, int] = {}
    for s in specs:
        if s.name in given and s.shape is not None:
            for want, got in zip(s.shape, given[s.name]):
                if meaningful(want):
                    sizes.setdefault(want, int(got))
    out: dict[str, list[int]] = {}
    for s in specs:
        if s.name in given:
            out[s.name] = [int(d) for d in given[s.name]]
            continue
        if s.shape is None:
            raise NormactError(f"input {s.name!r} has unknown rank: give its shape with --shape {s.name}=D1xD2…")
        dims = []
        for axis, d in enumerate(s.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif meaningful(d):
                dims.append(sizes.setdefault(d, _default(s, axis, batch_size)))
            else:
                dims.append(_default(s, axis, batch_size))
        out[s.name] = dims
    return out


def parse_assignments(
    items: Iterable[str] | dict[str, Any] | None, flag: str, convert: Any, example: str
) -> dict[str, Any]:
    """``["NAME=TEXT", …]`` (a repeatable CLI flag) or a dict → {name: convert(value)}; one line when malformed."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {k: convert(v) for k, v in items.items()}
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = convert(value)
        except ValueError:
            raise NormactError(f"{flag} {item!r}: expected {example}") from None
    return out


def parse_values(items: Iterable[str] | dict[str, float] | None) -> dict[str, float]:
    """``["sr=16000"]`` (``--value``) or a dict → {input name: fill value}."""
    return parse_assignments(items, "--value", float, "NAME=NUMBER (e.g. sr=16000)")


def synthetic_batch(
    specs: list[Any], shapes: dict[str, list[int]], rng: np.random.Generator, values: dict[str, float] | None = None
) -> dict[str, np.ndarray]:
    """One batch of inputs with the given concrete shapes."""
    values = values or {}
    unknown = sorted(set(values) - {s.name for s in specs})
    if unknown:
        raise NormactError(f"--value {unknown[0]}: the model has no such input ({', '.join(s.name for s in specs)})")
    out: dict[str, np.ndarray] = {}
    for s in specs:
        shape = shapes[s.name]
        if s.name in values:
            out[s.name] = np.full(shape, values[s.name]).astype(s.dtype)
        elif s.dtype.kind == "f":
            out[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif s.dtype.kind in "iu" and int(np.prod(shape)) == 1 and _SAMPLE_RATE.match(s.name):
            out[s.name] = np.full(shape, SAMPLE_RATE).astype(s.dtype)
        elif s.dtype.kind == "b":
            out[s.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            out[s.name] = rng.integers(0, 2, shape).astype(s.dtype)
    return out
