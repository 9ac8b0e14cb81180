"""Calibration data: every source becomes an iterator of ``{input name: array}`` batches.

Sources: an ``.npz`` (keys = input names), a ``.npy`` (single-input models), a
folder of ``.npz``/``.npy`` files (one batch each), an ONNX ``test_data_set_*``
folder of ``input_*.pb`` (or a folder of such folders), Parquet files or image
folders (one sample per row, see :mod:`.rows`), any object with ONNX
Runtime's ``CalibrationDataReader`` interface (``get_next()`` → dict or None), an
iterable of dicts, or synthetic N(0, 1) inputs.

File sources are checked against the model *before any run* from their headers
only (npy/npz headers are read without loading the arrays), so a bad 40th file
fails in a second, not after 39 batches. A mismatch names the input, the
expected shape and the given one.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import NormactError
from . import rows
from .inputs import InputSpec, format_shape
from .options import Batch, DataOptions, Header, Source
from .synthetic import meaningful, parse_assignments, parse_values, resolve_shapes, synthetic_batch

# Notes about the data (arrays ignored) go to the ``normact_onnx`` logger: without logging configured, Python prints
# a warning's message alone on stderr (one line), and a program that embeds the package can route or silence them.
LOG = logging.getLogger("normact_onnx")

# ---- checking --------------------------------------------------------------------------------------------------


def check_header(
    specs: list[InputSpec],
    header: dict[str, tuple[tuple[int, ...], np.dtype]],
    where: str,
    noted: set[str] | None = None,
) -> None:
    """Names, dtypes and shapes of one batch against the model's inputs (arrays not needed).

    Arrays that name no input (a fine-tuning file's labels) are ignored; ``noted`` (one set per run) makes the
    note that says so appear once for each such name (None: ignored silently, as a Ray worker does after the
    driver's check).
    """
    by_name = {s.name: s for s in specs}
    for spec in specs:
        if spec.name not in header:
            given = f"; given {', '.join(map(repr, header))}" if header else ""
            raise NormactError(f"{where}: missing input {spec.name!r} ({spec.describe()} {spec.dtype}){given}")
    if noted is not None:
        note_extra_arrays([k for k in header if k not in by_name], specs, where, noted)
    sizes: dict[str, tuple[int, str]] = {}
    for spec in specs:
        shape, dtype = header[spec.name]
        if len(shape) and shape[0] == 0:  # statistics of nothing are empty, a comparison of nothing is no check
            raise NormactError(
                f"{where}: input {spec.name!r} holds no samples (shape {format_shape(shape)}); give data with rows"
            )
        if _kind(dtype) != _kind(spec.dtype):
            raise NormactError(f"{where}: input {spec.name!r}: expected dtype {spec.dtype}, given {dtype}")
        if spec.shape is None:
            continue
        bad = len(shape) != len(spec.shape) or any(
            isinstance(want, int) and want > 0 and want != got for want, got in zip(spec.shape, shape)
        )
        if bad:
            raise NormactError(
                f"{where}: input {spec.name!r}: expected shape {spec.describe()}, given {format_shape(shape)}"
            )
        for want, got in zip(spec.shape, shape):
            if meaningful(want):  # '?', 'unk__3': unrelated sizes the exporter did not name
                seen = sizes.setdefault(want, (got, spec.name))
                if seen[0] != got:
                    raise NormactError(
                        f"{where}: dimension {want!r} is {seen[0]} in input {seen[1]!r} "
                        f"but {got} in input {spec.name!r}"
                    )


def note_extra_arrays(names: list[str], specs: list[InputSpec], where: str, noted: set[str]) -> None:
    """One note on stderr (the ``normact_onnx`` logger) for arrays in the data that no model input takes.

    They are left out of every batch; ``noted`` holds the names already reported in this run.
    """
    new = sorted(set(names) - noted)
    if not new:
        return
    noted.update(new)
    plural = "s" * (len(new) != 1)
    inputs = ", ".join(repr(s.name) for s in specs)
    listed = ", ".join(map(repr, new))
    LOG.warning(f"note: {where}: ignoring array{plural} {listed} (not an input of the model; its inputs: {inputs})")


def _kind(dtype: np.dtype) -> str:
    """Same kind = castable without surprise: float64 data for a float32 input is fine, floats for int ids are not."""
    dtype = np.dtype(dtype)
    return "f" if dtype.kind == "f" else ("i" if dtype.kind in "iu" else dtype.kind)


def conform(specs: list[InputSpec], batch: Any, where: str, noted: set[str] | None = None) -> Batch:
    """Check one loaded batch and cast it to the model's dtypes (arrays no input takes left out, see check_header)."""
    if not isinstance(batch, dict):
        raise NormactError(f"{where}: a batch must be a dict of input name → array, got {type(batch).__name__}")
    arrays = {k: np.asarray(v) for k, v in batch.items()}
    check_header(specs, {k: (v.shape, v.dtype) for k, v in arrays.items()}, where, noted)
    out = {s.name: np.ascontiguousarray(arrays[s.name], dtype=s.dtype) for s in specs}
    for name, arr in out.items():  # NaN/Inf would turn every statistic into NaN (and "constant" sites)
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            bad = "NaN" if np.isnan(arr).any() else "Inf"
            raise NormactError(f"{where}: input {name!r} holds {bad} values; clean the data or leave that batch out")
    return out


# ---- sources ---------------------------------------------------------------------------------------------------


def _load_npy(path: Path, mmap_mode: Literal["r"] | None = None) -> np.ndarray:
    """An .npy array, or one line saying why not (object arrays need pickle, which is never loaded)."""
    try:
        arr: np.ndarray = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        why = "it holds Python objects (not numbers)" if "object" in str(e).lower() else str(e)
        raise NormactError(f"{path}: not a readable numeric .npy: {why}") from None
    return arr


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    arr = _load_npy(path, mmap_mode="r")
    return arr.shape, arr.dtype


def _npz_header(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with z.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    reader = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = reader(fh)
                out[info.filename[: -len(".npy")]] = (shape, dtype)
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise NormactError(f"{path}: not a readable .npz ({e})") from None
    return out


def _load_npz(path: Path) -> Batch:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise NormactError(f"{path}: not a readable .npz ({e})") from None


def _pb_tensors(folder: Path, specs: list[InputSpec]) -> Batch:
    files = sorted(
        folder.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[-1]) if p.stem.split("_")[-1].isdigit() else 0
    )
    if not files:
        raise NormactError(f"{folder}: no input_*.pb files")
    out = {}
    for i, f in enumerate(files):
        t = onnx.TensorProto()
        try:
            t.ParseFromString(f.read_bytes())
            arr = numpy_helper.to_array(t)
        except Exception as e:
            raise NormactError(f"{f}: not a serialized ONNX TensorProto ({type(e).__name__})") from None
        name = t.name or (specs[i].name if i < len(specs) else f"input_{i}")
        out[name] = arr
    return out


def _single_input(specs: list[InputSpec], what: str) -> str:
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise NormactError(f"{what} feeds a single-input model; this one has inputs {names}: use .npz with those keys")
    return specs[0].name


def _split(batch: Batch, size: int | None) -> Iterator[Batch]:
    """Cut a batch along axis 0 into pieces of ``size`` samples (all inputs together)."""
    n = min((len(v) for v in batch.values() if np.ndim(v)), default=0)
    if not size:
        if n or not any(np.ndim(v) for v in batch.values()):  # an empty shard gives no batch (file_headers)
            yield batch
        return
    for start in range(0, n, size):
        yield {k: v[start : start + size] if np.ndim(v) else v for k, v in batch.items()}


def _split_header(h: dict[str, tuple[tuple[int, ...], np.dtype]], size: int | None) -> dict:
    if not size:
        return h
    return {k: ((min(size, s[0]), *s[1:]) if s else s, d) for k, (s, d) in h.items()}


def _file_batch(path: Path, specs: list[InputSpec]) -> Batch:
    if path.suffix == ".npz":
        return _load_npz(path)
    if path.suffix == ".npy":
        return {_single_input(specs, f"{path}: an .npy file"): _load_npy(path)}
    return _pb_tensors(path, specs)


def _file_header(path: Path, specs: list[InputSpec]) -> dict:
    if path.suffix == ".npz":
        return _npz_header(path)
    if path.suffix == ".npy":
        return {_single_input(specs, f"{path}: an .npy file"): _npy_header(path)}
    return {k: (v.shape, v.dtype) for k, v in _pb_tensors(path, specs).items()}


def _files(path: Path) -> list[Path]:
    """The batches a path stands for: itself, its test_data_set_* folders, or its .npz/.npy files."""
    if path.is_file():
        if path.suffix not in (".npz", ".npy"):
            raise NormactError(f"{path}: unsupported data file (use .npz, .npy or a test_data_set_* folder)")
        return [path]
    if not path.is_dir():
        raise NormactError(f"{path}: no such file or folder")
    if any(path.glob("input_*.pb")):
        return [path]
    sets = sorted(p for p in path.glob("test_data_set_*") if p.is_dir())
    if sets:
        return sets
    files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
    if not files:
        raise NormactError(f"{path}: no .npz/.npy files or test_data_set_* folders in it")
    return files


def file_batches(
    f: Path, specs: list[InputSpec], batch_size: int | None, start: int = 0, stop: int | None = None
) -> Iterator[tuple[str, Batch]]:
    """The batches of one file (cut into ``batch_size`` pieces), from piece ``start`` up to ``stop``."""
    for i, b in enumerate(_split(_file_batch(f, specs), batch_size)):
        if stop is not None and i >= stop:
            return
        if i >= start:
            yield (f"{f}" + (f" (batch {i})" if batch_size else ""), b)


def file_pieces(path: str | os.PathLike, specs: list[InputSpec], batch_size: int | None) -> list[tuple[Path, int]]:
    """Each file a path stands for with its number of batches (from headers only): the distributed run's work list."""
    out = []
    for f in _files(Path(path)):
        if batch_size:
            n = min((s[0] for s, _ in _file_header(f, specs).values() if s), default=0)
            out.append((f, -(-n // batch_size)))
        else:
            out.append((f, 1))
    return out


def has_batch_files(path: Path) -> bool:
    """Whether a folder is a batch-file source (.npz/.npy files or ONNX test data sets) rather than images."""
    return (
        any(path.glob("input_*.pb"))
        or any(path.glob("test_data_set_*"))
        or any(p.suffix in (".npz", ".npy") for p in path.iterdir())
    )


def file_headers(files: list[Path], specs: list[InputSpec], batch_size: int | None) -> Iterator[tuple[str, Header]]:
    """Each file's batch header (shapes and dtypes, read without the arrays): what is checked before any run.

    An empty shard among files that hold samples is passed over (it gives no batches, in a single process as
    on Ray); when every file is empty their headers stay, so ``check_header`` says which input holds no samples.
    """
    headers = [(str(f), _split_header(_file_header(f, specs), batch_size)) for f in files]
    if not all(_empty(h) for _, h in headers):
        headers = [(where, h) for where, h in headers if not _empty(h)]
    yield from headers


def _empty(header: Header) -> bool:
    return any(len(shape) and shape[0] == 0 for shape, _ in header.values())


def file_source(path: str | os.PathLike, specs: list[InputSpec], batch_size: int | None = None) -> Source:
    files = _files(Path(path))

    def batches() -> Iterator[tuple[str, Batch]]:
        for f in files:
            yield from file_batches(f, specs, batch_size)

    def headers() -> Iterator[tuple[str, Header]]:
        return file_headers(files, specs, batch_size)

    total = None
    if batch_size:
        sizes = [min((s[0] for s, _ in _file_header(f, specs).values() if s), default=0) for f in files]
        total = sum(-(-n // batch_size) for n in sizes)
    else:
        total = len(files)
    return Source(f"{path} ({len(files)} file{'s' * (len(files) != 1)})", batches, headers, total)


def reader_source(reader: Any) -> Source:
    """ONNX Runtime's CalibrationDataReader protocol: ``get_next()`` until it returns None."""

    def batches() -> Iterator[tuple[str, Batch]]:
        i = 0
        while True:
            b = reader.get_next()
            if b is None:
                return
            yield f"{type(reader).__name__} batch {i}", b
            i += 1

    return Source(f"{type(reader).__name__}.get_next()", batches)


def iterable_source(items: Iterable[Any]) -> Source:
    def batches() -> Iterator[tuple[str, Batch]]:
        for i, b in enumerate(items):
            yield f"batch {i}", b

    total = len(items) if isinstance(items, Sized) else None
    return Source("batches", batches, total=total)


def parse_shapes(items: Iterable[str] | dict[str, Any] | None) -> dict[str, list[int]]:
    """``["x=1x3x224x224", ...]`` (CLI) or ``{"x": (1, 3, 224, 224)}`` (API) → name → shape."""

    def dims(v: Any) -> list[int]:
        return [int(d) for d in (v.lower().split("x") if isinstance(v, str) else v)]

    return parse_assignments(items, "--shape", dims, "NAME=D1xD2x… (e.g. x=1x3x224x224)")


def synthetic_source(
    specs: list[InputSpec],
    shapes: dict[str, list[int]],
    batches: int,
    seed: int = 0,
    values: dict[str, float] | None = None,
    batch_size: int = 1,
) -> Source:
    """Synthetic inputs by the shared rules of :mod:`normact_onnx.data.synthetic` (N(0, 1) floats, 0/1 integers)."""
    for s in specs:
        if s.name in shapes:
            check_header([s], {s.name: (tuple(shapes[s.name]), s.dtype)}, "--shape")
    concrete = resolve_shapes(specs, shapes, batch_size)

    def gen() -> Iterator[tuple[str, Batch]]:
        rng = np.random.default_rng(seed)
        for i in range(batches):
            yield f"synthetic batch {i}", synthetic_batch(specs, concrete, rng, values)

    desc = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in concrete.items())
    return Source(f"synthetic N(0,1) {desc}", gen, total=batches)


def open_source(options: DataOptions, specs: list[InputSpec]) -> Source:
    """Whatever the user gave (:class:`.batches.DataOptions`) → a :class:`Source` for the model's ``specs``."""
    data, batch_size, batches = options.data, options.batch_size, options.batches
    if batch_size is not None and batch_size < 1:
        raise NormactError(f"--batch-size must be ≥ 1, got {batch_size}")
    if batches is not None and batches < 1:
        raise NormactError(f"--batches must be ≥ 1, got {batches}")
    if options.synthetic:
        if data is not None:
            raise NormactError("give either --data or --synthetic, not both")
        shapes, values = parse_shapes(options.shapes), parse_values(options.values)
        return synthetic_source(specs, shapes, batches or 10, options.seed, values, batch_size or 1)
    if data is None:
        raise NormactError("no calibration data: give --data PATH or --synthetic")
    if isinstance(data, str | os.PathLike):
        path = Path(data)
        if (tables := rows.parquet_files(path)) is not None:
            return rows.parquet_source(tables, specs, batch_size, str(path))
        if path.is_dir() and not has_batch_files(path) and (pictures := rows.image_files(path)) is not None:
            return rows.image_source(pictures, specs, batch_size, options.images, str(path))
        return file_source(data, specs, batch_size)
    if hasattr(data, "get_next"):
        return reader_source(data)
    if isinstance(data, dict):
        return iterable_source([data])
    if isinstance(data, Iterable):
        return iterable_source(data)
    raise NormactError(f"unsupported calibration data of type {type(data).__name__}")
