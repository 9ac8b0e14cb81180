"""The verified writer that ``rewrite`` and ``fold`` share: check the input, write atomically, verify the file.

A result takes its final name only after the written file passed the ONNX checker, loaded in ONNX Runtime
and (for rewritten sites) matched the catalogue's numpy reference site by site (docs/architecture.md §7, §8).
Whatever a failed write created is removed again; the input is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from .errors import NormactError
from .io import (
    atomic_path,
    carry_external_data,
    external_locations,
    externalize_computed,
    make_folders,
    partly_used,
    remove_created,
    write_model,
)
from .ort import unknown_ops
from .passes.normalize import SiteOutcome
from .verify import check_model_file, check_sites, ort_load


@dataclass(frozen=True)
class OutputOptions:
    """How a command writes its model, as one value from the CLI through ``rewrite``/``calibrate`` to the writer.

    ``form``: how a normalized site is written (``function``, ``subgraph``, ``custom-op``, ``layout``; ``fold`` has
    none).
    ``verify``: check the written file (checker, ONNX Runtime, site by site) before it takes its name.
    ``in_place``: the output may be the input file. ``write_unchanged``: with an output path, write a verified
    copy even when nothing changed (the CLI without ``-o`` does not).
    """

    form: str = "function"
    verify: bool = True
    in_place: bool = False
    write_unchanged: bool = True


def check_input(m: onnx.ModelProto, path: Path | None, runtime: bool = True) -> None:
    """A model that already fails the checker is the user's problem to hear about first, not ours.

    With ``runtime``, also ops onnxruntime does not know (a custom op without its library): the
    verification of the result would fail on them, and the input, not the result, is the cause.
    """
    where = path or "model"
    target = str(path) if path is not None and external_locations(m) else m
    try:
        onnx.checker.check_model(target)
    except Exception as e:
        why = " ".join(str(e).split())  # the checker's message spans lines; the reason is in all of them
        raise NormactError(f"{where}: fails the ONNX checker: {why[:300]}") from None
    if runtime:
        ops = unknown_ops(m)
        if ops:
            raise NormactError(
                f"{where}: the input model uses op {', '.join(ops)}, which onnxruntime does not know "
                "(a custom op?), so the result cannot be verified; pass --no-verify to skip verification"
            )


def verify_in_memory(m: onnx.ModelProto, outcomes: list[SiteOutcome], base_dir: str | None) -> list[dict]:
    """The checks of :func:`save_verified` for a result that is not written (``rewrite`` without an output)."""
    if not external_locations(m):
        try:
            onnx.checker.check_model(m)
        except Exception as e:
            raise NormactError(f"verification failed: onnx checker: {str(e).splitlines()[0]}") from None
    return check_sites(m, outcomes, base_dir)


def save_verified(
    m: onnx.ModelProto,
    dest: Path,
    src_dir: Path | None,
    outcomes: list[SiteOutcome],
    verify: bool,
    external: bool = False,
) -> list[dict[str, Any]]:
    """Write atomically beside ``dest``; verify the written file before it takes the final name.

    External data files the output uses whole are carried (untouched weights); computed weights of a
    model that had external data (``external``; possibly all of them replaced by now), and the tensors
    of data files the output uses only in part, are streamed into a new data file beside ``dest``.
    Whatever the write created is removed again when it fails.
    """
    dest_dir = dest.parent
    created = make_folders(dest_dir)
    try:
        elsewhere = src_dir is not None and src_dir.resolve() != dest_dir.resolve()
        repack = partly_used(m, src_dir) if src_dir is not None and elsewhere else set()
        if src_dir is not None:
            created += carry_external_data(m, src_dir, dest_dir, skip=repack)  # files the output uses whole
        if external or external_locations(m):  # computed weights, and those of files only partly used now
            data = externalize_computed(m, dest, src_dir=src_dir, repack=repack)
            created += [data] if data is not None else []
        with atomic_path(dest) as tmp:
            write_model(m, tmp)
            report: list[dict[str, Any]] = []
            if verify:
                check_model_file(tmp)
                ort_load(tmp, dest)
                report = check_sites(m, outcomes, str(dest_dir) if external_locations(m) else None)
    except BaseException:
        remove_created(created)
        raise
    return report
