"""An ONNX model executed by PyTorch, its float initializers as trainable parameters (the torch backend's graph).

``TorchGraph(model)`` is a ``torch.nn.Module``: ``forward(feeds)`` takes the model's inputs by name and returns its
outputs in the graph's order, running the main graph node by node with :mod:`.torch_ops` (``If`` and ``Loop``
bodies included, model-local functions inlined at run time, shapes read from the tensors, so dynamic sizes work).
Every float initializer of every graph is a ``torch.nn.Parameter`` under a key that names it
(:meth:`TorchGraph.initializer_keys`: the initializer's name, prefixed by its subgraph's path when it lives in one),
and :meth:`TorchGraph.to_model` writes the current values back into a copy of the model: nothing else changes.

``ai.normact::Norm<Act>`` nodes run as the catalogue entry's gradient-safe body (the same body the ONNX Runtime
training graph uses, docs/architecture.md §3), followed by ``scale·(f(x) − shift − slope·x)``.

Why a module-level ``__getattr__``: torch is an optional dependency, imported only when the class is first asked
for, so importing :mod:`normact_onnx.training` never needs it (docs/architecture.md §2).

Why one module past 500 lines: the plan (each node prepared once: its op, attributes, opset, the bit-exact
rewrites of training graphs), the parameter table and write-back, and the executor of main graph and subgraphs
share one step representation; the ops themselves are in :mod:`.torch_ops`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..catalogue import BY_OP_NAME, NORM_DOMAIN
from ..domains import canonical_domain, is_standard, is_standard_domain
from ..errors import NormactError
from ..passes.forms import AFFINE_ATTRS
from . import torch_ops

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
CONTROL = {"If", "Loop"}
# Plan-time rewrites (why: a training graph's site statistics are long elementwise chains over whole feature maps,
# run without autograd; on CPU a fresh output tensor costs more than the arithmetic, and a bool comparison followed
# by its Cast costs 5x a comparison written straight into a float tensor):
COMPARE = {"Greater": "gt", "Less": "lt", "GreaterOrEqual": "ge", "LessOrEqual": "le", "Equal": "eq"}
COMPARE_CAST = "Compare+Cast"
# op -> (in-place method, whether the second input may be the one overwritten)
INPLACE = {"Add": ("add_", True), "Mul": ("mul_", True), "Sub": ("sub_", False), "Div": ("div_", False)}
# ops whose torch function always returns a tensor of its own (never an input, never a view)
FRESH = {"Add", "Sub", "Mul", "Div", "Neg", "Exp", "Tanh", "Sigmoid", "Sqrt", "Abs", COMPARE_CAST}


@dataclass
class Step:
    """One node, planned once: its attributes parsed, its op function looked up, its input and output names as
    tuples. A training step runs thousands of nodes, so nothing of this is redone per step (per-step attribute
    parsing and table lookups were a tenth of the detector's step)."""

    node: onnx.NodeProto
    attrs: dict[str, Any]
    opset: int
    kind: str  # "op", "control", "norm", "function", "constant"
    subgraphs: dict[str, Plan] = field(default_factory=dict)
    no_grad: bool = False  # no output of this step reaches an output that is differentiated (TorchGraph.differentiate)
    fn: torch_ops.Op | None = None  # kind "op": the torch function
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    label: str = ""  # the op type, or COMPARE_CAST for a comparison fused with the Cast of its result
    inplace: int | None = None  # a no-grad step that may overwrite this input (see _mark_inplace)

    def __post_init__(self) -> None:
        self.inputs, self.outputs = tuple(self.node.input), tuple(self.node.output)
        self.label = self.node.op_type


@dataclass
class Plan:
    """A graph (or function body) ready to run: its steps, inputs, outputs and where its initializers live."""

    path: str
    steps: list[Step]
    inputs: list[str]
    outputs: list[str]
    initializers: dict[str, str]  # initializer name -> key in the module's tensors


def _opsets(imports: Any) -> dict[str, int]:
    out = {canonical_domain(i.domain): i.version for i in imports}
    out.setdefault("", 1)
    return out


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """The op types of ``model`` (any graph, any local function) this executor has no function for."""
    functions = {(f.domain, f.name) for f in model.functions}
    missing: set[str] = set()

    def visit(nodes: Any) -> None:
        for n in nodes:
            key = (canonical_domain(n.domain), n.op_type)
            known = key in torch_ops.OPS or key in functions or n.op_type in CONTROL or n.op_type == "Constant"
            known = known or (n.domain == NORM_DOMAIN and n.op_type in BY_OP_NAME)
            if not known:
                missing.add(f"{n.domain + '::' if n.domain else ''}{n.op_type}")
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g.node)

    visit(model.graph.node)
    for f in model.functions:
        visit(f.node)
    return sorted(missing)


