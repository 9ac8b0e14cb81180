"""Fine-tuning: graph builder, running rule, PyTorch reference, and the ONNX Runtime training path.

Tests marked ``needs_training`` skip where onnxruntime-training is missing (the
regular environment); the others run in either environment.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from normact_onnx.errors import NormactError
from normact_onnx.training.graph import LAMBDA_INPUT, MU_INPUT, STATS_OUTPUT, build_train_graph
from normact_onnx.training.running import RunningStats, batch_values, lambda_from

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"

try:
    import onnxruntime.training.api  # noqa: F401

    HAVE_TRAINING = True
except ImportError:
    HAVE_TRAINING = False
needs_training = pytest.mark.skipif(not HAVE_TRAINING, reason="onnxruntime-training is not installed (train env only)")
torch = pytest.importorskip("torch")

from normact_onnx.training.reference import ANAct, commit_all  # noqa: E402


# ---- helpers ----------------------------------------------------------------------------------
class TinyNet(torch.nn.Module):
    """Linear → ReLU → Linear → SiLU → Linear: two sites of different kinds (kinked and smooth)."""

    def __init__(self, act1: torch.nn.Module, act2: torch.nn.Module) -> None:
        super().__init__()
        self.fc1, self.act1 = torch.nn.Linear(8, 16), act1
        self.fc2, self.act2 = torch.nn.Linear(16, 16), act2
        self.fc3 = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


def _tiny_onnx(path: Path, seed: int = 0) -> TinyNet:
    import warnings

    torch.manual_seed(seed)
    net = TinyNet(torch.nn.ReLU(), torch.nn.SiLU())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter keeps opset 17 and Relu ops
        _export(net, path)
    return net


def _export(net: torch.nn.Module, path: Path) -> None:
    torch.onnx.export(
        net,
        (torch.zeros(2, 8),),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )


def _data(n: int = 192, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    w = rng.standard_normal((8, 3))
    return x, (x @ w).argmax(1).astype(np.int64)


# ---- graph builder (any environment with onnxruntime) -----------------------------------------
@pytest.mark.parametrize("model", ["mlp_relu.torchscript.onnx", "silu_net.dynamo.onnx", "transformer_gelu.dynamo.onnx"])
def test_train_graph_statistics_match_numpy(model: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    from normact_onnx.catalogue import CATALOGUE

    tg = build_train_graph(onnx.load(str(MODELS / model)), str(MODELS))
    assert tg.anact_sites and tg.model.ir_version <= 10
    onnx.checker.check_model(tg.model)
    # also return every site's pre-activation so numpy can recompute the statistics
    m = onnx.ModelProto()
    m.CopyFrom(tg.model)
    sites = find_inputs(m, tg)
    n = len(tg.anact_sites)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        if i.name in (LAMBDA_INPUT, MU_INPUT):
            continue
        shape = [d if isinstance(d, int) else 3 for d in i.shape]
        feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    lam, mu = np.linspace(1.0, 2.0, n).astype(np.float32), np.linspace(-0.2, 0.3, n).astype(np.float32)
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {**feeds, LAMBDA_INPUT: lam, MU_INPUT: mu})))
    stats = outs[STATS_OUTPUT].reshape(n, 5)
    for s, x_name, y_name in sites:
        x = outs[x_name].astype(np.float64)
        act = CATALOGUE[s.kind]
        f = act.f(x, s.params)
        want = [f.mean(), (f * f).mean(), (act.df(x, s.params) ** 2).mean(), x.mean(), x.var()]
        np.testing.assert_allclose(stats[s.index], want, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(outs[y_name], lam[s.index] * (f - mu[s.index]), rtol=1e-4, atol=1e-5)


def find_inputs(m: onnx.ModelProto, tg) -> list:
    """Expose each ANAct site's input and output as graph outputs (for the numpy cross-check)."""
    have = {o.name for o in m.graph.output}
    for s in tg.anact_sites:
        for name in (s.input, s.output):
            if name not in have:
                m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                have.add(name)
    return [(s, s.input, s.output) for s in tg.anact_sites]


def test_train_graph_static_and_errors() -> None:
    model = onnx.load(str(MODELS / "mlp_relu.torchscript.onnx"))
    tg = build_train_graph(model, str(MODELS), method="static", variant="zeta-zero")
    assert not tg.anact_sites and all(s.method == "static" and s.affine.slope != 0 for s in tg.sites)
    assert LAMBDA_INPUT not in {i.name for i in tg.model.graph.input}
    with pytest.raises(NormactError, match="method"):
        build_train_graph(model, method="bogus")
    with pytest.raises(NormactError, match="not a model output"):
        build_train_graph(model, output="nope")
    high = onnx.ModelProto()
    high.CopyFrom(model)
    high.opset_import[0].version = 22
    with pytest.raises(NormactError, match="opset 22"):
        build_train_graph(high)


