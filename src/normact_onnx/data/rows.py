"""Row-per-sample data: Parquet tables and image folders, turned into model batches.

Both formats hold one sample per row (a tokenized sentence, an image), unlike the
``.npz``/``.npy`` files of :mod:`.readers` that hold whole batches. The same
functions turn rows into a model batch whether the rows were read here (pyarrow,
PIL: the single-process run) or by Ray Data's ``read_parquet``/``read_images``
(the distributed run, :mod:`.distributed`), so both runs feed the model the same
numbers.

* Parquet: one column per model input, named after it; a fixed-shape tensor
  column or a (nested) list column. A flat list is reshaped to the input's
  per-sample shape when that shape is fully known.
* Images: decoded by PIL in the mode the model's channel count asks for (``L`` or
  ``RGB``), resized to ``size`` (bilinear) when they differ, then
  ``(pixel · scale − mean) / std`` per channel, laid out NCHW or NHWC.

pyarrow and Pillow come with the ``[ray]`` extra (``ray[data]`` needs both); the
single-process run imports them only when such a source is given.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NormactError
from .inputs import InputSpec
from .options import Batch, Source

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")  # what Ray Data's read_images reads
LAYOUTS = ("nchw", "nhwc")
DEFAULT_ROWS = 32  # samples per batch when --batch-size is not given


def _need(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise NormactError(
            f"{what} needs {module.split('.')[0]}: pip install 'normact-onnx[ray]' (or pyarrow and pillow)"
        ) from None


# ---- which kind of path ------------------------------------------------------------------------------------------


def parquet_files(path: Path) -> list[Path] | None:
    """The Parquet files a path stands for, or None when it is not a Parquet source."""
    if path.is_file():
        return [path] if path.suffix == ".parquet" else None
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        return files or None
    return None


def image_files(path: Path) -> list[Path] | None:
    """The images under a folder (class subfolders included, sorted), or None when it holds none."""
    if not path.is_dir():
        return None
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return files or None


# ---- Parquet -----------------------------------------------------------------------------------------------------


def stack_column(values: Any, spec: InputSpec, where: str, rows: Sequence[str] | None = None) -> np.ndarray:
    """One input's column (a tensor array, or one entry per row) → an array with the samples on axis 0.

    ``rows`` names each row (file and row number) for the error when rows disagree in shape.
    """
    if isinstance(values, np.ndarray) and values.dtype != object:
        return _reshape(values, spec)
    arrays = [_nested(v) for v in values]
    if not arrays:
        raise NormactError(f"{where}: no rows")
    first = arrays[0].shape
    for i, a in enumerate(arrays):
        if a.shape != first:
            at = rows[i] if rows else f"{where} row {i}"
            head = rows[0] if rows else "row 0"
            raise NormactError(
                f"{at}: input {spec.name!r} has shape {list(a.shape)} in this row but {list(first)} in {head}"
            )
    return _reshape(np.stack(arrays), spec)


def _nested(v: Any) -> np.ndarray:
    a = np.asarray(v)
    if a.dtype == object:  # a list of lists arrives as an array of arrays
        a = np.stack([_nested(e) for e in a]) if a.size else np.zeros(0)
    return a


def _reshape(a: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Flat rows (a ``list<float>`` column) take the input's per-sample shape when it is fully known."""
    per_sample = spec.shape[1:] if spec.shape else []
    dims = [d for d in per_sample if isinstance(d, int) and d > 0]  # only a fully known shape
    if a.ndim == 2 and len(per_sample) > 1 and len(dims) == len(per_sample) and a.shape[1] == math.prod(dims):
        return a.reshape(a.shape[0], *dims)
    return a


def columns_batch(
    columns: dict[str, Any], specs: list[InputSpec], where: str, rows: Sequence[str] | None = None
) -> Batch:
    """The model's inputs from a table batch (other columns, such as Ray's ``path``, are ignored)."""
    missing = [s.name for s in specs if s.name not in columns]
    if missing:
        have = ", ".join(repr(c) for c in columns if c != "path")
        raise NormactError(f"{where}: no column {missing[0]!r} for the model input of that name (columns: {have})")
    return {s.name: stack_column(columns[s.name], s, where, rows) for s in specs}


