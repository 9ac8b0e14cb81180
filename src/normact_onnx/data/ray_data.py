"""Ray Data plumbing shared by every distributed run (calibration's and ``compare``'s): the generic half.

Ray is an optional dependency, imported inside functions only. What is here knows nothing of statistics or
comparisons: connecting to (or starting) a cluster, quietly, with token authentication when joining one; a
worker's error found inside Ray's wrapping and shown as one line; the work plan (which rows go to the workers:
batch files, Parquet, images, a ``ray.data.Dataset``) and the :class:`Feeder` that turns a worker's rows back
into checked model batches with the same readers as the single-process run; a pairwise :class:`TreeMerge` of
the workers' partial results; :func:`map_rows`, which runs a worker class over the plan on restartable actors.

Faults: the actors are restartable (``max_restarts``) and their calls retried (``max_task_retries``); Ray
Data only emits a block once its task has finished, so the batches of a task that died with its worker are
counted once, from the retry. The workers themselves live with what they compute:
:mod:`normact_onnx.calibration.distributed` (per-site moments) and :mod:`normact_onnx.comparison` (tallies).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from ..errors import NormactError
from ..progress import native_stderr_quiet
from . import rows
from .feeding import first_line
from .inputs import InputSpec
from .options import Batch
from .readers import check_header, conform, file_batches, file_headers, file_pieces, has_batch_files

INSTALL = "pip install 'normact-onnx[ray]'"
RESTARTS = 3  # a worker that keeps dying is a bug, not a fault to retry forever
CRASH_ENV = "NORMACT_RAY_CRASH_ONCE"  # tests: a marker-file path; the first worker call that creates it exits
DEFAULT_ROWS = 32
T = TypeVar("T")


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or one line on how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise NormactError(f"--ray needs Ray Data: {INSTALL}") from None
    return ray


def is_dataset(data: Any) -> bool:
    """A ``ray.data.Dataset`` (recognised without importing Ray)."""
    return type(data).__module__.startswith("ray.data") and hasattr(data, "map_batches")


@contextlib.contextmanager
def cluster(address: str | None, workers: int) -> Iterator[None]:
    """Connected to Ray for the block: a local cluster started and stopped here (address None), or an existing one.

    A session the caller already opened (``ray.init`` before ``calibrate``) is used and left open.
    The local cluster is stopped on every way out, Ctrl-C included. From the command line (unless
    ``--verbose``), what Ray's native code writes to stderr is kept off the terminal for the block
    (:func:`..progress.native_stderr_quiet`).
    """
    with native_stderr_quiet():
        yield from _cluster(address, workers)


def _cluster(address: str | None, workers: int) -> Iterator[None]:
    ray = require_ray()
    _quiet(ray)
    if ray.is_initialized():
        yield
        return
    token = False
    try:
        if address is None:
            # a CPU per worker plus one for Ray Data's read tasks (else the actors hold every CPU and reads wait)
            ray.init(num_cpus=workers + 1, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        else:
            token = _token_auth(address)
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except Exception as e:
        what = "start a local Ray cluster" if address is None else f"connect to the Ray cluster at {address!r}"
        hint = "" if address is None else _join_hint(token)
        raise NormactError(f"cannot {what}: {first_line(e)}{hint}") from None
    try:
        _quiet(ray)
        yield
    finally:
        ray.shutdown()


def _token_auth(address: str) -> bool:
    """Join with Ray's token authentication (Ray ≥ 2.52) when a token is at hand: whether it is on.

    ``ray start --head`` turns authentication on when it finds a token (``~/.ray/auth_token``, which a local
    ``ray.init`` of Ray ≥ 2.59 creates, ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``), and ``ray.init``
    sends the token for ``address="auto"`` only; for ``HOST:PORT`` it would connect without one and
    fail after ~20 s of retries. So an explicit address is joined the way Ray joins ``auto``: with the token
    when one is found. ``RAY_AUTH_MODE`` set by the user (``token`` or ``disabled``) is left as it is.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return os.environ["RAY_AUTH_MODE"].lower() == "token"
    try:  # Ray's own rule for "auto" (module private to Ray; absent before 2.52, which has no authentication)
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return False
    return bool(maybe_enable_token_auth_if_token_available(warn_if_disabled=False))


def _join_hint(token: bool) -> str:
    """What to check when joining failed, by whether this side sent a token."""
    if token:
        return (
            " (this side sent the authentication token it found; if the cluster runs without token "
            "authentication, set RAY_AUTH_MODE=disabled; if its token differs, copy the head's: `ray get-auth-token`)"
        )
    return (
        " (is it running, and reachable? a cluster with token authentication needs its token here: "
        "`ray get-auth-token` on the head, saved as ~/.ray/auth_token or set as RAY_AUTH_TOKEN)"
    )


