"""The NVMe store's files: the asynchronous I/O engine (kernel AIO or a thread pool), swap directories.

Each transfer of one file is cut into spans of `block_size * queue_depth` bytes; the spans go to a pool
of `threads` workers, so up to `threads` system calls are in flight, each carrying `queue_depth`
blocks that the kernel submits to the disk together. Files are opened with O_DIRECT where the
filesystem accepts it (no page cache: the disk's own speed, and no second copy of the data in host
memory); where it does not (EINVAL), with buffered I/O and a warning.

O_DIRECT needs file offsets, lengths and memory addresses aligned to the disk's block size. Files are
therefore padded to a multiple of `ALIGN` bytes, and a span whose memory is not page-aligned (a tensor
from `torch.empty` starts 64 bytes into a page) or that holds the padded tail goes through a per-worker
aligned bounce buffer. Tensors from `empty_host` or `tidal.offload.empty_aligned` skip that copy.

`engine: aio` moves the spans with Linux kernel AIO instead (`tidal.offload.aio`: the interface
DeepSpeed's libaio op wraps, called through `syscall()`, nothing to build): the calling thread submits,
the disk's DMA moves the bytes, and no worker thread takes the GIL, which the training thread otherwise
gives up once per request. It serves transfers that need no bounce buffer (whole pages, or aligned
memory and sizes); the others still go through the pool. `auto` picks aio where O_DIRECT works and the
kernel allows AIO, else the pool. DeepSpeed's own op is not used: its handle waits for all queued
requests together, while tidal needs a handle per transfer.

Each store works in its own swap directory, `<parent>/tidal-swap-<pid>-<random>/`, marked with the
owner's pid, host and start time, so that a directory left by a process that crashed is recognised
(and reported, never reused or deleted) when the next store opens in the same parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import socket
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import psutil
import torch

from tidal.config import NvmeConfig
from tidal.memory.probe import format_bytes
from tidal.offload.aio import KernelAio
from tidal.runtime.device import empty_host, features

ALIGN = 4096
"""File sizes, offsets and buffer addresses of O_DIRECT transfers are multiples of this, bytes."""
SWAP_PREFIX = "tidal-swap-"
"""Name prefix of the directory each NVMe store creates for its files."""
OWNER_FILE = "owner.json"
"""The marker in a swap directory: pid, host and start time of the process that owns it."""
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class OffloadError(RuntimeError):
    """An offload tier failed: the message names the file, the sizes involved and what to change."""


class LeftoverSwapWarning(UserWarning):
    """A swap directory left by a tidal process that is gone (it crashed or was killed)."""


def padded_size(nbytes: int) -> int:
    """Bytes a file of `nbytes` bytes of data takes on disk: `nbytes` rounded up to `ALIGN`."""
    return -(-nbytes // ALIGN) * ALIGN


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU tensor's bytes; keep `tensor` alive while it is used."""
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


class IoHandle:
    """One file transfer under way. `wait()` returns None or raises its `OffloadError`."""

    def __init__(self, ring: KernelAio | None = None) -> None:
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._ring = ring
        """The kernel AIO context whose completions finish this transfer (None: pool workers finish it)."""

    def wait(self) -> None:
        if self._ring is not None:
            self._ring.wait_until(self._finished.is_set)
        self._finished.wait()
        if self._error is not None:
            raise self._error

    def done(self) -> bool:
        if self._ring is not None and not self._finished.is_set():
            self._ring.poll()
        return self._finished.is_set()

    def _finish(self, error: BaseException | None) -> None:
        self._error = error
        self._finished.set()


