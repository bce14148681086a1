"""tidal.init() on real gloo ranks, discovered from each launcher's environment."""

import time

import pytest
import torch
import torch.distributed as dist
from ranks import free_port, run_ranks

import tidal


def _join_and_reduce(rank: int, world: int, config: dict | None) -> dict:
    ctx = tidal.init(config)
    assert tidal.init() is ctx, "a second init() must return the same context"
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t, group=ctx.topology.group("tp"))
    out = {
        "source": ctx.process.source,
        "rank": ctx.rank,
        "world": ctx.world_size,
        "tp_members": ctx.topology.ranks("tp"),
        "tp_sum": t.item(),
        "dp": ctx.topology.size("dp"),
    }
    tidal.shutdown()
    out["closed"] = not dist.is_initialized()
    tidal.shutdown()  # a second shutdown is harmless
    return out


@pytest.mark.timeout(120)
def test_four_ranks_from_torchrun_variables():
    results = run_ranks(_join_and_reduce, 4, args=({"parallel": {"tp": 2}},))
    for rank, r in enumerate(results):
        pair = (rank // 2 * 2, rank // 2 * 2 + 1)
        assert r["source"] == "env" and r["rank"] == rank and r["world"] == 4 and r["dp"] == 2
        assert r["tp_members"] == pair and r["tp_sum"] == sum(pair) + 2 and r["closed"]


@pytest.mark.timeout(120)
def test_two_ranks_from_slurm_variables():
    port = str(free_port())
    env = [
        {
            "SLURM_PROCID": str(r),
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": str(r),
            "SLURM_NODEID": "0",
            "SLURM_TASKS_PER_NODE": "2",
            "SLURM_JOB_NODELIST": "localhost",
            "MASTER_PORT": port,
            "MASTER_ADDR": "127.0.0.1",
        }
        for r in range(2)
    ]
    results = run_ranks(_join_and_reduce, 2, args=({"parallel": {"tp": 2}},), env=env)
    assert [r["source"] for r in results] == ["slurm", "slurm"]
    assert [r["tp_sum"] for r in results] == [3.0, 3.0]


def _init_with_bad_global_batch(rank: int, world: int) -> str:
    try:
        tidal.init({"train": {"micro_batch_size": 2, "global_batch_size": 6}})
    except tidal.ConfigError as err:
        return str(err) + f"|closed={not dist.is_initialized()}"
    return "no error"


@pytest.mark.timeout(120)
def test_global_batch_that_does_not_match_dp_names_the_fix():
    results = run_ranks(_init_with_bad_global_batch, 2)
    for r in results:
        assert "train.global_batch_size=6 but micro_batch_size=2" in r and "dp=2 = 4" in r
        assert r.endswith("closed=True"), "a failed init must close the process group it opened"


def _rank_1_waits_for_rank_0_forever(rank: int, world: int) -> None:
    tidal.init()
    if rank == 0:
        time.sleep(600)
    dist.barrier()


def test_a_stuck_rank_is_named_within_the_deadline():
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"ranks \[0(, 1)?\] did not finish within 5 s"):
        run_ranks(_rank_1_waits_for_rank_0_forever, 2, timeout=5)
    assert time.monotonic() - start < 30