def _quiet(ray: Any) -> None:
    """Ray Data's own progress bars and notices off: the command prints its own progress and results."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    with contextlib.suppress(AttributeError):
        ctx.print_on_execution_start = False
    logging.getLogger("ray").setLevel(logging.ERROR)
    # a worker's NormactError reaches the user as one line; Ray Data would also log it (ERROR) with a stack trace
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"ray\..*")
    warnings.filterwarnings("ignore", message=r".*ray_remote_args.*")


def user_error(e: BaseException) -> NormactError | None:
    """The NormactError a worker raised, found inside Ray's wrapping (RayTaskError, Ray Data's errors)."""
    seen = set()
    stack = [e]
    while stack:
        cur = stack.pop()
        if id(cur) in seen or cur is None:
            continue
        seen.add(id(cur))
        if isinstance(cur, NormactError):
            return NormactError(str(cur).strip().splitlines()[0])
        for attr in ("cause", "__cause__", "__context__"):
            nxt = getattr(cur, attr, None)
            if isinstance(nxt, BaseException):
                stack.append(nxt)
    text = str(e)
    marker = "NormactError: "
    if marker in text:  # a cause that did not survive pickling: its message still names the file and row
        return NormactError(text[text.rindex(marker) + len(marker) :].strip().splitlines()[0])
    return None


# ---- the work: which rows go to the workers, and how a worker turns them into model batches ----------------------


@dataclass
class Work:
    """A Ray Dataset of work rows and how workers read them."""

    dataset: Any
    kind: str  # "files": rows name batch files; "columns": rows are samples (Parquet, a Dataset); "images"
    rows_per_call: int  # map_batches batch_size
    describe: str
    total: int | None  # model batches expected (progress)


def plan_work(
    data: Any,
    specs: list[InputSpec],
    batch_size: int | None,
    batches: int | None,
    images: Any,
) -> Work:
    """The dataset for ``data``: Ray Data's own readers for Parquet and images, file lists for batch files."""
    ray = require_ray()
    if batch_size is not None and batch_size < 1:
        raise NormactError(f"--batch-size must be ≥ 1, got {batch_size}")
    if batches is not None and batches < 1:
        raise NormactError(f"--batches must be ≥ 1, got {batches}")
    size = batch_size or DEFAULT_ROWS
    if is_dataset(data):
        ds = data.limit(batches * size) if batches else data
        return Work(ds, "columns", size, "ray.data.Dataset", batches)
    if not isinstance(data, str | os.PathLike):
        raise NormactError(
            "--ray reads a path (.npz, .npy, test_data_set_*, Parquet, an image folder) or a ray.data.Dataset; "
            f"{type(data).__name__} data runs single-process (leave out --ray)"
        )
    path = Path(data)
    if (tables := rows.parquet_files(path)) is not None:
        counts = [rows.check_parquet_schema(f, specs) for f in tables]  # footers only: names the bad file at once
        ds = ray.data.read_parquet([str(f) for f in tables], include_paths=True, columns=[s.name for s in specs])
        total = sum(-(-n // size) for n in counts)
        if batches:
            ds, total = ds.limit(batches * size), min(total, batches)
        return Work(ds, "columns", size, f"{path} ({len(tables)} Parquet files, {sum(counts)} rows)", total)
    if path.is_dir() and not has_batch_files(path) and (pictures := rows.image_files(path)) is not None:
        plan = rows.image_plan(specs, images)
        ds = ray.data.read_images(str(path), include_paths=True, mode=plan.mode)
        total = -(-len(pictures) // size)
        if batches:
            ds, total = ds.limit(batches * size), min(total, batches)
        return Work(ds, "images", size, f"{path} ({len(pictures)} images)", total)
    pieces = file_pieces(path, specs, batch_size)
    noted: set[str] = set()  # arrays no input takes: said once here, the workers leave them out silently
    for i, (where, header) in enumerate(file_headers([f for f, _ in pieces], specs, batch_size)):  # before any run
        if batches is not None and i >= batches:
            break
        check_header(specs, header, where, noted)
    items = file_items(pieces, batches)
    describe = f"{path} ({len(pieces)} file{'s' * (len(pieces) != 1)})"
    if not items:  # every file empty: the single-process run's refusal, not Ray's error about zero blocks
        raise NormactError(f"{describe}: no batches")
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return Work(ds, "files", 1, describe, sum(i["stop"] for i in items))


def file_items(pieces: list[tuple[Path, int]], batches: int | None) -> list[dict[str, Any]]:
    """The work list of batch files: each file with the batches to take from it, at most ``batches`` in all.

    A file with no batches (an empty shard) is passed over, as the single-process run passes over it; only
    the ``batches`` limit ends the list early.
    """
    items: list[dict[str, Any]] = []
    left = batches
    for f, n in pieces:
        take = n if left is None else min(n, left)
        if take > 0:
            items.append({"file": str(f), "start": 0, "stop": take})
        if left is not None:
            left -= take
            if left <= 0:
                break
    return items


def check_exists(data: Any) -> None:
    """A missing path is reported before a cluster is started for it."""
    if isinstance(data, str | os.PathLike) and not Path(data).exists():
        raise NormactError(f"{data}: no such file or folder")


class Feeder:
    """A worker's reader: one map_batches call's rows → (where, checked model batch) pairs."""

    def __init__(self, kind: str, specs: list[InputSpec], batch_size: int | None, images: Any) -> None:
        self.kind, self.specs, self.batch_size = kind, specs, batch_size
        self.plan = rows.image_plan(specs, images) if kind == "images" else None

    def feeds(self, batch: dict[str, np.ndarray]) -> Iterator[tuple[str, Batch]]:
        if self.kind == "files":
            for f, start, stop in zip(batch["file"], batch["start"], batch["stop"]):
                for where, raw in file_batches(Path(str(f)), self.specs, self.batch_size, int(start), int(stop)):
                    yield where, conform(self.specs, raw, where)
            return
        paths = [str(p) for p in batch["path"]] if "path" in batch else None
        n = len(next(iter(batch.values())))
        names = [f"{p} (row {i} of this batch)" for i, p in enumerate(paths)] if paths else None
        where = _span(paths) if paths else f"Dataset batch of {n} rows"
        if self.kind == "images":
            assert self.plan is not None
            images = list(batch["image"])
            yield where, rows.images_batch(images, self.plan, paths or [f"row {i}" for i in range(n)])
            return
        raw = rows.columns_batch(batch, self.specs, where, names)
        yield where, conform(self.specs, raw, where)


def _span(paths: list[str]) -> str:
    files = list(dict.fromkeys(paths))
    return files[0] if len(files) == 1 else f"{files[0]} … {files[-1]}"


def maybe_crash(marker: str | None) -> None:
    """Tests only: the first call anywhere that creates the marker file kills its worker process (a lost node)."""
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(17)


def batch_samples(feed: Batch) -> int:
    return int(next((v.shape[0] for v in feed.values() if v.ndim), 1))


class TreeMerge(Generic[T]):
    """Pairwise reduction of a stream: a binary counter of partial results (O(log n) of them held at a time)."""

    def __init__(self, merge: Callable[[T, T], T]) -> None:
        self.merge, self.count = merge, 0
        self.levels: list[T | None] = []

    def push(self, item: T) -> None:
        self.count += 1
        level = 0
        while level < len(self.levels) and self.levels[level] is not None:
            item = self.merge(self.levels[level], item)  # type: ignore[arg-type]
            self.levels[level] = None
            level += 1
        if level == len(self.levels):
            self.levels.append(None)
        self.levels[level] = item

    def result(self) -> T | None:
        acc = None
        for part in self.levels:
            if part is not None:
                acc = part if acc is None else self.merge(part, acc)
        return acc


def map_rows(work: Work, worker: type, kwargs: dict[str, Any], workers: int) -> Iterator[dict[str, np.ndarray]]:
    """Run ``worker`` over the work on ``workers`` actors; yields the result blocks as they finish."""
    ray = require_ray()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mapped = work.dataset.map_batches(
            worker,
            batch_size=work.rows_per_call,
            compute=ray.data.ActorPoolStrategy(size=workers),
            batch_format="numpy",
            fn_constructor_kwargs=kwargs,
            num_cpus=1,
            max_restarts=RESTARTS,
            max_task_retries=RESTARTS,
        )
    blocks = mapped.iter_batches(batch_size=None, batch_format="numpy")
    try:
        yield from blocks
    except NormactError:
        raise
    except Exception as e:
        err = user_error(e)
        if err is not None:
            raise err from None
        raise NormactError(f"the Ray run failed: {first_line(e)}") from None
    finally:  # stop Ray Data's executor threads now (Ctrl-C, an error): not at interpreter exit, after shutdown
        close = getattr(blocks, "close", None)
        if close is not None:
            close()