class IoEngine:
    """Reads and writes whole files from and to host tensors, asynchronously.

    Args:
        config: block size (bytes), queue depth (blocks per request), threads (workers; with aio, the
            requests in flight are `threads` spans' bytes) and engine.
        directory: an existing directory on the filesystem the engine will work on; a probe file
            created and removed there decides whether O_DIRECT is used.
    Raises:
        OffloadError: `config.engine` is "aio" where kernel AIO cannot work, or `directory` is not writable.
    """

    def __init__(self, config: NvmeConfig, directory: str) -> None:
        self.span_bytes = config.block_size * config.queue_depth
        """Bytes per system call (one span), a multiple of `ALIGN`."""
        self.direct, self.note = _probe_direct(directory)
        """Whether files are opened with O_DIRECT; `note` says why not (None when they are)."""
        if config.engine == "aio" and not (self.direct and features().kernel_aio):
            why = self.note if not self.direct else "this kernel or container refuses kernel AIO (io_setup)"
            raise OffloadError(
                f"offload.nvme.engine='aio' cannot work here: {why}; use engine 'threads' or 'auto' (which picks "
                "the thread pool where aio cannot work)"
            )
        if self.note is not None:
            warnings.warn(self.note, stacklevel=3)
        use_aio = config.engine != "threads" and self.direct and features().kernel_aio
        self._ring = KernelAio(max_bytes=config.threads * self.span_bytes) if use_aio else None
        self.kind = "aio" if use_aio else "threads"
        """The engine in use: "aio" (kernel AIO; bounce-buffered transfers still use the pool) or "threads"."""
        self._pool = ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="tidal-nvme")
        self._staging = threading.local()

    def write(self, path: str, data: torch.Tensor) -> IoHandle:
        """Write `data` into file `path`, padded with zeros to `ALIGN`.

        An existing file is overwritten in place, its disk blocks reused (resized first when its size
        differs): cheaper than freeing and allocating them again, especially where freeing discards.

        Args:
            path: the file to write, created when missing; on failure it is removed, so it either
                holds all of `data` or does not exist.
            data: a contiguous 1-D uint8 CPU tensor; it must not change until the handle finished.
        Raises:
            OffloadError: at once when the file cannot be created or its space reserved, otherwise
                from the handle's `wait()`.
        """
        needed = padded_size(_check_bytes(data))
        handle = self._open(path, os.O_WRONLY | os.O_CREAT, "creating", needed)
        try:
            if os.fstat(handle).st_size > needed:
                os.ftruncate(handle, needed)
            _reserve(handle, needed)
        except OSError as exc:
            os.close(handle)
            _remove(path)
            raise _io_error("reserving space for", path, exc, needed) from exc
        return self._start(_Transfer(handle, path, data, writing=True))

    def read(self, path: str, out: torch.Tensor) -> IoHandle:
        """Read the first `out.numel()` bytes of file `path` into `out`.

        Args:
            path: a file written by `write` with exactly `out.numel()` bytes of data.
            out: a contiguous 1-D uint8 CPU tensor that receives the bytes.
        Raises:
            OffloadError: at once when the file is missing or its size is not the padded size of
                `out` (truncated or replaced), otherwise from the handle's `wait()`.
        """
        nbytes = _check_bytes(out)
        handle = self._open(path, os.O_RDONLY, "opening", 0)
        size = os.fstat(handle).st_size
        if size != padded_size(nbytes):
            os.close(handle)
            raise OffloadError(
                f"swap file {path!r} is {size} bytes, but {padded_size(nbytes)} were written ({nbytes} bytes of "
                f"data padded to {ALIGN}); it was truncated or changed outside tidal and its content is lost: "
                "write the tensor again, or resume from a checkpoint"
            )
        return self._start(_Transfer(handle, path, out, writing=False))

    def write_pages(self, fd: int, path: str, offset: int, data: torch.Tensor) -> IoHandle:
        """Write the memory pages `data` lies on, whole, at byte `offset` of the open file `fd`, without a copy.

        The file then holds `data` at `offset + data.data_ptr() % ALIGN` (its place in its first
        page), amid whatever else those pages hold (the bytes around `data` are read, never changed).
        For a file holding many tensors (`SwapFileStore`): the caller opened `fd`, reserved the
        `page_span(data)` bytes from `offset` and keeps the file open; the engine neither closes nor
        removes it.

        Args:
            fd: a descriptor open for writing; `path`: its name, for error messages.
            offset: a multiple of `ALIGN`.
            data: a contiguous 1-D uint8 CPU tensor; it must not change until the handle finished.
        """
        _check_bytes(data)
        return self._start(_Transfer(fd, path, data, writing=True, base=offset, owned=False, pages=True))

    def read_pages(self, fd: int, path: str, offset: int, out: torch.Tensor) -> IoHandle:
        """Read what `write_pages` wrote at `offset` into the pages `out` lies on (whole: the bytes around
        `out` on them are overwritten, so they must belong to the caller); `out` must start at the
        same place in its page as the tensor written did."""
        _check_bytes(out)
        return self._start(_Transfer(fd, path, out, writing=False, base=offset, owned=False, pages=True))

    def close(self) -> None:
        """Wait for the transfers under way and stop the workers."""
        if self._ring is not None:
            self._ring.close()
        self._pool.shutdown(wait=True)

    def _open(self, path: str, flags: int, action: str, needed: int) -> int:
        flags |= os.O_CLOEXEC | (os.O_DIRECT if self.direct else 0)
        try:
            return os.open(path, flags, 0o600)
        except OSError as exc:
            raise _io_error(action, path, exc, needed) from exc

    def _start(self, transfer: _Transfer) -> IoHandle:
        nbytes = transfer.nbytes
        transfer.zero_copy = not self.direct or transfer.data.data_ptr() % ALIGN == 0
        spans = range(0, padded_size(nbytes), self.span_bytes)
        transfer.remaining = len(spans)
        if not spans:
            transfer.finish()
        direct_memory = transfer.pages or (transfer.zero_copy and nbytes % ALIGN == 0)
        if self._ring is not None and direct_memory:
            transfer.handle._ring = self._ring
            for offset in spans:
                length = min(self.span_bytes, padded_size(nbytes) - offset)
                done = functools.partial(_aio_span_done, transfer)
                address, at = transfer.address + offset, transfer.base + offset
                self._ring.submit(transfer.fd, address, length, at, writing=transfer.writing, done=done)
            return transfer.handle
        transfer.view = memoryview((ctypes.c_char * nbytes).from_address(transfer.address)).cast("B")
        for offset in spans:
            self._pool.submit(self._run_span, transfer, offset, min(self.span_bytes, padded_size(nbytes) - offset))
        return transfer.handle

    def _run_span(self, transfer: _Transfer, offset: int, length: int) -> None:
        try:
            if transfer.error is None:  # after a failure the remaining spans are skipped
                self._move_span(transfer, offset, length)
        except OSError as exc:
            transfer.fail(_io_error(transfer.action, transfer.path, exc, transfer.needed))
        except Exception as exc:  # anything else must still reach the waiter, or wait() would hang
            transfer.fail(exc)
        transfer.span_done()

    def _move_span(self, transfer: _Transfer, offset: int, length: int) -> None:
        if transfer.pages:  # whole pages: the view covers every span
            _move_all(transfer, transfer.view[offset : offset + length], offset)
            return
        data = transfer.data
        end = min(offset + length, data.numel())
        if transfer.zero_copy and end == offset + length:
            _move_all(transfer, transfer.view[offset:end], offset)
            return
        stage, stage_view = self._stage()
        if transfer.writing:
            stage[: end - offset].copy_(data[offset:end])
            stage[end - offset : length].zero_()
            _move_all(transfer, stage_view[:length], offset)
        else:
            _move_all(transfer, stage_view[:length], offset)
            data[offset:end].copy_(stage[: end - offset])

    def _stage(self) -> tuple[torch.Tensor, memoryview]:
        """This worker's aligned bounce buffer of one span, allocated on first use."""
        if not hasattr(self._staging, "buffer"):
            buffer = empty_host(self.span_bytes)
            self._staging.buffer = (buffer, byte_view(buffer))
        return self._staging.buffer


