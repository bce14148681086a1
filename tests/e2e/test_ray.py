"""`tidal ray` and `tidal.ray.run` end to end on Ray on this machine: 2 CPU workers, loopback only.

The example GPT job must train under Ray exactly as under `tidal launch`, come back from a worker killed
mid-run (restarting from its tidal checkpoint), and fail clearly once its restart budget is spent.
"""

import contextlib
import functools
import importlib.util
import json
import os
import runpy
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tidal

EXAMPLE = Path(__file__).parents[2] / "examples" / "train_gpt.py"
CRASH_ONCE = Path(__file__).parent / "scripts" / "crash_once.py"
TIDAL = shutil.which("tidal")
RAY = shutil.which("ray")
SMALL = ["--steps", "12", "--layers", "2", "--width", "64", "--seq", "64"]
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # a one-machine Ray: every address on loopback
    "RAY_AUTH_MODE": "token",  # the clusters of these tests take this token, not ~/.ray/auth_token
    "RAY_AUTH_TOKEN": secrets.token_hex(32),
}
"""The environment of every Ray process the tests start: the head, the `tidal ray` drivers, this process."""
pytestmark = [
    pytest.mark.skipif(TIDAL is None, reason="the tidal command is not installed (pip install -e .)"),
    pytest.mark.skipif(RAY is None or importlib.util.find_spec("ray") is None, reason="needs ray[train]"),
]


def _tidal_ray(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, **RAY_ENV}
    return subprocess.run([TIDAL, "ray", *args], capture_output=True, text=True, timeout=timeout, env=env)


def _losses(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """Per-step losses of the example under `tidal launch` with 2 ranks."""
    out = tmp_path_factory.mktemp("launch") / "losses.json"
    cmd = [TIDAL, "launch", "--nproc-per-node", "2", str(EXAMPLE), *SMALL, "--losses-out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return _losses(out)["losses"]


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray head on loopback (2 CPUs, no dashboard) for the tests that join a running cluster; its address.

    `ray start --block` runs in its own session, so stopping it stops exactly this cluster's processes.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved_env = {name: os.environ.get(name) for name in RAY_ENV}
    os.environ.update(RAY_ENV)  # this process is a driver too (tidal.ray.run); Ray reads these at import
    log = (tmp_path_factory.mktemp("head") / "ray-start.log").open("w")
    cmd = [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"]
    cmd += ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    env = {**os.environ, **RAY_ENV, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # stop at once on SIGTERM
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        assert proc.poll() is None, f"ray start --head exited with {proc.returncode}; see {log.name}"
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        pointer = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # ray start's "latest cluster" note
        with contextlib.suppress(OSError):
            if pointer.read_text().strip() == f"127.0.0.1:{port}":
                pointer.unlink()


@pytest.mark.timeout(60)
def test_sizes_that_do_not_fit_the_workers_are_refused_before_ray_starts(tmp_path):
    res = _tidal_ray("--workers", "3", "--tp", "2", str(EXAMPLE), timeout=50)
    assert res.returncode == 2
    assert "tidal ray: tp=2 does not divide world size 3" in res.stderr, res.stderr[-3000:]
    assert "Ray" not in res.stderr


@pytest.mark.timeout(10)
def test_a_tensor_parallel_group_must_lie_on_one_node():
    from tidal.launch.ray import check_tp_placement, placement_strategy

    check_tp_placement(tp=2, rank=3, local_rank=1, local_world_size=2)  # node holds ranks 2..3, group 2..3
    with pytest.raises(RuntimeError, match=r"rank 3's tensor-parallel group \(ranks 2..3\) spans nodes"):
        check_tp_placement(tp=2, rank=3, local_rank=0, local_world_size=3)  # node holds ranks 3..5
    assert placement_strategy(tp=4, workers=4) == "STRICT_PACK"
    assert placement_strategy(tp=2, workers=4) == placement_strategy(tp=1, workers=1) == "PACK"


@pytest.mark.timeout(180)
def test_cli_on_its_own_local_ray_trains_like_tidal_launch(tmp_path, reference):
    out, ckpt = tmp_path / "losses.json", tmp_path / "ckpt"
    res = _tidal_ray(
        "--workers", "2", "--storage", str(tmp_path / "runs"), "--set", f"checkpoint.dir={ckpt}",
        str(EXAMPLE), *SMALL, "--losses-out", str(out),
        timeout=170,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[rank0]: step 12/12" in res.stdout
    assert _losses(out)["losses"] == pytest.approx(reference, abs=1e-4)
    assert f"final loss {reference[-1]:.4f} | checkpoint {ckpt / 'step-00000012'}" in res.stdout


def _train_example(argv: list[str]) -> "tidal.Engine":
    """A train function for tidal.ray.run: the example run in-process; its Engine carries the metrics."""
    sys.argv = [str(EXAMPLE), *argv]
    sys.path.insert(0, str(EXAMPLE.parent))
    return runpy.run_path(str(EXAMPLE), run_name="__main__")["engine"]


@pytest.mark.timeout(150)
def test_python_api_on_a_running_cluster_returns_metrics_and_checkpoint(tmp_path, reference, head):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module
    out, ckpt = tmp_path / "losses.json", tmp_path / "ckpt"
    result = tidal.ray.run(
        functools.partial(_train_example, [*SMALL, "--losses-out", str(out)]),
        workers=2,
        address=head,
        overrides=[f"checkpoint.dir={ckpt}"],
        storage=tmp_path / "runs",
    )
    assert _losses(out)["losses"] == pytest.approx(reference, abs=1e-4)
    assert result.metrics["step"] == 12
    assert result.metrics["loss"] == pytest.approx(reference[-1], abs=1e-4)
    assert result.checkpoint == str(ckpt / "step-00000012")
    assert Path(result.path).is_dir()


def _crash_once(tmp_path: Path, head: str, max_failures: int) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the example through crash_once.py (rank 1 dies at step 6; checkpoints every 4 steps)."""
    out, marker = tmp_path / "losses.json", tmp_path / "killed"
    res = _tidal_ray(
        "--address", head, "--workers", "2", "--max-failures", str(max_failures),
        "--storage", str(tmp_path / "runs"),
        "--set", f"checkpoint.dir={tmp_path / 'ckpt'}", "--set", "checkpoint.interval=4",
        str(CRASH_ONCE), "--rank", "1", "--step", "6", "--marker", str(marker),
        str(EXAMPLE), *SMALL, "--losses-out", str(out),
        timeout=170,
    )  # fmt: skip
    assert marker.exists(), f"rank 1 was not killed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res, out


@pytest.mark.timeout(180)
def test_a_killed_worker_restarts_the_job_from_its_checkpoint(tmp_path, reference, head):
    res, out = _crash_once(tmp_path, head, max_failures=1)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[rank1]: armed: rank 1 of 2, found by env" in res.stdout
    resumed = _losses(out)
    assert resumed["start"] == 4, "the restarted job must resume from the step-4 checkpoint"
    assert resumed["losses"] == pytest.approx(reference[4:], abs=1e-4)


@pytest.mark.timeout(180)
def test_past_max_failures_the_job_fails_naming_the_dead_rank(tmp_path, head):
    res, out = _crash_once(tmp_path, head, max_failures=0)
    assert res.returncode == 1, res.stderr[-3000:]
    assert not out.exists()
    assert "tidal ray: the job failed (no restarts allowed" in res.stderr, res.stderr[-3000:]
    assert "failed workers:\n  rank 1: its process died" in res.stderr, res.stderr[-3000:]
