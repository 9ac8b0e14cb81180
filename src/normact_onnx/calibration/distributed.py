"""Calibration (and ``compare``) over Ray Data: the single-process pieces, run where the data lives.

Map: each worker is a Ray Data actor (``map_batches`` with a callable class)
holding one ONNX Runtime session (kernel library registered) over the *same*
instrumented model :func:`.run.prepare` builds for the single-process run; every
batch goes through :func:`.run.run_batch` and :func:`.run.batch_moments`
(``Probe.read``); the batches of one call (a batch file's pieces, or one batch of
rows) come back as one row of per-site moments: n, mean and M2 of x and of f(x),
and the mean of f'(x)², flattened into one float64 vector.

Reduce: the driver folds the rows as they stream in with a pairwise (binary
counter) tree of Chan merges, which are associative, so memory is O(log batches)
and the result equals one pass over the data up to float64 rounding. The gated EMA
depends on batch order and is not reproduced: a distributed run's factors use
``--aggregate mean``.

Faults: the actors are restartable (``max_restarts``) and their calls retried
(``max_task_retries``); Ray Data only emits a block once its task has finished, so
the batches of a task that died with its worker are counted once, from the retry.

Ray is imported here only, inside functions (an optional dependency). ``compare``'s Ray workers live in
:mod:`..comparison`, above this module, which they use for the cluster, the work plan and the tree merge.
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
import onnx

from ..data import rows
from ..data.inputs import model_inputs
from ..data.options import DataOptions
from ..data.readers import (
    Batch,
    InputSpec,
    check_header,
    conform,
    file_batches,
    file_headers,
    file_pieces,
    has_batch_files,
)
from ..errors import NormactError
from ..graph import structure_fingerprint
from ..io import ModelLike, load_model_like, model_folder
from ..progress import bar as progress_bar
from ..progress import native_stderr_quiet
from ..streaming import Moments, mean_merge, merge_cross
from .run import SiteRecord, batch_moments, calibration_session, empty_stats, finish, prepare, run_batch
from .stats import CalibrationStats

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
        raise NormactError(f"cannot {what}: {_first_line(e)}{hint}") from None
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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


# ---- calibration: workers return per-batch moments, the driver merges them ---------------------------------------


class StatsWorker:
    """A Ray Data actor: one ORT session over the instrumented model; each batch → one row of per-site moments."""

    def __init__(
        self,
        model: list[Any],  # [ObjectRef of the serialized model]
        base_dir: str | None,
        per_channel: bool,
        providers: list[str] | None,
        kind: str,
        batch_size: int | None,
        images: Any,
        sites: list[str],
        crash_marker: str | None = None,
        normalize: Any = None,
        selection: Any = None,
    ) -> None:
        model = onnx.load_from_string(require_ray().get(model[0]))
        self.specs = model_inputs(model)
        self.inst = prepare(model, base_dir, per_channel, normalize, selection)
        got = [p.site.output for p in self.inst.probes]
        if got != sites:
            raise NormactError("the workers instrumented the model differently from the driver (sites differ)")
        self.sess = calibration_session(self.inst.model, base_dir, providers, threads=1)
        self.feeder = Feeder(kind, self.specs, batch_size, images)
        self.crash_marker = crash_marker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model batches of one call (a batch file's pieces, or one batch of rows), merged into one record.

        A call's output is all or nothing (a call that dies with its worker is run again from the start), so
        merging inside it keeps every batch counted once and cuts the driver's merges to one per call.
        """
        merged, batches, samples = None, 0, 0
        for where, feed in self.feeder.feeds(batch):
            values = run_batch(self.sess, self.inst, feed, where)
            maybe_crash(self.crash_marker)
            rec = batch_moments(self.inst, values, where)
            merged = rec if merged is None else merge_records(merged, rec)
            batches += 1
            samples += batch_samples(feed)
        record = encode_moments(merged).tobytes() if merged is not None else b""
        return {
            "stats": np.array([record], dtype=object),
            "batches": np.array([batches], dtype=np.int64),
            "samples": np.array([samples], dtype=np.int64),
        }


def encode_moments(sites: list[SiteRecord]) -> np.ndarray:
    """Per site: channel count C and whether the co-moment is there, then n, mean, M2 of x, of f, mean f'²
    (and the x·f co-moment): 7·C or 8·C values (C = 0 for no data)."""
    parts = []
    for x, f, d2, xf in sites:
        c = x.n.size
        if not c:
            parts.append(np.zeros(2))
            continue
        parts += [np.array([c, xf is not None], np.float64), x.n, x.mean, x.m2, f.n, f.mean, f.m2, d2]
        if xf is not None:
            parts.append(xf)
    return np.concatenate(parts).astype(np.float64)


