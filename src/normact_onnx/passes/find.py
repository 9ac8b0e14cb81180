"""Find activation sites: every place the catalogue's ops or patterns occur, in every scope.

The matcher knows no activation by name: it interprets the catalogue's
:class:`~normact_onnx.catalogue.OpForm` entries and pattern trees. Larger patterns
claim their nodes first, so the Sigmoid of a SiLU or the Tanh of a Mish is part
of that site, never a site of its own.

Why one module past 500 lines: it is the matcher alone (the site record lives in :mod:`.site`, the roles a
site plays in :mod:`.roles`); pattern binding, the claim order of larger patterns and the trace of the deepest
failure (``--explain``) walk the same candidate state and are read together.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..catalogue import BY_OP_NAME, CATALOGUE, NORM_DOMAIN, Activation, DecomposedForm
from ..catalogue.fused import FUSED, FUSED_PRE, STANDALONE, Split
from ..catalogue.patterns import Alt, C, N, Pattern, Var
from ..domains import STANDARD_DOMAINS
from ..graph import Container, attr_value, const_value, containers
from ..outcome import Refusal
from ..provenance import SiteRecord, read_records
from ..valuetypes import FLOAT_TYPES, infer_value_types
from .roles import guard_reason, skip_reason
from .site import Site


class _View:
    """What an :class:`OpForm` reader may ask of a candidate node."""

    def __init__(self, node: onnx.NodeProto, c: Container, base_dir: str | None) -> None:
        self.node, self.c, self.base_dir, self.opset = node, c, base_dir, c.opset

    def attr(self, name: str, default: Any = None) -> Any:
        return attr_value(self.node, name, default)

    def has_input(self, i: int) -> bool:
        return len(self.node.input) > i and bool(self.node.input[i])

    def const_input(self, i: int) -> np.ndarray | None:
        return const_value(self.c, self.node.input[i], self.base_dir) if self.has_input(i) else None


@dataclass
class _Env:
    x: str | None = None
    nodes: tuple[onnx.NodeProto, ...] = ()
    params: tuple[tuple[str, float], ...] = ()
    consts: tuple[str, ...] = ()


@dataclass(frozen=True)
class PartialMatch:
    """How far one decomposed form got at a candidate node that ended in no site, and why it stopped there.

    ``bound`` counts the pattern nodes matched when it stopped (the deepest of all paths the pattern's
    alternatives and input orders allow); ``where`` is the graph node at which it stopped.
    """

    graph: str
    anchor: str  # the candidate node: where the form's root op was found
    kind: str
    form: str
    bound: int
    size: int  # pattern nodes of the form (its longest alternative)
    where: str
    why: str

    def line(self) -> str:
        """One line for people: ``silu x·Sigmoid(x) at 'mul_1': 2 of 2 nodes; input 0 of Sigmoid 'sig' …``."""
        return f"{self.kind} {self.form} at '{self.anchor}': {self.bound} of {self.size} nodes; {self.why}"

    @property
    def pattern(self) -> str:
        """The line without node and value names: candidates that fail the same way share it (for grouping)."""
        return re.sub(r"'[^']*'", "'…'", f"{self.kind} {self.form}: {self.bound} of {self.size} nodes; {self.why}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "graph": self.graph,
            "name": self.anchor,
            "kind": self.kind,
            "form": self.form,
            "matched": f"{self.bound} of {self.size} nodes",
            "where": self.where,
            "why": self.why,
        }


_BOTH = " (both input orders tried)"


def _said(text: str) -> Callable[[], str]:
    """A reason already written (rare failures, where writing it at once costs nothing that matters)."""
    return lambda: text


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{node.name or node.output[0]}'"


@dataclass
class _Failure:
    bound: int
    where: onnx.NodeProto
    explain: Callable[[], str]  # the reason, written only for the failures that are reported
    complete: bool = False  # the whole form matched, and was refused afterwards (taken nodes, Swish-β)
    nodes: tuple[onnx.NodeProto, ...] = ()  # the graph nodes bound when it stopped
    suffix: str = ""

    @property
    def why(self) -> str:
        return self.explain() + self.suffix


class _Matcher:
    """Interprets pattern trees; with ``trace``, remembers the deepest point each attempt reached and why.

    The deepest failure is the one with the most pattern nodes bound (the first such, at a tie): of all
    the paths alternatives and commutative orders open, it is the one that came closest to a site, and
    its reason is what a person needs to see to know why the form did not match.
    """

    def __init__(self, c: Container, base_dir: str | None, claimed: set[int], trace: bool = False) -> None:
        self.c, self.base_dir, self.trace = c, base_dir, trace
        self.claimed = claimed  # ids of nodes a site has (a match through one could never be a site)
        self.deepest: _Failure | None = None

    def deeper(self, env: _Env, found: int = 0) -> bool:
        """Whether a failure now would be the deepest so far (only then is its reason worth writing)."""
        return self.trace and (self.deepest is None or len(env.nodes) + found > self.deepest.bound)

    def fail(
        self, env: _Env, where: onnx.NodeProto, why: Callable[[], str], complete: bool = False, found: int = 0
    ) -> None:
        """Record a failure with ``env``'s nodes (and ``found`` more) bound; callers check :meth:`deeper` first."""
        self.deepest = _Failure(len(env.nodes) + found, where, why, complete, env.nodes)

    def tensor(self, p: Pattern, name: str, consumer: onnx.NodeProto, i: int, env: _Env) -> Iterator[_Env]:
        if isinstance(p, Var):
            if env.x is None or env.x == name:
                yield _Env(name, env.nodes, env.params, env.consts)
            elif self.trace and self.deeper(env):
                self.fail(env, consumer, lambda: f"input {i} of {_label(consumer)} is '{name}', not x = '{env.x}'")
        elif isinstance(p, C):
            value = const_value(self.c, name, self.base_dir)
            first = p.read(value)  # tolerance follows the constant's dtype
            if first is None:
                if self.trace and self.deeper(env):
                    self.fail(env, consumer, lambda: f"input {i} of {_label(consumer)} is {p.mismatch(value)}")
                return
            params = (*env.params, (p.capture, first)) if p.capture else env.params
            yield _Env(env.x, env.nodes, params, (*env.consts, name))
        elif isinstance(p, Alt):
            for option in p.options:
                yield from self.tensor(option, name, consumer, i, env)
        else:
            node = self.c.producer.get(name)
            if node is None or name in self.c.outputs or id(node) in self.claimed:
                if self.trace and self.deeper(env):
                    why = lambda: f"input {i} of {_label(consumer)} is {self._origin(name)}, expected {p.op}"  # noqa: E731
                    self.fail(env, consumer, why)
                return
            if node.op_type != p.op:
                if self.trace and self.deeper(env):
                    self.fail(
                        env, consumer, lambda: f"input {i} of {_label(consumer)} is {_label(node)}, expected {p.op}"
                    )
                return
            other = next((n for n in self.c.consumers.get(name, ()) if n is not consumer), None)
            if other is not None:  # an intermediate value with another consumer: not part of a pattern
                if self.trace and self.deeper(env, found=1):  # the node is the right op: it counts as reached
                    fan_out = f"{_label(node)} also feeds {_label(other)} (a pattern's inner values have one reader)"
                    self.fail(env, node, _said(fan_out), found=1)
                return
            yield from self.node(p, node, env)

    def _origin(self, name: str) -> str:
        """What a value that cannot be a pattern's inner node is, in words."""
        node = self.c.producer.get(name)
        if node is not None:
            return f"{_label(node)}, part of a site already" if id(node) in self.claimed else f"graph output '{name}'"
        if name in self.c.inputs:
            return f"graph input '{name}'"
        return f"constant '{name}'" if name in self.c.initializers else f"'{name}' from an enclosing graph"

    def node(self, p: N, node: onnx.NodeProto, env: _Env) -> Iterator[_Env]:
        if node.op_type != p.op or node.domain not in ((p.domain,) if p.domain else STANDARD_DOMAINS):  # hot path
            if self.trace and self.deeper(env):
                self.fail(
                    env,
                    node,
                    lambda: f"{_label(node)} of domain '{node.domain}' is not {p.op} of '{p.domain or 'ai.onnx'}'",
                )
            return
        if any(node is n for n in env.nodes):
            return
        for name, want in p.attrs:
            got = attr_value(node, name, want.default)
            if got is None or (want.value is not None and not np.isclose(float(got), want.value, rtol=1e-4)):
                if self.trace and self.deeper(env):
                    self.fail(env, node, _said(f"{_label(node)} has {name} = {got}, expected {want.value:.6g}"))
                return
        inputs = list(node.input)
        while inputs and not inputs[-1]:
            inputs.pop()
        if len(inputs) != len(p.inputs):
            if self.trace and self.deeper(env):
                self.fail(env, node, lambda: f"{_label(node)} has {len(inputs)} inputs, expected {len(p.inputs)}")
            return
        orders = [p.inputs]
        if p.commutative and len(p.inputs) == 2:
            orders.append(p.inputs[::-1])
        env = _Env(env.x, (*env.nodes, node), env.params, env.consts)
        if not self.trace:
            for order in orders:
                yield from self._inputs(list(enumerate(order)), inputs, node, env)
            return
        matched = False
        for order in orders:
            for e in self._inputs(list(enumerate(order)), inputs, node, env):
                matched = True
                yield e
        last = self.deepest
        if not matched and len(orders) == 2 and last is not None and last.where is node:
            last.suffix = _BOTH  # the deepest failure is at this node's inputs, and the other order fared no better

    def _inputs(
        self, pairs: list[tuple[int, Pattern]], inputs: list[str], node: onnx.NodeProto, env: _Env
    ) -> Iterator[_Env]:
        if not pairs:
            yield env
            return
        (i, p), rest = pairs[0], pairs[1:]
        for e in self.tensor(p, inputs[i], node, i, env):
            yield from self._inputs(rest, inputs, node, e)


