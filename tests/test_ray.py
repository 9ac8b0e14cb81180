"""Calibration and comparison on Ray Data: a local 2-worker cluster, results equal to the single-process run.

One cluster serves the module (starting Ray costs seconds); one CLI test starts and stops its own.
The data is scikit-learn's digits in every source format: .npz shards, Parquet, a PNG folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from normact_onnx.api import calibrate
from normact_onnx.calibration import distributed
from normact_onnx.comparison import compare
from normact_onnx.data.rows import ImageOptions
from normact_onnx.errors import NormactError

from .conftest import MODELS

ray = pytest.importorskip("ray", reason="Ray Data is optional: pip install 'normact-onnx[ray]'")
pytest.importorskip("ray.data", reason="Ray Data is optional: pip install 'normact-onnx[ray]'")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.slow  # a Ray cluster per module and some of their own: about 90 s on 2 cores

CNN = MODELS / "cnn_relu.torchscript.onnx"
RTOL = 1e-9
FIRST_SITE = 3136  # elements one image gives cnn_relu's first ReLU (its pre-activation is 4×28×28)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for this module: 2 workers and a CPU for Ray Data's read tasks."""
    with distributed.cluster(None, 2):
        yield


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """The 1797 digits upsampled into cnn_relu's 28×28 frame, in [0, 1]."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0
    x = np.zeros((len(images), 1, 28, 28), np.float32)
    x[:, 0, 6:22, 6:22] = np.kron(images, np.ones((2, 2), np.float32))
    return x


@pytest.fixture(scope="module")
def shards(tmp_path_factory, digits):
    """Four .npz shards of unequal size: a folder --data reads today."""
    folder = tmp_path_factory.mktemp("shards")
    for i, (a, b) in enumerate([(0, 500), (500, 900), (900, 1500), (1500, len(digits))]):
        np.savez(folder / f"part{i}.npz", x=digits[a:b])
    return folder


def assert_same_stats(a, b, rtol: float = RTOL) -> None:
    assert a.sites.keys() == b.sites.keys()
    for key, s in a.sites.items():
        r = b.sites[key]
        for q in ("x", "f"):
            for fld in ("n", "mean", "m2"):
                np.testing.assert_allclose(getattr(getattr(r, q), fld), getattr(getattr(s, q), fld), rtol=rtol,
                                           err_msg=f"{key} {q}.{fld}")  # fmt: skip
        np.testing.assert_allclose(r.d2, s.d2, rtol=rtol, err_msg=f"{key} d2")


def site_elements(stats) -> float:
    """Elements counted at the first site: FIRST_SITE per image that went through the model."""
    return float(stats.ordered()[0].x.n.sum())


def test_npz_shards_equal_the_single_process_run(cluster, shards, digits, tmp_path):
    one = calibrate(CNN, shards, tmp_path / "one.onnx", batch_size=100, aggregate="mean", details=True)
    many = calibrate(CNN, shards, tmp_path / "ray.onnx", batch_size=100, ray=True, workers=2, details=True)
    assert many.stats.settings["aggregate"] == "mean" and "EMA" in many.notes[0]
    assert many.stats.batches == one.stats.batches == 18  # 5 + 4 + 6 + 3 pieces of at most 100
    assert "on Ray (2 workers, 1797 samples)" in many.stats.sources[0]
    # in situ on both (the default): each batch normalizes with its own statistics, so the same batches merge
    # to the same statistics wherever they ran
    assert many.stats.settings["in_situ"] and one.stats.settings["in_situ"]
    assert many.stats.settings["normalized_in_situ"] == one.stats.settings["normalized_in_situ"] != []
    assert_same_stats(one.stats, many.stats)
    # the written models: the same λ and μ (and weights) in both
    import onnx

    def constants(path):
        m = onnx.load(path)
        return {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}

    c1, c2 = constants(tmp_path / "one.onnx"), constants(tmp_path / "ray.onnx")
    assert c1 and c1.keys() == c2.keys()
    for k in c1:
        np.testing.assert_allclose(c2[k], c1[k], rtol=RTOL, err_msg=k)
    # a ray.data.Dataset as the data source, from Python
    ds = ray.data.from_numpy(digits).rename_columns({"data": "x"})
    from_ds = calibrate(CNN, ds, batch_size=100, per_channel=False)
    assert_same_stats(one.stats, from_ds)


def test_a_killed_worker_is_retried_and_its_batches_counted_once(cluster, shards, tmp_path, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv(distributed.CRASH_ENV, str(marker))
    reference = calibrate(CNN, shards, batch_size=100, aggregate="mean", per_channel=True)
    stats = calibrate(CNN, shards, batch_size=100, ray=True, workers=2, per_channel=True)
    assert stats.per_channel and stats.ordered()[0].channels == 4  # one record per channel merges the same way
    assert marker.exists()  # a worker process did exit mid-run (os._exit after running a batch)
    assert stats.batches == 18
    assert site_elements(stats) == site_elements(reference) == 1797 * FIRST_SITE
    assert_same_stats(reference, stats)


def test_an_empty_shard_is_passed_over_as_in_the_single_process_run(cluster, digits, tmp_path):
    """An empty .npz among the shards used to end Ray's work list there: the shards after it were never read
    (and an empty first shard, or only empty ones, failed inside Ray with a traceback)."""
    for i, (a, b) in enumerate([(0, 300), (300, 300), (300, 500)]):  # part1 holds no samples
        np.savez(tmp_path / f"part{i}.npz", x=digits[a:b])
    one = calibrate(CNN, tmp_path, batch_size=100, aggregate="mean")
    many = calibrate(CNN, tmp_path, batch_size=100, ray=True, workers=2)
    assert many.batches == one.batches == 5
    assert site_elements(many) == site_elements(one) == 500 * FIRST_SITE
    assert_same_stats(one, many)
    limited = calibrate(CNN, tmp_path, batch_size=100, batches=4, ray=True)  # the limit counts batches, not files
    assert limited.batches == 4 and site_elements(limited) == 400 * FIRST_SITE
    for f in ("part0.npz", "part2.npz"):
        np.savez(tmp_path / f, x=digits[:0])
    with pytest.raises(NormactError, match=r"part0.npz: input .x. holds no samples"):  # every shard empty
        calibrate(CNN, tmp_path, batch_size=100, ray=True)


@pytest.fixture(scope="module")
def parquet(tmp_path_factory, digits):
    """Two files: a fixed-shape tensor column, and flat list<float> rows (reshaped to the input's 1×28×28)."""
    folder = tmp_path_factory.mktemp("parquet")
    first, second = digits[:1000], digits[1000:]
    pq.write_table(pa.table({"x": pa.FixedShapeTensorArray.from_numpy_ndarray(first)}), folder / "a.parquet")
    pq.write_table(pa.table({"x": [row.ravel().tolist() for row in second], "label": np.arange(len(second))}),
                   folder / "b.parquet")  # fmt: skip
    return folder


def test_parquet_source_ray_and_single_process(cluster, parquet, digits, shards):
    # the three runs cut the same rows into different batches: measured on the original network their moments
    # agree whatever the batching (in situ each batch normalizes with its own statistics, as batch norm does)
    ref = calibrate(CNN, shards, batch_size=100, aggregate="mean", in_situ=False)
    local = calibrate(CNN, parquet, batch_size=64, aggregate="mean", in_situ=False)  # pyarrow, no Ray
    many = calibrate(CNN, parquet, batch_size=64, ray=True, workers=2, in_situ=False)  # ray.data.read_parquet
    assert local.batches == 16 + 13
    assert "2 Parquet files, 1797 rows" in local.sources[0] and "on Ray" in many.sources[0]
    assert_same_stats(ref, local)
    assert_same_stats(ref, many)


def test_parquet_row_that_fails_validation_names_file_and_row(cluster, tmp_path):
    rows = [np.zeros(784, np.float32).tolist()] * 5
    rows[3] = rows[3][:700]  # one short row
    pq.write_table(pa.table({"x": rows}), tmp_path / "bad.parquet")
    with pytest.raises(NormactError, match=r"bad\.parquet row 3: input 'x' has shape \[700\]"):
        calibrate(CNN, tmp_path / "bad.parquet", batch_size=8)
    with pytest.raises(NormactError, match=r"bad\.parquet \(row 3 of this batch\): input 'x' has shape \[700\]"):
        calibrate(CNN, tmp_path / "bad.parquet", batch_size=8, ray=True)
    pq.write_table(pa.table({"pixels": rows}), tmp_path / "named.parquet")
    with pytest.raises(NormactError, match=r"named\.parquet: no column 'x' for the model input"):
        calibrate(CNN, tmp_path / "named.parquet", ray=True)  # from the footer, before any worker starts


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    """The 8×8 digits as grey PNGs in class subfolders (ImageNet's layout)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path_factory.mktemp("pngs")
    for i, (img, label) in enumerate(zip(d.images[:300], d.target[:300])):
        (root / str(label)).mkdir(exist_ok=True)
        Image.fromarray((img * 16).clip(0, 255).astype(np.uint8), "L").save(root / str(label) / f"{i:04d}.png")
    return root


def test_image_folder_ray_and_single_process(cluster, png_folder):
    opts = ImageOptions.parse(size="28x28", scale=1 / 255, mean="0.1", std="0.3")
    local = calibrate(CNN, png_folder, batch_size=50, aggregate="mean", images=opts)  # PIL, no Ray
    many = calibrate(CNN, png_folder, batch_size=50, ray=True, images=opts)  # ray.data.read_images
    assert local.batches == 6 and "300 images" in local.sources[0]
    assert site_elements(many) == 300 * FIRST_SITE
    assert_same_stats(local, many)
    # the preprocessing is what it says: one image by hand
    from normact_onnx.data.inputs import model_inputs
    from normact_onnx.data.rows import decode_image, image_plan, images_batch
    from normact_onnx.io import load_model

    first = sorted(png_folder.rglob("*.png"))[0]
    plan = image_plan(model_inputs(load_model(CNN)), opts)
    x = images_batch([decode_image(first, plan.mode)], plan, [str(first)])["x"]
    by_hand = np.asarray(Image.open(first).convert("L").resize((28, 28), Image.BILINEAR), np.float32)
    np.testing.assert_allclose(x[0, 0], (by_hand / 255 - 0.1) / 0.3, rtol=1e-6, atol=1e-6)


def test_compare_on_ray_merges_like_the_single_process_run(cluster, shards, tmp_path):
    out = tmp_path / "cal.onnx"
    calibrate(CNN, shards, out, batch_size=300, aggregate="mean")
    one = compare(CNN, out, shards, sites=True).report()
    many = compare(CNN, out, shards, sites=True, ray=True, workers=2).report()
    assert many["batches"] == one["batches"] == 4
    for o1, o2 in zip(one["outputs"], many["outputs"]):
        assert o1["elements"] == o2["elements"] == 1797 * 10
        assert o1["max_abs"] == o2["max_abs"] and o1["violations"] == o2["violations"]
        for k in ("mean_abs", "mean_rel", "cosine"):
            assert o2[k] == pytest.approx(o1[k], rel=RTOL)
        assert o2["p99_abs"] == pytest.approx(o1["p99_abs"], rel=1e-6)  # under the sample bound: every error kept
    assert [s["var"] for s in many["sites"]] == pytest.approx([s["var"] for s in one["sites"]], rel=RTOL)


def test_ray_only_reads_paths_and_datasets(cluster):
    with pytest.raises(NormactError, match="runs single-process"):
        calibrate(CNN, [{"x": np.zeros((1, 1, 28, 28), np.float32)}], ray=True)
    with pytest.raises(NormactError, match="--synthetic runs single-process"):
        calibrate(CNN, synthetic=True, ray=True)


@pytest.mark.slow  # a cluster of its own in a subprocess
def test_cli_starts_and_stops_its_own_cluster(cli, shards, tmp_path):
    """No ray.init in the subprocess: the command starts a local cluster and shuts it down."""
    stats_ray = tmp_path / "ray.json"
    one = calibrate(CNN, shards, batch_size=100, aggregate="mean")
    r = cli("calibrate", CNN, "--data", shards, "--batch-size", 100, "--stats-only", "--stats", stats_ray,
            "--ray", "--workers", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "aggregate mean" in r.stderr and "Traceback" not in r.stderr
    b = json.loads(stats_ray.read_text())
    assert b["settings"]["aggregate"] == "mean" and b["batches"] == one.batches == 18
    for key, s in one.sites.items():
        for q in ("x", "f"):
            np.testing.assert_allclose(b["sites"][key][q]["m2"], getattr(s, q).m2, rtol=RTOL)
    r = cli("calibrate", CNN, "--data", tmp_path / "missing", "--ray", "--stats-only")
    assert r.returncode == 2 and "no such file or folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # clusters of their own in subprocesses
def test_cli_stderr_holds_only_the_commands_lines(cli, shards, tmp_path, monkeypatch):
    """Ray's native log lines stay off stderr (--quiet or not), a killed worker included; --verbose shows them.

    Ray's core worker logs "constructor arguments in the object store and max_restarts > 0" for every Ray
    Data actor pool with restartable actors (Ray Data puts its own constructor arguments in the object store).
    """
    marker = tmp_path / "crashed"
    monkeypatch.setenv(distributed.CRASH_ENV, str(marker))  # a worker exits mid-run: restarted, batches kept
    stats = tmp_path / "s.json"
    r = cli("calibrate", CNN, "--data", shards, "--batch-size", 100, "--stats-only", "--stats", stats,
            "--ray", "--workers", "2", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert marker.exists() and json.loads(stats.read_text())["batches"] == 18
    assert r.stderr.splitlines() == [
        "--ray: factors from --aggregate mean (the EMA depends on the order of the batches)"
    ]
    monkeypatch.delenv(distributed.CRASH_ENV)
    cal = tmp_path / "cal.onnx"
    r = cli("calibrate", CNN, "--data", shards, "--batch-size", 300, "-o", cal, "--aggregate", "mean")
    assert r.returncode == 0, r.stderr
    r = cli("compare", CNN, cal, "--data", shards, "--batch-size", 300, "--sites", "--ray", "--workers", "2")
    assert r.returncode in (0, 1), r.stderr  # 1: the outputs differ beyond the tolerance (a finding, not an error)
    assert r.stderr == "" and "sites" in r.stdout
    r = cli("calibrate", CNN, "--data", shards, "--batch-size", 300, "--stats-only", "--stats", stats,
            "--ray", "--workers", "2", "--verbose")  # fmt: skip
    assert r.returncode == 0 and "max_restarts > 0" in r.stderr  # the line the quiet runs kept off


@pytest.mark.slow  # a cluster of its own in a subprocess
def test_ctrl_c_stops_the_cluster_the_command_started(tmp_path, digits):
    """SIGINT mid-run: exit 130, nothing written, and the Ray processes the command started are gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from .conftest import ROOT

    for i in range(30):  # enough batches that the run is still going when interrupted
        np.savez(tmp_path / f"p{i:02d}.npz", x=np.repeat(digits[:200], 2, axis=0))
    stats = tmp_path / "s.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.Popen([sys.executable, "-m", "normact_onnx.cli", "calibrate", CNN, "--data", tmp_path,
                          "--batch-size", "8", "--ray", "--stats-only", "--stats", stats],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip

    def children() -> set[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.pid)], capture_output=True, text=True).stdout
        return {int(x) for x in out.split()}

    started: set[int] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None and len(started) < 2:  # gcs_server and raylet
        started |= children()
        time.sleep(0.2)
    time.sleep(4)  # into the run: actors starting or batches flowing
    started |= children()
    assert p.poll() is None, p.communicate()[1]
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted; nothing was written" in err and "Traceback" not in err
    assert not stats.exists()
    time.sleep(2)
    alive = [pid for pid in started if _alive(pid)]
    assert started and not alive, f"left running: {alive}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"  # a zombie has exited
    except OSError:
        return False


