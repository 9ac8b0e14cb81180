"""What a rewritten model says was done to it: ``normact.version`` and the per-site records of ``normact.sites``.

One record per normalized site (docs/architecture.md §6), a JSON object in the model's metadata. Its keys are
declared once here (:class:`SiteRecord`); ``rewrite`` writes records, ``fold`` marks them folded, the fine-tuning
export updates their constants, and ``find``/``compare`` read them, all through these functions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict, cast

import onnx

from . import __version__

META_VERSION = "normact.version"
META_SITES = "normact.sites"


class SiteRecord(TypedDict, total=False):
    """One site's provenance. The method's own fields (``method``, ``variant``, ``q``, ``ratio``, ``lambda_rule``,
    ``centered_rho``, ``aggregate``, ``per_channel``, ``batches``, ``in_situ``, ``stats``) are spread into it."""

    graph: str  # the graph path of the site ("main", "If_0/then_branch", "function:…")
    name: str
    kind: str
    output: str  # the site's output value: how a later pass finds the site again
    form: str  # function, subgraph or custom-op
    act_output: str  # subgraph form: the plain activation's output inside the written standard ops
    folded: bool  # fold moved the affine part into neighbouring weights
    method: str
    variant: str
    q: float | str
    scale: Any  # floats, or per-channel lists
    shift: Any
    slope: Any


def site_record(
    graph: str, name: str, kind: str, output: str, form: str, method: Mapping[str, Any], constants: Mapping[str, Any]
) -> SiteRecord:
    """The record of a site ``rewrite`` just wrote: where it is and how, then the method's fields, then its constants.

    The method's fields are an open set (each method names its own), so a ``TypedDict`` cannot list them all; this
    is the one place that spreads them into a record. The key order is the order written into the model.
    """
    fields: dict[str, Any] = {"graph": graph, "name": name, "kind": kind, "output": output, "form": form}
    fields.update(method)
    fields.update(constants)
    return cast(SiteRecord, fields)


def read_records(model: onnx.ModelProto) -> list[SiteRecord]:
    """The per-site records earlier rewrites stamped into the model's metadata (none when unreadable)."""
    for p in model.metadata_props:
        if p.key == META_SITES:
            try:
                return list(json.loads(p.value))
            except (ValueError, TypeError):
                return []
    return []


def _dumps(records: Iterable[SiteRecord]) -> str:
    return json.dumps(list(records), separators=(",", ":"))


def stamp(model: onnx.ModelProto, records: list[SiteRecord]) -> None:
    """Write the records and this tool's version (entries replaced in place, or appended)."""
    values = {META_VERSION: __version__, META_SITES: _dumps(records)}
    for p in model.metadata_props:
        if p.key in values:
            p.value = values.pop(p.key)
    for k, v in values.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))


def replace_records(model: onnx.ModelProto, records: list[SiteRecord]) -> None:
    """Rewrite an existing ``normact.sites`` entry (the version stays what the rewrite stamped)."""
    for p in model.metadata_props:
        if p.key == META_SITES:
            p.value = _dumps(records)


def mark_folded(model: onnx.ModelProto, folded: set[tuple[str, str]]) -> None:
    """Mark the records of the (graph, output) sites ``fold`` folded (a later rewrite must not normalize them)."""
    records = read_records(model)
    if not records:
        return
    for r in records:
        if (r.get("graph"), r.get("output")) in folded:
            r["folded"] = True
            r.pop("act_output", None)
    replace_records(model, records)


def update_constants(model: onnx.ModelProto, constants: dict[str, dict[str, Any]], method: str) -> None:
    """New constants (``output`` → scale/shift/slope) and method for the records of those sites."""
    for p in model.metadata_props:
        if p.key == META_SITES:
            records = json.loads(p.value)
            for r in records:
                if r.get("output") in constants:
                    r.update(method=method, **constants[r["output"]])
            p.value = _dumps(records)
