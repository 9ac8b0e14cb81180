"""Loading and saving models without surprises.

- Weights stored as external data are never read unless a pass needs them; the
  output keeps pointing at (a copy or hard link of) the same data files.
- Paths in external data that escape the model's folder are refused.
- Writes go to a temporary file in the destination folder and are renamed into
  place, so a crash or a failed verification leaves nothing half-written.
- The IR version is kept, only clamped to what the installed onnxruntime reads.
- Written files follow the umask (an overwritten file keeps its mode); output paths are
  checked before any work starts.
- A model with external data keeps all its weights external: tensors a pass computed
  (folded weights) are streamed into a data file beside the output, never inlined.

Why one module past 500 lines: external data is the thread through all of it (where a tensor's bytes live
decides how a model is loaded, copied, clamped, streamed and renamed into place), and splitting the readers
from the writers would put that one rule in two rooms.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import itertools
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from .errors import NormactError
from .interop import is_foreign, to_proto
from .runtime.session import open_session, session_options

if TYPE_CHECKING:
    import onnx_ir

TWO_GB = 2**31
EXTERNAL_THRESHOLD = 1024  # bytes: computed initializers this big go to external data (onnx.save's default)
ALIGNMENT = 4096  # offsets in the data file: page-aligned, so ONNX Runtime can map the weights
# what the public API takes as a model (an onnx-graphsurgeon Graph too: untyped, so not named here)
ModelLike = Union[str, os.PathLike, onnx.ModelProto, "onnx_ir.Model"]


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
    """A ``ModelProto`` as given (no path), or the file parsed by :func:`load_model` with its path.

    An ``onnx_ir.Model`` or onnx-graphsurgeon ``Graph`` becomes a new ``ModelProto`` (:mod:`.interop`).
    """
    if isinstance(model, onnx.ModelProto):
        return model, None
    if is_foreign(model):
        return to_proto(model), None
    if not isinstance(model, (str, os.PathLike)):
        raise NormactError(
            f"not a model: {type(model).__name__} (give a path, an onnx.ModelProto, an onnx_ir.Model "
            "or an onnx-graphsurgeon Graph)"
        )
    path = Path(model)
    return load_model(path), path


def model_folder(path: Path | None) -> str | None:
    """The folder external data is read from: the model file's, or None for an in-memory model."""
    return str(path.parent) if path is not None else None


def refuse_overwrite(output: str | os.PathLike | None, path: Path | None, in_place: bool) -> None:
    """Writing onto the model that was read needs ``in_place``."""
    if output is not None and path is not None and Path(output).resolve() == path.resolve() and not in_place:
        raise NormactError(f"refusing to overwrite the input {path}; pass --in-place to do that")


def _graph_tensors(g: onnx.GraphProto | onnx.FunctionProto, attributes: bool) -> Iterator[TensorProto]:
    """A graph's initializers (``attributes``: and node attribute tensors), its subgraphs' included."""
    if isinstance(g, onnx.GraphProto):
        yield from g.initializer
    for node in g.node:
        for a in node.attribute:
            if attributes:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(a.g, attributes)
            for sub in a.graphs:
                yield from _graph_tensors(sub, attributes)


def model_tensors(model: onnx.ModelProto, attributes: bool = True) -> Iterator[TensorProto]:
    """Every tensor a model stores: initializers of every graph and, with ``attributes``, the tensors
    of node attributes (``Constant`` values), model-local functions' included."""
    yield from _graph_tensors(model.graph, attributes)
    if attributes:
        for f in model.functions:
            yield from _graph_tensors(f, attributes)


def _external_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    for t in model_tensors(model):
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


