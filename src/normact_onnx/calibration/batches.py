"""What every data source yields: named model batches, and cheap headers to check them before any run.

The readers of whole-batch files (:mod:`.readers`) and of row-per-sample data (:mod:`.rows`) both build a
:class:`Source`; they share these types from here rather than from each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

Batch = dict[str, np.ndarray]  # input name → array, samples along axis 0
Header = dict[str, tuple[tuple[int, ...], np.dtype]]  # input name → (shape, dtype), read without the data


@dataclass
class Source:
    """Batches from one place; ``headers`` (when the source can give them cheaply) allow checking before any run."""

    describe: str
    batches: Callable[[], Iterator[tuple[str, Batch]]]  # (where, batch)
    headers: Callable[[], Iterator[tuple[str, Header]]] | None = None
    total: int | None = None
