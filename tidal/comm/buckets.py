"""Gradient buckets reduced asynchronously while backward is still running.

Parameters are grouped into buckets of about `bucket_bytes`, in reverse registration order (roughly
the order backward produces their gradients). A post-accumulate-grad hook marks each parameter ready;
when a bucket is complete its collective is launched at once, so it travels while backward computes
the next layers' gradients. Buckets launch strictly in index order on every rank (collectives on
one group must be issued in the same order everywhere), and whatever a backward did not touch
(unused parameters, experts that got no tokens) is flushed with zeros when backward ends, so no rank
waits for a gradient that never comes.

Two reductions:

- ``"all_reduce"``: every rank ends with the mean gradient in ``p.grad`` (ZeRO 0 and 1). A DTensor
  parameter (tensor parallel) is reduced as its local shard: the data-parallel replicas of a shard
  are what the group averages.
- ``"reduce_scatter"``: each parameter's local part (a DTensor's local shard, else the whole tensor) is
  split by rows into ``world`` chunks (torch.chunk sizes, as DTensor's Shard(0)); rank r receives the
  mean of its chunk only, handed to ``on_shard_grad`` and the full ``p.grad`` is freed at launch (ZeRO 2).
  The full-size send buffer lives as long as its collective's handle, so at most `SCATTERS_IN_FLIGHT`
  are kept: launching one more first waits for the oldest and drops its handle (its received chunk
  stays until `wait`). Without that every send buffer would live to the end of backward, and ZeRO 2
  would hold as much gradient memory in backward as ZeRO 1.

Bucket layout for reduce_scatter, world=2, params a (3 rows) and b (1 row)::

    send buffer = [ a[0:2] b[0:1] pad | a[2:3] pad ]      one segment per rank, each `segment` long
    rank 0 gets   [ a[0:2] b[0:1] ]   rank 1 gets [ a[2:3] ]
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.autograd import Variable

from tidal.parallel.shards import like, local
from tidal.runtime.hooks import weak_hook

FIRST_BUCKET_BYTES = 1 << 20
"""Cap of the first bucket (the last layers' gradients, ready first), bytes."""
SCATTERS_IN_FLIGHT = 2
"""Reduce-scatter buckets (each holding a full-size send buffer) travelling at once, count."""


def row_range(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [start, end) of `rank` when `rows` are split into `world` chunks like torch.chunk / Shard(0)."""
    size = math.ceil(rows / world) if rows else 0
    start = min(rank * size, rows)
    return start, min(start + size, rows)


def lay_out_segments(params: Sequence[torch.Tensor], world: int) -> tuple[list[list[int]], int]:
    """Place each rank's row chunks of `params` (plain tensors: pass a DTensor's local shard) into one
    segment per rank.

    Returns ``(offsets, segment)``: ``offsets[i][r]`` is where param i's chunk of rank r starts in
    segment r, and `segment` is the length of the longest segment (the others are padded to it).
    """
    fill = [0] * world
    offsets = []
    for p in params:
        rows = p.shape[0]
        row_numel = p.numel() // rows if rows else 0
        starts = []
        for r in range(world):
            start, end = row_range(rows, world, r)
            starts.append(fill[r])
            fill[r] += (end - start) * row_numel
        offsets.append(starts)
    return offsets, max(fill)


def copy_rows(
    full: torch.Tensor, flat: torch.Tensor, offsets: list[int], segment: int, world: int, into_segments: bool
) -> None:
    """Copy each rank's row chunk of `full` into (or, with ``into_segments=False``, out of) the per-rank
    segments of `flat`, at ``r * segment + offsets[r]`` for rank r (the layout of `lay_out_segments`)."""
    rows = full.reshape(full.shape[0], -1)
    for r, off in enumerate(offsets):
        start, end = row_range(full.shape[0], world, r)
        chunk = rows[start:end].reshape(-1)
        base = r * segment + off
        if into_segments:
            flat[base : base + chunk.numel()].copy_(chunk)
        else:
            rows[start:end].view(-1).copy_(flat[base : base + chunk.numel()])


@dataclass
class Bucket:
    index: int
    params: list[torch.nn.Parameter]
    mode: str
    offsets: list[list[int]] = field(default_factory=list)
    """reduce_scatter: offsets[p][r] is where param p's chunk of rank r starts inside segment r."""
    segment: int = 0
    """reduce_scatter: elements per rank segment; all_reduce: elements of the whole bucket."""
    buffer: torch.Tensor | None = None
    ready: set[int] = field(default_factory=set)
    work: dist.Work | None = None
    blocked: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    """Wraps the blocking wait, so metrics can tell exposed communication from hidden."""
    launched: bool = False
    retired: bool = False
    """reduce_scatter: its collective was waited early (`SCATTERS_IN_FLIGHT`); its chunk awaits `wait`."""


class GradientBuckets:
    """Reduce gradients over `group` bucket by bucket during backward.

    Args:
        params: parameters in registration order (the model's order); reversed into backward order.
        modes: per parameter, "all_reduce" or "reduce_scatter" (same length as `params`).
        group: the data-parallel process group.
        bucket_bytes: target bytes of gradient per bucket.
        on_shard_grad: reduce_scatter only: called as ``fn(param, chunk)`` with this rank's mean chunk of
            the local part (shape ``(end - start, *local.shape[1:])``) once the bucket's reduction completes.
        on_comm: optional ``fn(name, nbytes, work)`` for metrics, called at each launch; it may return
            an object whose ``blocked()`` context manager is entered around the wait.
        scale: factor applied to the summed gradients; default 1 / group size (the mean). Expert
            gradients are summed over ``edp`` and divided by the ``dp_sp`` size.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        modes: Sequence[str],
        group: dist.ProcessGroup,
        bucket_bytes: int,
        on_shard_grad: Callable[[torch.nn.Parameter, torch.Tensor], None] | None = None,
        on_comm: Callable[[str, int, dist.Work], object] | None = None,
        scale: float | None = None,
    ) -> None:
        self.group = group
        self.scale = scale
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.on_shard_grad = on_shard_grad
        self.on_comm = on_comm
        self.buckets = self._assign(list(params), list(modes), bucket_bytes)
        self._where = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        self._next_launch = 0
        self._active = False
        self._unreduced = False
        self._callback_queued = False
        self._lock = threading.Lock()
        on_grad = weak_hook(self._on_grad)  # the parameters hold their hooks: a bound method would hold self
        self._hooks = [p.register_post_accumulate_grad_hook(on_grad) for p in params if p.requires_grad]

    def _assign(self, params: list, modes: list, bucket_bytes: int) -> list[Bucket]:
        buckets: list[Bucket] = []
        current: dict[tuple, list] = {}
        for p, mode in reversed(list(zip(params, modes, strict=True))):
            if not p.requires_grad:
                continue
            key = (mode, p.dtype)
            group = current.setdefault(key, [])
            group.append(p)
            # The first bucket is small so that communication starts as early in backward as it can.
            limit = min(bucket_bytes, FIRST_BUCKET_BYTES) if not buckets else bucket_bytes
            if sum(local(q).numel() * q.element_size() for q in group) >= limit:
                buckets.append(Bucket(len(buckets), current.pop(key), mode))
        for (mode, _), group in current.items():
            buckets.append(Bucket(len(buckets), group, mode))
        for b in buckets:
            if b.mode == "reduce_scatter":
                b.offsets, b.segment = lay_out_segments([local(p) for p in b.params], self.world)
            else:
                b.segment = sum(local(p).numel() for p in b.params)
        return buckets

    # -- backward ------------------------------------------------------------------------------------

    def arm(self, active: bool) -> None:
        """Before a micro-step's backward: reduce during it (a boundary) or let gradients accumulate."""
        self._active = active

    @property
    def pending(self) -> bool:
        """Gradients were accumulated by a backward that did not reduce them (a non-boundary micro-step)."""
        return self._unreduced

    def _on_grad(self, param: torch.nn.Parameter) -> None:
        if not self._active:
            self._unreduced = True
            return
        with self._lock:
            if not self._callback_queued:
                Variable._execution_engine.queue_callback(self._on_backward_end)
                self._callback_queued = True
            bucket, i = self._where[id(param)]
            if bucket.launched:
                raise RuntimeError(
                    "a gradient arrived after its bucket was reduced: a parameter got gradients from two "
                    "backward passes in one step (reentrant activation checkpointing does this); use "
                    "torch.utils.checkpoint with use_reentrant=False"
                )
            bucket.ready.add(i)
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if len(bucket.ready) < len(bucket.params):
                return
            self._launch(bucket)
            self._next_launch += 1

    def _on_backward_end(self) -> None:
        """Autograd's end-of-backward callback: flush untouched buckets, then wait for all."""
        with self._lock:
            self._callback_queued = False
            for bucket in self.buckets[self._next_launch :]:
                self._launch(bucket)
            self._next_launch = len(self.buckets)
        self.wait()

    def reduce_now(self) -> None:
        """Reduce every gradient immediately (an optimizer step came after a non-boundary backward)."""
        with self._lock:
            for bucket in self.buckets[self._next_launch :]:
                self._launch(bucket)
            self._next_launch = len(self.buckets)
        self.wait()

    def _launch(self, bucket: Bucket) -> None:
        bucket.launched = True
        if bucket.mode == "all_reduce":
            if bucket.buffer is None:
                bucket.buffer = torch.empty(bucket.segment, dtype=bucket.params[0].dtype, device=_device(bucket))
            offset = 0
            for p in bucket.params:
                n = local(p).numel()
                if p.grad is None:
                    bucket.buffer[offset : offset + n].zero_()
                else:
                    bucket.buffer[offset : offset + n].copy_(local(p.grad).reshape(-1))
                offset += n
            bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
            nbytes = bucket.buffer.numel() * bucket.buffer.element_size()
        else:
            self._retire_scatters(SCATTERS_IN_FLIGHT - 1)
            send = torch.zeros(bucket.segment * self.world, dtype=bucket.params[0].dtype, device=_device(bucket))
            for p, offsets in zip(bucket.params, bucket.offsets, strict=True):
                if p.grad is not None:
                    copy_rows(local(p.grad), send, offsets, bucket.segment, self.world, into_segments=True)
                    p.grad = None  # ZeRO-2: the full gradient is not kept once it is on its way
            bucket.buffer = torch.empty(bucket.segment, dtype=send.dtype, device=send.device)
            bucket.work = dist.reduce_scatter_tensor(bucket.buffer, send, group=self.group, async_op=True)
            nbytes = send.numel() * send.element_size()
        record = self.on_comm(f"{bucket.mode} {bucket.index}", nbytes, bucket.work) if self.on_comm else None
        bucket.blocked = record.blocked if record is not None else contextlib.nullcontext

    def _retire_scatters(self, keep: int) -> None:
        """Wait for the oldest reduce-scatters in flight until `keep` remain, dropping their handles (and
        with them their send buffers)."""
        flying = [b for b in self.buckets if b.mode == "reduce_scatter" and b.work is not None]
        for bucket in flying[: max(0, len(flying) - keep)]:
            with bucket.blocked():
                bucket.work.wait()
            bucket.work, bucket.retired = None, True

    def wait(self) -> None:
        """Wait for every launched bucket and deliver its mean gradients; then reset for the next step."""
        for bucket in self.buckets:
            if bucket.work is None and not bucket.retired:
                continue
            if bucket.work is not None:
                with bucket.blocked():
                    bucket.work.wait()
            bucket.work, bucket.retired = None, False
            bucket.buffer.mul_(1.0 / self.world if self.scale is None else self.scale)
            if bucket.mode == "all_reduce":
                offset = 0
                for p in bucket.params:
                    shard = local(p)
                    mean = bucket.buffer[offset : offset + shard.numel()].view_as(shard)
                    if p.grad is None:
                        p.grad = like(p, mean.clone())
                    else:
                        local(p.grad).copy_(mean)
                    offset += shard.numel()
            else:
                for p, offsets in zip(bucket.params, bucket.offsets, strict=True):
                    shape = local(p).shape
                    start, end = row_range(shape[0], self.world, self.rank)
                    n = (end - start) * (shape.numel() // shape[0] if shape[0] else 0)
                    off = offsets[self.rank]
                    self.on_shard_grad(p, bucket.buffer[off : off + n].view(end - start, *shape[1:]))
                bucket.buffer = None
        for bucket in self.buckets:
            bucket.ready.clear()
            bucket.launched = False
        self._next_launch = 0
        self._unreduced = False

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _device(bucket: Bucket) -> torch.device:
    return bucket.params[0].device
