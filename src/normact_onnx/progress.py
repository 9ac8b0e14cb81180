"""Progress on stderr for the long-running commands (tqdm), shown only to a person watching.

Bars appear when asked for and stderr is a terminal, so pipes, logs and tests see
nothing; ``--quiet`` turns them off on a terminal too. Stages of one command
(find, rewrite, write, verify) are one bar whose steps are the stages.
"""

from __future__ import annotations

import contextlib
import os
import sys
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

    ONNX Runtime logs errors only, numpy's floating-point RuntimeWarnings are not shown, and Ray's
    native processes log errors only to their files. With ``verbose`` all of them print as usual.
    Warnings of this tool (printed as lines, not through :mod:`warnings`) are never affected.
    """
    if verbose:
        set_log_severity(VERBOSE)
        yield
        return
    set_log_severity(QUIET)
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")  # read by Ray's processes when they start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
