"""LiveTensorTracker: exact byte counts for allocations, frees, views, in-place ops, resizes, models,
optimizer state, FSDP2's sharded parameters and gloo collectives (a one-rank group in this process)."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tidal.memory.tracker import LiveTensorTracker

FLOATS = 1000
NBYTES = FLOATS * 4


@pytest.fixture
def gloo_group():
    """A gloo process group of one rank (this process), closed after the test."""
    if dist.is_initialized():
        pytest.skip("a process group is already open in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_allocation_raises_peak_by_exactly_its_bytes_and_free_lowers_current() -> None:
    with LiveTensorTracker() as tracker:
        x = torch.empty(FLOATS)
        assert tracker.current_bytes("cpu") == NBYTES
        assert tracker.peak_bytes("cpu") == NBYTES
        y = torch.ones(FLOATS, dtype=torch.float64)
        assert tracker.peak_bytes("cpu") == NBYTES + 2 * NBYTES
        del x
        assert tracker.current_bytes("cpu") == 2 * NBYTES
        assert tracker.peak_bytes("cpu") == 3 * NBYTES
        del y
        assert tracker.current_bytes("cpu") == 0
    assert tracker.peak_bytes("cpu") == 3 * NBYTES
    assert tracker.current_bytes("cuda") == 0 and tracker.peak_bytes("cuda") == 0


def test_views_and_in_place_ops_add_nothing() -> None:
    with LiveTensorTracker() as tracker:
        x = torch.zeros(10, FLOATS // 10)
        views = [x.view(-1), x[2:], x.t(), x.detach(), x[:, ::2], x.unsqueeze(0).expand(3, -1, -1)]
        x.add_(1).mul_(2)
        torch.add(x, 1, out=x)
        x[0].copy_(x[1])
        assert tracker.current_bytes("cpu") == NBYTES
        assert tracker.peak_bytes("cpu") == NBYTES
        del views


def test_storage_freed_only_when_its_last_view_dies() -> None:
    with LiveTensorTracker() as tracker:
        x = torch.empty(FLOATS)
        tail = x[500:]
        del x
        gc.collect()
        assert tracker.current_bytes("cpu") == NBYTES
        del tail
        assert tracker.current_bytes("cpu") == 0


def test_tensors_made_before_entering_count_only_when_tracked() -> None:
    before = torch.ones(FLOATS)
    tracker = LiveTensorTracker()
    with tracker:
        before.add_(1)
        before.view(10, -1)
        assert tracker.current_bytes("cpu") == 0
    tracker.track(before, before, before[3:])  # one storage, counted once
    assert tracker.current_bytes("cpu") == NBYTES
    del before
    assert tracker.current_bytes("cpu") == 0


def test_python_values_turned_into_tensors_are_counted() -> None:
    with LiveTensorTracker() as tracker:
        t = torch.tensor([1.0, 2.0, 3.0])
        assert tracker.current_bytes("cpu") == t.nbytes


def test_meta_tensors_hold_no_bytes() -> None:
    with LiveTensorTracker() as tracker:
        torch.empty(FLOATS, device="meta") + 1
    assert tracker.peak_bytes("cpu") == 0
    assert tracker.peak_bytes("meta") == 0


def test_reset_peak_restarts_from_current() -> None:
    with LiveTensorTracker() as tracker:
        keep = torch.empty(FLOATS)
        temp = torch.empty(10 * FLOATS)
        del temp
        assert tracker.peak_bytes("cpu") == 11 * NBYTES
        tracker.reset_peak()
        assert tracker.peak_bytes("cpu") == NBYTES
        del keep


def test_resize_of_storages_is_followed() -> None:
    """FSDP2 frees and re-allocates unsharded parameters with ``untyped_storage().resize_``."""
    original_resize = torch.UntypedStorage.resize_
    tracked = torch.empty(FLOATS)
    untracked = torch.empty(FLOATS)
    untracked.untyped_storage().resize_(0)
    with LiveTensorTracker().track(tracked) as tracker:
        tracked.untyped_storage().resize_(0)
        assert tracker.current_bytes("cpu") == 0
        tracked.untyped_storage().resize_(NBYTES)
        untracked.untyped_storage().resize_(2 * NBYTES)  # a re-allocation while active: counted
        assert tracker.current_bytes("cpu") == 3 * NBYTES
        untracked.untyped_storage().resize_(0)
        assert tracker.current_bytes("cpu") == NBYTES
    assert torch.UntypedStorage.resize_ is original_resize  # unwrapped once no tracker is active
    tracked.untyped_storage().resize_(0)  # while inactive: seen at the next entry
    with tracker:
        assert tracker.current_bytes("cpu") == 0
    assert tracker.peak_bytes("cpu") == 3 * NBYTES


def test_entering_again_resumes_and_frees_are_seen_in_between() -> None:
    tracker = LiveTensorTracker()
    with tracker:
        a = torch.empty(FLOATS)
        b = torch.empty(FLOATS)
    del a
    outside = torch.empty(FLOATS)
    assert tracker.current_bytes("cpu") == NBYTES
    with tracker:
        c = torch.empty(FLOATS)
        assert tracker.current_bytes("cpu") == 2 * NBYTES
    with pytest.raises(RuntimeError, match="already active"), tracker, tracker:
        pass
    del b, c, outside


def test_track_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match="takes tensors, modules and optimizers, got list"):
        LiveTensorTracker().track([torch.empty(1)])


def test_model_step_counts_params_grads_and_optimizer_state_exactly() -> None:
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    params = _param_bytes(model)
    x = torch.randn(32, 64)
    tracker = LiveTensorTracker().track(model, optimizer)
    assert tracker.current_bytes("cpu") == params
    with tracker:
        model(x).square().mean().backward()
        assert tracker.peak_bytes("cpu") >= 2 * params  # parameters and their gradients
        assert tracker.current_bytes("cpu") == 2 * params  # the graph and its activations are gone
        optimizer.step()
        state = sum(v.nbytes for s in optimizer.state.values() for v in s.values())
        assert state >= 2 * params  # AdamW: exp_avg and exp_avg_sq (plus a step counter each)
        assert tracker.current_bytes("cpu") == 2 * params + state
        optimizer.zero_grad()
        assert tracker.current_bytes("cpu") == params + state


def test_tied_weights_count_once() -> None:
    embed = torch.nn.Embedding(100, 16)
    head = torch.nn.Linear(16, 100, bias=False)
    head.weight = embed.weight
    tracker = LiveTensorTracker().track(torch.nn.ModuleList([embed, head]))
    assert tracker.current_bytes("cpu") == embed.weight.nbytes


def test_gloo_collectives_writing_into_their_inputs_are_not_double_counted(gloo_group) -> None:
    made_before = torch.ones(FLOATS)
    with LiveTensorTracker() as tracker:
        x = torch.ones(FLOATS)
        dist.all_reduce(x)
        dist.all_reduce(x, async_op=True).wait()
        dist.broadcast(x, src=0)
        dist.all_reduce(made_before)
        assert tracker.current_bytes("cpu") == NBYTES
        assert tracker.peak_bytes("cpu") == NBYTES
        out = torch.empty(FLOATS)
        dist.all_gather_single(out, x)
        assert tracker.current_bytes("cpu") == 2 * NBYTES
    assert torch.equal(out, x)


def test_fsdp2_sharded_model_counts_local_shards_and_frees_gathered_copies(gloo_group) -> None:
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    params = _param_bytes(model)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters())
    tracker = LiveTensorTracker().track(model, optimizer)
    assert tracker.current_bytes("cpu") == params  # one rank: the local shard is the whole parameter
    with tracker:
        out = model(torch.randn(32, 64))
        # the gathered (unsharded) copies were counted while in use, and freed after forward
        assert tracker.peak_bytes("cpu") >= params + model[0].weight.nbytes + out.nbytes
        out.sum().backward()
        assert tracker.peak_bytes("cpu") >= 2 * params
        assert tracker.current_bytes("cpu") == 2 * params + out.nbytes  # shards, their grads, the output
        optimizer.step()
        optimizer.zero_grad()
    state = sum(_local(v).nbytes for s in optimizer.state.values() for v in s.values())
    assert tracker.current_bytes("cpu") == params + state + out.nbytes


def test_release_on_another_thread_is_seen() -> None:
    with LiveTensorTracker() as tracker:
        box = [torch.empty(FLOATS)]
    worker = threading.Thread(target=box.clear)
    worker.start()
    worker.join()
    assert tracker.current_bytes("cpu") == 0
    assert tracker.peak_bytes("cpu") == NBYTES
