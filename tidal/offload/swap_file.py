"""The NVMe tier for short-lived tensors: one swap file whose space is reused, no file per tensor.

Saved activations are written in forward and read back and dropped in backward, a hundred or more per
step. `NvmeStore` gives each tensor its own file, written under a temporary name and renamed (the
content of a key survives a failed write): right for optimizer state, but for an activation that lives
a fraction of a step the create, rename and unlink cost more CPU than the copy itself (an unlink is
about a millisecond on a disk mounted with `discard`). `SwapFileStore` keeps one file open with
O_DIRECT and gives each tensor an extent of it: a freed extent is merged with its free neighbours and
reused by the next tensor that fits (best fit), so a steady training loop stops growing the file
after its first step and then issues no file-system call but the reads and writes themselves.

The file grows in steps with its blocks reserved (`posix_fallocate`), so a full disk fails the write
that needed the space, at once, with the sizes in the message; nothing stored before is affected.
Tensors are read back into fresh memory from torch's allocator (aligned within a slightly larger
block), which recycles the memory of tensors freed before; fresh anonymous maps, as `NvmeStore` uses
for its reads, page-fault on every 4 KiB (measured here: ten times the CPU time for the same bytes).

A key's content is not kept over a failed rewrite (activations are never rewritten). The file lives in
a swap directory like `NvmeStore`'s (owner marker, leftovers of crashed processes reported) and goes
with it at `close()`, garbage collection or interpreter exit.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import shutil
import threading
import weakref
from dataclasses import dataclass

import torch

from tidal.config import NvmeConfig
from tidal.offload.nvme import (
    ALIGN,
    IoEngine,
    IoHandle,
    OffloadError,
    _io_error,
    byte_view,
    create_swap_directory,
    padded_size,
    page_span,
)
from tidal.offload.store import Store, _Entry
from tidal.runtime.device import Handle

SWAP_FILE = "tensors.swap"
"""The name of the store's file in its swap directory."""
MIN_GROWTH = 16 * 2**20
"""Bytes the file grows by at least when it is full."""
_OWN_PAGES = "_tidal_swap_pages"
"""Marks a tensor `_allocate` made: the rest of its pages is the store's, so a read may fill them whole."""


class Extents:
    """Free space inside a file of `end` bytes: (offset, size) extents, sorted and merged; best-fit allocation."""

    def __init__(self) -> None:
        self.end = 0
        """Bytes of the file in use or freed; space past it was never handed out."""
        self._free: list[tuple[int, int]] = []

    def take(self, size: int) -> int:
        """The offset of `size` free bytes: the smallest free extent that holds them, else the end."""
        fits = [(length, offset) for offset, length in self._free if length >= size]
        if not fits:
            offset, self.end = self.end, self.end + size
            return offset
        length, offset = min(fits)
        index = bisect.bisect_left(self._free, (offset, length))
        if length == size:
            del self._free[index]
        else:
            self._free[index] = (offset + size, length - size)
        return offset

    def give(self, offset: int, size: int) -> None:
        """Free [offset, offset + size), merging it with free neighbours (and with the end)."""
        index = bisect.bisect_left(self._free, (offset, 0))
        if index < len(self._free) and self._free[index][0] == offset + size:
            size += self._free.pop(index)[1]
        if index > 0 and sum(self._free[index - 1]) == offset:
            index -= 1
            offset, size = self._free[index][0], self._free.pop(index)[1] + size
        if offset + size == self.end:
            self.end = offset
        else:
            self._free.insert(index, (offset, size))

    def free_bytes(self) -> int:
        """Bytes below `end` not handed out."""
        return sum(size for _, size in self._free)


@dataclass(frozen=True)
class _Extent:
    """Where a tensor is in the swap file: its pages from `offset`, `size` bytes, the tensor `lead` bytes in."""

    offset: int
    lead: int
    size: int