class _Transfer:
    """One file's transfer: its descriptor, its memory and how many spans are still under way."""

    def __init__(
        self,
        handle: int,
        path: str,
        data: torch.Tensor,
        writing: bool,
        *,
        base: int = 0,
        owned: bool = True,
        pages: bool = False,
    ) -> None:
        self.fd = handle
        self.base = base
        """Where the data starts in the file, bytes."""
        self.owned = owned
        """Whether the transfer closes the descriptor when done (and removes the file after a failed write)."""
        self.pages = pages
        """Whether the whole pages under `data` move (`write_pages`), not just its bytes."""
        self.path = path
        self.data = data
        lead, span = page_span(data) if pages else (0, data.numel())
        self.address = data.data_ptr() - lead
        """Where the bytes that move start in memory: `data`'s, or its first page's."""
        self.nbytes = span
        """Bytes that move: `data`'s, or its whole pages'."""
        self.view = memoryview(b"")
        """Those bytes as a memoryview, for the pool's system calls (set when the pool moves them)."""
        self.writing = writing
        self.action = "writing" if writing else "reading"
        self.needed = padded_size(data.numel()) if writing else 0  # bytes added to the disk, for error messages
        self.zero_copy = False
        self.remaining = 0
        self.error: BaseException | None = None
        self.handle = IoHandle()
        self._lock = threading.Lock()

    def fail(self, error: BaseException) -> None:
        with self._lock:
            self.error = self.error or error

    def span_done(self) -> None:
        with self._lock:
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            self.finish()

    def finish(self) -> None:
        if not self.owned:
            self.handle._finish(self.error)
            return
        try:
            os.close(self.fd)
        except OSError as exc:  # some filesystems report delayed write errors at close
            self.fail(_io_error(f"{self.action} (at close)", self.path, exc, self.needed))
        if self.error is not None and self.writing:
            _remove(self.path)
        self.handle._finish(self.error)