def test_already_normalized_model_is_retrained_adaptively(tmp_path: Path) -> None:
    from normact_onnx.api import rewrite

    normalized = rewrite(str(MODELS / "mlp_relu.torchscript.onnx"))
    tg = build_train_graph(normalized, str(MODELS))
    assert len(tg.anact_sites) == 2 and not tg.model.functions
    assert all(o.domain != "ai.normact" for o in tg.model.opset_import)
    tg_static = build_train_graph(normalized, str(MODELS), method="static")
    assert [round(s.affine.scale, 5) for s in tg_static.sites] == [1.71286, 1.71286]


# ---- running rule and reference (any environment with torch) ----------------------------------
def test_lambda_rules_match_math_table() -> None:
    assert lambda_from(0.5, 0.5) == pytest.approx(1.414214, abs=1e-6)
    assert lambda_from(0.293379, 0.044836) == pytest.approx(3.585523, abs=1e-4)
    assert lambda_from(0.293379, 0.044836, "xavier") == pytest.approx(2.431747, abs=1e-4)


def test_running_rule_gates_and_blends() -> None:
    rs = RunningStats.start([(0.5, 0.5, 0.4)])
    batch = lambda rho, d2, mu: np.array([mu, rho, d2, 0.0, 1.0])  # noqa: E731 (var x = 1 → ρ = mean f²)
    rs.update(batch(0.9, 0.3, 1.0))  # first batch sets everything
    assert (rs.rho[0], rs.rho_d[0], rs.mu[0]) == pytest.approx((0.9, 0.3, 1.0))
    rs.update(batch(1.0, 0.9, 0.0))  # ρ within the gate (blended), ρ' far outside (kept), μ always blended
    assert (rs.rho[0], rs.rho_d[0], rs.mu[0]) == pytest.approx((0.91, 0.3, 0.9))
    rs.update(np.array([np.nan, 1, 1, 0, 1]))  # not finite: ignored
    assert rs.mu[0] == pytest.approx(0.9)
    back = RunningStats.from_properties(rs.to_properties())
    assert np.allclose(back.rho, rs.rho) and back.batches == rs.batches == 3
    *_, ok = batch_values(np.array([0.1, 0.5, 0.2, 0.0, 0.0]))
    assert not ok[0]  # a dead pre-activation (variance 0) is not a statistic


def test_reference_converges_to_gaussian_values() -> None:
    """Fed N(0,1) batches, the reference's running λ, μ approach docs/math.md §2.6's table."""
    torch.manual_seed(0)
    for kind, lam, mu in (("relu", 1.414214, 0.398942), ("silu", 1.650141, 0.206621), ("tanh", 1.531254, 0.0)):
        a = ANAct(kind, start=(1.0, 1.0, 0.0))
        for _ in range(60):
            a(torch.randn(4096))
            a.commit()
        assert float(a.lam()) == pytest.approx(lam, rel=0.01) and float(a.mu) == pytest.approx(mu, abs=0.01)


def test_reference_update_matches_numpy_rule() -> None:
    """The torch module's gated update and the host loop's numpy rule agree batch by batch."""
    from normact_onnx.training.graph import gaussian_start

    torch.manual_seed(1)
    a = ANAct("relu")
    rs = RunningStats.start([gaussian_start("relu", {})])
    for k in range(20):
        x = torch.randn(512) * (1 + 0.1 * k) + 0.05 * k
        a(x)
        a.commit()
        xn = x.double().numpy()
        f = np.maximum(xn, 0)
        rs.update(np.array([f.mean(), (f * f).mean(), (xn > 0).mean(), xn.mean(), xn.var()]))
    assert float(a.rho) == pytest.approx(rs.rho[0], rel=1e-6) and float(a.mu) == pytest.approx(rs.mu[0], rel=1e-6)


# ---- ONNX Runtime training (train environment only) -------------------------------------------
def _train_torch(net: TinyNet, x: np.ndarray, y: np.ndarray, steps: int, lr: float, batch: int) -> list[float]:
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    order = np.random.default_rng(0).permutation(len(y))  # the loop's order: default_rng(seed + epoch)
    losses = []
    for i in range(steps):
        idx = order[i * batch : (i + 1) * batch]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
        loss.backward()
        opt.step()
        commit_all(net)
        losses.append(loss.item())
    return losses