def _patterns_by_size() -> list[tuple[Activation, DecomposedForm]]:
    """Larger forms first (they claim their nodes first); of equal size, the refusing forms last."""
    forms = [(a, f) for a in CATALOGUE.values() for f in a.patterns]
    return sorted(forms, key=lambda af: (-af[1].size(), af[1].refuse is not None))


def _op_forms() -> dict[tuple[str, str], list[tuple[Activation, Any]]]:
    index: dict[tuple[str, str], list[tuple[Activation, Any]]] = {}
    for a in CATALOGUE.values():
        for form in a.ops:
            for dom in (form.domain,) if form.domain else STANDARD_DOMAINS:
                index.setdefault((dom, form.op_type), []).append((a, form))
    return index


_PATTERNS = _patterns_by_size()
_OPS = _op_forms()


def find_in_container(
    c: Container,
    base_dir: str | None,
    normalized_outputs: Mapping[str, SiteRecord],  # output → its record
    misses: list[dict] | None = None,
    partial: list[PartialMatch] | None = None,
) -> list[Site]:
    """All sites of one container, in node order.

    ``partial`` (when given) collects, per candidate node that ends in no site, the deepest point any
    decomposed form reached there and why it stopped (see :func:`partial_matches`).
    """
    claimed: set[int] = set()
    sites: list[Site] = []
    matcher = _Matcher(c, base_dir, claimed, trace=partial is not None)
    attempts: dict[int, tuple[onnx.NodeProto, Activation, DecomposedForm, _Failure]] = {}
    refused: dict[int, str] = {}  # node id → why the form it belongs to is not in the catalogue
    by_op: dict[str, list[onnx.NodeProto]] = {}
    # one pass over the node list: positions by identity (the list keeps the wrappers, so ids stay valid)
    node_list = list(c.nodes)
    order = {id(n): i for i, n in enumerate(node_list)}
    for node in node_list:
        by_op.setdefault(node.op_type, []).append(node)

    for node in node_list:  # fused ops of earlier rewrites
        if node.domain == NORM_DOMAIN and node.op_type in BY_OP_NAME:
            act = BY_OP_NAME[node.op_type]
            params = {k: float(attr_value(node, k, v)) for k, v in act.params.items()}
            record = SiteRecord(
                scale=float(attr_value(node, "scale", 1.0)),
                shift=float(attr_value(node, "shift", 0.0)),
                slope=float(attr_value(node, "slope", 0.0)),
            )
            sites.append(
                Site(
                    c,
                    act.kind,
                    params,
                    [node],
                    node.input[0],
                    node.output[0],
                    f"normalized {node.op_type}",
                    normalized=record,
                )
            )
            claimed.add(id(node))

    for act, form in _PATTERNS:
        root = form.pattern
        for node in by_op.get(root.op, ()):
            if id(node) in claimed:
                continue
            matcher.deepest = None
            for env in matcher.node(root, node, _Env()):
                taken = next((n for n in env.nodes if id(n) in claimed), None)
                if taken is not None or env.x is None:
                    if taken is not None and matcher.deeper(env):
                        matcher.fail(
                            env, taken, _said(f"{_label(taken)} is part of another site already"), complete=True
                        )
                    continue
                nodes = sorted(env.nodes, key=lambda n: order[id(n)])  # node order, root last
                if nodes[-1] is not node:
                    continue
                params = {**form.fixed, **dict(env.params)}
                if form.refuse is not None:
                    refusal = form.refuse(params)
                    refused.update((id(n), refusal) for n in nodes)
                    if matcher.trace:
                        matcher.fail(env, node, _said(refusal), complete=True)
                    break
                site = Site(c, act.kind, params, nodes, env.x, node.output[0], f"pattern {form.name}")
                site.const_nodes = _exclusive_const_nodes(c, env.consts, nodes)
                claimed.update(id(n) for n in nodes)
                sites.append(site)
                break
            failure = matcher.deepest
            if failure is not None and id(node) not in claimed:
                best = attempts.get(id(node))
                if best is None or _closer(failure, form, best[3], best[2]):
                    attempts[id(node)] = (node, act, form, failure)

    in_patterns = set(claimed)  # a half match through these nodes is explained by the pattern site they are in
    for node in node_list:  # ONNX Runtime's fused ops: the activation inside, when the catalogue reads it
        split = FUSED.get((node.domain, node.op_type)) if id(node) not in claimed and node.output else None
        fused = _fused_site(c, node, split, base_dir, misses) if split is not None else None
        if fused is not None:
            sites.append(fused)
            claimed.add(id(node))

    for node in node_list:
        if id(node) in claimed or not node.input or not node.output:
            continue
        reasons = []
        for act, form in _OPS.get((node.domain, node.op_type), ()):
            if c.opset < form.min_opset and form.domain == "":
                continue
            params = form.read(_View(node, c, base_dir))
            if isinstance(params, Refusal):
                reasons.append(params.reason)
                continue
            site = Site(c, act.kind, params, [node], node.input[0], node.output[0], f"op {node.op_type}")
            site.const_nodes = _exclusive_const_nodes(c, tuple(node.input[1:]), [node])  # e.g. Clip's min/max
            sites.append(site)
            claimed.add(id(node))
            break
        else:
            if reasons and misses is not None:
                misses.append(
                    {
                        "graph": c.path,
                        "name": node.name or node.output[0],
                        "op": node.op_type,
                        "why": "; ".join(reasons),
                    }
                )

    guards = [(s, guard_reason(s, base_dir)) for s in sites if s.normalized is None]
    for s, why in guards:
        if why:
            sites.remove(s)
            if misses is not None:
                misses.append({"graph": c.path, "name": s.name, "op": s.root.op_type, "why": why})
    sites.sort(key=lambda s: order[id(s.root)])
    for s in sites:
        if s.normalized is None and s.output in normalized_outputs:
            record = s.normalized = normalized_outputs[s.output]
            s.written_as += " (normalized, folded)" if record.get("folded") else " (normalized, subgraph form)"
        if s.normalized is None:
            s.skip = skip_reason(s, base_dir, refused)
    if partial is not None:
        partial.extend(_half_matched(c, attempts.values(), claimed, in_patterns, order))
    return sites


