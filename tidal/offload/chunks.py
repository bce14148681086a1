"""The pieces of the offloaded optimizer: chunks of parameters, their state's layout in one file,
the host staging buffers a chunk is updated in, and the choice of update kernel."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from tidal.config import Config
from tidal.offload.store import empty_aligned
from tidal.runtime.device import Handle

T = TypeVar("T")

ALIGN_BYTES = 64
"""Alignment of each tensor inside a chunk's file, bytes (any dtype's itemsize divides it)."""


def cut_runs(items: Sequence[T], sizes: Iterable[float], limit: float) -> list[list[T]]:
    """`items` cut into consecutive runs, each closed once its `sizes` reach `limit` (one item at least).

    The one rule for optimizer chunks, ZeRO's all-gather groups and the memory estimate of both."""
    runs: list[list[T]] = []
    size = limit  # the first item opens a run
    for item, nbytes in zip(items, sizes, strict=True):
        if size >= limit:
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += nbytes
    return runs


def updates_in_backward(
    config: Config, *, zero_stage: int, dp_world: int, model_parallel: bool, pipelined: bool, device_type: str
) -> bool:
    """Whether offloaded chunks update (and free their gradients) during backward: a gradient is final when its
    post-accumulate-grad hook runs, so nothing reduces it later (one rank at ZeRO 0, or ZeRO 3), clips it (the
    norm needs every gradient) or unscales it (fp16). The engine and the memory estimate both ask this.

    ZeRO 3 counts only on the CPU: FSDP2 runs the hooks after its reduce-scatter, which is synchronous there;
    on CUDA the gradient would still be in flight on its stream."""
    return (
        config.offload.optimizer.update_in_backward
        and config.train.gradient_clipping is None
        and config.precision.dtype != "fp16"
        and ((zero_stage == 0 and dp_world == 1) or (zero_stage == 3 and device_type == "cpu"))
        and not model_parallel
        and not pipelined
    )


@functools.cache
def fused_on_cpu(optimizer_class: type[torch.optim.Optimizer]) -> bool:
    """Whether `optimizer_class(..., fused=True)` steps fp32 CPU tensors in this torch (tried once)."""
    probe = torch.zeros(1)
    probe.grad = torch.zeros(1)
    try:
        optimizer_class([probe], fused=True).step()
    except (TypeError, RuntimeError, ValueError):
        return False
    return True


@dataclass
class Segment:
    """Where one tensor sits in a chunk's flat byte buffer."""

    offset: int
    dtype: torch.dtype
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass
class Chunk:
    """Consecutive optimizer parameters updated together by one optimizer instance."""

    index: int
    tier: str
    params: list[torch.Tensor]
    groups: list[int]
    """Index in the user's param_groups of each parameter."""
    masters: list[torch.Tensor | None]
    """Host fp32 copies of parameters that are not fp32 host tensors (cpu tier; nvme keeps them in the file)."""
    optimizer: torch.optim.Optimizer | None = None
    scalars: list[dict[str, object]] = field(default_factory=list)
    """Per parameter: the state that does not live in the chunk's file (Python numbers, odd-shaped tensors)."""
    layout: dict[tuple[int, str], Segment] = field(default_factory=dict)
    """(parameter, state name or "master") -> its place in the file; empty until the first step (nvme)."""
    nbytes: int = 0

    @property
    def key(self) -> str:
        return f"chunk{self.index}"


class Staging:
    """One host buffer a chunk's file is read into, updated in and written from; reused round-robin."""

    def __init__(self, keep_bytes: int = 0) -> None:
        self.keep_bytes = keep_bytes
        """A buffer grown past twice this (for one oversized chunk) is dropped when a smaller chunk comes."""
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.grad_buffer = torch.empty(0, dtype=torch.float32)
        self.grads: list[torch.Tensor | None] = []
        """The chunk's gradients as fp32 host tensors, valid once `settle()` returned."""
        self.pending: list[Handle[object]] = []

    def settle(self) -> None:
        """Wait for the transfers still using the buffer; the first failure is raised after all finished."""
        pending, self.pending = self.pending, []
        errors = []
        for handle in pending:
            try:
                handle.wait()
            except Exception as exc:  # noqa: BLE001 - every transfer must finish before the buffer is reused
                errors.append(exc)
        if errors:
            raise errors[0]

    def reserve(self, nbytes: int) -> torch.Tensor:
        """The first `nbytes` of the buffer: the same memory for the same size until the buffer changes
        (a transfer still using a replaced buffer keeps it alive)."""
        if self.buffer.numel() < nbytes or self.buffer.numel() > 2 * max(nbytes, self.keep_bytes):
            self.buffer = empty_aligned((nbytes,), torch.uint8)
        return self.buffer[:nbytes]

    def reserve_grads(self, numel: int) -> torch.Tensor:
        """An fp32 host buffer of `numel` elements that gradients are copied into (pinned on CUDA)."""
        if self.grad_buffer.numel() < numel:
            self.grad_buffer = empty_aligned((numel,), torch.float32)
        return self.grad_buffer[:numel]


KERNEL_OPTIONS = ("fused", "foreach", "capturable", "differentiable")
"""Options that choose an implementation, not the mathematics: the host chunks set their own."""


def host_kernel(cls: type[torch.optim.Optimizer], options: dict) -> dict:
    """The implementation options for updating fp32 host tensors fastest: fused where the class has it."""
    if "fused" in options and fused_on_cpu(cls):
        return {"fused": True, "foreach": False}
    return {"foreach": False} if "foreach" in options else {}


def state_slots(optimizer: torch.optim.Optimizer) -> int:
    """How many parameter-shaped state tensors `optimizer`'s class keeps (a step on a 2-element probe)."""
    probe = torch.zeros(2)
    probe.grad = torch.ones(2)
    options = {k: v for k, v in optimizer.param_groups[0].items() if k not in ("params", *KERNEL_OPTIONS)}
    options["lr"] = 0.0
    try:
        opt = type(optimizer)([{"params": [probe], **options}])
        opt.step()
    except Exception:  # noqa: BLE001 - an optimizer we cannot probe gets Adam's two slots as the estimate
        return 2
    return sum(1 for v in opt.state[probe].values() if isinstance(v, torch.Tensor) and v.shape == probe.shape)


def lay_out(tensors: dict[tuple[int, str], torch.Tensor]) -> dict[tuple[int, str], Segment]:
    layout = {}
    offset = 0
    for key, tensor in tensors.items():
        layout[key] = Segment(offset, tensor.dtype, tensor.shape)
        offset += -(-tensor.numel() * tensor.element_size() // ALIGN_BYTES) * ALIGN_BYTES
    return layout


def assign(entry: dict[str, object], name: str, value: object) -> None:
    current = entry.get(name)
    if isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor) and current.shape == value.shape:
        current.copy_(value)
    else:
        entry[name] = value.clone() if isinstance(value, torch.Tensor) else value
