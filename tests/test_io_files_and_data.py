"""Files and data a command reads and writes: output modes and paths, hostile data and statistics, models over 2 GB.

CLI tests run ``normact-onnx`` through the one runner (``conftest.run_cli``) and assert the exact exit code, that
stderr is exactly one line, and what the folder holds afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from normact_onnx import io as nio
from normact_onnx.api import calibrate, inspect, rewrite
from normact_onnx.errors import NormactError

from .conftest import MODELS, fvi, listing, one_line_error, random_feeds, run_cli, run_model, tiny_model

MLP = MODELS / "mlp_relu.torchscript.onnx"
SYN = ("--synthetic", "--shape", "x=16x64")  # synthetic calibration data for MLP
ROOT_USER = os.geteuid() == 0


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def external_copy(src: Path, dest_dir: Path, name: str = "model.onnx") -> Path:
    m = onnx.load(str(src))
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / name
    onnx.save(
        m, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0
    )
    return out


# ---- files and output paths --------------------------------------------------------------------------


@pytest.mark.parametrize("umask, want", [(0o022, 0o644), (0o077, 0o600)])
def test_every_output_follows_the_umask(tmp_path, umask, want):
    src = external_copy(MLP, tmp_path / "in")
    r = run_cli("rewrite", src, "-o", "out/n.onnx", "--preserve-function", "--report", "out/r.json", cwd=tmp_path,
                umask=umask)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    # the model, the report, and one data file: the weights the rewrite computed and those it still uses
    assert sorted(os.listdir(out)) == ["n.onnx", "n.onnx.data", "r.json"]  # weights.bin: only its used tensors
    assert {p.name: mode(p) for p in out.iterdir()} == dict.fromkeys(os.listdir(out), want)
    r = run_cli("calibrate", MLP, *SYN, "-o", "c/m.onnx", "--report", "c/m.html", cwd=tmp_path, umask=umask)
    assert r.returncode == 0, r.stderr
    assert {p.name: mode(p) for p in (tmp_path / "c").iterdir()} == dict.fromkeys(
        ["m.onnx", "m.stats.json", "m.html"], want
    )
    r = run_cli("fold", "out/n.onnx", "-o", "f.onnx", "--report", "f.json", cwd=tmp_path, umask=umask)
    assert r.returncode == 0, r.stderr
    assert mode(tmp_path / "f.onnx") == mode(tmp_path / "f.json") == want


@pytest.mark.parametrize("before", [0o644, 0o640])
def test_in_place_keeps_the_input_mode(tmp_path, before):
    shutil.copy(MLP, tmp_path / "m.onnx")
    os.chmod(tmp_path / "m.onnx", before)
    r = run_cli("rewrite", "m.onnx", "--in-place", cwd=tmp_path, umask=0o077)
    assert r.returncode == 0, r.stderr
    assert mode(tmp_path / "m.onnx") == before
    assert [s["normalized"] for s in inspect(tmp_path / "m.onnx")] == [True, True]
    assert listing(tmp_path) == ["m.onnx"]


def test_output_given_is_written_even_when_nothing_changes(tmp_path):
    src = external_copy(MLP, tmp_path / "in")
    assert run_cli("rewrite", src, "-o", "n.onnx", cwd=tmp_path).returncode == 0
    before = listing(tmp_path)
    # without -o: nothing to rewrite, nothing written (as before)
    r = run_cli("rewrite", "n.onnx", cwd=tmp_path)
    assert r.returncode == 0 and "nothing to rewrite" in r.stdout and listing(tmp_path) == before
    # with -o: OUT exists afterwards, a verified copy with its external data carried
    r = run_cli("rewrite", "n.onnx", "-o", "copy/again.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "copy")) == ["again.onnx", "weights.bin"]
    assert inspect(tmp_path / "copy/again.onnx") == inspect(tmp_path / "n.onnx")
    feeds = random_feeds(MLP)
    np.testing.assert_array_equal(run_model(tmp_path / "copy/again.onnx", feeds)[0], run_model(tmp_path / "n.onnx",
                                  feeds)[0])  # fmt: skip
    # fold of a model without normalized sites, calibrate whose rewrite selects nothing
    r = run_cli("fold", MLP, "-o", "f.onnx", cwd=tmp_path)
    assert r.returncode == 0 and "unchanged copy" in r.stdout, r.stderr
    assert onnx.load(str(tmp_path / "f.onnx")).graph == onnx.load(str(MLP)).graph
    r = run_cli("calibrate", MLP, *SYN, "--include", "tanh", "-o", "c.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c.onnx").exists() and (tmp_path / "c.stats.json").exists()
    assert not (tmp_path / "mlp_relu.torchscript.normact.onnx").exists()


def test_calibrate_writes_beside_its_output_under_its_own_name(tmp_path):
    shutil.copy(MLP, tmp_path / "m.onnx")
    r = run_cli("calibrate", "m.onnx", *SYN, "-o", "elsewhere/out.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert listing(tmp_path) == ["elsewhere", "elsewhere/out.onnx", "elsewhere/out.stats.json", "m.onnx"]
    r = run_cli("calibrate", "m.onnx", *SYN, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert run_cli("rewrite", "m.onnx", cwd=tmp_path).returncode == 0
    assert {"m.anact.onnx", "m.anact.stats.json", "m.normact.onnx"} <= set(os.listdir(tmp_path))
    assert "m.anact.onnx" in run_cli("calibrate", "--help", cwd=tmp_path).stdout.replace("<model>", "m")


def _bad_output_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    return [
        (["rewrite", "m.onnx", "-o", "folder"], "is a folder"),
        (["rewrite", "m.onnx", "-o", "newdir/"], "is a folder"),
        (["rewrite", "m.onnx", "-o", "/proc/normact.onnx"], "/proc"),
        (["rewrite", "m.onnx", "-o", "afile/out.onnx"], "not a folder"),
        (["rewrite", "m.onnx", "-o", "ok.onnx", "--report", "/proc/report.json"], "--report"),
        (["rewrite", "m.onnx", "--in-place", "-o", "ok.onnx"], "conflict"),
        (["fold", "m.onnx", "-o", "folder"], "is a folder"),
        (["fold", "m.onnx", "-o", "ok.onnx", "--report", "folder/"], "--report"),
        (["fold", "m.onnx", "--in-place", "-o", "ok.onnx"], "conflict"),
        (["calibrate", "m.onnx", *SYN, "-o", "/proc/x/c.onnx"], "/proc"),
        (["calibrate", "m.onnx", *SYN, "--stats", "folder"], "--stats"),
        (["calibrate", "m.onnx", *SYN, "--report", "/proc/c.html"], "--report"),
        (["calibrate", "m.onnx", *SYN, "-o", "new/"], "is a folder"),
    ]


def test_output_path_problems_are_one_line_before_any_work(tmp_path):
    shutil.copy(MLP, tmp_path / "m.onnx")
    cases = _bad_output_cases(tmp_path)
    one_line_error(run_cli(*cases[0][0], cwd=tmp_path, process=True), cases[0][1])  # one in a real process
    for args, needle in cases:
        before = listing(tmp_path)
        one_line_error(run_cli(*args, cwd=tmp_path), needle)
        assert listing(tmp_path) == before, args


@pytest.mark.skipif(ROOT_USER, reason="root writes into read-only folders")
def test_read_only_folder_is_refused(tmp_path):
    shutil.copy(MLP, tmp_path / "m.onnx")
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        one_line_error(run_cli("rewrite", "m.onnx", "-o", "ro/out.onnx", cwd=tmp_path), "cannot write")
        assert os.listdir(tmp_path / "ro") == []
    finally:
        os.chmod(tmp_path / "ro", 0o755)


def test_a_failed_write_removes_the_folders_it_created(tmp_path):
    """A model ONNX Runtime cannot load passes the checker and fails verification after the folders exist."""
    w = onnx.numpy_helper.from_array(np.ones(4096, np.float32), "W")
    nodes = [
        helper.make_node("Relu", ["x"], ["h"]),
        helper.make_node("Frobnicate", ["h", "W"], ["y"], domain="com.example"),
    ]
    model = tiny_model(nodes, [fvi("x", [4096])], [fvi("y", [4096])], [w])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    (tmp_path / "in").mkdir()
    onnx.save(model, str(tmp_path / "in" / "m.onnx"), save_as_external_data=True, location="w.bin")
    before = listing(tmp_path)
    one_line_error(run_cli("rewrite", "in/m.onnx", "-o", "new/deeper/out.onnx", cwd=tmp_path), "onnxruntime")
    assert listing(tmp_path) == before  # neither the folders nor the carried w.bin stay


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    """Eight writers carry one model's external data into one folder at the same moment."""
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    t = onnx.TensorProto(name="W", data_type=onnx.TensorProto.FLOAT, dims=[4 << 20])
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "w.bin"), ("offset", "0"), ("length", str(16 << 20))):
        t.external_data.add(key=k, value=v)
    payload = np.random.default_rng(0).integers(0, 255, 16 << 20, dtype=np.uint8).tobytes()
    (src_dir / "w.bin").write_bytes(payload)
    model = tiny_model([helper.make_node("Relu", ["x"], ["y"])], [fvi("x", [1])], [fvi("y", [1])], [t])
    barrier, errors = threading.Barrier(8), []

    def carry() -> None:
        barrier.wait()
        try:
            nio.carry_external_data(model, src_dir, tmp_path / "dest")
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=carry) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert os.listdir(tmp_path / "dest") == ["w.bin"]  # no temporary file left behind
    assert (tmp_path / "dest" / "w.bin").read_bytes() == payload


