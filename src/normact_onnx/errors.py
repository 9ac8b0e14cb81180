"""Errors a user can act on.

Everything the tool refuses to do is raised as :class:`NormactError` with a message
that fits on one line; the CLI prints it to stderr and exits non-zero instead of
showing a traceback. What a pass declines to do for one site is a :class:`Refusal`:
a value with the reason, reported with the site, never raised.
"""

from __future__ import annotations

from dataclasses import dataclass


class NormactError(Exception):
    """A problem with the user's input or request, reported as one clear line."""


@dataclass(frozen=True)
class Refusal:
    """Why a step is not taken, as a value: a pass returns it instead of its result.

    Callers test for it (``isinstance(x, Refusal)``) rather than for a string, so a
    result that happens to be text can never be taken for a reason; ``reason`` is the
    sentence shown to the user.
    """

    reason: str
