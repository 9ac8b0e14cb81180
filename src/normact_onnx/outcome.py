"""Why something was not done, as a value: the other half of a ``Result | Refusal`` return.

Functions that either compute something or explain why they could not (a site
without usable statistics, moments that give no constants) return a
:class:`Refusal` rather than a bare string, so a caller tells the two apart by
type (``isinstance(x, Refusal)``) and a reason can never be mistaken for a
result that happens to be text. The reason is a sentence for a person: callers
show it as it is (``str(refusal)`` is the reason).

This module imports nothing from the package, so every layer can use it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    """A computation that did not happen, with the reason a person would want."""

    reason: str

    def __str__(self) -> str:
        return self.reason
