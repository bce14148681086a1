"""Checkpoint tensors that live in a store, streamed one at a time through DCP's planners.

    deferred = DeferredTensors()
    state = {"exp_avg": deferred.placeholder(shape, dtype, read=fetch, write=put)}   # one element of memory
    save_checkpoint(root, step, state, extras, deferred=deferred)   # fetch() runs as DCP writes that tensor
    load_checkpoint(path, state, deferred=deferred)                 # put(tensor) runs once it is read in full

Optimizer state offloaded to NVMe must not come into memory all at once to be saved. Each such tensor
enters the state dict as a placeholder: a zero-stride tensor of its shape and dtype backed by one
element, which DCP plans with like any tensor (and wraps in a DTensor for sharded state). DCP's
file-system writer resolves tensors one at a time (its serial loader), and the save planner answers
a placeholder with `read()`; the load planner hands DCP a full buffer for a placeholder (filled first
with `read()`, so a partial load keeps the rest), counts the pieces DCP reads into it (several when
resharding), and calls `write(buffer)` after the last. At most one deferred tensor is in memory at a
time, plus DCP's own piece.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner, LoadPlan, ReadItem
from torch.distributed.checkpoint.metadata import MetadataIndex


@dataclass
class _Deferred:
    placeholder: torch.Tensor
    read: Callable[[], torch.Tensor]
    write: Callable[[torch.Tensor], None]
    buffer: torch.Tensor | None = None
    pieces: int = 0


@dataclass
class DeferredTensors:
    """The placeholders of one save or load and how to read and write the tensors they stand for."""

    _entries: dict[int, _Deferred] = field(default_factory=dict)

    def placeholder(
        self,
        shape: torch.Size,
        dtype: torch.dtype,
        read: Callable[[], torch.Tensor],
        write: Callable[[torch.Tensor], None],
    ) -> torch.Tensor:
        """A tensor of `shape` and `dtype` using one element of memory, standing for what `read()` returns
        (a tensor of that shape and dtype); `write(tensor)` stores a loaded value."""
        base = torch.empty((), dtype=dtype)
        tensor = base.expand(shape) if len(shape) else base
        self._entries[tensor.untyped_storage().data_ptr()] = _Deferred(tensor, read, write)
        return tensor

    def find(self, tensor: object) -> _Deferred | None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
            return None
        return self._entries.get(tensor.untyped_storage().data_ptr())

    def save_planner(self) -> DefaultSavePlanner:
        return _DeferredSavePlanner(self)

    def load_planner(self) -> DefaultLoadPlanner:
        return WeightsOnlyLoadPlanner(self)


class _DeferredSavePlanner(DefaultSavePlanner):
    """DCP's save planner; a placeholder resolves to its tensor, read when DCP writes it."""

    def __init__(self, deferred: DeferredTensors) -> None:
        super().__init__()
        self.deferred = deferred

    def lookup_object(self, index: MetadataIndex) -> object:
        found = super().lookup_object(index)
        entry = self.deferred.find(found)
        return found if entry is None else entry.read()


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, with two changes: a non-tensor value must pass ``torch.load(weights_only=True)``
    before DCP unpickles it (DCP itself loads those with weights_only=False, which can run a file's
    code), and placeholders of `deferred` are loaded through a buffer and written back to their store."""

    def __init__(self, deferred: DeferredTensors | None = None) -> None:
        super().__init__()
        self.deferred = deferred or DeferredTensors()

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        torch.load(io.BytesIO(value.getvalue()), weights_only=True)
        super().load_bytes(read_item, value)

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        for item in plan.items:
            entry = self.deferred.find(super().lookup_tensor(item.dest_index)) if item.dest_index.fqn else None
            if entry is not None:
                entry.pieces += 1
        return plan

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        found = super().lookup_tensor(index)
        entry = self.deferred.find(found)
        if entry is None:
            return found
        if entry.buffer is None:
            entry.buffer = entry.read().clone()
        return entry.buffer

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        super().commit_tensor(read_item, tensor)
        entry = self.deferred.find(super().lookup_tensor(read_item.dest_index))
        if entry is None:
            return
        entry.pieces -= 1
        if entry.pieces == 0:
            entry.write(entry.buffer)
            entry.buffer = None
