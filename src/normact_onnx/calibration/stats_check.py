"""Validation of a statistics file before it is trusted: every field a reader relies on, one line per problem.

A stats JSON is user input like a model: it may be hand-edited, truncated, or written by
another tool. Everything ``CalibrationStats.from_dict`` reads is checked here first (types,
array lengths, finite numbers, non-negative counts and variances), so a bad file is one clear
error instead of an internal error or, worse, constants silently computed from nonsense.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import NormactError

MOMENTS = ("n", "mean", "m2")
EMA_ARRAYS = ("rho", "rho_centered", "drho", "mu")
SITE_KEYS = ("name", "kind", "graph", "depth", "channel_axis", "channel_shape", "x", "f", "d2_mean")
TOP_KEYS = ("format", "version", "fingerprint", "per_channel", "batches", "sites")


class _Bad(Exception):
    """One problem found, as the text after the file name."""


def _int(v: Any, what: str, minimum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(f"{what} must be an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise _Bad(f"{what} must be ≥ {minimum}, got {v}")
    return v


def _numbers(v: Any, what: str, *, nonneg: bool = False, nulls: bool = False) -> int:
    """A list of finite numbers (``null`` allowed where a value may be undefined); returns its length."""
    if not isinstance(v, list):
        raise _Bad(f"{what} must be a list of numbers, got {type(v).__name__}")
    for x in v:
        if x is None and nulls:
            continue
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
            raise _Bad(f"{what} holds {x!r}, not a finite number")
        if nonneg and x < 0:
            raise _Bad(f"{what} holds {x!r}; it cannot be negative")
    return len(v)


def _moments(v: Any, what: str) -> int:
    if not isinstance(v, dict):
        raise _Bad(f"{what} must be an object with n, mean, m2")
    lengths = set()
    for k in MOMENTS:
        if k not in v:
            raise _Bad(f"{what} has no {k!r}")
        lengths.add(_numbers(v[k], f"{what}.{k}", nonneg=k != "mean"))
    if len(lengths) > 1:
        raise _Bad(f"{what}: n, mean and m2 have different lengths {sorted(lengths)}")
    return lengths.pop()


def _site(key: str, s: Any) -> None:
    where = f"site {key!r}"
    if not isinstance(s, dict):
        raise _Bad(f"{where} must be an object, got {type(s).__name__}")
    for k in SITE_KEYS:
        if k not in s:
            raise _Bad(f"{where} has no {k!r}")
    for k in ("name", "kind", "graph"):
        if not isinstance(s[k], str):
            raise _Bad(f"{where}: {k} must be a string")
    _int(s["depth"], f"{where}: depth", 0)
    if s["channel_axis"] is not None:
        _int(s["channel_axis"], f"{where}: channel_axis")
    if not isinstance(s["channel_shape"], list):
        raise _Bad(f"{where}: channel_shape must be a list")
    for d in s["channel_shape"]:
        _int(d, f"{where}: channel_shape")
    c = _moments(s["x"], f"{where}: x")
    lengths = {c, _moments(s["f"], f"{where}: f"), _numbers(s["d2_mean"], f"{where}: d2_mean", nonneg=True)}
    ema = s.get("ema")
    if ema is not None:
        if not isinstance(ema, dict):
            raise _Bad(f"{where}: ema must be an object or null")
        for k in EMA_ARRAYS:
            if k not in ema:
                raise _Bad(f"{where}: ema has no {k!r}")
            lengths.add(_numbers(ema[k], f"{where}: ema.{k}", nonneg=k != "mu", nulls=True))
        _int(ema.get("batches"), f"{where}: ema.batches", 0)
    if len(lengths) > 1:
        raise _Bad(f"{where}: per-channel arrays have different lengths {sorted(lengths)}")


def check_document(d: Any, origin: str, fmt: str, newest: int) -> None:
    """Raise one :class:`NormactError` line for the first problem in a parsed stats file."""
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise NormactError(f"{origin}: not a normact-onnx calibration statistics file")
    try:
        for k in TOP_KEYS:
            if k not in d:
                raise _Bad(f"no {k!r} field")
        version = _int(d["version"], "version", 1)
        if version > newest:
            raise NormactError(f"{origin}: statistics format version {version} is newer than this tool reads; upgrade")
        if not isinstance(d["fingerprint"], str):
            raise _Bad("fingerprint must be a string")
        if not isinstance(d["per_channel"], bool):
            raise _Bad("per_channel must be true or false")
        _int(d["batches"], "batches", 0)
        _int(d.get("merged_from", 1), "merged_from", 1)
        for k, kind in (("sources", list), ("settings", dict), ("skipped", dict)):
            if not isinstance(d.get(k, kind()), kind):
                raise _Bad(f"{k} must be a {'list' if kind is list else 'object'}")
        if not isinstance(d["sites"], dict):
            raise _Bad(f"sites must be an object keyed by the site's output name, got {type(d['sites']).__name__}")
        for key, s in d["sites"].items():
            _site(key, s)
    except _Bad as e:
        raise NormactError(f"{origin}: invalid statistics file: {e}; recalibrate (normact-onnx calibrate)") from None
