"""Progress on stderr for the long-running commands (tqdm), shown only to a person watching.

Bars appear when asked for and stderr is a terminal, so pipes, logs and tests see
nothing; ``--quiet`` turns them off on a terminal too. Stages of one command
(find, rewrite, write, verify) are one bar whose steps are the stages.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


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
