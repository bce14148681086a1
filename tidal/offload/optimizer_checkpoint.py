"""Checkpoints of the offloaded optimizer: its state by parameter (NVMe state as placeholders a
checkpoint reads and writes one tensor at a time), loading state back, and the fp32 master copies."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from tidal.offload.chunks import Chunk, Segment, assign
from tidal.offload.store import Store
from tidal.parallel.shards import local
from tidal.runtime.deferred import DeferredTensors


class CheckpointedChunks:
    """The checkpoint side of `OffloadedOptimizer` (which provides `chunks`, `store` and `_quiesce`)."""

    chunks: list[Chunk]
    store: Store | None

    def _quiesce(self, raise_errors: bool = True) -> None: ...

    def state_by_param(
        self, deferred: DeferredTensors | None = None
    ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """(parameter, its state) for every parameter with state.

        Args:
            deferred: where nvme state becomes placeholders, read (and written back by a load) one tensor
                at a time by a checkpoint; None reads each nvme chunk into fresh memory, one at a time.
        """
        self._quiesce()
        for chunk in self.chunks:
            if chunk.tier != "nvme":
                state = chunk.optimizer.state if chunk.optimizer is not None else {}
                for p, entry in zip(chunk.params, state.values(), strict=False):
                    if entry:
                        yield p, dict(entry)
                continue
            if not chunk.layout:
                continue
            buffer = None if deferred is not None else self.store.read(chunk.key).wait()
            for j, p in enumerate(chunk.params):
                entry = dict(chunk.scalars[j])
                for (k, name), segment in chunk.layout.items():
                    if k != j or name == "master":
                        continue
                    if buffer is not None:
                        entry[name] = segment.view(buffer)
                    else:
                        entry[name] = deferred.placeholder(
                            segment.shape,
                            segment.dtype,
                            functools.partial(self._read_segment, chunk, segment),
                            functools.partial(self._write_segment, chunk, segment),
                        )
                if entry:
                    yield p, entry

    def _read_segment(self, chunk: Chunk, segment: Segment) -> torch.Tensor:
        return self.store.read_slice(chunk.key, segment.offset, segment.nbytes).view(segment.dtype).view(segment.shape)

    def _write_segment(self, chunk: Chunk, segment: Segment, value: torch.Tensor) -> None:
        self.store.write_slice(chunk.key, segment.offset, value.to(segment.dtype))

    def refresh_masters(self) -> None:
        """Copy the parameters into their fp32 master copies (after the parameters were loaded)."""
        self._quiesce()
        for chunk in self.chunks:
            for j, p in enumerate(chunk.params):
                segment = chunk.layout.get((j, "master"))
                if segment is not None:
                    self._write_segment(chunk, segment, local(p))
                elif chunk.masters[j] is not None:
                    chunk.masters[j].copy_(local(p))

    def load_state(self, state: dict[torch.Tensor, dict[str, torch.Tensor]]) -> None:
        """Copy `state` (as `state_by_param` yields it, for this rank's parameters) into the tier."""
        self._quiesce()
        for chunk in self.chunks:
            if chunk.tier != "nvme":
                current = dict(zip(chunk.params, chunk.optimizer.state.values(), strict=False))
                for p in chunk.params:
                    for name, value in state.get(p, {}).items():
                        assign(current[p], name, value)
                continue
            buffer = self.store.read(chunk.key).wait()
            for j, p in enumerate(chunk.params):
                for name, value in state.get(p, {}).items():
                    segment = chunk.layout.get((j, name))
                    if segment is None:
                        assign(chunk.scalars[j], name, value)
                    else:
                        segment.view(buffer).copy_(value)
            self.store.write(chunk.key, buffer).wait()
        self.refresh_masters()

    def has_state(self) -> bool:
        """Whether every chunk has stepped once (so its state exists to be loaded into)."""
        return all(c.optimizer is not None and (c.tier != "nvme" or c.layout) for c in self.chunks)
