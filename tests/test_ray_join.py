"""``--ray HOST:PORT`` joins a cluster started as docs/distributed.md §4 shows, token authentication included.

A real head (``ray start --head --block``) in its own home folder: it finds the token there and turns Ray's
token authentication on (Ray ≥ 2.52), as a head does on a machine where a local ``--ray`` run of Ray ≥ 2.59
left ``~/.ray/auth_token``. Before issue 20 the command connected without the token and failed after ~22 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from normact_onnx.api import calibrate
from normact_onnx.comparison import compare

from .conftest import MODELS, ROOT, run_cli

pytest.importorskip("ray.data", reason="Ray Data is optional: pip install 'normact-onnx[ray]'")
pytestmark = pytest.mark.slow  # a cluster of its own: ~10 s to start and stop

CNN = MODELS / "cnn_relu.torchscript.onnx"
RAY_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes_under(folder: str) -> list[int]:
    """Processes whose command line names ``folder`` (the head's own temp folder: only what this test started)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if folder in (d / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                continue
    return out


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head with token authentication on, in a home folder of its own; stopped (every process) after."""
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if k not in RAY_ENV}
    env.update(HOME=str(home), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", PYTHONPATH=str(ROOT / "src"))
    ray_cli = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_cli, "get-auth-token", "--generate"], env=env, capture_output=True, check=True, timeout=120)
    assert (home / ".ray" / "auth_token").is_file()
    temp = tempfile.mkdtemp(prefix="nr", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    log = home / "head.log"
    port = _free_port()
    with open(log, "w") as fh:
        p = subprocess.Popen(
            [ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=3", "--include-dashboard=false",
             "--disable-usage-stats", f"--temp-dir={temp}"],
            env=env, stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        assert "Token authentication is enabled" in log.read_text()  # the head requires the token
        yield {"address": f"127.0.0.1:{port}", "env": env}
    finally:
        p.terminate()
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
        for pid in _processes_under(temp):  # anything of this head's that outlived it
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("join_data")
    rng = np.random.default_rng(3)
    for i, n in enumerate((40, 24)):
        np.savez(folder / f"part{i}.npz", x=rng.random((n, 1, 28, 28), dtype=np.float32))
    return folder


def test_host_port_joins_a_cluster_with_token_authentication(head, shards, tmp_path):
    env, address = head["env"], head["address"]
    stats = tmp_path / "s.json"
    start = time.monotonic()
    r = run_cli("calibrate", CNN, "--data", shards, "--batch-size", 16, "--stats-only", "--stats", stats,
                "--ray", address, "--workers", 2, cwd=tmp_path, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "cannot connect" not in r.stderr
    one = calibrate(CNN, shards, batch_size=16, aggregate="mean")
    got = json.loads(stats.read_text())
    assert got["batches"] == one.batches == 5  # 40 → 16+16+8, 24 → 16+8
    for key, s in one.sites.items():  # the same batches and counts; the cluster's workers run their own ORT
        # sessions (one thread each), whose float32 reductions sum in another order, and in situ each site's
        # input carries the earlier sites' rounding: measured up to 1.6e-6 apart, so float32 noise, not 1e-9
        # (a lost or repeated batch moves m2 by percents)
        np.testing.assert_array_equal(got["sites"][key]["x"]["n"], s.x.n)
        np.testing.assert_allclose(got["sites"][key]["x"]["m2"], s.x.m2, rtol=1e-5)
    assert time.monotonic() - start < 120

    cal = tmp_path / "cal.onnx"
    calibrate(CNN, shards, cal, batch_size=16, aggregate="mean")
    r = run_cli("compare", CNN, cal, "--data", shards, "--batch-size", 16, "--batches", 4, "--json",
                "--ray", address, cwd=tmp_path, env=env)  # fmt: skip
    assert r.returncode in (0, 1), r.stderr
    want = compare(CNN, cal, shards, batch_size=16, batches=4).report()
    assert json.loads(r.stdout)["batches"] == want["batches"] == 4
    assert (
        json.loads(r.stdout)["outputs"][0]["elements"] == want["outputs"][0]["elements"] == 56 * 10
    )  # 16+16+8, then 16

    r = run_cli("compare", cal, "--data", shards, "--sites", "--json", "--ray", address,  # one model, on Ray
                cwd=tmp_path, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    sites = json.loads(r.stdout)["sites"]
    want = compare(cal, None, shards, sites=True).report()["sites"]
    assert [s["var"] for s in sites] == pytest.approx([s["var"] for s in want], rel=1e-5)  # float32 noise, as above