# ---- data and statistics -------------------------------------------------------------------------------


def test_nan_or_inf_calibration_data_is_refused(tmp_path):
    shutil.copy(MLP, tmp_path / "m.onnx")
    spec = onnx.load(str(MLP)).graph.input[0]
    name = spec.name
    dims = [d.dim_value or 4 for d in spec.type.tensor_type.shape.dim]
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(0)
    good = rng.standard_normal(dims).astype(np.float32)
    bad = good.copy()
    bad.flat[3] = np.inf
    np.savez(tmp_path / "data" / "a.npz", **{name: good})
    np.savez(tmp_path / "data" / "b.npz", **{name: bad})
    before = listing(tmp_path)
    err = one_line_error(run_cli("calibrate", "m.onnx", "--data", "data", cwd=tmp_path), "b.npz", repr(name), "Inf")
    assert "a.npz" not in err
    assert listing(tmp_path) == before
    bad.flat[3] = np.nan
    np.savez(tmp_path / "nan.npz", **{name: np.concatenate([good, bad])})
    one_line_error(run_cli("calibrate", "m.onnx", "--data", "nan.npz", "--batch-size", dims[0], cwd=tmp_path),
                   "(batch 1)", "NaN")  # fmt: skip
    assert not (tmp_path / "m.anact.stats.json").exists()


