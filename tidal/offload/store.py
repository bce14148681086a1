"""Memory tiers as stores: tensors kept under string keys in host memory (`CpuStore`) or on disk (`NvmeStore`).

    store = NvmeStore("/nvme/tidal", config.offload.nvme)
    store.write("chunk3", tensor).wait()        # every transfer returns a handle; wait() raises its error
    handle = store.read("chunk3")               # or read(key, out=tensor) into a tensor of your own
    tensor = handle.wait()
    store.delete("chunk3"); store.close()

Rules shared by both stores:

- A key's stored content changes only when a write of it completes, when its handle is waited on (or
  the key is next used). A failed write leaves the previous content readable and the source
  tensor untouched.
- A source tensor must not change, and a read's `out` must not be used, until the handle's `wait()`
  returned. Operations on one key run in the order they were issued: a read waits for the key's
  write under way, a write or delete for all of the key's transfers under way.
- Stores are driven from one thread; handles may be waited on from any thread.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from tidal.offload.nvme import ALIGN, OffloadError, padded_size
from tidal.runtime.device import Handle, copy_async, empty_host, pin_memory_available, then

L = TypeVar("L")


def empty_aligned(shape: Sequence[int], dtype: torch.dtype, *, pinned: bool | None = None) -> torch.Tensor:
    """An uninitialized CPU tensor that starts on a page boundary: the NVMe store moves it without a bounce copy.

    Args:
        shape: the tensor's shape.
        dtype: the tensor's dtype.
        pinned: page-locked memory (for asynchronous CUDA copies); default: when a CUDA device is visible.
    """
    pinned = pin_memory_available() if pinned is None else pinned
    return empty_host(math.prod(shape) * dtype.itemsize, pinned=pinned).view(dtype).reshape(shape)


@dataclass(frozen=True)
class _Entry(Generic[L]):
    """What a store knows about one key: the tensor's type and shape, and where its bytes are."""

    dtype: torch.dtype
    shape: torch.Size
    nbytes: int
    location: L
    """`CpuStore`: the pooled buffer holding the bytes; `NvmeStore`: the file's path."""
    checksum: int | None = None
    """CRC-32 of the bytes when the store verifies reads."""


