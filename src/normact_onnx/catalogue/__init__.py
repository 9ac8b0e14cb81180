"""The activation catalogue: one entry per activation kind (see :mod:`.base`)."""

from __future__ import annotations

from . import exponential, gated, rectifiers, sigmoidal
from .base import Activation, Body, OpForm, Ref
from .patterns import DecomposedForm

CATALOGUE: dict[str, Activation] = {
    a.kind: a for family in (rectifiers, exponential, sigmoidal, gated) for a in family.ENTRIES
}
BY_OP_NAME: dict[str, Activation] = {a.op_name: a for a in CATALOGUE.values()}
NORM_DOMAIN = "ai.normact"
NORM_DOMAIN_VERSION = 1


def get(kind: str) -> Activation:
    """The entry for ``kind``; unknown kinds are a user error listing the known ones."""
    from ..errors import NormactError

    try:
        return CATALOGUE[kind]
    except KeyError:
        raise NormactError(f"unknown activation kind {kind!r}; known: {', '.join(CATALOGUE)}") from None


__all__ = [
    "BY_OP_NAME",
    "CATALOGUE",
    "NORM_DOMAIN",
    "NORM_DOMAIN_VERSION",
    "Activation",
    "Body",
    "DecomposedForm",
    "OpForm",
    "Ref",
    "get",
]