@needs_training
def test_ort_training_matches_pytorch_reference(tmp_path: Path) -> None:
    """Same tiny net, weights, data and plain SGD: same losses step by step and the same final λ, μ."""
    from normact_onnx.training import finetune

    path = tmp_path / "tiny.onnx"
    plain = _tiny_onnx(path)
    x, y = _data()
    steps, lr, batch = 12, 0.2, 16
    res = finetune(
        path,
        {"x": x, "y": y},
        output=tmp_path / "tuned.onnx",
        optimizer="sgd",
        lr=lr,
        batch_size=batch,
        epochs=1,
        progress=False,
    )
    ref = TinyNet(ANAct("relu"), ANAct("silu"))
    ref.load_state_dict(plain.state_dict(), strict=False)
    torch_losses = _train_torch(ref, x, y, steps, lr, batch)
    np.testing.assert_allclose(res.losses, torch_losses, rtol=1e-4, atol=1e-5)
    for site, mod in zip(res.sites, (ref.act1, ref.act2)):
        assert site["lambda"] == pytest.approx(float(mod.lam()), rel=1e-4)
        assert site["mu"] == pytest.approx(float(mod.mu), rel=1e-4, abs=1e-6)
        assert site["alpha"] == pytest.approx(float(mod.alpha), rel=1e-3, abs=1e-6)


@needs_training
def test_validation_with_a_partial_batch_is_exact(tmp_path: Path) -> None:
    """The training graph has the batch's fixed shape: a partial last validation batch is padded, and the
    reported loss and accuracy are still those of the validation samples alone (numpy on the export)."""
    import onnxruntime as ort

    from normact_onnx.training import finetune

    path = tmp_path / "tiny.onnx"
    _tiny_onnx(path)
    x, y = _data(64)
    xv, yv = _data(37, seed=2)  # batches of 16: two full, one of 5
    res = finetune(
        path,
        {"x": x, "y": y},
        val={"x": xv, "y": yv},
        batch_size=16,
        epochs=1,
        lr=0.01,
        method="none",
        output=tmp_path / "t.onnx",
        progress=False,
    )
    logits = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": xv})[0]
    z = logits - logits.max(1, keepdims=True)
    nll = -(z - np.log(np.exp(z).sum(1, keepdims=True)))[np.arange(len(yv)), yv]
    row = res.history[-1]
    assert row["val_loss"] == pytest.approx(float(nll.mean()), rel=1e-4)
    assert row["val_accuracy"] == pytest.approx(float((logits.argmax(1) == yv).mean()))
    # the training graph's inputs have the batch's concrete shape; the export keeps the model's symbolic one
    tm = onnx.load(str(res.workdir / "artifacts" / "training_model.onnx"), load_external_data=False)
    assert [d.dim_value for d in next(i for i in tm.graph.input if i.name == "x").type.tensor_type.shape.dim] == [16, 8]
    out = onnx.load(str(tmp_path / "t.onnx"))
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


@needs_training
def test_resume_with_other_batch_shapes_is_refused(tmp_path: Path) -> None:
    """The artifacts are built for one batch shape: resuming on data that gives another stops in one line."""
    from normact_onnx.training import finetune

    path = tmp_path / "tiny.onnx"
    _tiny_onnx(path)
    x, y = _data(64)
    common = {"batch_size": 32, "method": "none", "output": tmp_path / "t.onnx", "progress": False}
    finetune(path, {"x": x, "y": y}, epochs=1, **common)
    with pytest.raises(NormactError, match=r"--resume: the training graph was built for batches of shape"):
        finetune(path, {"x": x[:20], "y": y[:20]}, epochs=2, resume=True, **common)


@needs_training
def test_finetune_cli_end_to_end_resume_and_export(tmp_path: Path) -> None:
    """CLI run, log/plot/checkpoints written, resume continues exactly, export reproduces the graph."""
    import onnxruntime as ort

    path = tmp_path / "tiny.onnx"
    _tiny_onnx(path)
    x, y = _data()
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "val.npz", x=x[:64], y=y[:64])
    base = [
        sys.executable,
        "-m",
        "normact_onnx.cli",
        "finetune",
        str(path),
        "--data",
        str(tmp_path / "train.npz"),
        "--val",
        str(tmp_path / "val.npz"),
        "--batch-size",
        "32",
        "--lr",
        "0.01",
        "-o",
        str(tmp_path / "t.onnx"),
    ]
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([*base, "--epochs", "2", "--quiet"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    work = tmp_path / "t.train"
    for name in ("log.csv", "loss.png", "plan.json", "checkpoints/epoch_2", "checkpoints/last"):
        assert (work / name).exists(), name
    rows = list(csv.DictReader(io.StringIO((work / "log.csv").read_text())))
    assert [r["split"] for r in rows].count("val") == 2 and "lambda_1" in rows[0]
    r = subprocess.run(
        [*base, "--epochs", "3", "--resume", "--quiet", "--json"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    resumed = json.loads(r.stdout)
    assert [h["epoch"] for h in resumed["history"]] == [3] and resumed["export_max_abs_diff"] < 1e-4
    # the export runs in a plain ORT session and reproduces the saved last training-graph outputs
    check = np.load(work / "export_check.npz")
    sess = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": check["x"]})[0], check["expected"], rtol=1e-4, atol=1e-5)
    ops = {(n.domain, n.op_type) for n in onnx.load(str(tmp_path / "t.onnx")).graph.node}
    assert ("ai.normact", "NormRelu") in ops and ("ai.normact", "NormSilu") in ops


@needs_training
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"y": np.zeros(10, np.int64)}, "samples"),
        ({"y": np.zeros((192, 3), np.float32)}, "one-hot"),
        ({"y": np.full(192, 7)}, "3 classes"),
        ({"x": np.zeros((0, 8), np.float32), "y": np.zeros(0, np.int64)}, "empty"),
        ({"x": np.zeros((192, 5), np.float32)}, "expects"),
    ],
)
def test_finetune_bad_data(tmp_path: Path, change: dict, message: str) -> None:
    from normact_onnx.training import finetune

    path = tmp_path / "tiny.onnx"
    _tiny_onnx(path)
    x, y = _data()
    with pytest.raises(NormactError, match=message):
        finetune(path, {"x": x, "y": y, **change}, output=tmp_path / "t.onnx", progress=False)


