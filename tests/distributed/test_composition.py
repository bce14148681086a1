"""Parallel features combined through `tidal.wrap`, against a single-process PyTorch run of the same batches.

One table of scenarios (name -> world size, config); every rank of a data-parallel group is given its
dp share of the global batch (sequence-parallel ranks of one group get the same share and cut it by
sequence themselves). Tolerance: fp32; the differences are the order of floating-point sums across
ranks, so per-step losses agree to 2e-5 and parameters after the run to 5e-5 absolute.
"""

import pytest
import torch.distributed as dist
from models import batches, full_params, make_optimizer, reference_run, tiny_llama
from ranks import run_ranks

import tidal
from tidal.runtime.context import current

STEPS = 3
GLOBAL_BATCH = 4
LOSS_TOL = 2e-5
PARAM_TOL = 5e-5
QUIET = {"logging": {"progress": False, "interval": 1000}}

SCENARIOS = {
    "sp2-ulysses": (2, {"parallel": {"sp": 2, "sequence": {"method": "ulysses"}}}),
    "sp2-ring": (2, {"parallel": {"sp": 2, "sequence": {"method": "ring"}}}),
    "sp2-ring-zero3": (2, {"parallel": {"sp": 2, "sequence": {"method": "ring"}}, "zero": {"stage": 3}}),
    "sp2xdp2-ulysses-zero1": (4, {"parallel": {"sp": 2}, "zero": {"stage": 1}}),
    "sp2xdp2-ring-zero3": (4, {"parallel": {"sp": 2, "sequence": {"method": "ring"}}, "zero": {"stage": 3}}),
}
SIZES = ("pp", "sp", "tp", "ep")


def _init_config(world: int) -> dict:
    """The sizes every scenario of this world size shares (one tidal.init per spawn)."""
    shared = {n: {s for w, c in SCENARIOS.values() if w == world for s in [c["parallel"].get(n, 1)]} for n in SIZES}
    assert all(len(v) == 1 for v in shared.values()), f"scenarios of world {world} need one topology: {shared}"
    return {"parallel": {n: v.pop() for n, v in shared.items()}, **QUIET}


def _train(config: dict):
    ctx = current()
    model = tiny_llama()
    model, opt = tidal.wrap(model, make_optimizer(model), {**config, **QUIET})
    dp, dp_rank = ctx.topology.size("dp"), ctx.topology.rank("dp")
    losses = []
    for ids in batches(STEPS, GLOBAL_BATCH):
        mine = ids.chunk(dp)[dp_rank]
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().reshape(1)
        dist.all_reduce(total, group=ctx.topology.group("dp"))
        losses.append(total.item() / dp)
    return losses, full_params(model)


def _run(rank: int, world: int) -> dict:
    tidal.init(_init_config(world))
    results = {name: _train(config) for name, (w, config) in SCENARIOS.items() if w == world}
    if world == 2:
        model = tiny_llama()
        try:
            tidal.wrap(model, make_optimizer(model), {"parallel": {"tp": 2}, **QUIET})
        except ValueError as exc:
            results["refused"] = str(exc)
    tidal.shutdown()
    return results


@pytest.fixture(scope="module")
def runs():
    """Every scenario, one spawn per world size."""
    return {w: run_ranks(_run, w, timeout=400) for w in sorted({w for w, _ in SCENARIOS.values()})}


@pytest.fixture(scope="module")
def reference():
    return reference_run(STEPS, GLOBAL_BATCH, model_name="llama")


pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("name", SCENARIOS)
def test_matches_single_process(runs, reference, name) -> None:
    world, _ = SCENARIOS[name]
    ref_losses, ref_params = reference
    for rank, results in enumerate(runs[world]):
        losses, params = results[name]
        assert losses == pytest.approx(ref_losses, abs=LOSS_TOL), f"{name} rank {rank}"
        for key, ref in ref_params.items():
            diff = (params[key] - ref).abs().max().item()
            assert diff < PARAM_TOL, f"{name} rank {rank} {key}: max |diff| {diff:.2e}"


def test_wrap_refuses_sizes_other_than_the_topology(runs) -> None:
    for results in runs[2]:
        assert "tidal.wrap() got parallel sizes" in results["refused"] and "'sp': 2" in results["refused"]