class SwapFileStore(Store[_Extent]):
    """Short-lived tensors at offsets of one swap file, moved by the asynchronous `IoEngine`; see the module doc.

    Args:
        directory: parent directory of the store's swap directory; created when missing.
        config: the I/O engine's settings (block size, queue depth, threads).
    Raises:
        OffloadError: `directory` cannot be created or written.
    """

    def __init__(self, directory: str | os.PathLike[str], config: NvmeConfig | None = None) -> None:
        super().__init__()
        self.directory = create_swap_directory(os.fspath(directory))
        self._remove_directory = weakref.finalize(self, shutil.rmtree, self.directory, ignore_errors=True)
        self._engine = IoEngine(config or NvmeConfig(), self.directory)
        self.path = os.path.join(self.directory, SWAP_FILE)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_DIRECT if self._engine.direct else 0)
        try:
            self._fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            self._engine.close()
            self._remove_directory()
            raise _io_error("creating", self.path, exc, 0) from exc
        self._close_file = weakref.finalize(self, _close_quietly, self._fd)  # runs once: the number may be reused
        self._extents = Extents()
        self._size = 0
        """Bytes of the file (reserved)."""
        self._space_lock = threading.Lock()

    @property
    def direct(self) -> bool:
        """Whether the file is read and written with O_DIRECT (False: buffered, see the engine's warning)."""
        return self._engine.direct

    @property
    def engine_kind(self) -> str:
        """The I/O engine moving the bytes: "aio" (kernel AIO) or "threads" (see `IoEngine.kind`)."""
        return self._engine.kind

    def file_bytes(self) -> tuple[int, int]:
        """(bytes of the file, bytes of it not held by any tensor)."""
        with self._space_lock:
            return self._size, self._size - self._extents.end + self._extents.free_bytes()

    def _check_device(self, tensor: torch.Tensor, operation: str) -> None:
        if tensor.device.type != "cpu":
            raise ValueError(
                f"SwapFileStore.{operation} takes CPU tensors, got one on {tensor.device}; copy it to host memory first"
            )

    def _start_write(self, key: str, source: torch.Tensor, dtype: torch.dtype, shape: torch.Size) -> Handle[None]:
        lead, size = page_span(source)
        offset = self._take(size)
        try:
            transfer = self._engine.write_pages(self._fd, self.path, offset, source)
        except BaseException:
            self._give(offset, size)
            raise
        return _SwapWrite(self, transfer, key, _Entry(dtype, shape, source.numel(), _Extent(offset, lead, size)))

    def _start_read(self, entry: _Entry[_Extent], out: torch.Tensor, result: torch.Tensor) -> Handle[torch.Tensor]:
        extent = entry.location
        if getattr(result, _OWN_PAGES, False):  # allocated here, the pages around it included
            transfer = self._engine.read_pages(self._fd, self.path, extent.offset, out)
            return _SwapRead(transfer, result)
        pages = self._pages(extent, entry.nbytes)  # `out` is the caller's and starts elsewhere in its page
        transfer = self._engine.read_pages(self._fd, self.path, extent.offset, pages)
        return _SwapRead(transfer, result, copy=(out, pages))

    def _allocate(self, entry: _Entry[_Extent]) -> torch.Tensor:
        tensor = self._pages(entry.location, entry.nbytes).view(entry.dtype).reshape(entry.shape)
        setattr(tensor, _OWN_PAGES, True)
        return tensor

    @staticmethod
    def _pages(extent: _Extent, nbytes: int) -> torch.Tensor:
        """`nbytes` of new memory at `extent.lead` bytes into a page, on whole pages of their own.

        From torch's allocator, which recycles freed memory: fresh anonymous maps fault on every page."""
        block = torch.empty(extent.size + ALIGN, dtype=torch.uint8)
        start = -block.data_ptr() % ALIGN + extent.lead
        return block[start : start + nbytes]

    def _release(self, entry: _Entry[_Extent]) -> None:
        self._give(entry.location.offset, entry.location.size)

    def _close_tier(self) -> None:
        self._engine.close()
        self._close_file()
        self._remove_directory()

    def _read_slice(self, entry: _Entry[_Extent], start: int, nbytes: int) -> torch.Tensor:
        out = torch.empty(nbytes, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as f:
            got = os.preadv(f.fileno(), [byte_view(out)], entry.location.offset + entry.location.lead + start)
        if got != nbytes:
            raise OffloadError(f"{self.path!r} is shorter than written: its content is lost")
        return out

    def _write_slice(self, key: str, entry: _Entry[_Extent], start: int, source: torch.Tensor) -> None:
        with open(self.path, "r+b", buffering=0) as f:
            os.pwrite(f.fileno(), byte_view(source), entry.location.offset + entry.location.lead + start)
            os.fdatasync(f.fileno())

    def _take(self, size: int) -> int:
        """An extent of `size` bytes, growing the file (its blocks reserved) when none is free."""
        with self._space_lock:
            offset = self._extents.take(size)
            if self._extents.end > self._size:
                try:
                    self._grow(self._extents.end)
                except OffloadError:
                    self._extents.give(offset, size)
                    raise
            return offset

    def _grow(self, needed: int) -> None:
        """Make the file at least `needed` bytes, by a quarter of its size or `MIN_GROWTH` at least."""
        wanted = padded_size(max(needed, self._size + max(self._size // 4, MIN_GROWTH)))
        try:
            _reserve_range(self._fd, self._size, wanted)
        except OSError:
            try:  # a disk without room for the whole step may still hold what is needed
                _reserve_range(self._fd, self._size, needed)
            except OSError as exc:
                raise _io_error("growing swap file", self.path, exc, needed - self._size) from exc
            wanted = needed
        self._size = wanted

    def _give(self, offset: int, size: int) -> None:
        with self._space_lock:
            self._extents.give(offset, size)


class _SwapWrite:
    """A write into the swap file; its first `wait()` commits the key, or frees the extent when it failed."""

    def __init__(self, store: SwapFileStore, transfer: IoHandle, key: str, entry: _Entry[_Extent]) -> None:
        self._store, self._transfer, self._key, self._entry = store, transfer, key, entry
        self._settled = False
        self._lock = threading.Lock()

    def done(self) -> bool:
        return self._transfer.done()

    def wait(self) -> None:
        try:
            self._transfer.wait()
        except BaseException:
            self._settle(ok=False)
            raise
        self._settle(ok=True)

    def _settle(self, ok: bool) -> None:
        with self._lock:
            if self._settled:
                return
            self._settled = True
        extent = self._entry.location
        if not ok:
            self._store._give(extent.offset, extent.size)
            return
        previous = self._store._commit(self._key, self._entry)
        if previous is not None:
            self._store._give(previous.location.offset, previous.location.size)


class _SwapRead:
    """A read; `copy`: (the caller's tensor, the pages read into) when the bytes still have to move there."""

    def __init__(
        self, transfer: IoHandle, result: torch.Tensor, copy: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        self._transfer, self._result, self._copy = transfer, result, copy

    def done(self) -> bool:
        return self._transfer.done()

    def wait(self) -> torch.Tensor:
        self._transfer.wait()
        if self._copy is not None:
            out, pages = self._copy
            self._copy = None
            out.copy_(pages)
        return self._result


def _reserve_range(fd: int, start: int, end: int) -> None:
    """Allocate the file's blocks in [start, end) (or, where the filesystem cannot, extend the file)."""
    try:
        os.posix_fallocate(fd, start, end - start)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        os.ftruncate(fd, end)


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