class Tensors:
    """Keys → initializer protos: the float ones become parameters, the rest buffers; Constant values too."""

    def __init__(self) -> None:
        self.params: dict[str, TensorProto] = {}
        self.buffers: dict[str, np.ndarray] = {}
        self.places: dict[str, tuple[str, str, str]] = {}  # key -> (graph path, name, "initializer" | "constant")

    def add_graph(self, graph: onnx.GraphProto, path: str) -> dict[str, str]:
        names: dict[str, str] = {}
        for t in graph.initializer:
            key = t.name if not path else f"{path}/{t.name}"
            names[t.name] = key
            self.places[key] = (path, t.name, "initializer")
            if t.data_type in FLOAT_TYPES:
                self.params[key] = t
            else:
                self.buffers[key] = numpy_helper.to_array(t)
        return names

    def add_constant(self, node: onnx.NodeProto, path: str, lift: bool) -> str:
        """A Constant node's value: a parameter when it is a float tensor of a graph (Paddle and spox exports keep
        weights in Constant nodes), a buffer otherwise. Function bodies are shared by every call: never lifted."""
        key = node.output[0] if not path else f"{path}/{node.output[0]}"
        a = node.attribute[0] if node.attribute else None
        if lift and a is not None and a.name == "value" and a.t.data_type in FLOAT_TYPES:
            self.params[key] = a.t
            self.places[key] = (path, node.output[0], "constant")
        else:
            self.buffers[key] = _constant_value(node)
        return key


def _plan(
    nodes: Any,
    inputs: list[str],
    outputs: list[str],
    path: str,
    opsets: dict[str, int],
    functions: dict[tuple[str, str], onnx.FunctionProto],
    tensors: Tensors,
    initializers: dict[str, str],
    lift: bool = True,
) -> Plan:
    steps = []
    for i, node in enumerate(nodes):
        attrs = torch_ops.attributes(node)
        domain = canonical_domain(node.domain)
        step = Step(node, attrs, opsets.get(domain, 1), "op")
        if node.op_type == "Constant" and domain == "":
            step.kind = "constant"
            step.attrs["_key"] = tensors.add_constant(node, path.lstrip("/"), lift)
        elif domain == "" and node.op_type in CONTROL:
            step.kind = "control"
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    sub_path = f"{path}/{node.name or node.op_type + str(i)}.{a.name}"
                    names = tensors.add_graph(a.g, sub_path.lstrip("/"))
                    step.subgraphs[a.name] = _plan(
                        a.g.node,
                        [x.name for x in a.g.input],
                        [x.name for x in a.g.output],
                        sub_path,
                        opsets,
                        functions,
                        tensors,
                        names,
                    )
        elif domain == NORM_DOMAIN and node.op_type in BY_OP_NAME:
            step.kind = "norm"
        elif (node.domain, node.op_type) in functions:
            step.kind = "function"
        elif (domain, node.op_type) not in torch_ops.OPS:
            raise NormactError(f"node {node.name!r}: no torch function for {node.domain or 'ai.onnx'}::{node.op_type}")
        else:
            step.fn = torch_ops.OPS[(domain, node.op_type)]
        steps.append(step)
    plan = Plan(path, steps, inputs, outputs, initializers)
    _fuse_compare_cast(plan)
    return plan


def _protected(plan: Plan) -> set[str]:
    """Values a rewrite must leave alone: the plan's outputs and whatever a nested body reads."""
    out = set(plan.outputs)
    for step in plan.steps:
        for sub in step.subgraphs.values():
            out |= _reads(sub)
    return out


def _uses(plan: Plan) -> dict[str, int]:
    uses: dict[str, int] = {}
    for step in plan.steps:
        for i in step.inputs:
            if i:
                uses[i] = uses.get(i, 0) + 1
    return uses