def _aio_span_done(transfer: _Transfer, error: OSError | None) -> None:
    if error is not None:
        transfer.fail(_io_error(transfer.action, transfer.path, error, transfer.needed))
    transfer.span_done()


def _move_all(transfer: _Transfer, view: memoryview, offset: int) -> None:
    """pwritev/preadv all of `view` at `offset`, continuing after short transfers."""
    call = os.pwritev if transfer.writing else os.preadv
    offset += transfer.base
    done = 0
    while done < len(view):
        moved = call(transfer.fd, [view[done:]], offset + done)
        if moved == 0:
            raise OSError(errno.EIO, f"file ended {offset + done} bytes in, before the data did")
        done += moved


def page_span(tensor: torch.Tensor) -> tuple[int, int]:
    """(bytes before `tensor` in its first page, bytes of the `ALIGN`-sized pages it lies on)."""
    lead = tensor.data_ptr() % ALIGN
    return lead, padded_size(lead + tensor.numel() * tensor.element_size())


def _check_bytes(tensor: torch.Tensor) -> int:
    if tensor.dtype != torch.uint8 or tensor.dim() != 1 or not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError(
            f"the I/O engine moves contiguous 1-D uint8 CPU tensors, got {tensor.dtype} of shape "
            f"{tuple(tensor.shape)} on {tensor.device}; pass tensor.reshape(-1).view(torch.uint8) of a CPU tensor"
        )
    return tensor.numel()


def _reserve(handle: int, nbytes: int) -> None:
    """Allocate the file's blocks up to `nbytes`, so that a full disk fails before any data moved."""
    try:
        if nbytes:
            os.posix_fallocate(handle, 0, nbytes)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        # this filesystem cannot preallocate: blocks are then allocated as the spans land


