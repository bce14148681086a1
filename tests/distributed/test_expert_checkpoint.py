"""Checkpoints of expert-parallel models through the engine (`engine.save`/`engine.load`).

One spawn of 2 ranks: the tiny Mixtral trains 2 steps at ep=2, saves, trains 2 more (the uninterrupted
run). A fresh wrap at ep=2 (other initial weights: everything must come from the checkpoint) loads the
save and trains the same 2 steps; then the job re-initialises at ep=1 (dp=2, the transformers blocks
unconverted, fused gate_up_proj) and does the same. The pytest process itself loads the checkpoint's
model into a plain single-process Mixtral.

Tolerances (fp32): the ep=2 resume runs the same operations in the same order as the uninterrupted run,
so its losses, parameters and AdamW moments are bitwise equal. The ep=1 resume computes the experts
through transformers' block instead of `MoELayer` (other summation order): losses, parameters and
moments 1e-6 absolute (measured: losses equal, parameters 1.5e-8). The single-process load is a copy:
exact.
"""

import os

import pytest
import torch
import torch.distributed as dist
from models import batches, make_optimizer, tiny_mixtral, train_step
from ranks import free_port, run_ranks

import tidal
from tidal.parallel.expert_checkpoint import ExpertCheckpointLayout
from tidal.runtime.checkpoint import load_checkpoint

STEPS, SAVE_AT, GLOBAL_BATCH = 4, 2, 8
EXPERT_WEIGHTS = ("w1", "w3", "w2")
MOMENTS = ("exp_avg", "exp_avg_sq")
LOSS_TOL, STATE_TOL = 1e-6, 1e-6


def _full(model: torch.nn.Module, topology, value) -> dict[str, torch.Tensor]:
    """`value(param)` for every parameter as a full tensor under the transformers names: the experts
    gathered over ep and w1, w3 fused back into gate_up_proj, w2 named down_proj."""
    out = {}
    for name, p in model.named_parameters():
        t = value(p).detach().clone()
        if name.rpartition(".")[2] in EXPERT_WEIGHTS and topology.size("ep") > 1:
            parts = [torch.empty_like(t) for _ in range(topology.size("ep"))]
            dist.all_gather(parts, t.contiguous(), group=topology.group("ep"))
            t = torch.cat(parts)
        out[name] = t
    for name in [n for n in out if n.endswith(".experts.w1")]:
        prefix = name.removesuffix(".w1")
        out[f"{prefix}.gate_up_proj"] = torch.cat([out.pop(f"{prefix}.w1"), out.pop(f"{prefix}.w3")], dim=1)
        out[f"{prefix}.down_proj"] = out.pop(f"{prefix}.w2")
    return out


def _snapshot(model, opt, topology) -> dict:
    """Parameters and AdamW moments, full, by transformers name."""
    snap = {"params": _full(model, topology, lambda p: p)}
    for moment in MOMENTS:
        snap[moment] = _full(model, topology, lambda p, m=moment: opt.state[p][m])
    return snap


def _train(ep: int, root: str, rank: int, world: int, resume: bool) -> dict:
    """Wrap a new tiny Mixtral at `ep`; from scratch: steps [0, STEPS) saving after SAVE_AT; resuming:
    load `root`, then steps [SAVE_AT, STEPS)."""
    model = tiny_mixtral(seed=123 if resume else 0)
    opt = make_optimizer(model)
    config = {"parallel": {"ep": ep}, "logging": {"progress": False}, "checkpoint": {"dir": root}}
    model, opt = tidal.wrap(model, opt, config)
    engine = tidal.engine(model)
    topology = engine.topology
    result = {"losses": []}
    if resume:
        result["step"] = engine.load()
    for step, ids in enumerate(batches(STEPS, GLOBAL_BATCH)):
        if resume and step < SAVE_AT:
            continue
        if step == SAVE_AT and not resume:
            engine.save()
            result["saved"] = _full(model, topology, lambda p: p)
        result["losses"].append(train_step(model, opt, ids, rank, world))
    result["final"] = _snapshot(model, opt, topology)
    return result


def _job(rank: int, world: int, root: str) -> dict:
    tidal.init({"parallel": {"ep": 2}, "logging": {"progress": False}})
    results = {"uninterrupted": _train(2, root, rank, world, resume=False)}
    results["ep2"] = _train(2, root, rank, world, resume=True)
    port = [free_port()]  # a second process group in the same processes: the first one's port is still bound
    dist.broadcast_object_list(port, src=0)
    os.environ["MASTER_PORT"] = str(port[0])
    tidal.shutdown()
    tidal.init({"parallel": {"ep": 1}, "logging": {"progress": False}})
    results["ep1"] = _train(1, root, rank, world, resume=True)
    tidal.shutdown()
    return results


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    root = tmp_path_factory.mktemp("expert_ckpt")
    return root, run_ranks(_job, 2, args=(str(root),), timeout=240)


pytestmark = pytest.mark.timeout(300)


def _assert_close(mine: dict, ref: dict, atol: float, what: str) -> None:
    assert mine.keys() == ref.keys(), what
    for name, expected in ref.items():
        if atol == 0:
            assert torch.equal(mine[name], expected), f"{what} {name}"
        else:
            diff = (mine[name] - expected).abs().max().item()
            assert diff <= atol, f"{what} {name}: max |diff| {diff:.2e}"


@pytest.mark.parametrize("resumed,atol", [("ep2", 0.0), ("ep1", STATE_TOL)])
def test_resume_trains_like_the_uninterrupted_run(spawned, resumed, atol):
    _, results = spawned
    for rank, r in enumerate(results):
        ref, got = r["uninterrupted"], r[resumed]
        assert got["step"] == SAVE_AT
        if atol == 0:
            assert got["losses"] == ref["losses"][SAVE_AT:], f"rank {rank}"
        else:
            assert got["losses"] == pytest.approx(ref["losses"][SAVE_AT:], abs=LOSS_TOL), f"rank {rank}"
        for key in ("params", *MOMENTS):
            _assert_close(got["final"][key], ref["final"][key], atol, f"rank {rank} {resumed} {key}")


def test_checkpoint_loads_into_a_plain_single_process_model(spawned):
    root, results = spawned
    model = tiny_mixtral(seed=5)
    layout = ExpertCheckpointLayout(model, None)
    load_checkpoint(root / "step-00000002", {"model": layout.model_state(model.state_dict())})
    loaded = {n: p.detach() for n, p in model.named_parameters()}
    _assert_close(loaded, results[0]["uninterrupted"]["saved"], 0.0, "single process")
