"""Progress on stderr for the long-running commands (tqdm), shown only to a person watching.

Bars appear when asked for and stderr is a terminal, so pipes, logs and tests see
nothing; ``--quiet`` turns them off on a terminal too. Stages of one command
(find, rewrite, write, verify) are one bar whose steps are the stages.
"""

from __future__ import annotations

import contextlib
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

    ONNX Runtime logs errors only and numpy's floating-point RuntimeWarnings are not shown (Ray's Python
    loggers are quieted where Ray starts, :mod:`.calibration.distributed`). With ``verbose`` they print as usual.
    Warnings of this tool (printed as lines, not through :mod:`warnings`) are never affected.
    """
    if verbose:
        set_log_severity(VERBOSE)
        yield
        return
    set_log_severity(QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