def _strict(text: str) -> dict:
    def refuse(token: str):
        raise AssertionError(f"{token} in a statistics file")

    return json.loads(text, parse_constant=refuse)


def test_stats_json_is_strict_json_even_for_a_constant_site(tmp_path):
    """A site whose input is constant has an undefined forward gain (0/0): written as null, never NaN."""
    zero = onnx.numpy_helper.from_array(np.zeros(8, np.float32), "z")
    nodes = [
        helper.make_node("Mul", ["x", "z"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("Add", ["r", "t"], ["s"]),
        helper.make_node("Identity", ["s"], ["y"]),
    ]
    onnx.save(tiny_model(nodes, [fvi("x", ["N", 8])], [fvi("y", ["N", 8])], [zero]), tmp_path / "m.onnx")
    r = run_cli("calibrate", "m.onnx", "--synthetic", "--shape", "x=16x8", "--stats-only", cwd=tmp_path)
    assert r.returncode == 2 and "constant" in r.stderr  # a site to normalize with undefined statistics: refused
    r = run_cli("calibrate", "m.onnx", "--synthetic", "--shape", "x=16x8", "--stats-only", "--method", "static",
                "--nodes", "^t$", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = _strict((tmp_path / "m.anact.stats.json").read_text())
    assert doc["sites"]["r"]["ema"]["rho"] == [None]
    r = run_cli("rewrite", "m.onnx", "--method", "static", "--stats", "m.anact.stats.json", "-o", "s.onnx",
                cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "constant on the calibration data" in r.stdout  # the constant site is skipped, not normalized at q = 1
    assert [s["normalized"] for s in inspect(tmp_path / "s.onnx")] == [False, True]


def _another_mlp(tmp_path: Path) -> Path:
    """The bundled MLP with one more node: the same site names, another model."""
    m = onnx.load(str(MLP))
    out = m.graph.output[0].name
    m.graph.node[-1].output[0] = out + "_pre"
    m.graph.node.append(helper.make_node("Identity", [out + "_pre"], [out]))
    onnx.save(m, str(tmp_path / "other.onnx"))
    return tmp_path / "other.onnx"


def test_stats_of_another_model_are_refused_unless_forced(tmp_path):
    shutil.copy(MLP, tmp_path / "m.onnx")
    assert run_cli("calibrate", "m.onnx", *SYN, "--stats-only", "--stats", "s.json", cwd=tmp_path).returncode == 0
    other = _another_mlp(tmp_path)
    assert [s["name"] for s in inspect(other)] == [s["name"] for s in inspect(MLP)]
    before = listing(tmp_path)
    one_line_error(run_cli("rewrite", other, "--method", "anact", "--stats", "s.json", "-o", "x.onnx", cwd=tmp_path),
                   "another model", "--force")  # fmt: skip
    assert listing(tmp_path) == before
    with pytest.raises(NormactError, match="another model"):
        rewrite(other, stats=tmp_path / "s.json", method="anact")
    r = run_cli("rewrite", other, "--method", "anact", "--stats", "s.json", "-o", "x.onnx", "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(rewrite(other, stats=tmp_path / "s.json", method="anact", force=True, details=True).rewritten) == 2
    # the same model re-serialized (even with its weights moved to external data) is the same model
    again = external_copy(tmp_path / "m.onnx", tmp_path / "resaved")
    r = run_cli("rewrite", again, "--method", "anact", "--stats", "s.json", "-o", "y.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert nio.load_model(again) != onnx.load(str(MLP))


@pytest.fixture(scope="module")
def mlp_stats(tmp_path_factory) -> Path:
    """Statistics of the bundled MLP (calibrated once for the module)."""
    path = tmp_path_factory.mktemp("stats") / "s.json"
    rng = np.random.default_rng(0)
    calibrate(MLP, [{"x": rng.standard_normal((16, 64)).astype(np.float32)} for _ in range(3)], stats_path=path)
    return path


def _tamper(doc: dict, how: str) -> str | dict:
    site = next(iter(doc["sites"].values()))
    if how == "version-text":
        doc["version"] = "two"
    elif how == "version-newer":
        doc["version"] = 99
    elif how == "sites-list":
        doc["sites"] = list(doc["sites"].values())
    elif how == "lengths":
        site["x"]["mean"].append(0.5)
    elif how == "negative-variance":
        site["x"]["m2"][0] = -1.0
    elif how == "nan":
        return json.dumps(doc).replace(json.dumps(site["f"]["mean"][0]), "NaN", 1)
    elif how == "missing-top":
        del doc["fingerprint"]
    elif how == "missing-site-key":
        del site["d2_mean"]
    elif how == "moments-text":
        site["f"]["n"] = "many"
    elif how == "depth-float":
        site["depth"] = 1.5
    return doc


@pytest.mark.parametrize(
    "how, needle",
    [
        ("version-text", "version must be an integer"),
        ("version-newer", "newer than this tool"),
        ("sites-list", "sites must be an object"),
        ("lengths", "different lengths"),
        ("negative-variance", "cannot be negative"),
        ("nan", "not JSON"),
        ("missing-top", "no 'fingerprint'"),
        ("missing-site-key", "no 'd2_mean'"),
        ("moments-text", "must be a list"),
        ("depth-float", "depth must be an integer"),
    ],
)
def test_tampered_stats_are_one_line_errors(tmp_path, mlp_stats, how, needle):
    from normact_onnx.calibration import CalibrationStats

    shutil.copy(MLP, tmp_path / "m.onnx")
    doc = _tamper(json.loads(mlp_stats.read_text()), how)
    (tmp_path / "s.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    before = listing(tmp_path)
    one_line_error(run_cli("rewrite", "m.onnx", "--method", "static", "--stats", "s.json", cwd=tmp_path), needle)
    for use in (CalibrationStats.load, lambda p: rewrite(tmp_path / "m.onnx", stats=p, method="anact")):
        with pytest.raises(NormactError, match=needle) as e:
            use(tmp_path / "s.json")
        assert "\n" not in str(e.value)
    assert listing(tmp_path) == before


def test_format_1_stats_stay_readable_when_they_match(tmp_path):
    """Files written before the graph fingerprint (version 1: a hash of the site list) still work for their model."""
    from normact_onnx.calibration.stats import fingerprint
    from normact_onnx.passes.find import find_sites

    shutil.copy(MLP, tmp_path / "m.onnx")
    assert run_cli("calibrate", "m.onnx", *SYN, "--stats-only", "--stats", "s.json", cwd=tmp_path).returncode == 0
    doc = json.loads((tmp_path / "s.json").read_text())
    doc["version"] = 1
    doc["fingerprint"] = fingerprint([(s.output, s.kind) for s in find_sites(onnx.load(str(MLP)))])
    (tmp_path / "old.json").write_text(json.dumps(doc))
    r = run_cli("rewrite", "m.onnx", "--method", "anact", "--stats", "old.json", "-o", "a.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc["fingerprint"] = "0123456789abcdef"
    (tmp_path / "old.json").write_text(json.dumps(doc))
    r = run_cli("rewrite", "m.onnx", "--method", "anact", "--stats", "old.json", cwd=tmp_path)
    one_line_error(r, "another model")


def _dynamic_mlp(tmp_path: Path) -> Path:
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32), "W")
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"])]
    onnx.save(tiny_model(nodes, [fvi("x", ["N", 8])], [fvi("y", ["N", 5])], [w]), tmp_path / "d.onnx")
    return tmp_path / "d.onnx"


def test_compare_honours_shape_and_refuses_unknown_inputs_and_bad_counts(tmp_path):
    _dynamic_mlp(tmp_path)
    r = run_cli("compare", "d.onnx", "d.onnx", "--synthetic", "--shape", "x=7x8", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["outputs"][0]["shape"] == [7, 5]
    one_line_error(run_cli("compare", "d.onnx", "d.onnx", "--synthetic", "--shape", "z=7x8", cwd=tmp_path),
                   "--shape z", "no such input")  # fmt: skip
    for flag in ("--batch-size", "--batches"):
        one_line_error(run_cli("compare", "d.onnx", "d.onnx", "--synthetic", flag, "0", cwd=tmp_path), flag)
    r = run_cli("compare", "d.onnx", "d.onnx", "--data", "d.npz", "--shape", "x=2x8", cwd=tmp_path)
    one_line_error(r, "--shape")
    for q in ("inf", "nan", "-1", "0"):
        one_line_error(run_cli("rewrite", "d.onnx", "--q", q, cwd=tmp_path), "--q")
    assert sorted(os.listdir(tmp_path)) == ["d.onnx"]


def test_compare_outputs_of_different_shapes_show_no_numbers(tmp_path):
    _dynamic_mlp(tmp_path)
    m = onnx.load(str(tmp_path / "d.onnx"))
    m.graph.node[-1].output[0] = "y0"
    m.graph.node.append(helper.make_node("Concat", ["y0", "y0"], ["y"], axis=1))
    m.graph.output[0].CopyFrom(fvi("y", ["N", 10]))
    onnx.save(m, str(tmp_path / "wide.onnx"))
    r = run_cli("compare", "d.onnx", "wide.onnx", "--synthetic", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("y "))
    assert "FAIL" in row and "n/a" in row and "1.0000" not in row
    r = run_cli("compare", "d.onnx", "wide.onnx", "--synthetic", "--json", cwd=tmp_path)
    out = json.loads(r.stdout)["outputs"][0]
    assert out["cosine"] is None and out["passed"] is False and "shapes differ" in out["error"]


def test_compare_cuda_without_the_cuda_provider_is_refused(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    one_line_error(run_cli("compare", MLP, MLP, "--synthetic", "--cuda", cwd=tmp_path), "CUDAExecutionProvider")


def test_compare_reference_reads_symlinked_external_data(tmp_path):
    src = external_copy(MLP, tmp_path / "m")
    (tmp_path / "m" / "store").mkdir()
    (tmp_path / "m" / "weights.bin").rename(tmp_path / "m" / "store" / "weights.bin")
    (tmp_path / "m" / "weights.bin").symlink_to("store/weights.bin")
    r = run_cli("compare", src, "--reference", "--synthetic", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "PASS" in r.stdout


def test_api_calibrate_checks_its_outputs_first(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(NormactError, match="is a folder"):
        calibrate(MLP, synthetic=True, stats_path=tmp_path / "folder")


# ---- a model over 2 GB whose weights fold and preserve-function change -------------------------------------


def _big_model(folder: Path) -> tuple[Path, int]:
    """x → Relu → MatMul(W1) and an embedding table E read by Gather: 2.4 GB of external data in one file.

    E (2.25 GB) is a sparse file (no disk, never read); W1 (128 MB, written through np.memmap) is the
    weight that folding changes. Returns the model and the byte offset of W1 in the data file.
    """
    k, n1, rows = 64, 1 << 19, (1 << 23) + (1 << 20)
    e_len, w_len = 4 * rows * k, 4 * k * n1

    def external(name: str, dims: list[int], offset: int, length: int) -> onnx.TensorProto:
        t = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=dims)
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, v in (("location", "big.weights"), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=key, value=v)
        return t

    folder.mkdir()
    with open(folder / "big.weights", "wb") as fh:
        fh.truncate(e_len + w_len)
    w1 = np.memmap(folder / "big.weights", np.float32, "r+", offset=e_len, shape=(k, n1))
    pattern = (np.arange(n1, dtype=np.float32) % 13) - 6
    w1[:] = pattern[None, :] * np.linspace(0.1, 1.0, k, dtype=np.float32)[:, None]
    w1.flush()
    del w1
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("MatMul", ["r", "W1"], ["h"]),
        helper.make_node("Gather", ["E", "idx"], ["z"], axis=0),
    ]
    inputs = [fvi("x", [1, k]), helper.make_tensor_value_info("idx", onnx.TensorProto.INT64, [1])]
    model = tiny_model(nodes, inputs, [fvi("h", [1, n1]), fvi("z", [1, k])],
                       [external("E", [rows, k], 0, e_len), external("W1", [k, n1], e_len, w_len)])  # fmt: skip
    onnx.save(model, str(folder / "big.onnx"))
    return folder / "big.onnx", e_len


def _peak_rss_mb(args: list[str], cwd: Path) -> float:
    """Run the CLI in a fresh interpreter; its peak resident memory (VmHWM of that process) in MB."""
    code = (
        "import sys; from normact_onnx.cli import main; rc = main(sys.argv[1:]); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
        "print('RSS', int(hwm) / 1024); sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert r.returncode == 0, r.stderr
    return float(r.stdout.strip().splitlines()[-1].split()[1])


def _rows(model: Path, name: str, n: int = 3) -> np.ndarray:
    """The first ``n`` rows of an external float tensor, read from its data file."""
    t = next(t for t in onnx.load(str(model), load_external_data=False).graph.initializer if t.name == name)
    assert t.data_location == onnx.TensorProto.EXTERNAL, f"{name} was inlined into {model.name}"
    info = onnx.external_data_helper.ExternalDataInfo(t)
    return np.fromfile(model.parent / info.location, np.float32, n * t.dims[1], offset=info.offset).reshape(n, -1)


@pytest.mark.skipif(sys.platform != "linux", reason="peak memory from /proc")
def test_fold_and_preserve_function_on_a_model_over_2gb_keep_weights_external(tmp_path):
    path, w_offset = _big_model(tmp_path / "big")
    d = path.parent
    before = np.fromfile(d / "big.weights", np.float32, 3 * (1 << 19), offset=w_offset).reshape(3, -1)
    changed_mb = 128
    # --preserve-function: the inverse of the normalization moves into W1 (so outputs stay as they were)
    rss = _peak_rss_mb(["rewrite", "big.onnx", "--preserve-function", "-o", "pf.onnx", "--report", "pf.json"], d)
    scale = json.loads((d / "pf.json").read_text())["sites"][0]["scale"]
    assert rss < changed_mb + 1024, f"peak RSS {rss:.0f} MB"
    np.testing.assert_allclose(_rows(d / "pf.onnx", "W1"), before / scale, rtol=1e-6)
    # fold: the normalized model's affine part moves into W1 (scaled by the site's scale)
    assert run_cli("rewrite", "big.onnx", "-o", "n.onnx", "--no-verify", cwd=d).returncode == 0
    rss = _peak_rss_mb(["fold", "n.onnx", "-o", "f.onnx"], d)
    assert rss < changed_mb + 1024, f"peak RSS {rss:.0f} MB"
    np.testing.assert_allclose(_rows(d / "f.onnx", "W1"), before * scale, rtol=1e-6)
    # the protobufs stay small; the changed weights went to <output>.data, the 2.25 GB table was never copied
    for out in ("pf.onnx", "f.onnx"):
        assert os.path.getsize(d / out) < 100_000
        assert (changed_mb << 20) <= os.path.getsize(d / f"{out}.data") < (changed_mb + 4 << 20)  # W1, a bias
        locations = {
            t.name: onnx.external_data_helper.ExternalDataInfo(t).location
            for t in onnx.load(str(d / out), load_external_data=False).graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL
        }
        assert locations.pop("E") == "big.weights" and locations["W1"] == f"{out}.data"
        assert set(locations.values()) == {f"{out}.data"}
    assert sorted(os.listdir(d)) == sorted(
        ["big.onnx", "big.weights", "pf.onnx", "pf.onnx.data", "pf.json", "n.onnx", "f.onnx", "f.onnx.data"]
    )


def test_weights_stay_external_when_every_external_weight_changes(tmp_path):
    """The only external weight is the one folding rewrites: the result still keeps it out of the protobuf."""
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 512)).astype(np.float32), "W")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "W"], ["y"])]
    (tmp_path / "in").mkdir()
    onnx.save(tiny_model(nodes, [fvi("x", ["N", 16])], [fvi("y", ["N", 512])], [w]), str(tmp_path / "in" / "m.onnx"),
              save_as_external_data=True, location="m.bin", size_threshold=0)  # fmt: skip
    res = rewrite(tmp_path / "in" / "m.onnx", tmp_path / "out" / "p.onnx", preserve_function=True, details=True)
    assert len(res.rewritten) == 1
    assert _rows(tmp_path / "out" / "p.onnx", "W", 16).shape == (16, 512)  # external, in p.onnx.data
    assert sorted(os.listdir(tmp_path / "out")) == ["p.onnx", "p.onnx.data"]  # m.bin: nothing reads it any more
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)}
    np.testing.assert_allclose(run_model(tmp_path / "out" / "p.onnx", feeds)[0],
                               run_model(tmp_path / "in" / "m.onnx", feeds)[0], rtol=1e-4, atol=1e-4)  # fmt: skip
    # fold: the normalized model's only external weight is the one that absorbs the affine part
    from normact_onnx import fold

    rewrite(tmp_path / "in" / "m.onnx", tmp_path / "n" / "n.onnx")
    res = fold(tmp_path / "n" / "n.onnx", tmp_path / "n" / "f.onnx", details=True)
    assert len(res.folded) == 1
    assert sorted(os.listdir(tmp_path / "n")) == ["f.onnx", "f.onnx.data", "m.bin", "n.onnx"]
    assert _rows(tmp_path / "n" / "f.onnx", "W", 16).shape == (16, 512)
    np.testing.assert_allclose(run_model(tmp_path / "n" / "f.onnx", feeds)[0],
                               run_model(tmp_path / "n" / "n.onnx", feeds)[0], rtol=1e-4, atol=1e-4)  # fmt: skip
