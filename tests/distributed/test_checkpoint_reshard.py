"""Checkpoints resharded between 2 gloo ranks (Shard(0) DTensors, replicated tensors) and one process."""

import json

import pytest
import torch
from ranks import run_ranks
from torch.distributed.tensor import DTensor, Shard

import tidal
from tidal.runtime.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint

PARAM_GROUPS = [{"lr": 0.01, "betas": (0.9, 0.95), "foreach": None, "params": ["layer.w", "layer.b", "v"]}]


def full_tensors() -> dict[str, torch.Tensor]:
    """The full values: 5 rows and 3 elements split unevenly over 2 ranks (torch.chunk: 3+2, 2+1)."""
    return {
        "layer.w": torch.arange(15.0).reshape(5, 3),
        "layer.b": torch.arange(4.0) + 100,
        "v": torch.arange(3.0) - 50,
        "exp_avg": torch.arange(15.0).reshape(5, 3) * 0.5,
        "replicated": torch.arange(6.0).reshape(2, 3) * -1,
    }


def build_state(tensors: dict[str, torch.Tensor], lr: float = PARAM_GROUPS[0]["lr"]) -> dict:
    """The engine's layout, with `tensors` (plain or DTensor) at the leaves; "replicated" stays plain."""
    return {
        "model": {k: tensors[k] for k in ("layer.w", "layer.b", "v")},
        "optim": {
            "state": {"layer.w": {"exp_avg": tensors["exp_avg"], "step": torch.tensor(7.0)}},
            "param_groups": [dict(PARAM_GROUPS[0], lr=lr)],
        },
        "replicated": tensors["replicated"],
    }


def shard(full: torch.Tensor, mesh, rank: int, world: int) -> DTensor:
    local = torch.chunk(full, world)[rank].clone()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())


def flatten(state: dict) -> dict[str, torch.Tensor]:
    """The tensors of `state` by name, each a plain tensor (a DTensor's local shard)."""
    named = {**state["model"], "exp_avg": state["optim"]["state"]["layer.w"]["exp_avg"]}
    named["replicated"] = state["replicated"]
    named["step"] = state["optim"]["state"]["layer.w"]["step"]
    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in named.items()}


def _save_sharded(rank: int, world: int, root: str) -> str:
    ctx = tidal.init()
    mesh = ctx.topology.submesh("dp_sp")
    full = full_tensors()
    tensors = {k: t if k == "replicated" else shard(t, mesh, rank, world) for k, t in full.items()}
    path = save_checkpoint(root, 7, build_state(tensors), {"step": 7, "rank": rank})
    tidal.shutdown()
    return str(path)


def save_replicated(root: str, rank: int) -> None:
    save_checkpoint(root, 3, build_state(full_tensors()), {"step": 3, "rank": rank})


def load_sharded(mesh, root: str, rank: int, world: int) -> dict:
    blank = {k: torch.zeros_like(t) for k, t in full_tensors().items()}
    tensors = {k: t if k == "replicated" else shard(t, mesh, rank, world) for k, t in blank.items()}
    state = build_state(tensors, lr=9.0)
    extras = load_checkpoint(root, state)
    return {"tensors": flatten(state), "param_groups": state["optim"]["param_groups"], "extras": extras}


def _load_sharded(rank: int, world: int, root: str) -> dict:
    ctx = tidal.init()
    result = load_sharded(ctx.topology.submesh("dp_sp"), root, rank, world)
    tidal.shutdown()
    return result


def _save_replicated_then_load_sharded(rank: int, world: int, root: str) -> dict:
    ctx = tidal.init()
    save_replicated(root, rank)
    result = load_sharded(ctx.topology.submesh("dp_sp"), root, rank, world)
    tidal.shutdown()
    return result


def _save_then_fail_on_rank_1(rank: int, world: int, root: str) -> str:
    tidal.init()
    save_replicated(root, rank)
    extras = {"step": 5, "bad": torch.nn.Linear(1, 1) if rank == 1 else None}
    try:
        save_checkpoint(root, 5, build_state(full_tensors()), extras)
    except CheckpointError as err:
        return str(err)
    finally:
        tidal.shutdown()
    return "saved"


def check_local_shards(results: list[dict], world: int, extras_ranks: list[int]) -> None:
    full = full_tensors()
    for rank, result in enumerate(results):
        got = result["tensors"]
        for name, t in full.items():
            expected = t if name == "replicated" else torch.chunk(t, world)[rank]
            assert torch.equal(got[name], expected), (rank, name)
        assert got["step"].item() == 7.0
        assert result["param_groups"] == PARAM_GROUPS
        assert result["extras"]["rank"] == extras_ranks[rank]


@pytest.mark.timeout(180)
def test_shard0_dtensors_from_2_ranks_load_as_full_tensors_in_one_process(tmp_path):
    paths = run_ranks(_save_sharded, 2, args=(str(tmp_path),), timeout=120)
    assert paths == [str(tmp_path / "step-00000007")] * 2
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000007"
    meta = json.loads((tmp_path / "step-00000007" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["extras"] == ["extras-rank0.pt", "extras-rank1.pt"]

    state = build_state({k: torch.zeros_like(t) for k, t in full_tensors().items()}, lr=9.0)
    extras = load_checkpoint(tmp_path, state)  # no process group here: DCP's no_dist path
    got = flatten(state)
    for name, expected in full_tensors().items():
        assert torch.equal(got[name], expected), name
    assert got["step"].item() == 7.0
    assert state["optim"]["param_groups"] == PARAM_GROUPS
    assert extras == {"step": 7, "rank": 0}, "a smaller job gets rank 0's extras"


@pytest.mark.timeout(180)
def test_full_tensors_from_one_process_load_as_shard0_dtensors_on_2_ranks(tmp_path):
    save_checkpoint(tmp_path, 7, build_state(full_tensors()), {"step": 7, "rank": 0})
    results = run_ranks(_load_sharded, 2, args=(str(tmp_path),), timeout=120)
    # The saving job had one rank: rank 1 falls back to rank 0's extras.
    check_local_shards(results, 2, extras_ranks=[0, 0])


@pytest.mark.timeout(180)
def test_replicated_tensors_from_2_ranks_load_as_shard0_dtensors_on_2_ranks(tmp_path):
    results = run_ranks(_save_replicated_then_load_sharded, 2, args=(str(tmp_path),), timeout=120)
    check_local_shards(results, 2, extras_ranks=[0, 1])


@pytest.mark.timeout(180)
def test_one_rank_failing_fails_the_save_on_every_rank_and_keeps_latest(tmp_path):
    errors = run_ranks(_save_then_fail_on_rank_1, 2, args=(str(tmp_path),), timeout=120)
    for err in errors:
        assert err.startswith("rank 1: extras['bad'] cannot be read back"), err
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000003"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003"]