# A candidate is reported as half-matched when its deepest attempt bound at least this many pattern nodes
# and at least half of its form: one node is only the root's op type (every Mul is a candidate of every
# GELU form), and two of a 9-node GELU chain is a layer norm's Mul·Reciprocal, not a GELU gone wrong
MIN_BOUND = 2


def _closer(failure: _Failure, form: DecomposedForm, best: _Failure, best_form: DecomposedForm) -> bool:
    """Whether ``failure`` came closer to a site than ``best``: more nodes bound, a whole form, more of its form."""
    if failure.bound != best.bound:
        return failure.bound > best.bound
    if failure.complete != best.complete:
        return failure.complete
    return failure.bound * best_form.size(longest=True) > best.bound * form.size(longest=True)


def _half_matched(
    c: Container,
    attempts: Iterable[tuple[onnx.NodeProto, Activation, DecomposedForm, _Failure]],
    claimed: set[int],
    in_patterns: set[int],
    order: Mapping[int, int],
) -> list[PartialMatch]:
    """One :class:`PartialMatch` per candidate node that ended in no site, in node order.

    Not reported: candidates that became sites, attempts that bound too little of their form, and attempts
    that ran into a pattern site found later (a smaller form claimed those nodes: they are explained).
    """
    out = []
    for node, act, form, failure in sorted(attempts, key=lambda a: order[id(a[0])]):
        size = max(form.size(longest=True), failure.bound)
        if id(node) in claimed or failure.bound < MIN_BOUND or 2 * failure.bound < size:
            continue
        if any(id(n) in in_patterns for n in failure.nodes):
            continue
        anchor = node.name or node.output[0]
        where = failure.where.name or failure.where.output[0]
        out.append(PartialMatch(c.path, anchor, act.kind, form.name, failure.bound, size, where, failure.why))
    return out


