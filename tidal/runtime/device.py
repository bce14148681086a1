"""The only module that knows CUDA from the CPU.

Everything else asks this module: which device a rank computes on, which collective backend it uses,
and which optional torch features this build offers. Feature detection happens once, here.
"""

from __future__ import annotations

import functools
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch
import torch.distributed as dist

PAGE_BYTES = mmap.PAGESIZE
"""Bytes per host memory page; `empty_host` buffers start on a page boundary (O_DIRECT needs that)."""

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


@dataclass(frozen=True)
class Features:
    """What this torch build and machine offer, detected once per process."""

    torch_version: str
    cuda: bool
    """A CUDA device is visible and usable."""
    cuda_devices: int
    nccl: bool
    gloo: bool
    mpi: bool
    """torch was built with its own MPI backend (rare; tidal's MPI support does not need it)."""
    bf16_cpu: bool
    """bf16 matmuls run on this CPU (torch reports the AMX/AVX512-BF16 path or falls back correctly)."""
    symm_mem: bool
    """CUDA with torch's symmetric-memory collective matmuls (fused_all_gather_matmul and friends)."""
    kernel_aio: bool
    """Linux kernel AIO works in this process (the NVMe engine's `aio`; a container may refuse io_setup)."""


@functools.cache
def features() -> Features:
    """Detect the optional pieces of this torch build once and remember them."""
    from tidal.offload.aio import kernel_aio_available  # the offload package imports this module

    cuda = torch.cuda.is_available()
    return Features(
        torch_version=torch.__version__,
        cuda=cuda,
        cuda_devices=torch.cuda.device_count() if cuda else 0,
        nccl=dist.is_available() and dist.is_nccl_available(),
        gloo=dist.is_available() and dist.is_gloo_available(),
        mpi=dist.is_available() and dist.is_mpi_available(),
        bf16_cpu=torch.backends.mkldnn.is_available(),
        symm_mem=cuda and hasattr(getattr(torch.ops, "symm_mem", None), "fused_all_gather_matmul"),
        kernel_aio=kernel_aio_available(),
    )


def fused_collective_matmul(tensor: torch.Tensor, group: dist.ProcessGroup) -> bool:
    """Whether torch's fused collective matmuls (symmetric memory) serve `tensor` on `group`: a CUDA
    tensor, an NCCL group, and symmetric memory enabled for it (tried once per group)."""
    if not (features().symm_mem and tensor.is_cuda and dist.get_backend(group) == "nccl"):
        return False
    return _symmetric_memory_for(group.group_name)


@functools.cache
def _symmetric_memory_for(group_name: str) -> bool:
    from torch.distributed import _symmetric_memory

    try:
        _symmetric_memory.enable_symm_mem_for_group(group_name)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@dataclass(frozen=True)
class Device:
    """The device one rank computes on and the collective backend that matches it."""

    type: str
    """"cuda" or "cpu"."""
    index: int | None
    """The CUDA device index for this rank; None on the CPU."""
    backend: str
    """The torch.distributed backend: "nccl" on CUDA, "gloo" on the CPU."""

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type, self.index) if self.index is not None else torch.device(self.type)

    def activate(self) -> None:
        """Make this rank's device the current one (a no-op on the CPU)."""
        if self.type == "cuda":
            torch.cuda.set_device(self.index)


def select_device(local_rank: int, prefer: str = "auto") -> Device:
    """Choose this rank's device.

    Args:
        local_rank: the rank's index on its node; on CUDA it picks the GPU (modulo the visible count).
        prefer: "auto" (CUDA when visible, else the CPU), "cuda" or "cpu".
    Raises:
        ValueError: `prefer` is unknown, or "cuda" is asked for where no GPU is visible.
    """
    feats = features()
    if prefer not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device={prefer!r} is not a device kind; choose one of auto, cuda, cpu")
    if prefer == "cuda" and not feats.cuda:
        raise ValueError("device='cuda' was asked for but no CUDA device is visible; use device='cpu' or 'auto'")
    if feats.cuda and prefer in ("auto", "cuda"):
        return Device("cuda", local_rank % feats.cuda_devices, "nccl" if feats.nccl else "gloo")
    return Device("cpu", None, "gloo")


def memory_stats(device: Device) -> dict[str, int]:
    """Memory the caching allocator holds for tensors on `device`.

    Returns:
        On CUDA: "allocated" (bytes in live tensors now) and "peak" (the most allocated since the
        process started or torch's peak counter was last reset), in bytes. On the CPU: {} (ask psutil).
    """
    if device.type != "cuda":
        return {}
    return {
        "allocated": torch.cuda.memory_allocated(device.torch_device),
        "peak": torch.cuda.max_memory_allocated(device.torch_device),
    }


