"""Rank discovery from each launcher's environment (no processes started)."""

import pytest

from tidal.launch.env import DiscoveryError, discover, first_slurm_host


def test_torchrun_environment():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "1234",
    }
    info = discover(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 4, 1, 2)
    assert (info.source, info.master_addr, info.master_port) == ("env", "10.0.0.1", 1234)


def test_torchrun_wins_over_mpi_and_slurm():
    env = {"RANK": "0", "WORLD_SIZE": "1", "PMI_RANK": "5", "PMI_SIZE": "8", "SLURM_PROCID": "2", "SLURM_NTASKS": "4"}
    assert discover(env).source == "env"


def test_single_process_without_a_launcher():
    info = discover({})
    assert (info.rank, info.world_size, info.local_rank, info.source) == (0, 1, 0, "single")


def test_slurm_environment():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "gpu[007-008]",
        "SLURM_JOB_ID": "123456",
    }
    info = discover(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 4)
    assert info.source == "slurm" and info.master_addr == "gpu007"
    assert info.master_port == 20000 + 123456 % 20000


def test_slurm_master_from_environment_wins():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a1", "MASTER_ADDR": "h", "MASTER_PORT": "7"}
    info = discover(env)
    assert (info.master_addr, info.master_port) == ("h", 7)


@pytest.mark.parametrize(
    "nodelist,first",
    [("node1", "node1"), ("gpu[003-010,12],cpu1", "gpu003"), ("a[1,3]", "a1"), ("x-y[09-10]", "x-y09")],
)
def test_first_slurm_host(nodelist, first, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda _: None)
    assert first_slurm_host(nodelist) == first


def test_unreadable_rank_names_the_variable():
    with pytest.raises(DiscoveryError, match="RANK='x' is not an integer"):
        discover({"RANK": "x", "WORLD_SIZE": "2"})


def test_mpi_environment_with_openmpi_variables(monkeypatch):
    # mpi4py is real here: a singleton MPI world of 1, with OpenMPI's local-rank variables read from env.
    pytest.importorskip("mpi4py")
    info = discover({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"})
    assert (info.source, info.rank, info.world_size, info.local_world_size) == ("mpi", 0, 1, 1)
