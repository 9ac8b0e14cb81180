"""Progress on stderr for the long-running commands (tqdm), shown only to a person watching.

Bars appear when asked for and stderr is a terminal, so pipes, logs and tests see
nothing; ``--quiet`` turns them off on a terminal too. Stages of one command
(find, rewrite, write, verify) are one bar whose steps are the stages.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

from .runtime.session import QUIET, VERBOSE, set_log_severity


def shown(enabled: bool = True) -> bool:
    """Whether a bar would be drawn: enabled and stderr is a terminal."""
    try:
        return enabled and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def bar(total: int | None, desc: str, enabled: bool = True, unit: str = "it", **kw: Any) -> tqdm:
    """A tqdm bar on stderr, cleared when done (the command's own output stays readable)."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not shown(enabled),
        leave=False,
        dynamic_ncols=True,
        mininterval=0.2,
        **kw,
    )


def stage(b: tqdm, name: str) -> None:
    """Mark the start of the next stage on a stage bar (``bar(n_stages, …, unit="stage")``)."""
    if getattr(b, "postfix", None):  # the previous stage is done (a disabled bar keeps no postfix)
        b.update()
    b.set_postfix_str(name, refresh=True)


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """Keep what libraries print off the terminal unless ``verbose``: the command's own lines are the output.

    ONNX Runtime logs fatal errors only (the command says a failure itself, once) and numpy's floating-point
    RuntimeWarnings are not shown (Ray's Python loggers are quieted where Ray starts, :mod:`.data.ray_data`).
    With ``verbose`` they print as usual.
    Warnings of this tool (printed as lines, not through :mod:`warnings`) are never affected.
    """
    global _native_quiet
    if verbose:
        set_log_severity(VERBOSE)
        yield
        return
    set_log_severity(QUIET)
    _native_quiet = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        _native_quiet = False


_native_quiet = False  # inside quiet_libraries(verbose=False): a command run from the command line


@contextlib.contextmanager
def native_stderr_quiet() -> Iterator[None]:
    """Inside a quiet command, what native code writes to file descriptor 2 goes to an unnamed file for the block.

    Ray's C++ core worker logs its errors straight to the process's stderr (not through Python's logging),
    for example a warning that every Ray Data actor pool triggers by design: Ray Data puts its own constructor
    arguments in the object store, and restartable actors (our fault tolerance) then draw "constructor
    arguments in the object store and max_restarts > 0". No Ray setting removes that line (raising
    ``RAY_BACKEND_LOG_LEVEL`` prints a line of its own), so the descriptor is redirected while Ray runs:
    Python's ``sys.stderr`` (this tool's lines, warnings, progress bars) is moved to a copy of the terminal's
    descriptor and still prints. A Python caller of the API (no ``quiet_libraries``) and ``--verbose`` see
    everything as usual. Ray's own log files (its session folder) keep the lines.
    """
    if not _native_quiet:
        yield
        return
    with contextlib.suppress(AttributeError, ValueError, OSError):
        sys.stderr.flush()
    original = sys.stderr
    try:
        terminal = os.dup(2)
    except OSError:  # no descriptor 2 (a closed stderr): nothing to keep off it
        yield
        return
    sink = tempfile.TemporaryFile()  # noqa: SIM115 (held for the block, closed in the finally below)
    os.dup2(sink.fileno(), 2)
    encoding = getattr(original, "encoding", None) or "utf-8"
    sys.stderr = open(terminal, "w", buffering=1, encoding=encoding, errors="backslashreplace", closefd=False)  # noqa: SIM115
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(terminal, 2)
        sys.stderr.close()
        sys.stderr = original
        os.close(terminal)
        sink.close()