def test_without_ray_one_line_says_how_to_install(monkeypatch, shards):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError, as in an environment without it
    with pytest.raises(NormactError, match=r"^--ray needs Ray Data: pip install 'normact-onnx\[ray\]'$"):
        calibrate(CNN, shards, ray=True)


def test_cli_image_options_without_ray(cli, png_folder, tmp_path):
    """The image options on the command line, single-process (PIL): the statistics equal the Python call's."""
    stats = tmp_path / "img.json"
    r = cli("calibrate", CNN, "--data", png_folder, "--image-size", "28x28", "--mean", "0.1", "--std", "0.3",
            "--batch-size", 50, "--stats-only", "--stats", stats, "--aggregate", "mean")  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(stats.read_text())
    assert doc["batches"] == 6 and "300 images" in doc["sources"][0]
    ref = calibrate(CNN, png_folder, batch_size=50, images={"size": (28, 28), "mean": "0.1", "std": "0.3"})
    for key, s in ref.sites.items():
        np.testing.assert_allclose(doc["sites"][key]["x"]["m2"], s.x.m2, rtol=RTOL)
    r = cli("calibrate", CNN, "--data", png_folder, "--image-size", "28", "--stats-only", "--stats", stats)
    assert r.returncode == 2 and "--image-size '28': expected HEIGHTxWIDTH" in r.stderr
    r = cli("calibrate", CNN, "--data", png_folder, "--mean", "0.1,0.2", "--stats-only", "--stats", stats)
    assert r.returncode == 2 and "--mean: 2 values for 1 channel(s)" in r.stderr
