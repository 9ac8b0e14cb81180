"""The activation catalogue: one entry per activation kind (see :mod:`.base`)."""

from __future__ import annotations

from ..errors import NormactError
from . import exponential, gated, rectifiers, sigmoidal
from .base import Activation, Body, OpForm, Ref
from .patterns import DecomposedForm

CATALOGUE: dict[str, Activation] = {
    a.kind: a for family in (rectifiers, exponential, sigmoidal, gated) for a in family.ENTRIES
}
BY_OP_NAME: dict[str, Activation] = {a.op_name: a for a in CATALOGUE.values()}
NORM_DOMAIN = "ai.normact"
NORM_DOMAIN_VERSION = 1

# Other names users (and the README, models/manifest.json, PyTorch, Keras) give these kinds; keys are
# written as :func:`canonical_name` leaves them. Every flag or argument that takes a kind resolves it here.
ALIASES: dict[str, str] = {
    "swish": "silu",
    "relu6": "clip",
    "hardtanh": "clip",
    "hard_tanh": "clip",
    "hardswish": "hard_swish",
    "hardsigmoid": "hard_sigmoid",
    "leakyrelu": "leaky_relu",
    "gelu_erf": "gelu",
    "fastgelu": "gelu_tanh",
    "fast_gelu": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}


def canonical_name(name: str) -> str:
    """``"Hard-Swish "`` → ``"hard_swish"``: case, blanks and dashes do not matter in kind names."""
    return name.strip().lower().replace("-", "_")


def known_kinds() -> str:
    """The kinds and aliases, for error messages."""
    aliases = ", ".join(f"{a}={k}" for a, k in ALIASES.items())
    return f"{', '.join(CATALOGUE)} (aliases: {aliases})"


def resolve(name: str) -> str | None:
    """The catalogue kind a user's name means (a kind or an alias), or None when it means none."""
    key = canonical_name(name)
    key = ALIASES.get(key, key)
    return key if key in CATALOGUE else None


def get(kind: str) -> Activation:
    """The entry for ``kind`` (or an alias); unknown kinds are a user error listing the known ones."""
    key = resolve(kind)
    if key is None:
        raise NormactError(f"unknown activation kind {kind!r}; known: {known_kinds()}")
    return CATALOGUE[key]


__all__ = [
    "ALIASES",
    "BY_OP_NAME",
    "CATALOGUE",
    "NORM_DOMAIN",
    "NORM_DOMAIN_VERSION",
    "Activation",
    "Body",
    "DecomposedForm",
    "OpForm",
    "Ref",
    "canonical_name",
    "get",
    "known_kinds",
    "resolve",
]