class Handle(Protocol[T_co]):
    """An operation under way (a copy, file I/O, a collective)."""

    def wait(self) -> T_co:
        """Block until the operation finished; return its result or raise its error."""
        ...

    def done(self) -> bool:
        """Whether the operation finished (then `wait` does not block)."""
        ...


class FutureHandle(Generic[T]):
    """A thread-pool future as a `Handle`."""

    def __init__(self, future: Future[T]) -> None:
        self._future = future

    def wait(self) -> T:
        return self._future.result()

    def done(self) -> bool:
        return self._future.done()


class _Then(Generic[T]):
    """See `then`."""

    def __init__(self, handle: Handle[object], finish: Callable[[], T]) -> None:
        self._handle = handle
        self._finish = finish
        self._lock = threading.Lock()
        self._outcome: tuple[bool, T | Exception] | None = None

    def wait(self) -> T:
        with self._lock:
            if self._outcome is None:
                try:
                    self._handle.wait()
                    self._outcome = (True, self._finish())
                except Exception as exc:
                    self._outcome = (False, exc)
        succeeded, value = self._outcome
        if not succeeded:
            raise value  # type: ignore[misc]
        return value  # type: ignore[return-value]

    def done(self) -> bool:
        return self._handle.done()


def then(handle: Handle[object], finish: Callable[[], T]) -> Handle[T]:
    """A handle that, on its first `wait()`, waits for `handle` and then runs `finish` once.

    Returns:
        A handle whose `wait()` returns `finish()`'s result, or raises the error of `handle` or of
        `finish` (the same error on every later `wait()`; `finish` does not run when `handle` failed).
    """
    return _Then(handle, finish)


class _CudaCopyHandle:
    """A copy queued on a side stream; `wait` blocks the host until the copy's event fired."""

    def __init__(self, event: torch.cuda.Event, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._event = event
        self._dst = dst
        self._src = src  # kept alive until the copy finished

    def wait(self) -> torch.Tensor:
        self._event.synchronize()
        return self._dst

    def done(self) -> bool:
        return self._event.query()


def pin_memory_available() -> bool:
    """Whether page-locked (pinned) host memory can be allocated: only with a visible CUDA device."""
    return features().cuda


def empty_host(nbytes: int, *, pinned: bool = False) -> torch.Tensor:
    """An uninitialized host buffer that starts on a page boundary, as O_DIRECT file I/O requires.

    Args:
        nbytes: size in bytes (>= 0).
        pinned: allocate page-locked memory, which CUDA copies to and from asynchronously; needs
            `pin_memory_available()`. Unpinned buffers are anonymous memory maps, returned to the OS
            when the last tensor viewing them is freed.
    Returns:
        A 1-D uint8 CPU tensor of `nbytes` elements whose `data_ptr()` is a multiple of `PAGE_BYTES`.
    Raises:
        ValueError: `nbytes` is negative, or `pinned` is asked for without a CUDA device.
    """
    if nbytes < 0:
        raise ValueError(f"nbytes={nbytes} is negative; pass a buffer size in bytes >= 0")
    if pinned and not pin_memory_available():
        raise ValueError("pinned host memory needs a CUDA device and none is visible; pass pinned=False")
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    if not pinned:
        return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)  # anonymous maps are page-aligned
    spare = torch.empty(nbytes + PAGE_BYTES, dtype=torch.uint8, pin_memory=True)
    start = -spare.data_ptr() % PAGE_BYTES
    return spare[start : start + nbytes]


def copy_async(dst: torch.Tensor, src: torch.Tensor) -> Handle[torch.Tensor]:
    """Start `dst.copy_(src)` without waiting for it.

    On CUDA (either tensor on a GPU) the copy runs on a side stream that first waits for the work
    already queued on the current stream; host memory should be pinned for the copy to be
    asynchronous. Between CPU tensors it runs on a small thread pool (torch releases the GIL).
    Neither tensor may be changed or freed by the caller until the handle's `wait` returned.

    Returns:
        A handle whose `wait()` returns `dst`.
    """
    if dst.is_cuda or src.is_cuda:
        device = dst.device if dst.is_cuda else src.device
        stream = _copy_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        for tensor in (dst, src):
            if tensor.is_cuda:
                tensor.record_stream(stream)  # the allocator must not reuse it before the copy ran
        event = torch.cuda.Event()
        event.record(stream)
        return _CudaCopyHandle(event, dst, src)
    return FutureHandle(_copy_pool().submit(dst.copy_, src))


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


@functools.cache
def _copy_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="tidal-copy")