def _fused_site(
    c: Container,
    node: onnx.NodeProto,
    split: Callable[[onnx.NodeProto, str], Split | Refusal],
    base_dir: str | None,
    misses: list[dict] | None,
) -> Site | None:
    """The activation inside a fused op as a site whose input is the (not yet written) pre-activation."""
    parts = split(node, f"{node.output[0]}{FUSED_PRE}")
    why = parts.reason if isinstance(parts, Refusal) else None
    if not isinstance(parts, Refusal):
        pre, act = parts
        for a, form in _OPS.get((act.domain or "", act.op_type), ()):
            params = form.read(_View(act, c, base_dir))
            if isinstance(params, Refusal):
                why = params.reason
                continue
            site = Site(c, a.kind, params, [node], act.input[0], node.output[0], f"fused {node.op_type}({act.op_type})")
            site.unfused = (pre, act)
            return site
    if why and misses is not None and why != STANDALONE:
        misses.append({"graph": c.path, "name": node.name or node.output[0], "op": node.op_type, "why": why})
    return None


def _exclusive_const_nodes(c: Container, names: tuple[str, ...], nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    out = []
    mine = {id(n) for n in nodes}
    for name in dict.fromkeys(names):
        producer = c.producer.get(name)
        exclusive = all(id(u) in mine for u in c.consumers.get(name, ())) and name not in c.outputs
        if producer is not None and producer.op_type == "Constant" and exclusive:
            out.append(producer)
    return out


def find_sites(
    model: onnx.ModelProto,
    base_dir: str | None = None,
    misses: list[dict] | None = None,
    partial: list[PartialMatch] | None = None,
) -> list[Site]:
    """Every activation site of the model: main graph, control-flow bodies, model-local functions.

    ``misses`` (when given) collects candidate nodes that looked like activations but did not
    qualify, with the reason (``rewrite --explain`` shows them). ``partial`` (when given) collects the
    decomposed forms that matched part of the way at a node that ended in no site: how deep, and why
    they stopped (``inspect --explain`` shows them); tracing costs time only when it is asked for.
    """
    records = read_records(model)
    normalized = {r["act_output"]: r for r in records if r.get("act_output")}
    # a folded site is a plain activation again, but its normalization lives in the next layers' weights
    normalized.update({r["output"]: r for r in records if r.get("folded") and r.get("output")})
    sites: list[Site] = []
    types = infer_value_types(model)
    for c in containers(model):
        if c.function is not None and c.function.domain == NORM_DOMAIN:
            continue  # our own Norm<Act> bodies are the implementation of sites, not sites
        for s in find_in_container(c, base_dir, normalized, misses, partial):
            elem = None if c.function is not None else types.elem.get(s.input)  # function values are typed per call
            if elem is None or elem in FLOAT_TYPES:
                sites.append(s)
            elif misses is not None:
                kind = onnx.helper.tensor_dtype_to_np_dtype(elem).name
                why = f"its input is {kind}, not floating point (shape arithmetic, not an activation)"
                misses.append({"graph": c.path, "name": s.name, "op": s.root.op_type, "why": why})
    return sites


@dataclass
class Explanation:
    """Every decision of the site finder: the sites, the near misses and the half-matched forms."""

    sites: list[Site]
    misses: list[dict]  # nodes that looked like activations but did not qualify, with the reason
    partial: list[PartialMatch]  # forms that matched part of the way at a node that ended in no site

    def grouped(self) -> list[tuple[PartialMatch, list[PartialMatch]]]:
        """The half-matched forms, one group per way of failing: :func:`grouped`."""
        return grouped(self.partial)


def grouped(partial: list[PartialMatch]) -> list[tuple[PartialMatch, list[PartialMatch]]]:
    """Half-matched forms, one group per way of failing (:attr:`PartialMatch.pattern`), first seen first."""
    groups: dict[tuple[str, str], list[PartialMatch]] = {}
    for p in partial:
        groups.setdefault((p.graph, p.pattern), []).append(p)
    return [(members[0], members[1:]) for members in groups.values()]


def explain(model: onnx.ModelProto, base_dir: str | None = None) -> Explanation:
    """:func:`find_sites` with every decision kept: what ``inspect --explain`` prints."""
    misses: list[dict] = []
    partial: list[PartialMatch] = []
    sites = find_sites(model, base_dir, misses, partial)
    return Explanation(sites, misses, partial)
