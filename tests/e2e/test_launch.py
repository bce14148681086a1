"""`tidal launch` end to end, through the installed command, as a user runs it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tidal.parallel.topology import RankGrid

JOB = Path(__file__).parent / "scripts" / "job.py"
TIDAL = shutil.which("tidal")
pytestmark = pytest.mark.skipif(TIDAL is None, reason="the tidal command is not installed (pip install -e .)")


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status


def _reports(out: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}


def _launch(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run `tidal launch`; past `timeout`, stop it (SIGTERM stops its ranks) and fail naming each rank's last line."""
    proc = subprocess.Popen([TIDAL, "launch", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
        last = {}
        for line in out.splitlines():
            if line.startswith("[rank"):
                last[line.split("]")[0] + "]"] = line
        pytest.fail(f"tidal launch {' '.join(args)} hung for {timeout} s; last line of each rank: {last}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _assert_all_gone(reports: dict[int, dict]) -> None:
    pids = [pid for r in reports.values() for pid in r["pids"]]
    assert pids, "the job reported no processes"
    deadline = time.monotonic() + 5
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], "processes of the job outlived the launcher"


def test_groups_of_4_ranks_with_tp2_dp2(tmp_path):
    res = _launch("--nproc-per-node", "4", "--tp", "2", str(JOB), "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    reports = _reports(tmp_path)
    assert sorted(reports) == [0, 1, 2, 3]
    grid = RankGrid.create(4, tp=2)
    for rank, rep in reports.items():
        assert rep["world"] == 4 and rep["source"] == "env" and rep["tp"] == 2
        for name, members in rep["groups"].items():
            assert tuple(members) == grid.group_ranks(name, rank), (rank, name)
        assert rep["groups"]["tp"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert rep["groups"]["dp"] == [rank % 2, rank % 2 + 2]
        assert rep["sum_tp"] == sum(rep["groups"]["tp"]) and rep["sum_dp"] == sum(rep["groups"]["dp"])
    for rank in range(4):
        assert f"[rank{rank}]: step 3 sum 4" in res.stdout


def test_config_and_overrides_reach_the_workers(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("zero:\n  stage: 1\nparallel:\n  tp: 1\n")
    out = tmp_path / "out"
    out.mkdir()
    res = _launch(
        "--nproc-per-node",
        "2",
        "--config",
        str(cfg),
        "--set",
        "zero.stage=2",
        "--tp",
        "2",
        str(JOB),
        "--out",
        str(out),
        "--steps",
        "1",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["zero_stage"] for r in _reports(out).values()] == [2, 2]
    assert [r["tp"] for r in _reports(out).values()] == [2, 2]


def test_bad_config_is_refused_before_any_rank_starts(tmp_path):
    res = _launch("--nproc-per-node", "2", "--set", "zero.stgae=2", str(JOB), "--out", str(tmp_path))
    assert res.returncode == 2
    assert "did you mean 'zero.stage'" in res.stderr
    assert not list(tmp_path.iterdir())


def test_a_failing_rank_stops_the_job(tmp_path):
    start = time.monotonic()
    res = _launch(
        "--nproc-per-node",
        "2",
        str(JOB),
        "--out",
        str(tmp_path),
        "--fail-rank",
        "1",
        "--steps",
        "600",
        "--step-seconds",
        "0.1",
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert res.returncode != 0
    assert elapsed < 30, f"the launcher took {elapsed:.0f} s to give up"
    assert "injected failure on rank 1 at step 2" in res.stderr, res.stderr[-3000:]
    assert "Root Cause" in res.stderr and "rank      : 1" in res.stderr
    _assert_all_gone(_reports(tmp_path))


def test_sigterm_to_the_launcher_leaves_nothing_behind(tmp_path):
    proc = subprocess.Popen(
        [
            TIDAL,
            "launch",
            "--nproc-per-node",
            "2",
            str(JOB),
            "--out",
            str(tmp_path),
            "--steps",
            "600",
            "--step-seconds",
            "0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while len(_reports(tmp_path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(_reports(tmp_path)) == 2, "the ranks never started"
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert time.monotonic() - start < 30
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped by SIGTERM" in output
    _assert_all_gone(_reports(tmp_path))


def test_two_launches_at_once_do_not_collide(tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = []
    for out in outs:
        out.mkdir()
        cmd = [
            TIDAL,
            "launch",
            "--nproc-per-node",
            "2",
            str(JOB),
            "--out",
            str(out),
            "--steps",
            "5",
            "--step-seconds",
            "0.2",
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc, out in zip(procs, outs, strict=True):
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err[-3000:]
        assert sorted(_reports(out)) == [0, 1]


def test_max_restarts_restarts_a_job_that_fails_once(tmp_path):
    res = _launch(
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        str(JOB),
        "--out",
        str(tmp_path),
        "--fail-rank",
        "0",
        "--fail-once",
        "--steps",
        "3",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "failed-once").exists()
    assert [r["restart"] for r in _reports(tmp_path).values()] == [1, 1]


def test_without_restarts_the_same_job_fails(tmp_path):
    res = _launch("--nproc-per-node", "2", str(JOB), "--out", str(tmp_path), "--fail-rank", "0", "--fail-once")
    assert res.returncode == 1
    assert "injected failure on rank 0" in res.stderr


def test_missing_script_is_a_clear_error(tmp_path):
    res = _launch("--nproc-per-node", "2", str(tmp_path / "nope.py"))
    assert res.returncode == 2 and "does not exist" in res.stderr


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec is not installed (pip install mpich)")
def test_mpiexec_forms_a_two_rank_group(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    res = subprocess.run(
        ["mpiexec", "-n", "2", sys.executable, str(JOB), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    reports = _reports(tmp_path)
    assert sorted(reports) == [0, 1]
    assert all(r["source"] == "mpi" and r["world"] == 2 and r["sum_dp"] == 1.0 for r in reports.values())


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec is not installed (pip install mpich)")
def test_launch_under_mpi(tmp_path):
    res = _launch("--launcher", "mpi", "--nproc-per-node", "2", "--tp", "2", str(JOB), "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    reports = _reports(tmp_path)
    assert sorted(reports) == [0, 1] and all(r["source"] == "mpi" and r["tp"] == 2 for r in reports.values())
    assert "[0] step 3 sum 2" in res.stdout and "[1] step 3 sum 2" in res.stdout
