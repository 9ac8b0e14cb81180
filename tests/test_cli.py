"""The command line as a user meets it: outputs on disk, exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import shutil

import onnx
from onnx import helper

from .conftest import MODELS, fvi, tiny_model


def _copy(tmp_path, name="mlp_relu.torchscript.onnx"):
    dst = tmp_path / "model.onnx"
    shutil.copy(MODELS / name, dst)
    return dst


def _one_line_error(proc, code=2):
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normact-onnx: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_rewrite_writes_default_output_and_report(cli, tmp_path):
    model = _copy(tmp_path)
    proc = cli("rewrite", model, "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "model.normact.onnx"
    assert out.exists() and "wrote" in proc.stdout and "(verified" in proc.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert [s["action"] for s in report["sites"]] == ["rewritten", "rewritten"]
    assert all(abs(s["scale"] - 1.712859) < 1e-5 for s in report["sites"])
    assert len(report["verification"]) == 2


def test_rewrite_options_from_the_issue(cli, tmp_path):
    model = _copy(tmp_path, "transformer_gelu.torchscript.onnx")
    out = tmp_path / "out.onnx"
    proc = cli(
        "rewrite",
        model,
        "-o",
        out,
        "--variant",
        "zeta-zero",
        "--q",
        "2",
        "--include",
        "relu,gelu",
        "--form",
        "subgraph",
    )
    assert proc.returncode == 0, proc.stderr
    m = onnx.load(str(out))
    assert not any(n.domain == "ai.normact" for n in m.graph.node)
    meta = {p.key: p.value for p in m.metadata_props}
    (site,) = json.loads(meta["normact.sites"])
    assert site["variant"] == "zeta-zero" and site["q"] == 2.0 and site["form"] == "subgraph"


def test_explain_writes_nothing(cli, tmp_path):
    model = _copy(tmp_path, "silu_net.torchscript.onnx")
    proc = cli("rewrite", model, "--explain")
    assert proc.returncode == 0
    assert "multiplicative gate" in proc.stdout and "dry run" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_inspect_table_and_json(cli, tmp_path):
    model = _copy(tmp_path, "if_branch.helper.onnx")
    proc = cli("inspect", model, "--json")
    sites = json.loads(proc.stdout)
    assert {s["kind"] for s in sites} == {"relu", "silu"}
    assert all(s["graph"].startswith("main/") for s in sites)
    proc = cli("inspect", model)
    assert "then_branch" in proc.stdout and "2 sites" in proc.stdout


def test_missing_file(cli, tmp_path):
    assert "no such file" in _one_line_error(cli("rewrite", tmp_path / "nope.onnx"))


def test_not_an_onnx_file(cli, tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("these are not the weights you are looking for\n" * 10)
    _one_line_error(cli("inspect", bad))
    _one_line_error(cli("rewrite", bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.onnx"]


def test_truncated_file(cli, tmp_path):
    data = (MODELS / "cnn_relu.torchscript.onnx").read_bytes()
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(data[: len(data) // 2])
    assert "not" in _one_line_error(cli("rewrite", bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.onnx"]


def test_model_failing_the_checker(cli, tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Relu", ["undefined_value"], ["y"])]
    onnx.save(tiny_model(nodes, [fvi("x", [4])], [fvi("y", [4])]), str(tmp_path / "broken.onnx"))
    assert "fails the ONNX checker" in _one_line_error(cli("rewrite", tmp_path / "broken.onnx"))
    assert not (tmp_path / "broken.normact.onnx").exists()


def test_opset_too_old(cli, tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    onnx.save(tiny_model(nodes, [fvi("x", [4])], [fvi("y", [4])], opset=6, ir=3), str(tmp_path / "old.onnx"))
    assert "opset 6" in _one_line_error(cli("rewrite", tmp_path / "old.onnx"))


def test_unknown_include_kind(cli, tmp_path):
    line = _one_line_error(cli("rewrite", _copy(tmp_path), "--include", "relu,swishy"))
    assert "swishy" in line and "known:" in line


def test_bad_ratio_and_variant_values(cli, tmp_path):
    model = _copy(tmp_path)
    assert "needs --ratio" in _one_line_error(cli("rewrite", model, "--variant", "ratio"))
    assert "positive" in _one_line_error(cli("rewrite", model, "--q", "-1"))
    proc = cli("rewrite", model, "--variant", "ratio", "--ratio", "5", "--explain")  # beyond q·b²/v for ReLU
    assert proc.returncode == 0 and "ratio must lie in [0, 0.733" in proc.stdout


def test_no_sites_is_a_note_and_exit_zero(cli, tmp_path):
    nodes = [helper.make_node("Add", ["x", "x"], ["y"])]
    onnx.save(tiny_model(nodes, [fvi("x", [4])], [fvi("y", [4])]), str(tmp_path / "plain.onnx"))
    proc = cli("rewrite", tmp_path / "plain.onnx")
    assert proc.returncode == 0
    assert "no activation sites found" in proc.stderr and "nothing written" in proc.stdout
    assert not (tmp_path / "plain.normact.onnx").exists()


def test_refuses_to_overwrite_input(cli, tmp_path):
    model = _copy(tmp_path)
    before = model.read_bytes()
    assert "--in-place" in _one_line_error(cli("rewrite", model, "-o", model))
    assert model.read_bytes() == before
    assert cli("rewrite", model, "--in-place").returncode == 0
    assert model.read_bytes() != before


def test_argument_groups_give_the_api_its_values_and_leave_args_alone(tmp_path, capsys):
    """Each argument group turns its flags into the option value the API takes, and no command changes ``args``
    (calibrate once patched ``explain``/``report`` into it to reuse rewrite's tail); in-process."""
    from normact_onnx.cli import build_parser
    from normact_onnx.commands import calibrate_cmd, fold_cmd, rewrite_cmd
    from normact_onnx.policy import MethodOptions
    from normact_onnx.selection import SiteSelection
    from normact_onnx.writer import OutputOptions

    model = _copy(tmp_path)
    plain = tmp_path / "plain.onnx"
    onnx.save(tiny_model([helper.make_node("Neg", ["x"], ["y"])], [fvi("x", [4])], [fvi("y", [4])]), str(plain))
    parser = build_parser()
    args = parser.parse_args(
        ["calibrate", str(model), "--synthetic", "--batches", "2", "--seed", "3", "--include", "relu",
         "--form", "subgraph", "--no-verify", "--method", "static", "--variant", "zeta-zero"]
    )  # fmt: skip
    assert calibrate_cmd.SELECTION.value(args) == SiteSelection.parse(include="relu")
    assert calibrate_cmd.OUTPUT.value(args) == OutputOptions("subgraph", verify=False, write_unchanged=False)
    data = calibrate_cmd.DATA.value(args)
    assert (data.data, data.batches, data.synthetic, data.seed) == (None, 2, True, 3) and data.images is not None
    assert calibrate_cmd.METHOD.value(args) == MethodOptions("static", "zeta-zero", 1.0, None, "anact", False, "ema")
    ratio = parser.parse_args(["rewrite", str(model), "--variant", "ratio", "--ratio", "0.3"])
    assert rewrite_cmd.METHOD.value(ratio) == MethodOptions("static", "ratio", 1.0, 0.3)
    assert fold_cmd.DATA.value(parser.parse_args(["fold", str(model), "--synthetic"])).images is None
    runs = [
        ["calibrate", model, "--synthetic", "--batches", "2", "--method", "static", "--no-verify"],
        ["calibrate", model, "--synthetic", "--batches", "2", "--stats-only", "--stats", tmp_path / "s.json"],
        ["calibrate", plain, "--synthetic", "-o", tmp_path / "copy.onnx"],  # no sites: rewrite's unchanged copy
        ["rewrite", model, "--explain", "--q", "2"],
    ]
    for argv in runs:
        run = parser.parse_args(list(map(str, argv)))
        before = dict(vars(run))
        assert run.handler(run) == 0
        assert vars(run) == before, argv
    assert (tmp_path / "model.anact.onnx").exists() and (tmp_path / "s.json").exists()
    assert (tmp_path / "copy.onnx").exists() and "no activation sites found" in capsys.readouterr().out