def _fuse_compare_cast(plan: Plan) -> None:
    """A comparison whose only reader is a Cast to a float type becomes one step that writes the comparison into a
    float tensor (``torch.gt(a, b, out=float_tensor)``: 1.0 / 0.0, what the Cast makes of true / false)."""
    protected, uses = _protected(plan), _uses(plan)
    readers = {i: s for s in plan.steps for i in s.inputs if i}
    dropped: set[int] = set()
    for step in plan.steps:
        if step.fn is None or not is_standard_domain(step.node.domain) or step.label not in COMPARE:
            continue
        out = step.outputs[0] if step.outputs else ""
        cast = readers.get(out)
        if not out or out in protected or uses.get(out) != 1 or cast is None or cast.label != "Cast":
            continue
        if cast.fn is None or cast.attrs.get("to") not in FLOAT_TYPES:
            continue
        step.fn = _compare_into(COMPARE[step.label], cast.attrs["to"])
        step.outputs, step.label = cast.outputs, COMPARE_CAST
        dropped.add(id(cast))
    plan.steps = [s for s in plan.steps if id(s) not in dropped]


def _compare_into(name: str, to: int) -> torch_ops.Op:
    torch = torch_ops.torch
    compare = getattr(torch, name)
    narrow = torch_ops.dtype_of(to)

    def run(a: dict[str, Any], x: list[Any], v: int) -> list[Any]:
        p, q = x
        dtype = torch.float64 if torch_ops.wide else narrow
        out = torch.empty(_broadcast(p, q), dtype=dtype, device=p.device)
        with torch.no_grad():  # a comparison has no gradient; out= refuses inputs that require one
            compare(p, q, out=out)
        return [out]

    return run


def _broadcast(p: Any, q: Any) -> Any:
    """The broadcast shape of two tensors; the common cases (same shape, a scalar other) without torch's helper,
    which costs more than a small op."""
    if p.shape == q.shape or (q.dim() <= p.dim() and q.numel() == 1):
        return p.shape
    return torch_ops.torch.broadcast_shapes(p.shape, q.shape)


def _mark_inplace(plan: Plan) -> None:
    """Let a no-grad Add/Sub/Mul/Div overwrite an input that nothing else reads: one made by a no-grad step of the
    plan whose op always returns a new tensor (so no name, parameter, feed or autograd record shares it). Whether
    the shapes and dtype allow it (the result has the input's shape and dtype) is checked when it runs."""
    protected, uses = _protected(plan), _uses(plan)
    producers = {o: s for s in plan.steps for o in s.outputs if o}
    for step in plan.steps:
        step.inplace = None
        if not step.no_grad or step.fn is None or step.label not in INPLACE or len(step.inputs) != 2:
            continue
        if not is_standard_domain(step.node.domain):
            continue
        for k in (0, 1) if INPLACE[step.label][1] else (0,):
            name = step.inputs[k]
            made = producers.get(name)
            fresh = made is not None and made.no_grad and made.label in FRESH
            if name and fresh and uses.get(name) == 1 and name not in protected:
                step.inplace = k
                break


def _run_inplace(step: Step, x: list[Any]) -> list[Any] | None:
    """The step written into its input ``step.inplace``, or None where the result would not fit that tensor."""
    k = step.inplace
    assert k is not None
    target, other = x[k], x[1 - k]
    if other is None or not target.is_floating_point() or target.requires_grad:
        return None
    torch = torch_ops.torch
    if torch.result_type(target, other) != target.dtype:
        return None
    if _broadcast(target, other) != target.shape:
        return None
    getattr(target, INPLACE[step.label][0])(other)
    return [target]


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    a = node.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    if a.name in ("value_float", "value_int"):
        dtype = np.float32 if a.name == "value_float" else np.int64
        return np.array(a.f if a.name == "value_float" else a.i, dtype=dtype)
    if a.name in ("value_floats", "value_ints"):
        return np.array(
            list(a.floats) if a.name == "value_floats" else list(a.ints),
            dtype=np.float32 if "float" in a.name else np.int64,
        )
    raise NormactError(f"Constant node {node.name!r}: {a.name} is not supported")


class TorchBody:
    """The catalogue's Body protocol, evaluated eagerly on torch tensors (gradient-safe form)."""

    gradient_safe = True

    def __init__(self, opset: int, x: Any, params: dict[str, Any]) -> None:
        self.opset, self.params = opset, params
        self.values: dict[str, Any] = {"x": x}
        self.like = x

    def _store(self, value: Any) -> str:
        name = f"v{len(self.values)}"
        self.values[name] = value
        return name

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        fn = torch_ops.OPS[("", op_type)]
        a = {"_op": op_type, "_n_outputs": 1, **attrs}
        return self._store(fn(a, [self.values[i] for i in inputs], self.opset)[0])

    def const(self, value: float) -> str:
        return self._store(torch_ops.torch.tensor(value, dtype=self.like.dtype, device=self.like.device))

    def param(self, name: str) -> str:
        return self.const(float(self.params[name]))

    def attr(self, name: str) -> float:
        return float(self.params[name])