def tensor_array(t: TensorProto, base_dir: str | None) -> Any:
    """A tensor's value as a numpy array; external data is read straight from its file, in one copy.

    onnx's loader reads the bytes into a copy of the proto and then into the array (two copies of
    a possibly huge weight, and it refuses data files that are links inside the model's folder).
    """
    import numpy as np
    from onnx import helper, numpy_helper

    packed = {getattr(TensorProto, n, -1) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")}
    if not (base_dir and uses_external_data(t)) or t.data_type in {TensorProto.STRING, TensorProto.UNDEFINED} | packed:
        return numpy_helper.to_array(t, base_dir or "")  # in memory, strings, or sub-byte storage onnx unpacks
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    count = int(np.prod(t.dims)) if len(t.dims) else 1
    info = ExternalDataInfo(t)
    path = (Path(base_dir) / info.location).resolve()
    if info.length is not None and info.length != dtype.itemsize * count:
        raise NormactError(f"external data of {t.name!r}: {info.length} bytes for {count} × {dtype} values")
    try:
        arr = np.fromfile(path, dtype=dtype, count=count, offset=info.offset or 0)
    except (OSError, ValueError) as e:
        raise NormactError(f"external data of {t.name!r} cannot be read from {info.location!r} ({e})") from None
    if arr.size != count:
        raise NormactError(f"external data file {info.location!r} is too short for tensor {t.name!r}")
    return arr.reshape(tuple(t.dims))


def load_external_data(model: onnx.ModelProto, base: str | os.PathLike) -> None:
    """Read every external tensor into the proto (for runtimes that need the weights in memory).

    Locations were checked by :func:`check_external_paths` when the model was loaded (inside the
    model's folder, links resolved), so a data file that is a symbolic link inside the folder is
    read like any other; onnx's own loader refuses those.
    """
    for t in list(_external_tensors(model)):
        info = ExternalDataInfo(t)
        with open((Path(base) / info.location).resolve(), "rb") as fh:
            fh.seek(info.offset or 0)
            t.raw_data = fh.read(info.length) if info.length else fh.read()
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT


@lru_cache(maxsize=1)
def max_ir_version() -> int:
    """The highest IR version the installed onnxruntime loads (probed once; onnx's own if no ORT)."""
    try:
        import onnxruntime  # noqa: F401  (only whether it is there: the session factory imports it)
    except ImportError:
        return onnx.IR_VERSION
    from onnx import helper

    so = session_options()
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
            open_session(m, None, so, library="none")
            return ir
        except Exception:
            continue
    return 3


def clamp_ir(model: onnx.ModelProto) -> None:
    """Keep the model's IR version unless the installed onnxruntime cannot read it."""
    model.ir_version = min(model.ir_version, max_ir_version())


def _umask() -> int:
    """The process's umask (read by setting and restoring it: Python has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(dest: Path) -> int:
    """The mode a written file gets: an existing file's own (``--in-place`` keeps it), else 0666 less the umask.

    ``tempfile.mkstemp`` creates 0600 files whatever the umask; a model served by another user
    must stay readable the way the user's umask says.
    """
    try:
        return dest.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


TEMP_MARK = "normact-"  # in every temporary name: ``.<name>.normact-<pid>.<random>.tmp``
_TEMP_NAME = re.compile(r"^\..+\.normact-(\d+)\.[A-Za-z0-9_]+\.tmp$")
_swept: set[str] = set()
_STARTED = time.time()  # (about) when this process started: a leftover was last written before it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's live process (or a name we did not write)
        return True
    return True


def sweep_temporaries(folder: Path) -> list[Path]:
    """Remove what a killed run of this tool left in ``folder``: our temporary files whose process is gone.

    Only regular files named the way :func:`temp_beside` names them, with the id of a process that no
    longer exists, last written before this process started, are removed (a live writer's, or anything
    another program named, is never touched).
    Once per folder and process. Returns the files removed.
    """
    key = os.path.normcase(str(folder.resolve()))
    if key in _swept:
        return []
    _swept.add(key)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for e in entries:
        m = _TEMP_NAME.match(e.name)
        if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            if e.is_file(follow_symlinks=False) and e.stat(follow_symlinks=False).st_mtime < _STARTED:
                os.unlink(e.path)
                removed.append(Path(e.path))
    return removed


def temp_beside(dest: Path, mode: int | None = None) -> Path:
    """A new, uniquely named temporary file beside ``dest`` (concurrent writers never share one).

    The name carries this process's id, so a later run can tell a killed run's leftovers
    (:func:`sweep_temporaries`, done here first) from a live writer's file.
    """
    sweep_temporaries(dest.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{TEMP_MARK}{os.getpid()}.", suffix=".tmp", dir=dest.parent)
    try:
        os.fchmod(fd, new_file_mode(dest) if mode is None else mode)
    finally:
        os.close(fd)
    return Path(tmp)


def make_folders(folder: Path) -> list[Path]:
    """``mkdir -p`` that says which folders it created (outermost first), so a failure can remove them."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    missing.reverse()
    for d in missing:
        d.mkdir(exist_ok=True)
    return missing


def remove_created(created: list[Path]) -> None:
    """Undo what a failed write created (files, and folders from :func:`make_folders`), newest first.

    Folders something else has filled meanwhile stay.
    """
    for p in reversed(created):
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """A temporary path beside ``dest``, renamed onto it only if the block succeeds.

    The file gets the mode of :func:`new_file_mode`; folders created for it are removed again
    when the block fails (a full disk is then one line naming ``dest``).
    """
    dest = Path(dest)
    created = make_folders(dest.parent)
    try:
        tmp = temp_beside(dest)
    except BaseException:
        remove_created(created)
        raise
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        remove_created(created)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            why = "no space left on the device (or quota exceeded); free space or write elsewhere"
            raise NormactError(f"{dest}: {why}") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def check_output_path(path: str | os.PathLike, flag: str = "-o") -> Path:
    """Refuse an output path that cannot be written, before any work starts; one line each.

    A name that is not valid UTF-8, a folder (or a name ending in a slash), a location under /proc or
    /sys, a parent that is a file, or a folder this process may not create files in.
    """
    text = os.fspath(path)
    p = Path(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of the name (surrogate escapes): ONNX's C++ side cannot open it
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        raise NormactError(f"{flag} {shown}: the name is not valid UTF-8; choose a UTF-8 file name") from None
    if text.endswith(("/", os.sep)) or p.is_dir():
        raise NormactError(f"{flag} {text}: is a folder; give a file name (e.g. {p / 'model.onnx'})")
    resolved = p.resolve()
    if resolved.parts[1:2] in (("proc",), ("sys",)):
        raise NormactError(f"{flag} {text}: cannot write under /{resolved.parts[1]}; choose a path in a normal folder")
    if p.exists() and not p.is_file():
        raise NormactError(f"{flag} {text}: exists and is not a regular file; choose another path")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NormactError(f"{flag} {text}: {parent} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".normact-write-test.", dir=parent)
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise NormactError(f"{flag} {text}: cannot write in {parent} ({why}); choose a writable folder") from None
    os.close(fd)
    os.unlink(probe)
    return p


def carry_external_data(
    model: onnx.ModelProto, src_dir: Path, dest_dir: Path, skip: set[str] | frozenset[str] = frozenset()
) -> list[Path]:
    """Copy the model's external data files next to the output (hard links are refused by onnx's checker).

    ``skip``: locations not to copy (repacked instead). Returns the files it created (for cleanup when
    the write fails). Each copy goes through its own
    unique temporary name, so concurrent writers into one folder never collide.
    """
    created: list[Path] = []
    if src_dir.resolve() == dest_dir.resolve():
        return created
    for loc in sorted(external_locations(model) - set(skip)):
        src, dst = src_dir / loc, dest_dir / loc
        if dst.exists():
            if os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False):
                continue
            raise NormactError(f"{dst} exists with other content; refusing to overwrite another model's data")
        created += make_folders(dst.parent)
        tmp = temp_beside(dst, mode=0o666 & ~_umask())
        try:
            shutil.copyfile(src, tmp)  # streams (sendfile); never holds the data in memory
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        created.append(dst)
    return created


def write_model(model: onnx.ModelProto, path: Path) -> None:
    """Serialize (tensors still external stay external) to ``path``."""
    too_big = "the rewritten model is over 2 GB in one protobuf; store its weights as external data"
    from google.protobuf.message import EncodeError

    try:
        data = model.SerializeToString()
    except (ValueError, EncodeError):  # protobuf refuses messages over 2 GB
        raise NormactError(too_big) from None
    if len(data) >= TWO_GB:
        raise NormactError(too_big)
    with open(path, "wb") as fh:
        fh.write(data)


def _nbytes(t: TensorProto) -> int:
    """A tensor's data size from its shape (``ByteSize`` walks the whole message: slow for big weights)."""
    import numpy as np
    from onnx import helper

    try:
        item = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return t.ByteSize()
    return item * (int(np.prod(t.dims)) if len(t.dims) else 1)


def partly_used(model: onnx.ModelProto, src_dir: Path) -> set[str]:
    """Data files the model references only in part (a pass replaced some of their tensors).

    Copied whole beside an output they would carry bytes nothing reads (gigabytes, for a big model's
    ``fold`` or ``--preserve-function``); their tensors are repacked by :func:`externalize_computed`.
    """
    used: dict[str, int] = {}
    for t in _external_tensors(model):
        info = ExternalDataInfo(t)
        used[info.location] = used.get(info.location, 0) + (info.length or _nbytes(t))
    out = set()
    for loc, n in used.items():
        try:
            if n < (src_dir / loc).stat().st_size:
                out.add(loc)
        except OSError:
            continue
    return out


def _copy_range(src: Path, offset: int, length: int, fh: Any) -> None:
    """``length`` bytes of ``src`` from ``offset`` onto ``fh``, in pieces (never a whole weight in memory)."""
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            piece = f.read(min(left, 16 << 20))
            if not piece:
                raise NormactError(f"external data file {src.name!r} is shorter than its tensors say")
            fh.write(piece)
            left -= len(piece)


def externalize_computed(
    model: onnx.ModelProto,
    dest: Path,
    threshold: int = EXTERNAL_THRESHOLD,
    src_dir: Path | None = None,
    repack: set[str] | frozenset[str] = frozenset(),
) -> Path | None:
    """Move the inline initializers of a model that uses external data into a new data file beside ``dest``.

    Weights a pass rewrote (``fold``, ``--preserve-function``) are inline tensors in memory; left
    inline they would make a big model's protobuf exceed 2 GB. Each tensor is written and its
    bytes dropped from the proto at once, so nothing is held twice. Tensors stored in the data files
    named in ``repack`` (in ``src_dir``; see :func:`partly_used`) are streamed into the same file, so
    the output carries only the bytes it references. The file is named ``<output>.data``
    (``<output>.<k>.data`` when that name is taken) and created exclusively, so concurrent writers and
    carried data files are never overwritten. Returns the file, or None when there was nothing to move.
    """
    from onnx import numpy_helper

    inline = [
        t
        for t in model_tensors(model, attributes=False)
        if not uses_external_data(t) and t.data_type != TensorProto.STRING and _nbytes(t) >= threshold
    ]
    moved = [t for t in _external_tensors(model) if src_dir is not None and ExternalDataInfo(t).location in repack]
    if not inline and not moved:
        return None
    taken = external_locations(model)
    for k in itertools.count():
        name = f"{dest.name}.data" if k == 0 else f"{dest.name}.{k}.data"
        if name in taken:
            continue
        try:
            fh = open(dest.parent / name, "xb")  # noqa: SIM115 (closed below; exclusive creation picks the name)
        except FileExistsError:
            continue
        break
    path = dest.parent / name

    def point(t: TensorProto, offset: int, length: int) -> None:
        del t.external_data[:]
        for key, value in (("location", name), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=key, value=value)
        t.data_location = TensorProto.EXTERNAL

    try:
        with fh:
            for t in inline:
                raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
                fh.write(b"\0" * (-fh.tell() % ALIGNMENT))
                offset = fh.tell()
                fh.write(raw)
                for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    t.ClearField(f)
                point(t, offset, len(raw))
                del raw
            for t in moved:
                info = ExternalDataInfo(t)
                length = info.length or _nbytes(t)
                fh.write(b"\0" * (-fh.tell() % ALIGNMENT))
                offset = fh.tell()
                _copy_range(Path(src_dir or ".") / info.location, info.offset or 0, length, fh)
                point(t, offset, length)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path