def check_parquet_schema(path: Path, specs: list[InputSpec]) -> int:
    """Every input has a column (from the file's footer only); returns the file's row count."""
    pq = _need("pyarrow.parquet", "a Parquet source")
    try:
        meta = pq.ParquetFile(path)
    except Exception as e:
        raise NormactError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    names = meta.schema_arrow.names
    for s in specs:
        if s.name not in names:
            raise NormactError(
                f"{path}: no column {s.name!r} for the model input of that name (columns: {', '.join(names)})"
            )
    return meta.metadata.num_rows


def arrow_column(col: Any) -> Any:
    """A pyarrow column → a tensor array (fixed-shape tensor columns) or one entry per row (lists)."""
    pa = _need("pyarrow", "a Parquet source")
    if isinstance(col.type, pa.FixedShapeTensorType):
        return col.combine_chunks().to_numpy_ndarray() if hasattr(col, "combine_chunks") else col.to_numpy_ndarray()
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        return col.to_numpy(zero_copy_only=False)
    return col.to_numpy(zero_copy_only=False)


def parquet_source(files: list[Path], specs: list[InputSpec], batch_size: int | None, describe: str) -> Source:
    """Batches of ``batch_size`` rows, file by file (a batch does not span files), read with pyarrow."""
    pq = _need("pyarrow.parquet", "a Parquet source")
    size = batch_size or DEFAULT_ROWS
    counts = [check_parquet_schema(f, specs) for f in files]

    def batches() -> Iterator[tuple[str, Batch]]:
        for f in files:
            start = 0
            for rb in pq.ParquetFile(f).iter_batches(batch_size=size, columns=[s.name for s in specs]):
                where = f"{f} rows {start}-{start + rb.num_rows - 1}"
                rows = [f"{f} row {start + i}" for i in range(rb.num_rows)]
                cols = {name: arrow_column(rb.column(name)) for name in rb.schema.names}
                yield where, columns_batch(cols, specs, where, rows)
                start += rb.num_rows

    total = sum(-(-n // size) for n in counts)
    return Source(
        f"{describe} ({len(files)} Parquet file{'s' * (len(files) != 1)}, {sum(counts)} rows)", batches, None, total
    )


# ---- images ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageOptions:
    """How image files become an input tensor (the CLI's --image-* options)."""

    size: tuple[int, int] | None = None  # (height, width); None: the input's fixed size
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "nchw"
    input: str | None = None  # which model input receives the images (default: the only one)

    @classmethod
    def parse(
        cls,
        size: str | Sequence[int] | None = None,
        scale: float | None = None,
        mean: str | Sequence[float] | None = None,
        std: str | Sequence[float] | None = None,
        layout: str | None = None,
        input: str | None = None,
    ) -> ImageOptions:
        """From CLI strings (``224x224``, ``0.485,0.456,0.406``) or Python values."""
        hw = None
        if size is not None:
            try:
                hw = tuple(int(d) for d in (size.lower().split("x") if isinstance(size, str) else size))
                if len(hw) != 2 or min(hw) < 1:
                    raise ValueError
            except ValueError:
                raise NormactError(f"--image-size {size!r}: expected HEIGHTxWIDTH, e.g. 224x224") from None
        lay = (layout or "nchw").lower()
        if lay not in LAYOUTS:
            raise NormactError(f"--layout {layout!r}: choose nchw or nhwc")
        st = _floats(std, "--std", (1.0,))
        if any(v == 0 for v in st):
            raise NormactError("--std: values must be non-zero")
        sc = 1 / 255 if scale is None else float(scale)
        return cls(hw, sc, _floats(mean, "--mean", (0.0,)), st, lay, input)  # type: ignore[arg-type]


def _floats(value: str | Sequence[float] | None, flag: str, default: tuple[float, ...]) -> tuple[float, ...]:
    if value is None:
        return default
    try:
        out = tuple(float(v) for v in (value.split(",") if isinstance(value, str) else value))
    except ValueError:
        raise NormactError(f"{flag} {value!r}: expected one number or one per channel, comma-separated") from None
    if not out:
        raise NormactError(f"{flag}: no values")
    return out


@dataclass(frozen=True)
class ImagePlan:
    """ImageOptions resolved against the model: the input, its colour mode and its spatial size."""

    spec: InputSpec
    mode: str  # PIL mode: "L" (one channel) or "RGB"
    channels: int
    size: tuple[int, int]
    options: ImageOptions


def image_plan(specs: list[InputSpec], options: ImageOptions | dict[str, Any] | None) -> ImagePlan:
    """Which input, colour mode and size; ``options`` may also be a dict of :meth:`ImageOptions.parse` arguments."""
    opts = ImageOptions.parse(**options) if isinstance(options, dict) else (options or ImageOptions())
    if opts.input is not None:
        spec = next((s for s in specs if s.name == opts.input), None)
        if spec is None:
            raise NormactError(
                f"--image-input {opts.input}: the model has no such input ({', '.join(s.name for s in specs)})"
            )
    elif len(specs) == 1:
        spec = specs[0]
    else:
        raise NormactError(
            f"an image folder feeds one input; name it with --image-input ({', '.join(s.name for s in specs)})"
        )
    others = [s.name for s in specs if s is not spec]
    if others:
        raise NormactError(f"an image folder feeds one input, but the model also needs {', '.join(others)}")
    if spec.dtype.kind != "f":
        raise NormactError(f"input {spec.name!r} is {spec.dtype}: images feed floating-point inputs")
    if spec.shape is not None and len(spec.shape) != 4:
        raise NormactError(
            f"input {spec.name!r} has shape {spec.describe()}: images feed rank-4 inputs (N, C, H, W or N, H, W, C)"
        )
    dims = spec.shape or [None] * 4
    c, h, w = (dims[1], dims[2], dims[3]) if opts.layout == "nchw" else (dims[3], dims[1], dims[2])
    channels = c if isinstance(c, int) and c > 0 else 3
    if channels not in (1, 3):
        raise NormactError(f"input {spec.name!r} has {channels} channels ({opts.layout}): images give 1 (L) or 3 (RGB)")
    size = opts.size
    if size is None:
        if not (isinstance(h, int) and h > 0 and isinstance(w, int) and w > 0):
            raise NormactError(
                f"input {spec.name!r} has shape {spec.describe()}: give the image size with --image-size HxW"
            )
        size = (h, w)
    for name, vals in (("--mean", opts.mean), ("--std", opts.std)):
        if len(vals) not in (1, channels):
            raise NormactError(f"{name}: {len(vals)} values for {channels} channel(s)")
    return ImagePlan(spec, "L" if channels == 1 else "RGB", channels, size, opts)


def decode_image(path: Path | str, mode: str) -> np.ndarray:
    """An image file → HxW (L) or HxWx3 (RGB) uint8, decoded the way Ray Data's read_images does (PIL)."""
    image_mod = _need("PIL.Image", "an image folder")
    try:
        with image_mod.open(path) as im:
            return np.asarray(im.convert(mode))
    except Exception as e:
        raise NormactError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def images_batch(images: Sequence[np.ndarray], plan: ImagePlan, names: Sequence[str]) -> Batch:
    """Decoded images → the input tensor: resize, scale, mean/std, layout (``names`` label errors)."""
    image_mod = _need("PIL.Image", "an image folder")
    h, w = plan.size
    out = np.empty((len(images), h, w, plan.channels), np.float32)
    for i, img in enumerate(images):
        a = np.asarray(img)
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        want_rank = 2 if plan.channels == 1 else 3
        if a.ndim != want_rank or (a.ndim == 3 and a.shape[2] != 3):
            raise NormactError(f"{names[i]}: image of shape {list(a.shape)}, expected {plan.mode}")
        if a.shape[:2] != (h, w):
            a = np.asarray(image_mod.fromarray(a).resize((w, h), image_mod.BILINEAR))
        out[i] = a.reshape(h, w, plan.channels)
    opts = plan.options
    out = (out * np.float32(opts.scale) - np.asarray(opts.mean, np.float32)) / np.asarray(opts.std, np.float32)
    if opts.layout == "nchw":
        out = out.transpose(0, 3, 1, 2)
    return {plan.spec.name: np.ascontiguousarray(out, dtype=plan.spec.dtype)}


def image_source(
    files: list[Path], specs: list[InputSpec], batch_size: int | None, options: ImageOptions | None, describe: str
) -> Source:
    """Batches of ``batch_size`` images in sorted path order, decoded with PIL."""
    plan = image_plan(specs, options)
    size = batch_size or DEFAULT_ROWS

    def batches() -> Iterator[tuple[str, Batch]]:
        for start in range(0, len(files), size):
            chunk = files[start : start + size]
            images = [decode_image(f, plan.mode) for f in chunk]
            yield f"{chunk[0]} … {chunk[-1]}", images_batch(images, plan, [str(f) for f in chunk])

    return Source(f"{describe} ({len(files)} images)", batches, None, -(-len(files) // size))