def _probe_direct(directory: str) -> tuple[bool, str | None]:
    """Whether files in `directory` can be opened with O_DIRECT, and a note when they cannot."""
    if not hasattr(os, "O_DIRECT"):
        return False, "O_DIRECT is not offered on this OS; NVMe offload uses buffered I/O"
    path = os.path.join(directory, f".tidal-direct-probe-{os.getpid()}-{threading.get_ident()}")
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise _io_error("creating", path, exc, 0) from exc
        return False, (
            f"the filesystem of {directory!r} refuses O_DIRECT ({exc.strerror}); NVMe offload uses buffered I/O "
            "there, through the page cache: point the offload path at a local disk (ext4, xfs) for full speed"
        )
    _remove(path)
    return True, None


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _io_error(action: str, path: str, exc: OSError, needed: int) -> OffloadError:
    """An OffloadError for `exc` raised while `action` file `path`; `needed`: bytes to write (0 for reads)."""
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    message = f"{action} {path!r} failed: {exc.strerror or exc} ({code})"
    if needed:
        try:
            free = format_bytes(shutil.disk_usage(os.path.dirname(path)).free)
        except OSError:
            free = "unknown"
        message += f"; {format_bytes(needed)} needed, {free} free there"
    if exc.errno in _NO_SPACE:
        fix = "point the offload path at a filesystem with more free space, or offload less at once (a smaller chunk)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "point the offload path at a directory this user can write"
    else:
        fix = "check the disk (dmesg) and the offload path, or point the offload path at another disk"
    return OffloadError(f"{message}; {fix}")


def create_swap_directory(parent: str) -> str:
    """Create a new swap directory in `parent` (created when missing) and report the leftovers there.

    Returns:
        The new directory's absolute path, holding only its owner marker.
    Raises:
        OffloadError: `parent` cannot be created or written.
    Warns:
        LeftoverSwapWarning: for each swap directory in `parent` whose owner process on this host is gone.
    """
    parent = os.path.abspath(parent)
    try:
        os.makedirs(parent, exist_ok=True)
        directory = tempfile.mkdtemp(prefix=f"{SWAP_PREFIX}{os.getpid()}-", dir=parent)
        _write_owner(directory)
    except OSError as exc:
        raise OffloadError(
            f"cannot create a swap directory in {parent!r} ({exc.strerror}); "
            "point the offload path at a writable directory on a local disk"
        ) from exc
    _report_leftovers(parent, directory)
    return directory


def _write_owner(directory: str) -> None:
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": psutil.Process().create_time()}
    with open(os.path.join(directory, OWNER_FILE), "w") as marker:
        json.dump(owner, marker)


def _report_leftovers(parent: str, own: str) -> None:
    """Warn about each swap directory in `parent` whose owner process, on this host, is gone."""
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not name.startswith(SWAP_PREFIX) or path == own or not os.path.isdir(path):
            continue
        owner = _dead_owner(path)
        if owner is None:
            continue
        files = [entry for entry in os.scandir(path) if entry.is_file() and entry.name != OWNER_FILE]
        size = sum(entry.stat().st_size for entry in files)
        warnings.warn(
            LeftoverSwapWarning(
                f"{path} holds {len(files)} swap files ({format_bytes(size)}) of tidal process {owner['pid']} on "
                f"{owner['host']}, which is no longer running (it crashed or was killed). tidal does not reuse or "
                f"delete it; remove it with `rm -rf {path}` once no job needs its content"
            ),
            stacklevel=4,
        )


def _dead_owner(path: str) -> dict[str, object] | None:
    """The owner marker of swap directory `path` if its process is gone; None when alive or unknown."""
    try:
        with open(os.path.join(path, OWNER_FILE)) as marker:
            owner = json.load(marker)
        pid, host, started = int(owner["pid"]), owner["host"], float(owner["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no readable marker: not a directory tidal finished creating
    if host != socket.gethostname():
        return None  # another host's process cannot be checked from here
    try:
        alive = abs(psutil.Process(pid).create_time() - started) < 1.0  # same pid, same process (not a reuse)
    except psutil.NoSuchProcess:
        alive = False
    except psutil.AccessDenied:
        alive = True
    return None if alive else owner
