"""Parameter offload (NVMe) under ZeRO-3 on FSDP2 at 1 and 2 ranks, against the same FSDP2 run without offload.

The model is built as the engine builds it (fully_shard on each block, then the root) but without tidal.wrap.
Offload only moves bytes: the shards read back are the bytes written, so losses and parameters must be equal
exactly. Between steps no block shard may be resident, the store must hold every shard, and close() must
leave no swap file.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
from models import batches, full_params, make_optimizer, shard, tiny_gpt2
from ranks import run_ranks

from tidal.config import NvmeConfig, ParamOffloadConfig
from tidal.offload.params import apply_param_offload
from tidal.runtime.device import select_device

STEPS = 3
GLOBAL_BATCH = 8

# name -> (reshard_after_forward, micro-batches per step (all but the last without gradient sync), step via)
SCENARIOS = {
    "reshard": (True, 1, "context"),
    "keep-gathered": (False, 1, "context"),
    "accumulate": (True, 2, "context"),
    "optimizer-hooks": (True, 1, "hooks"),
}


def _build(mesh, reshard: bool, swap: str | None):
    """Tiny GPT-2 under FSDP2 (blocks, then root), with parameters on NVMe under `swap` (None: resident)."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_gpt2()
    blocks = list(model.transformer.h)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    config = ParamOffloadConfig(device="nvme" if swap else "none", path=swap)
    return model, blocks, apply_param_offload(model, blocks, config, NvmeConfig(), select_device(0, "cpu"))


def _train(mesh, scenario: str, swap: str | None) -> dict:
    """STEPS optimizer steps; returns losses, final parameters and (with offload) what was resident when."""
    reshard, accumulation, step_via = SCENARIOS[scenario]
    rank, world = mesh.get_local_rank(), mesh.size()
    model, blocks, offload = _build(mesh, reshard, swap)
    opt = make_optimizer(model)
    out: dict = {"losses": [], "between_steps": [], "in_blocks": []}
    if offload is not None:
        out["shard_bytes"] = offload.store.nbytes()
        for block in blocks:  # inside a block's forward and backward, after its own gather
            block.mlp.register_forward_pre_hook(lambda *_: out["in_blocks"].append(offload.resident_bytes()))
            block.mlp.register_full_backward_hook(lambda *_: out["in_blocks"].append(offload.resident_bytes()))
        if step_via == "hooks":
            offload.attach_optimizer(opt)
    for ids in batches(STEPS, GLOBAL_BATCH):
        step_loss = torch.zeros(1)
        micros = shard(ids, rank, world).chunk(accumulation)
        for i, micro in enumerate(micros):
            model.set_requires_gradient_sync(i == len(micros) - 1)
            loss = model(input_ids=micro, labels=micro).loss / accumulation
            loss.backward()
            step_loss += loss.detach()
        with offload.resident_for_step() if offload and step_via == "context" else contextlib.nullcontext():
            opt.step()
        opt.zero_grad()
        if offload is not None:
            out["between_steps"].append((offload.resident_bytes(), offload.store.nbytes()))
        dist.all_reduce(step_loss, group=mesh.get_group())
        out["losses"].append(step_loss.item() / world)
    with offload.resident() if offload else contextlib.nullcontext():
        out["params"] = full_params(model)
    if scenario == "reshard":
        out.update(_state_dict_round_trip(model, offload, rank, world))
    if offload is not None:
        directory = offload.store.directory
        offload.close()
        out["closed"] = (os.path.exists(directory), os.listdir(swap))
    return out


def _state_dict_round_trip(model, offload, rank: int, world: int) -> dict:
    """state_dict (materialized by the hook), then load halved values: read back after a forward evicted them."""
    saved = {k: v.full_tensor() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v * 0.5 for k, v in model.state_dict().items()})
    ids = shard(batches(1, GLOBAL_BATCH, seed=7)[0], rank, world)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    resident = offload.resident_bytes() if offload else 0
    with offload.resident() if offload else contextlib.nullcontext():
        loaded = full_params(model)
    return {"state_dict": saved, "loaded_loss": loss.item(), "after_load_forward": resident, "loaded": loaded}


def _run_all(rank: int, world: int, swap_root: str) -> dict:
    """Every scenario on both ranks, then on rank 0 alone (a one-rank mesh), each with and without offload."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    dist.init_process_group("gloo")
    try:
        meshes = {2: init_device_mesh("cpu", (world,))}
        alone = dist.new_group([0])  # every rank takes part in creating it
        if rank == 0:
            meshes[1] = DeviceMesh.from_group(alone, "cpu")
        return {
            (size, scenario, swap is not None): _train(mesh, scenario, swap)
            for size, mesh in meshes.items()
            for scenario in SCENARIOS
            for swap in (None, os.path.join(swap_root, f"w{size}", scenario, f"rank{rank}"))
        }
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list[dict]]:
    """world size -> per-rank results of every scenario (one spawn: importing torch and transformers is slow)."""
    results = run_ranks(_run_all, 2, args=(str(tmp_path_factory.mktemp("param-offload")),), timeout=150)
    return {
        world: [{key[1:]: value for key, value in ranks.items() if key[0] == world} for ranks in results[:world]]
        for world in (1, 2)
    }


pytestmark = pytest.mark.timeout(300)


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: max |diff| {(a[name] - b[name]).abs().max().item():.2e}"


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_offloaded_training_equals_resident_training(runs, world, scenario):
    for rank, result in enumerate(runs[world]):
        plain, offloaded = result[(scenario, False)], result[(scenario, True)]
        assert offloaded["losses"] == plain["losses"], f"rank {rank}"
        _equal(offloaded["params"], plain["params"])


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_shards_live_in_the_store_between_uses(runs, world, scenario):
    for rank, result in enumerate(runs[world]):
        offloaded = result[(scenario, True)]
        total = offloaded["shard_bytes"]
        assert total > 0
        assert offloaded["between_steps"] == [(0, total)] * STEPS, f"rank {rank}: (resident, stored) bytes"
        # inside a block at most one other block's shard is in memory (the prefetched or kept one)
        assert 0 < max(offloaded["in_blocks"]) <= total // 2, f"rank {rank}"
        assert offloaded["closed"] == (False, []), f"rank {rank}: swap directory left after close()"


@pytest.mark.parametrize("world", [1, 2])
def test_state_dict_and_load_state_dict(runs, world):
    for result in runs[world]:
        plain, offloaded = result[("reshard", False)], result[("reshard", True)]
        _equal(offloaded["state_dict"], plain["state_dict"])
        assert offloaded["loaded_loss"] == plain["loaded_loss"]
        assert offloaded["after_load_forward"] == 0, "a no-grad forward writes changed shards back and frees them"
        _equal(offloaded["loaded"], plain["loaded"])


def test_cpu_and_none_need_no_streaming_on_the_cpu():
    cpu = select_device(0, "cpu")
    for device in ("none", "cpu"):
        assert (
            apply_param_offload(torch.nn.Linear(2, 2), [], ParamOffloadConfig(device=device), NvmeConfig(), cpu) is None
        )