def norm_forward(op_name: str, attrs: dict[str, Any], x: Any, opset: int) -> Any:
    """A ``Norm<Act>`` node: the entry's gradient-safe body, then the affine part."""
    act = BY_OP_NAME[op_name]
    params = {k: attrs.get(k, default) for k, default in act.with_defaults().items()}
    b = TorchBody(max(opset, 13), x, params)
    f = b.values[act.body(b, "x")]
    scale, shift, slope = (float(attrs.get(k, d)) for k, d in AFFINE_ATTRS)
    y = f
    if slope != 0.0:
        y = y - slope * x
    if shift != 0.0:
        y = y - shift
    return y * scale if scale != 1.0 else y


@cache
def torch_graph_class() -> type:
    """Define the ``torch.nn.Module`` subclass (torch imported here, on first use)."""
    torch = torch_ops.load()

    class TorchGraph(torch.nn.Module):  # type: ignore[misc,name-defined]
        """The model as a module; see the module docstring."""

        def __init__(self, model: onnx.ModelProto) -> None:
            super().__init__()
            missing = unsupported_ops(model)
            if missing:
                raise NormactError(f"the torch backend cannot run op(s) {', '.join(missing)} of this model")
            self.model = model
            self.tensors = Tensors()
            self.functions = {(f.domain, f.name): f for f in model.functions}
            # calling node's id -> (node, planned body, its constants): see call_function
            self.function_plans: dict[int, tuple[onnx.NodeProto, Plan, Tensors]] = {}
            self.opsets = _opsets(model.opset_import)
            g = model.graph
            names = self.tensors.add_graph(g, "")
            inits = {t.name for t in g.initializer}
            self.input_names = [i.name for i in g.input if i.name not in inits]
            self.plan = _plan(
                g.node,
                self.input_names,
                [o.name for o in g.output],
                "",
                self.opsets,
                self.functions,
                self.tensors,
                names,
            )
            self.keys = list(self.tensors.params)
            self.narrow = _computes_narrow(model)
            self.weights = torch.nn.ParameterList(
                torch.nn.Parameter(torch.from_numpy(numpy_helper.to_array(t).copy()), requires_grad=True)
                for t in self.tensors.params.values()
            )
            self.index = {k: i for i, k in enumerate(self.keys)}
            self.buffer_keys = list(self.tensors.buffers)
            for i, k in enumerate(self.buffer_keys):
                value = np.array(self.tensors.buffers[k], copy=True)
                self.register_buffer(f"b{i}", torch.from_numpy(value.copy()), persistent=False)
            self.buffer_index = {k: f"b{i}" for i, k in enumerate(self.buffer_keys)}

        # ---- the parameters and the way back to the model -------------------------------------------------

        def initializer_keys(self) -> list[str]:
            return list(self.keys)

        def named_initializers(self) -> list[tuple[str, Any]]:
            """(key, parameter) for every float initializer."""
            return [(k, self.weights[i]) for i, k in enumerate(self.keys)]

        def parameter(self, key: str) -> Any:
            return self.weights[self.index[key]]

        def to_model(self) -> onnx.ModelProto:
            """A copy of the model with every trainable tensor (float initializers, float ``Constant`` values) set to
            its parameter's current value; tensors whose value did not change keep their bytes."""
            out = copy.deepcopy(self.model)
            graphs = {"": out.graph}
            _index_subgraphs(out.graph, "", graphs)
            for key, p in self.named_initializers():
                path, name, where = self.tensors.places[key]
                if where == "initializer":
                    (t,) = [t for t in graphs[path].initializer if t.name == name]
                else:
                    (node,) = [n for n in graphs[path].node if n.op_type == "Constant" and n.output[0] == name]
                    t = node.attribute[0].t
                before = numpy_helper.to_array(self.tensors.params[key])
                value = p.detach().cpu().numpy().astype(before.dtype)
                if np.array_equal(value, before):
                    continue  # untouched values keep their exact bytes (docs/architecture.md §8)
                new = numpy_helper.from_array(value, t.name)
                new.doc_string = t.doc_string
                t.CopyFrom(new)
            return out

        # ---- execution ---------------------------------------------------------------------------------

        def differentiate(self, outputs: list[str]) -> None:
            """Only ``outputs`` will be differentiated: main-graph steps none of them depends on (a training graph's
            statistics: the derivative body, the squares, the means) then run without autograd bookkeeping,
            like the outputs ONNX Runtime training builds no gradient for."""
            needed = set(outputs)
            for step in reversed(self.plan.steps):
                step.no_grad = not any(o in needed for o in step.outputs if o)
                if not step.no_grad:
                    needed.update(i for i in step.inputs if i)
                    for sub in step.subgraphs.values():  # outer values read inside If/Loop bodies
                        needed.update(_reads(sub))
            _mark_inplace(self.plan)

        def value(self, plan: Plan, name: str, env: dict[str, Any]) -> Any:
            return env[name]

        def forward(self, feeds: dict[str, Any]) -> list[Any]:
            missing = [n for n in self.input_names if n not in feeds]
            if missing:
                raise NormactError(f"missing input(s) {', '.join(missing)}")
            device = self.weights[0].device if len(self.weights) else torch.device("cpu")
            torch_ops.device = device
            env = {k: torch.as_tensor(v).to(device) for k, v in feeds.items()}
            return self.run(self.plan, env)

        def forward_float64(self, feeds: dict[str, Any]) -> list[Any] | None:
            """The forward with every float32 weight, buffer, feed and intermediate in float64, no gradient: the
            function the float32 module approximates, to check an export against (ONNX Runtime's float32 result
            and this one differ by ORT's own rounding only, not by two roundings that a graph like magika's
            LayerNorm amplifies). The module's tensors are back in float32 afterwards, unchanged. None for a
            model that computes in float16 or bfloat16 on purpose (there float32 is the reference)."""
            floats = [t for t in [*self.weights, *self.buffers()] if t.is_floating_point()]
            if self.narrow or any(t.dtype != torch.float32 for t in floats):
                return None
            wide = {k: np.asarray(v, np.float64) if np.asarray(v).dtype == np.float32 else v for k, v in feeds.items()}
            saved = [(t, t.data) for t in floats]
            try:
                for t in floats:
                    t.data = t.data.double()
                torch_ops.wide = True
                with torch.no_grad():
                    return list(self(wide))
            finally:
                torch_ops.wide = False
                for t, data in saved:
                    t.data = data

        def run(self, plan: Plan, env: dict[str, Any]) -> list[Any]:
            env = dict(env)
            for name, key in plan.initializers.items():
                if name not in env or plan.path:
                    env[name] = self.tensor(key)
            grad = torch.is_grad_enabled()
            execute = self.execute
            for step in plan.steps:
                if grad and step.no_grad:
                    with torch.no_grad():
                        execute(step, env)
                else:
                    execute(step, env)
            return [env[o] for o in plan.outputs]

        def tensor(self, key: str) -> Any:
            if key in self.index:
                return self.weights[self.index[key]]
            return getattr(self, self.buffer_index[key])

        def execute(self, step: Step, env: dict[str, Any]) -> None:
            if step.fn is not None:
                x = [env[i] if i else None for i in step.inputs]
                done = _run_inplace(step, x) if step.inplace is not None else None
                outs = done if done is not None else step.fn(step.attrs, x, step.opset)
            elif step.kind == "constant":
                outs = [self.tensor(step.attrs["_key"])]
            else:
                node = step.node
                inputs = [env[i] if i else None for i in step.inputs]
                if step.kind == "norm":
                    outs = [norm_forward(node.op_type, step.attrs, inputs[0], step.opset)]
                elif step.kind == "function":
                    outs = self.call_function(self.functions[(node.domain, node.op_type)], node, inputs)
                elif node.op_type == "If":
                    cond = inputs[0]
                    assert cond is not None, "If without a condition fails the ONNX checker"
                    branch = "then_branch" if bool(cond.reshape(())) else "else_branch"
                    outs = self.run(step.subgraphs[branch], env)
                else:
                    outs = self.loop(step, inputs, env)
            for name, value in zip(step.outputs, outs):
                if name:
                    env[name] = value

        def loop(self, step: Step, inputs: list[Any], env: dict[str, Any]) -> list[Any]:
            body = step.subgraphs["body"]
            trips = int(inputs[0].reshape(())) if inputs[0] is not None else None
            cond = bool(inputs[1].reshape(())) if len(inputs) > 1 and inputs[1] is not None else True
            carried = list(inputs[2:])
            n_carried = len(carried)
            scans: list[list[Any]] = [[] for _ in range(len(body.outputs) - 1 - n_carried)]
            i = 0
            while cond and (trips is None or i < trips):
                inner = dict(env)
                inner[body.inputs[0]] = torch.tensor(i, dtype=torch.int64, device=torch_ops.device)
                inner[body.inputs[1]] = torch.tensor(cond, device=torch_ops.device)
                for name, v in zip(body.inputs[2:], carried):
                    inner[name] = v
                outs = self.run(body, inner)
                cond = bool(outs[0].reshape(()))
                carried = outs[1 : 1 + n_carried]
                for acc, v in zip(scans, outs[1 + n_carried :]):
                    acc.append(v)
                i += 1
            return carried + [torch.stack(acc) if acc else torch.empty(0) for acc in scans]

        def call_function(self, fn: onnx.FunctionProto, node: onnx.NodeProto, inputs: list[Any]) -> list[Any]:
            """A model-local function, inlined: its body runs with the caller's attributes substituted (planned on
            the first call of each calling node, kept for the next steps)."""
            planned = self.function_plans.get(id(node))
            if planned is None or planned[0] is not node:
                planned = (node, *self.plan_function(fn, node))
                self.function_plans[id(node)] = planned
            _, plan, scratch = planned
            env = dict(zip(fn.input, inputs))
            for step in plan.steps:
                if step.kind == "constant":
                    value = torch.from_numpy(np.array(scratch.buffers[step.attrs["_key"]], copy=True))
                    like = inputs[0] if inputs and inputs[0] is not None else None
                    env[step.node.output[0]] = value.to(like.device) if like is not None else value
                else:
                    self.execute(step, env)
            return [env[o] for o in fn.output]

        def plan_function(self, fn: onnx.FunctionProto, node: onnx.NodeProto) -> tuple[Plan, Tensors]:
            """The body of ``fn`` with ``node``'s attributes substituted, planned."""
            given = {a.name: a for a in node.attribute}
            defaults = {a.name: a for a in fn.attribute_proto}
            body = []
            for n in fn.node:
                n2 = copy.copy(n) if not any(a.ref_attr_name for a in n.attribute) else onnx.NodeProto()
                if n2 is not n:
                    n2.CopyFrom(n)
                    del n2.attribute[:]
                    for a in n.attribute:
                        if a.ref_attr_name:
                            src = given.get(a.ref_attr_name) or defaults.get(a.ref_attr_name)
                            if src is None:
                                continue
                            a2 = onnx.AttributeProto()
                            a2.CopyFrom(src)
                            a2.name = a.name
                            n2.attribute.append(a2)
                        else:
                            n2.attribute.append(a)
                body.append(n2)
            opsets = {**self.opsets, **_opsets(fn.opset_import)}
            scratch = Tensors()
            plan = _plan(body, list(fn.input), list(fn.output), "", opsets, self.functions, scratch, {}, lift=False)
            return plan, scratch

    return TorchGraph


