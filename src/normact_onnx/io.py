"""Loading and saving models without surprises.

- Weights stored as external data are never read unless a pass needs them; the
  output keeps pointing at (a copy or hard link of) the same data files.
- Paths in external data that escape the model's folder are refused.
- Writes go to a temporary file in the destination folder and are renamed into
  place, so a crash or a failed verification leaves nothing half-written.
- The IR version is kept, only clamped to what the installed onnxruntime reads.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import shutil
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from .errors import NormactError

TWO_GB = 2**31
ModelLike = str | os.PathLike | onnx.ModelProto


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse a model file (external data left on disk) or fail with one clear line."""
    p = Path(path)
    if not p.exists():
        raise NormactError(f"{p}: no such file")
    if p.is_dir():
        raise NormactError(f"{p}: is a folder, not an .onnx file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise NormactError(f"{p}: not a readable ONNX model ({type(e).__name__})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise NormactError(f"{p}: not an ONNX model (no graph; truncated or another file type?)")
    check_external_paths(model, p.parent)
    return model


def load_model_like(model: ModelLike) -> tuple[onnx.ModelProto, Path | None]:
    """A ``ModelProto`` as given (no path), or the file parsed by :func:`load_model` with its path."""
    if isinstance(model, onnx.ModelProto):
        return model, None
    path = Path(model)
    return load_model(path), path


def model_folder(path: Path | None) -> str | None:
    """The folder external data is read from: the model file's, or None for an in-memory model."""
    return str(path.parent) if path is not None else None


def refuse_overwrite(output: str | os.PathLike | None, path: Path | None, in_place: bool) -> None:
    """Writing onto the model that was read needs ``in_place``."""
    if output is not None and path is not None and Path(output).resolve() == path.resolve() and not in_place:
        raise NormactError(f"refusing to overwrite the input {path}; pass --in-place to do that")


def _external_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    from onnx.external_data_helper import _get_all_tensors

    for t in _get_all_tensors(model):
        if uses_external_data(t):
            yield t


def external_locations(model: onnx.ModelProto) -> set[str]:
    return {ExternalDataInfo(t).location for t in _external_tensors(model)}


def check_external_paths(model: onnx.ModelProto, base: Path) -> None:
    """Refuse external data locations that leave the model's folder (absolute, '..', links out)."""
    root = base.resolve()
    for loc in external_locations(model):
        target = (base / loc).resolve()
        if Path(loc).is_absolute() or not target.is_relative_to(root):
            raise NormactError(f"external data location {loc!r} escapes the model's folder; refusing to read it")
        if not target.exists():
            raise NormactError(f"external data file {loc!r} is missing next to the model")


@lru_cache(maxsize=1)
def max_ir_version() -> int:
    """The highest IR version the installed onnxruntime loads (probed once; onnx's own if no ORT)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return onnx.IR_VERSION
    from onnx import helper

    so = ort.SessionOptions()
    so.log_severity_level = 3  # a refused IR version is the answer here, not a warning for the user
    for ir in range(onnx.IR_VERSION, 3, -1):
        g = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        m.ir_version = ir
        try:
            ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return ir
        except Exception:
            continue
    return 3


def clamp_ir(model: onnx.ModelProto) -> None:
    """Keep the model's IR version unless the installed onnxruntime cannot read it."""
    model.ir_version = min(model.ir_version, max_ir_version())


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """A temporary path beside ``dest``, renamed onto it only if the block succeeds."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def carry_external_data(model: onnx.ModelProto, src_dir: Path, dest_dir: Path) -> None:
    """Copy the model's external data files next to the output (hard links are refused by onnx's checker)."""
    if src_dir.resolve() == dest_dir.resolve():
        return
    for loc in external_locations(model):
        src, dst = src_dir / loc, dest_dir / loc
        if dst.exists():
            if os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False):
                continue
            raise NormactError(f"{dst} exists with other content; refusing to overwrite another model's data")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)  # streams (sendfile); never holds the data in memory
        os.replace(tmp, dst)


def write_model(model: onnx.ModelProto, path: Path) -> None:
    """Serialize (tensors still external stay external) to ``path``."""
    too_big = "the rewritten model is over 2 GB in one protobuf; store its weights as external data"
    try:
        data = model.SerializeToString()
    except ValueError:  # protobuf refuses messages over 2 GB
        raise NormactError(too_big) from None
    if len(data) >= TWO_GB:
        raise NormactError(too_big)
    with open(path, "wb") as fh:
        fh.write(data)
