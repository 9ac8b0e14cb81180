"""What every data source yields: named model batches, and cheap headers to check them before any run.

The readers of whole-batch files (:mod:`.readers`) and of row-per-sample data (:mod:`.rows`) both build a
:class:`Source`; they share these types from here rather than from each other. What the user asked for, the
data or the synthetic inputs and how many batches of what size, travels as one :class:`DataOptions`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..errors import NormactError

Batch = dict[str, np.ndarray]  # input name → array, samples along axis 0
Header = dict[str, tuple[tuple[int, ...], np.dtype]]  # input name → (shape, dtype), read without the data


@dataclass
class Source:
    """Batches from one place; ``headers`` (when the source can give them cheaply) allow checking before any run."""

    describe: str
    batches: Callable[[], Iterator[tuple[str, Batch]]]  # (where, batch)
    headers: Callable[[], Iterator[tuple[str, Header]]] | None = None
    total: int | None = None


@dataclass(frozen=True)
class DataOptions:
    """Where sample inputs come from: one value from the command line (or the API's keywords) down to the readers.

    ``data``: a path, a reader with ``get_next()``, an iterable of feed dicts, or a ``ray.data.Dataset``; or
    ``synthetic`` inputs, with ``shapes`` for symbolic dimensions, ``values`` for inputs filled with one value and
    ``seed``. ``batches``: at most this many (None: all; synthetic: the reader's default). ``batch_size``: split
    files into batches of this many samples (synthetic: the batch dimension). ``images``: an
    :class:`.rows.ImageOptions` for image folders. What each field defaults to is the caller's choice (``fold``
    checks on two batches of one sample), so the defaults here are those of ``calibrate``.
    """

    data: Any = None
    batches: int | None = None
    batch_size: int | None = None
    synthetic: bool = False
    shapes: Any = None
    values: Any = None
    seed: int = 0
    images: Any = None

    @classmethod
    def from_keywords(cls, data: Any, keywords: Mapping[str, Any]) -> DataOptions:
        """The value the loose keywords of an API call name (``batches``, ``batch_size``, ``synthetic``, ``shapes``,
        ``values``, ``seed``, ``images``; absent ones at their defaults), with ``data`` as the source."""
        fields = ("batches", "batch_size", "synthetic", "shapes", "values", "seed", "images")
        return cls(data, **{k: keywords[k] for k in fields if k in keywords})

    def with_synthetic_defaults(self, batches: int, batch_size: int) -> DataOptions:
        """Synthetic inputs: ``batches`` and ``batch_size`` filled with the caller's defaults where left open.

        Each caller decides its defaults once, here, and reads the filled value back (progress bar totals, the
        readers); data files keep theirs open (every batch, as stored).
        """
        if not self.synthetic:
            return self
        return replace(self, batches=self.batches or batches, batch_size=self.batch_size or batch_size)


def data_bundle(data_options: DataOptions | None, loose: DataOptions) -> DataOptions:
    """The data source of a call: ``data_options`` as given, or built from the loose keywords (``loose``)."""
    if data_options is None:
        return loose
    if loose != DataOptions():
        raise NormactError(
            "pass the data source as data_options= or as data/batches/batch_size/synthetic/shapes/values/seed/images,"
            " not both"
        )
    return data_options
