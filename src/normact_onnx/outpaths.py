"""The one rule for a command's output paths: none names another output or any input of the same run.

Every path a command will write (``-o``, ``--report``, ``--stats``, the statistics file beside the output,
the data file beside an external-data output, a work folder) is checked, before any work starts, against
the others and against everything the run reads (the model, its external data files, ``--data``, statistics
given as input). Paths are compared as the file system sees them: relative paths and symbolic links resolved,
case folded where the platform folds it (``os.path.normcase``), and, where both files exist, by device and
inode (``os.path.samefile``: hard links, case-insensitive volumes). A collision is one line naming both paths
and the command stops before anything is written, so no run ever replaces a file it also reads or writes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx

from .errors import NormactError
from .io import check_output_path, external_locations

PathLike = str | os.PathLike
MODEL = "the input model"
IN_PLACE = "--in-place"
MODEL_OUTPUT = ("-o", "output")  # how commands label the model they write (the default name: "output")


@dataclass(frozen=True)
class Named:
    """A path with the words a message uses for it (``--report r.json``, ``the input model m.onnx``)."""

    label: str
    path: Path

    def describe(self) -> str:
        return f"{self.label} {self.path}"


def _key(p: Path) -> str:
    """The path as the file system resolves it (links, ``..``, the current folder), case folded where it is."""
    return os.path.normcase(str(p.resolve()))


def _same(a: Path, b: Path) -> bool:
    if _key(a) == _key(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links, a case-insensitive volume on a case-sensitive platform
    except OSError:  # one of them does not exist yet: the resolved names decide
        return False


def model_files(model: PathLike, label: str = MODEL) -> list[Named]:
    """The model file and the external data files it reads (what no output of the run may replace).

    A model that cannot be read is left to the command's own loading, which says why in one line.
    """
    p = Path(model)
    found = [Named(label, p)]
    if not p.is_file():
        return found
    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception:  # not a model: the command's loader reports it
        return found
    return found + [Named("its external data file", p.parent / loc) for loc in sorted(external_locations(m))]


def check_run_paths(
    outputs: Mapping[str, PathLike | None],
    inputs: Iterable[Named] = (),
    *,
    offers_in_place: bool = False,
    folders: Iterable[str] = (),
    beside_model: Mapping[str, PathLike] | None = None,
) -> None:
    """Refuse (one line, before any work) outputs that name each other or an input, or cannot be written.

    ``outputs``: label → path (None: not written this run), each also checked by :func:`.io.check_output_path`
    except the work folders labelled in ``folders`` (compared as a path only). An output labelled
    ``--in-place`` may be the input model; with ``offers_in_place`` the refusal of ``-o MODEL`` names that flag.
    ``beside_model``: files the writer puts beside the model output (carried or repacked external data); the
    writer never overwrites an input or another of them, so they are checked against the other outputs only.
    """
    outs: list[Named] = []
    for label, path in outputs.items():
        if path is None:
            continue
        if label not in set(folders):
            check_output_path(path, label)
        outs.append(Named(label, Path(path)))
    ins = list(inputs)
    for i, a in enumerate(outs):
        for b in outs[i + 1 :]:
            if _same(a.path, b.path):
                raise NormactError(
                    f"{a.describe()} and {b.describe()} name the same file; give each output its own path"
                )
        for inp in ins:
            if a.label == IN_PLACE and inp.label == MODEL:
                continue
            if _same(a.path, inp.path):
                other = (
                    " (or pass --in-place)"
                    if offers_in_place and a.label in MODEL_OUTPUT and inp.label == MODEL
                    else ""
                )
                raise NormactError(
                    f"{a.describe()} would overwrite {inp.describe()}, which this run reads; choose another path{other}"
                )
        for label, path in (beside_model or {}).items():
            if a.label not in (*MODEL_OUTPUT, IN_PLACE) and _same(a.path, Path(path)):
                raise NormactError(f"{a.describe()} would overwrite {label} {path}; choose another path")


def beside(path: PathLike, suffix: str) -> Path:
    """``out.onnx`` → ``out<suffix>`` beside it (``.onnx`` matched in any case)."""
    p = Path(path)
    stem = p.name[: -len(".onnx")] if p.name.lower().endswith(".onnx") else p.name
    return p.with_name(stem + suffix)