class Store(ABC, Generic[L]):
    """Tensors under string keys in one tier; every transfer is asynchronous and returns a handle."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry[L]] = {}
        self._writing: dict[str, Handle[None]] = {}
        self._reading: dict[str, list[Handle[torch.Tensor]]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def write(self, key: str, tensor: torch.Tensor) -> Handle[None]:
        """Store a copy of `tensor` under `key`, replacing what the key held once the copy is complete.

        Returns:
            A handle whose `wait()` returns None, or raises the failure (`OffloadError` for disk errors)
            with the key's previous content still in place.
        """
        self._check_open()
        self._check_device(tensor, "write")
        source = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._settle(key, reads=True)
        handle = self._start_write(key, source, tensor.dtype, tensor.shape)
        self._writing[key] = handle
        return handle

    def read(self, key: str, out: torch.Tensor | None = None) -> Handle[torch.Tensor]:
        """Copy the tensor stored under `key` into `out`, or into a new tensor when `out` is None.

        Args:
            key: a key written before.
            out: a contiguous tensor of the stored dtype and number of elements (any shape).
        Returns:
            A handle whose `wait()` returns the filled tensor.
        Raises:
            KeyError: nothing is stored under `key`.
            ValueError: `out` does not match the stored tensor.
        """
        self._check_open()
        self._settle(key, reads=False)
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            raise KeyError(f"nothing is stored under key {key!r} ({len(self._entries)} keys held); write it first")
        if out is None:
            out = self._allocate(entry)
        self._check_device(out, "read")
        numel = entry.nbytes // entry.dtype.itemsize
        if out.dtype != entry.dtype or out.numel() != numel or not out.is_contiguous():
            raise ValueError(
                f"out is {'' if out.is_contiguous() else 'non-contiguous '}{out.dtype} with {out.numel()} "
                f"elements, but key {key!r} holds {entry.dtype} with {numel}; pass a contiguous tensor like the "
                "one written, or out=None"
            )
        handle = self._start_read(entry, out.reshape(-1).view(torch.uint8), out)
        readers = [reader for reader in self._reading.get(key, []) if not reader.done()]
        self._reading[key] = [*readers, handle]
        return handle

    def delete(self, key: str) -> None:
        """Drop the tensor stored under `key`, after the key's transfers under way finished.

        Raises:
            KeyError: nothing is stored under `key`.
        """
        self._check_open()
        self._settle(key, reads=True)
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is None:
            raise KeyError(f"nothing is stored under key {key!r}; nothing to delete")
        self._release(entry)

    def read_slice(self, key: str, start: int, nbytes: int) -> torch.Tensor:
        """Bytes [start, start + nbytes) of the tensor under `key`, read at once into a new uint8 tensor.

        For visiting stored tensors piece by piece (checkpoints), not for the training pipeline."""
        entry = self._slice_entry(key, start, nbytes)
        return self._read_slice(entry, start, nbytes)

    def write_slice(self, key: str, start: int, data: torch.Tensor) -> None:
        """Overwrite bytes from `start` of the tensor under `key` with `data`'s bytes, at once and in place
        (not atomic: for loading checkpoints into a store, whose failure fails the load)."""
        source = data.detach().contiguous().reshape(-1).view(torch.uint8)
        entry = self._slice_entry(key, start, source.numel())
        self._write_slice(key, entry, start, source)

    def _slice_entry(self, key: str, start: int, nbytes: int) -> _Entry[L]:
        self._check_open()
        self._settle(key, reads=True)
        entry = self._entries.get(key)
        if entry is None:
            raise KeyError(f"nothing is stored under key {key!r}; write it first")
        if start < 0 or nbytes < 0 or start + nbytes > entry.nbytes:
            raise ValueError(f"bytes [{start}, {start + nbytes}) are outside key {key!r}'s {entry.nbytes} bytes")
        return entry

    def __contains__(self, key: str) -> bool:
        self._settle(key, reads=False)
        return key in self._entries

    def nbytes(self) -> int:
        """Bytes of tensor data held (completed writes only; padding and spare buffers not counted)."""
        with self._lock:
            return sum(entry.nbytes for entry in self._entries.values())

    def close(self) -> None:
        """Wait for all transfers, then free everything the store holds. Closing twice is a no-op."""
        if self._closed:
            return
        for key in {*self._writing, *self._reading}:
            self._settle(key, reads=True)
        self._closed = True
        with self._lock:
            self._entries.clear()
        self._close_tier()

    def __enter__(self) -> Store[L]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _commit(self, key: str, entry: _Entry[L]) -> _Entry[L] | None:
        """Make `entry` the key's content; return the entry it replaced."""
        with self._lock:
            previous = self._entries.get(key)
            self._entries[key] = entry
        return previous

    def _settle(self, key: str, reads: bool) -> None:
        """Wait for the key's write under way (and its reads, when `reads`)."""
        pending: list[Handle[object]] = [self._writing.pop(key)] if key in self._writing else []
        if reads:
            pending += self._reading.pop(key, [])
        for handle in pending:
            with contextlib.suppress(Exception):  # the failure belongs to that handle's waiter; content is intact
                handle.wait()

    def _check_open(self) -> None:
        if self._closed:
            raise OffloadError(f"this {type(self).__name__} is closed; open a new store")

    def _check_device(self, tensor: torch.Tensor, operation: str) -> None:
        """Raise ValueError when this tier cannot `operation` (read/write) a tensor on `tensor.device`."""

    @abstractmethod
    def _start_write(self, key: str, source: torch.Tensor, dtype: torch.dtype, shape: torch.Size) -> Handle[None]:
        """Start copying `source` (flat uint8) to the tier; the handle commits the new entry when waited."""

    @abstractmethod
    def _start_read(self, entry: _Entry[L], out: torch.Tensor, result: torch.Tensor) -> Handle[torch.Tensor]:
        """Start copying `entry`'s bytes into `out` (flat uint8 view of `result`); the handle returns `result`."""

    @abstractmethod
    def _allocate(self, entry: _Entry[L]) -> torch.Tensor:
        """A new tensor to read `entry` into."""

    @abstractmethod
    def _release(self, entry: _Entry[L]) -> None:
        """Free the memory or file holding `entry`."""

    @abstractmethod
    def _close_tier(self) -> None:
        """Free all the tier's memory or files."""

    @abstractmethod
    def _read_slice(self, entry: _Entry[L], start: int, nbytes: int) -> torch.Tensor:
        """Read `nbytes` bytes of `entry` from `start`, synchronously."""

    @abstractmethod
    def _write_slice(self, key: str, entry: _Entry[L], start: int, source: torch.Tensor) -> None:
        """Overwrite bytes of `entry` from `start` with `source` (flat uint8), synchronously."""