@needs_training
def test_finetune_wrong_loss_and_missing_labels(tmp_path: Path) -> None:
    from normact_onnx.training import finetune

    path = tmp_path / "tiny.onnx"
    _tiny_onnx(path)
    x, y = _data()
    with pytest.raises(NormactError, match="mse"):
        finetune(path, {"x": x, "y": y}, output=tmp_path / "t.onnx", loss="mse", progress=False)
    with pytest.raises(NormactError, match="--labels"):
        finetune(path, {"x": x, "label": y}, output=tmp_path / "t.onnx", progress=False)


def test_finetune_outside_train_env_says_how(tmp_path: Path) -> None:
    if HAVE_TRAINING:
        pytest.skip("this environment has onnxruntime-training")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "normact_onnx.cli",
            "finetune",
            str(MODELS / "mlp_relu.torchscript.onnx"),
            "--data",
            "x.npz",
            "--backend",
            "ort",
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "scripts/make_train_env.sh" in r.stderr


@needs_training
def test_finetune_refuses_nan_data_and_leaves_no_work_folder(tmp_path: Path) -> None:
    """Issue 16: NaN/Inf data is named before training (not "lower --lr"), and nothing is left behind."""
    path = tmp_path / "tiny.onnx"
    _tiny_onnx(path)
    x, y = _data()
    x[5, 2] = np.nan
    np.savez(tmp_path / "train.npz", x=x, y=y)
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, "-m", "normact_onnx.cli", "finetune", str(path), "--data", str(tmp_path / "train.npz"),
         "--quiet"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "train.npz" in r.stderr and "'x'" in r.stderr and "NaN" in r.stderr and "sample 5" in r.stderr
    assert "--lr" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx", "train.npz"]


@needs_training
def test_finetune_failure_removes_the_work_folder_it_created(tmp_path: Path) -> None:
    from normact_onnx.training import finetune

    path = tmp_path / "tiny.onnx"
    _tiny_onnx(path)
    x, y = _data()
    kw = {"output": tmp_path / "t.onnx", "progress": False, "lr": 1e30, "optimizer": "sgd", "loss": "mse"}
    y_mse = np.eye(3, dtype=np.float32)[y] * 1e20
    with pytest.raises(NormactError, match="lower --lr"):  # fails after the work folder was set up
        finetune(path, {"x": x, "y": y_mse}, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(NormactError, match="lower --lr"):
        finetune(path, {"x": x, "y": y_mse}, workdir=tmp_path / "mine", **kw)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's"  # an existing --workdir is kept


def test_export_check_keeps_inputs_named_like_savez_parameters(tmp_path: Path) -> None:
    """export_check.npz holds every probe input by its name, also ``file`` and ``allow_pickle`` (np.savez's own
    parameters: through ``**`` the first raised a TypeError after the training, the second was dropped)."""
    from normact_onnx.training.loop import save_arrays

    arrays = {
        "file": np.arange(6, dtype=np.float32).reshape(2, 3),
        "allow_pickle": np.array([[1, 0]], np.int64),
        "x": np.ones(4, np.float16),
        "expected": np.linspace(0, 1, 5),
    }
    save_arrays(tmp_path / "export_check.npz", arrays)
    with np.load(tmp_path / "export_check.npz") as check:
        assert sorted(check.files) == sorted(arrays)
        for name, value in arrays.items():
            assert check[name].dtype == value.dtype
            np.testing.assert_array_equal(check[name], value)