def _computes_narrow(model: onnx.ModelProto) -> bool:
    """Whether a graph or function of ``model`` casts to float16 / bfloat16 (it computes in 16 bits on purpose)."""
    narrow = (TensorProto.FLOAT16, TensorProto.BFLOAT16)

    def visit(nodes: Any) -> bool:
        for n in nodes:
            if n.op_type in ("Cast", "CastLike") and any(a.name == "to" and a.i in narrow for a in n.attribute):
                return True
            if any(a.type == onnx.AttributeProto.GRAPH and visit(a.g.node) for a in n.attribute):
                return True
        return False

    return visit(model.graph.node) or any(visit(f.node) for f in model.functions)


def _reads(plan: Plan) -> set[str]:
    """Every value name the steps of ``plan`` (and of its nested bodies) read."""
    out: set[str] = set()
    for step in plan.steps:
        out.update(i for i in step.inputs if i)
        for sub in step.subgraphs.values():
            out |= _reads(sub)
    return out


def _index_subgraphs(graph: onnx.GraphProto, path: str, out: dict[str, onnx.GraphProto]) -> None:
    """Graph path → GraphProto, with the same paths :func:`_plan` gives subgraphs."""
    for i, node in enumerate(graph.node):
        if node.op_type in CONTROL and is_standard(node):
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    sub = f"{path}/{node.name or node.op_type + str(i)}.{a.name}"
                    out[sub.lstrip("/")] = a.g
                    _index_subgraphs(a.g, sub, out)


def __getattr__(name: str) -> Any:
    if name == "TorchGraph":
        return torch_graph_class()
    raise AttributeError(name)
