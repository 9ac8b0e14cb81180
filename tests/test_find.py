"""Site finding: every spelling exporters use, constants from initializers or Constant nodes, all scopes."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper

from normact_onnx.api import inspect, rewrite
from normact_onnx.passes.find import find_sites

from .conftest import bundled_models, const, fvi, random_feeds, run_model, tiny_model

SQRT2 = math.sqrt(2.0)


def chain(spec, const_style="initializer", opset=17):
    """A one-site model y = pattern(x) from (op, inputs, output[, attrs]) rows; names starting 'k' are constants.

    Constants come as initializers or as Constant nodes (``const_style``), as exporters write both.
    A Relu after the site keeps it a hidden activation.
    """
    nodes, inits = [], []
    for row in spec:
        op, ins, out, *attrs = row
        for i in ins:
            if i.startswith("k") and not any(t.name == i for t in inits) and not any(i in n.output for n in nodes):
                value = float(i.split("=")[1])
                if const_style == "initializer":
                    inits.append(const(i, value))
                else:
                    nodes.append(helper.make_node("Constant", [], [i], value=const(i, value)))
        nodes.append(helper.make_node(op, ins, [out], **(attrs[0] if attrs else {})))
    nodes.append(helper.make_node("Relu", ["y"], ["z"]))
    return tiny_model(nodes, [fvi("x", [3, 5])], [fvi("z", [3, 5])], inits, opset=opset)


ERF_GELU = [
    ("Div", ["x", f"k={SQRT2}"], "d"),
    ("Erf", ["d"], "e"),
    ("Add", ["e", "k=1"], "a"),
    ("Mul", ["x", "a"], "m"),
    ("Mul", ["m", "k=0.5"], "y"),
]
ERF_GELU_HALF_FIRST = [
    ("Div", ["x", f"k={SQRT2}"], "d"),
    ("Erf", ["d"], "e"),
    ("Add", ["k=1", "e"], "a"),
    ("Mul", ["k=0.5", "a"], "h"),
    ("Mul", ["x", "h"], "y"),
]
ERF_GELU_MUL_RSQRT2 = [
    ("Mul", [f"k={1 / SQRT2}", "x"], "d"),
    ("Erf", ["d"], "e"),
    ("Add", ["e", "k=1"], "a"),
    ("Mul", ["x", "k=0.5"], "h"),
    ("Mul", ["h", "a"], "y"),
]
C = math.sqrt(2 / math.pi)
TANH_GELU = [
    ("Mul", ["x", "x"], "x2"),
    ("Mul", ["x", "x2"], "x3"),
    ("Mul", ["k=0.044715", "x3"], "c"),
    ("Add", ["x", "c"], "i"),
    ("Mul", [f"k={C}", "i"], "s"),
    ("Tanh", ["s"], "t"),
    ("Add", ["k=1", "t"], "a"),
    ("Mul", ["x", "a"], "m"),
    ("Mul", ["k=0.5", "m"], "y"),
]
TANH_GELU_POW = [
    ("Pow", ["x", "k=3"], "x3"),
    ("Mul", ["x3", "k=0.044715"], "c"),
    ("Add", ["c", "x"], "i"),
    ("Mul", ["i", f"k={C}"], "s"),
    ("Tanh", ["s"], "t"),
    ("Add", ["t", "k=1"], "a"),
    ("Mul", ["a", "x"], "m"),
    ("Div", ["m", "k=2"], "y"),
]
SILU = [("Sigmoid", ["x"], "s"), ("Mul", ["x", "s"], "y")]
SILU_SWAPPED = [("Sigmoid", ["x"], "s"), ("Mul", ["s", "x"], "y")]
HARD_SWISH = [
    ("Add", ["x", "k=3"], "a"),
    ("Clip", ["a", "k=0", "k=6"], "c"),
    ("Div", ["c", "k=6"], "d"),
    ("Mul", ["x", "d"], "y"),
]
HARD_SWISH_OUTER_DIV = [
    ("Add", ["x", "k=3"], "a"),
    ("Clip", ["a", "k=0", "k=6"], "c"),
    ("Mul", ["x", "c"], "m"),
    ("Div", ["m", "k=6"], "y"),
]
HARD_SWISH_HSIG = [("HardSigmoid", ["x"], "h", {"alpha": 1 / 6, "beta": 0.5}), ("Mul", ["x", "h"], "y")]
MISH = [("Softplus", ["x"], "sp"), ("Tanh", ["sp"], "t"), ("Mul", ["x", "t"], "y")]
RELU6 = [("Clip", ["x", "k=0", "k=6"], "y")]
RELU6_MIN = [("Relu", ["x"], "r"), ("Min", ["r", "k=6"], "y")]
SOFTSIGN = [("Abs", ["x"], "a"), ("Add", ["a", "k=1"], "d"), ("Div", ["x", "d"], "y")]


@pytest.mark.parametrize("const_style", ["initializer", "constant-node"])
@pytest.mark.parametrize(
    ("spec", "kind", "params"),
    [
        (ERF_GELU, "gelu", {}),
        (ERF_GELU_HALF_FIRST, "gelu", {}),
        (ERF_GELU_MUL_RSQRT2, "gelu", {}),
        (TANH_GELU, "gelu_tanh", {}),
        (TANH_GELU_POW, "gelu_tanh", {}),
        (SILU, "silu", {}),
        (SILU_SWAPPED, "silu", {}),
        (HARD_SWISH, "hard_swish", {}),
        (HARD_SWISH_OUTER_DIV, "hard_swish", {}),
        (HARD_SWISH_HSIG, "hard_swish", {}),
        (MISH, "mish", {}),
        (RELU6, "clip", {"min": 0.0, "max": 6.0}),
        (RELU6_MIN, "clip", {"min": 0.0, "max": 6.0}),
        (SOFTSIGN, "softsign", {}),
    ],
)
def test_decomposed_patterns_are_one_site_and_rewrite_exactly(spec, kind, params, const_style):
    model = chain(spec, const_style)
    sites = find_sites(model)
    assert [(s.kind, s.input, s.output) for s in sites] == [(kind, "x", "y"), ("relu", "y", "z")]
    assert sites[0].params == pytest.approx(params)
    out = rewrite(model)
    assert next(n.op_type for n in out.graph.node if n.op_type != "Constant").startswith("Norm")
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32) * 3
    # the rewritten site equals the catalogue's reference, through the whole model (Relu after it)
    (z,) = run_model(out, {"x": x})
    site = sites[0]
    a = next(o for o in rewrite(model, details=True).outcomes if o.site.output == "y").affine
    want = np.maximum(a.scale * (site.activation.f(x.astype(np.float64), params) - a.shift), 0)
    np.testing.assert_allclose(z, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ([*ERF_GELU[:-1], ("Mul", ["m", "k=0.6"], "y")], "wrong constant"),
        ([("Div", ["x", "k=1.3"], "d"), *ERF_GELU[1:]], "wrong √2"),
        ([("Sigmoid", ["x"], "s"), ("Mul", ["s", "s"], "y")], "not x·σ(x)"),
        (
            [
                ("Add", ["x", "k=3"], "a"),
                ("Clip", ["a", "k=0", "k=5"], "c"),
                ("Div", ["c", "k=6"], "d"),
                ("Mul", ["x", "d"], "y"),
            ],
            "Clip(0,5)",
        ),
    ],
)
def test_patterns_with_wrong_numbers_do_not_match(spec, why):
    kinds = [s.kind for s in find_sites(chain(spec)) if s.output == "y"]
    assert "gelu" not in kinds and "silu" not in kinds and "hard_swish" not in kinds, why


def test_intermediate_with_another_consumer_breaks_the_pattern():
    model = chain(SILU)
    model.graph.node.append(helper.make_node("Identity", ["s"], ["s_copy"]))
    model.graph.output.append(fvi("s_copy", [3, 5]))
    kinds = {s.output: s.kind for s in find_sites(model)}
    assert kinds.get("y") is None and kinds["s"] == "sigmoid"


def test_gelu_op_respects_approximate_and_opset():
    for approx, kind in (("none", "gelu"), ("tanh", "gelu_tanh")):
        m = tiny_model(
            [helper.make_node("Gelu", ["x"], ["y"], approximate=approx), helper.make_node("Relu", ["y"], ["z"])],
            [fvi("x", [4])],
            [fvi("z", [4])],
            opset=20,
            ir=10,
        )
        assert [s.kind for s in find_sites(m)] == [kind, "relu"]


def test_gates_and_graph_outputs_are_reported_not_rewritten():
    nodes = [
        helper.make_node("Relu", ["x"], ["h"]),
        helper.make_node("Sigmoid", ["x"], ["g"]),
        helper.make_node("Mul", ["h", "g"], ["m"]),
        helper.make_node("Tanh", ["m"], ["y"]),
    ]
    model = tiny_model(nodes, [fvi("x", [4])], [fvi("y", [4])])
    sites = {s.kind: s for s in find_sites(model)}
    assert sites["sigmoid"].skip.startswith("multiplicative gate")
    assert sites["tanh"].skip == "its output is a graph output"
    assert sites["relu"].skip is None
    res = rewrite(model, details=True)
    assert {o.site.kind: o.action for o in res.outcomes} == {
        "relu": "rewritten",
        "sigmoid": "skipped",
        "tanh": "skipped",
    }
    res = rewrite(model, all_sites=True, details=True)
    assert all(o.action == "rewritten" for o in res.outcomes)


def test_sites_in_if_and_loop_bodies_and_functions_are_found_and_rewritten():
    for path in [p for p in bundled_models() if p.name.startswith(("if_branch", "loop_body"))]:
        sites = inspect(path)
        assert any(s["graph"] != "main" for s in sites), path.name
        out = rewrite(path)
        feeds = random_feeds(path)
        run_model(out, feeds)  # loads and runs
        remaining = [s for s in inspect(out) if not s["normalized"] and not s["skipped"]]
        assert remaining == [], path.name


def test_sites_inside_model_local_functions():
    body = [helper.make_node("Relu", ["a"], ["b"]), helper.make_node("Mul", ["b", "b"], ["c"])]
    fn = helper.make_function("my.domain", "Block", ["a"], ["c"], body, [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("Block", ["x"], ["y"], domain="my.domain")]
    model = tiny_model(nodes, [fvi("x", [4])], [fvi("y", [4])], functions=[fn])
    model.opset_import.append(helper.make_opsetid("my.domain", 1))
    sites = find_sites(model)
    assert [(s.kind, s.path) for s in sites] == [("relu", "function my.domain::Block")]
    out = rewrite(model)
    x = np.array([-1.0, 0.5, 2.0, 3.0], dtype=np.float32)
    (y,) = run_model(out, {"x": x})
    a = rewrite(model, details=True).outcomes[0].affine
    np.testing.assert_allclose(y, (a.scale * (np.maximum(x, 0) - a.shift)) ** 2, rtol=1e-5)


def test_every_bundled_model_has_exactly_its_manifest_sites():
    """The manifest (written by the export script from the torch modules) lists kind, count and role."""
    import json
    from collections import Counter

    manifest = json.loads((bundled_models()[0].parent / "manifest.json").read_text())
    alias = {"relu6": "clip"}
    for entry in manifest["models"]:
        found = inspect(bundled_models()[0].parent / entry["file"])
        want = Counter()
        for s in entry["sites"]:
            want[(alias.get(s["kind"], s["kind"]), s["role"] == "hidden")] += s["count"]
        got = Counter((s["kind"], s["skipped"] is None) for s in found)
        assert got == want, entry["file"]


def test_onnx_light_models_every_relu_found():
    from .conftest import light_models

    for path in light_models():
        m = onnx.load(str(path), load_external_data=False)
        relus = sum(n.op_type == "Relu" for n in m.graph.node)
        assert len(find_sites(m)) == relus, path.name


def test_constants_behind_identity_and_cast_are_constants():
    """Converters write constants through Identity or Cast (fp16 constants cast up, for instance)."""
    nodes = [
        helper.make_node("Identity", ["k_sqrt2"], ["s2"]),
        helper.make_node("Cast", ["k_half16"], ["half"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Div", ["x", "s2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "k_one"], ["a"]),
        helper.make_node("Mul", ["x", "a"], ["m"]),
        helper.make_node("Mul", ["m", "half"], ["y"]),
        helper.make_node("Relu", ["y"], ["z"]),
    ]
    inits = [
        const("k_sqrt2", SQRT2),
        const("k_one", 1.0),
        onnx.numpy_helper.from_array(np.array(0.5, dtype=np.float16), "k_half16"),
    ]
    model = tiny_model(nodes, [fvi("x", [3])], [fvi("z", [3])], inits)
    assert [s.kind for s in find_sites(model)] == ["gelu", "relu"]


LOW_PRECISION_MODELS = [
    "transformer_gelu.torchscript.onnx",  # Erf chain: x/√2, √2 stored as 1.4140625
    "transformer_gelu.dynamo.onnx",
    "transformer_gelu_tanh.torchscript.onnx",  # tanh chain: 0.044715 and √(2/π) rounded
    "silu_net.torchscript.onnx",
    "hardswish_net.torchscript.onnx",  # Add→Clip→Div→Mul spellings
    "mobilenet_like.torchscript.onnx",
]


@pytest.mark.parametrize("elem", [onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("file", LOW_PRECISION_MODELS)
def test_low_precision_conversions_find_the_same_sites(file, elem):
    from .conftest import MODELS, to_low_precision

    m = onnx.load(str(MODELS / file))
    want = [(s.kind, s.written_as, s.output) for s in find_sites(m)]
    got = [(s.kind, s.written_as, s.output) for s in find_sites(to_low_precision(m, elem))]
    assert got == want
