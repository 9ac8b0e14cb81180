"""Which sites the selection flags (``--include``, ``--exclude``, ``--nodes``, ``--all-sites``) choose.

One rule for every command: ``rewrite`` applies it (through :mod:`.policy`), and in-situ calibration normalizes
exactly these sites on the way, so the statistics describe the network the rewrite will write. It sits below
``calibration/`` for that reason; the per-site constants are decided above it, in :mod:`.policy`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from .catalogue import known_kinds, resolve
from .errors import NormactError
from .passes.find import Site


def parse_kinds(names: Iterable[str] | str | None, flag: str) -> set[str] | None:
    """``--include``/``--exclude`` (a comma-separated string or names, aliases allowed) → catalogue kinds."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    resolved = {n.strip(): resolve(n) for n in names}
    unknown = sorted(n for n, kind in resolved.items() if kind is None)
    if unknown:
        raise NormactError(f"{flag}: unknown activation kind(s) {', '.join(unknown)}; known: {known_kinds()}")
    return {kind for kind in resolved.values() if kind is not None}


@dataclass(frozen=True)
class SiteSelection:
    """The site-selection flags (kinds already resolved) as one value, passed from the CLI through ``rewrite`` and
    ``calibrate`` down to calibration instead of four loose parameters; frozen and picklable, so Ray workers apply
    the same rule. The default selects every site the finder does not skip."""

    include: AbstractSet[str] | None = None
    exclude: AbstractSet[str] | None = None
    nodes: str | None = None
    all_sites: bool = False
    pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):  # frozen all the way down: a caller's set cannot change it later
            kinds = getattr(self, name)
            if kinds is not None:
                object.__setattr__(self, name, frozenset(kinds))
        if self.nodes:
            try:
                object.__setattr__(self, "pattern", re.compile(self.nodes))
            except re.error as e:
                raise NormactError(f"--nodes: bad regular expression ({e})") from None

    @classmethod
    def parse(
        cls,
        include: Iterable[str] | str | None = None,
        exclude: Iterable[str] | str | None = None,
        nodes: str | None = None,
        all_sites: bool = False,
    ) -> SiteSelection:
        """From the flags as a user writes them (kind names and aliases, comma-separated or listed)."""
        return cls(parse_kinds(include, "--include"), parse_kinds(exclude, "--exclude"), nodes, all_sites)

    def why(self, s: Site) -> str | None:
        """Why the site is left alone (None: it is to be normalized)."""
        if s.normalized is not None:
            return "already normalized"
        if self.include is not None and s.kind not in self.include:
            return f"kind {s.kind} not in --include"
        if self.exclude is not None and s.kind in self.exclude:
            return f"kind {s.kind} in --exclude"
        if self.pattern is not None and not (self.pattern.search(s.name) or self.pattern.search(s.output)):
            return "name does not match --nodes"
        if s.skip and not self.all_sites:
            return f"{s.skip} (use --all-sites to include)"
        return None

    def selected(self, s: Site) -> bool:
        """Whether the site is to be normalized (what in-situ calibration normalizes on the way)."""
        return self.why(s) is None