def decode_moments(vec: np.ndarray, count: int) -> list[SiteRecord]:
    out: list[SiteRecord] = []
    i = 0
    for _ in range(count):
        c, cross = int(vec[i]), bool(vec[i + 1])
        i += 2
        if c == 0:
            out.append((Moments.empty(0), Moments.empty(0), np.zeros(0), None))
            continue
        rows = 8 if cross else 7
        a = vec[i : i + rows * c].reshape(rows, c)
        i += rows * c
        out.append((Moments(a[0], a[1], a[2]), Moments(a[3], a[4], a[5]), a[6], a[7] if cross else None))
    return out


def merge_records(a: list[SiteRecord], b: list[SiteRecord]) -> list[SiteRecord]:
    """Two partial results, site by site: Chan merges for the moments (and co-moment), count-weighted mean for f'²."""
    out: list[SiteRecord] = []
    for ra, rb in zip(a, b):
        (xa, fa, da, ca), (xb, fb, db, cb) = ra, rb
        if xa.n.size == 0 or xb.n.size == 0:
            out.append(rb if xa.n.size == 0 else ra)
            continue
        if xa.n.size != xb.n.size:
            raise NormactError(f"a site's channel count differs between batches ({xa.n.size} vs {xb.n.size})")
        cross = merge_cross(xa, fa, ca, xb, fb, cb) if ca is not None and cb is not None else None
        out.append((xa.merge(xb), fa.merge(fb), mean_merge(xa.n, da, xb.n, db), cross))
    return out


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
        raise NormactError(f"the Ray run failed: {_first_line(e)}") from None
    finally:  # stop Ray Data's executor threads now (Ctrl-C, an error): not at interpreter exit, after shutdown
        close = getattr(blocks, "close", None)
        if close is not None:
            close()


def collect_ray(
    model: ModelLike,
    source: DataOptions,
    *,
    address: str | None = None,
    workers: int = 2,
    per_channel: bool = False,
    providers: list[str] | None = None,
    progress: bool = False,
    normalize: Any = None,
    selection: Any = None,
) -> CalibrationStats:
    """:func:`.run.collect` over Ray Data: same instrumented model and statistics, merged in a tree (no EMA).

    ``source``: its ``data`` (files, Parquet, an image folder with ``images``, a Dataset), ``batches`` and
    ``batch_size``; synthetic inputs are the single-process run's (``calibrate`` refuses them here).

    ``normalize``/``selection``: in-situ calibration, as in :func:`.run.collect` (each batch normalizes
    with its own statistics, so the workers' results merge exactly whatever the order).
    """
    if workers < 1:
        raise NormactError(f"--workers must be ≥ 1, got {workers}")
    src, path = load_model_like(model)
    base_dir = model_folder(path)
    specs = model_inputs(src)
    # the driver's copy: the site list, and errors before any cluster starts
    inst = prepare(src, base_dir, per_channel, normalize, selection)
    stats = empty_stats(inst, per_channel, structure_fingerprint(src))
    sites = [p.site.output for p in inst.probes]
    check_exists(source.data)
    with cluster(address, workers):
        work = plan_work(source.data, specs, source.batch_size, source.batches, source.images)
        # the model by reference, held by this driver for the run: inline (small) constructor arguments are what
        # Ray can replay when it restarts an actor (see Ray issue 53727)
        model_ref = require_ray().put(src.SerializeToString())
        kwargs = {
            "model": [model_ref],
            "base_dir": base_dir,
            "per_channel": per_channel,
            "providers": providers,
            "kind": work.kind,
            "batch_size": source.batch_size,
            "images": source.images,
            "sites": sites,
            "crash_marker": os.environ.get(CRASH_ENV),
            "normalize": normalize,
            "selection": selection,
        }
        tree: TreeMerge[list[SiteRecord]] = TreeMerge(merge_records)
        bar = progress_bar(work.total, "calibrating (ray)", progress, unit="batch")
        batches = samples = 0
        try:
            for block in map_rows(work, StatsWorker, kwargs, workers):
                for rec, k, n in zip(block["stats"], block["batches"], block["samples"]):
                    if k:
                        tree.push(decode_moments(np.frombuffer(rec, np.float64), len(sites)))
                    batches += int(k)
                    samples += int(n)
                    bar.update(int(k))
                    if not bar.disable:  # samples per second beside the batches
                        rate = samples / max(bar.format_dict.get("elapsed", 0.0), 1e-9)
                        bar.set_postfix_str(f"{rate:.0f} samples/s", refresh=False)
        finally:
            bar.close()
    merged = tree.result()
    if merged is None:
        raise NormactError(f"{work.describe}: no batches")
    for probe, (x, f, d2, xf) in zip(inst.probes, merged):
        if x.n.size:
            s = stats.sites[probe.site.output]
            s.x, s.f, s.d2, s.xf = x, f, d2, xf
    stats.batches = batches
    stats.sources = [f"{work.describe} on Ray ({workers} workers, {samples} samples)"]
    return finish(stats, inst, normalize)