class BufferPool:
    """Reusable page-aligned host buffers, so that a steady stream of same-sized tensors allocates once.

    Args:
        pinned: allocate page-locked buffers (for asynchronous CUDA copies).
    """

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self._spare: list[tuple[int, int, torch.Tensor]] = []  # (capacity, serial, buffer), sorted
        self._serial = itertools.count()
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least `nbytes` bytes: the smallest spare one below twice that, or a new one."""
        with self._lock:
            index = bisect.bisect_left(self._spare, (nbytes, -1))
            if index < len(self._spare) and self._spare[index][0] < 2 * nbytes + ALIGN:
                return self._spare.pop(index)[2]
        return empty_host(padded_size(nbytes), pinned=self.pinned)

    def give(self, buffer: torch.Tensor) -> None:
        """Return a buffer from `take` for reuse."""
        with self._lock:
            bisect.insort(self._spare, (buffer.numel(), next(self._serial), buffer))

    def clear(self) -> None:
        """Drop the spare buffers."""
        with self._lock:
            self._spare.clear()


class CpuStore(Store[torch.Tensor]):
    """Tensors in host memory: pooled buffers, pinned on CUDA so copies to and from the GPU are asynchronous.

    Args:
        pinned: use page-locked buffers; default: when a CUDA device is visible.
    """

    def __init__(self, *, pinned: bool | None = None) -> None:
        super().__init__()
        self._pool = BufferPool(pin_memory_available() if pinned is None else pinned)

    def _start_write(self, key: str, source: torch.Tensor, dtype: torch.dtype, shape: torch.Size) -> Handle[None]:
        buffer = self._pool.take(source.numel())
        entry = _Entry(dtype, shape, source.numel(), buffer)

        def finish() -> None:
            previous = self._commit(key, entry)
            if previous is not None:
                self._pool.give(previous.location)

        return then(copy_async(buffer[: source.numel()], source), finish)

    def _start_read(self, entry: _Entry[torch.Tensor], out: torch.Tensor, result: torch.Tensor) -> Handle[torch.Tensor]:
        return then(copy_async(out, entry.location[: entry.nbytes]), lambda: result)

    def _allocate(self, entry: _Entry[torch.Tensor]) -> torch.Tensor:
        return torch.empty(entry.shape, dtype=entry.dtype)

    def _release(self, entry: _Entry[torch.Tensor]) -> None:
        self._pool.give(entry.location)

    def _close_tier(self) -> None:
        self._pool.clear()

    def _read_slice(self, entry: _Entry[torch.Tensor], start: int, nbytes: int) -> torch.Tensor:
        return entry.location[start : start + nbytes].clone()

    def _write_slice(self, key: str, entry: _Entry[torch.Tensor], start: int, source: torch.Tensor) -> None:
        entry.location[start : start + source.numel()].copy_(source)
