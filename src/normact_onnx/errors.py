"""Errors a user can act on.

Everything the tool refuses to do is raised as :class:`NormactError` with a message
that fits on one line; the CLI prints it to stderr and exits non-zero instead of
showing a traceback.
"""

from __future__ import annotations


class NormactError(Exception):
    """A problem with the user's input or request, reported as one clear line."""
