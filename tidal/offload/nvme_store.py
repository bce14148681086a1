"""The NVMe tier: tensors in files on a local disk, moved by the asynchronous I/O engine (see store.py's rules)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import shutil
import weakref
import zlib

import torch

from tidal.config import NvmeConfig
from tidal.offload.nvme import IoEngine, OffloadError, byte_view, create_swap_directory, padded_size
from tidal.offload.store import Store, _Entry, empty_aligned
from tidal.runtime.device import Handle, then


class NvmeStore(Store[str]):
    """Tensors in files on a local disk, one file per key, moved by the asynchronous `IoEngine`.

    The store creates its own directory `<directory>/tidal-swap-<pid>-<random>/` holding an owner marker
    and one file per key (the data padded to 4 KiB). A write goes to `<file>.tmp`, which is renamed over
    the key's file only when complete. The replaced file is kept as a spare, which the next write
    overwrites in place: freeing and allocating blocks cost a quarter of the write speed on a disk
    mounted with `discard`. There are at most as many spares as overwrites under way at once. The
    directory is removed by `close()`, when the store is garbage collected, or at interpreter exit.
    Directories in the same parent left by a tidal process that is gone are reported when a store
    opens (`LeftoverSwapWarning`) and left in place.

    Args:
        directory: parent directory of the store's directory; created when missing.
        config: the I/O engine's settings (block size, queue depth, threads, engine).
        verify: keep a CRC-32 per key and check it on every read (costs a pass over the bytes).
    Raises:
        OffloadError: `directory` cannot be created or written, or `config.engine` is not available.
    """

    def __init__(self, directory: str | os.PathLike[str], config: NvmeConfig | None = None, *, verify: bool = False):
        super().__init__()
        self.directory = create_swap_directory(os.fspath(directory))
        # rmtree at collection or exit too; ignore_errors: a directory that stays is reported by the next store
        self._remove_directory = weakref.finalize(self, shutil.rmtree, self.directory, ignore_errors=True)
        self._engine = IoEngine(config or NvmeConfig(), self.directory)
        self.verify = verify
        self._files: dict[str, str] = {}
        self._file_names = itertools.count()
        self._spares: list[tuple[str, int]] = []
        """(path, bytes) of files no key uses any more, overwritten by the next writes (no allocation, no discard)."""
        self._spare_names = itertools.count()

    @property
    def direct(self) -> bool:
        """Whether files are read and written with O_DIRECT (False: buffered, see the engine's warning)."""
        return self._engine.direct

    @property
    def engine_kind(self) -> str:
        """The I/O engine moving the bytes: "aio" (kernel AIO) or "threads" (see `IoEngine.kind`)."""
        return self._engine.kind

    def _check_device(self, tensor: torch.Tensor, operation: str) -> None:
        if tensor.device.type != "cpu":
            raise ValueError(
                f"NvmeStore.{operation} takes CPU tensors, got one on {tensor.device}; "
                "copy it to host memory first (CpuStore, or tidal.runtime.device.copy_async into empty_aligned)"
            )

    def _start_write(self, key: str, source: torch.Tensor, dtype: torch.dtype, shape: torch.Size) -> Handle[None]:
        path = self._files.get(key)
        if path is None:  # a counter, not len(self._files): deleted keys leave the map
            path = self._files[key] = os.path.join(self.directory, f"{next(self._file_names):08d}.swap")
        temporary = f"{path}.tmp"
        spare = self._take_spare(padded_size(source.numel()))
        if spare is not None:
            with contextlib.suppress(OSError):  # a spare that cannot be moved stays until close() removes it
                os.replace(spare, temporary)
        checksum = zlib.crc32(byte_view(source)) if self.verify else None
        transfer = self._engine.write(temporary, source)

        def finish() -> None:
            spare = self._link_spare(path)
            try:
                os.replace(temporary, path)
            except OSError as exc:
                if spare is not None:
                    os.unlink(spare[0])
                raise OffloadError(
                    f"renaming {temporary} to {path!r} failed ({exc.strerror}); key {key!r} keeps its previous "
                    "content; check the disk (dmesg) or point the offload path at another disk"
                ) from exc
            if spare is not None:
                with self._lock:
                    self._spares.append(spare)
            self._commit(key, _Entry(dtype, shape, source.numel(), path, checksum))

        return then(transfer, finish)

    def _take_spare(self, nbytes: int) -> str | None:
        """Remove and return a spare file: one of `nbytes` bytes if any, else the newest; None if none."""
        with self._lock:
            sizes = [size for _, size in self._spares]
            return self._spares.pop(sizes.index(nbytes) if nbytes in sizes else -1)[0] if sizes else None

    def _link_spare(self, path: str) -> tuple[str, int] | None:
        """A second name for file `path`, and its size, so that replacing `path` keeps its blocks; None when
        `path` does not exist (a new key) or the filesystem has no hard links (the old file is then freed)."""
        spare = os.path.join(self.directory, f"spare-{next(self._spare_names)}")
        try:
            os.link(path, spare)
        except OSError:
            return None
        return spare, os.stat(spare).st_size

    def _start_read(self, entry: _Entry[str], out: torch.Tensor, result: torch.Tensor) -> Handle[torch.Tensor]:
        def finish() -> torch.Tensor:
            if entry.checksum is not None and zlib.crc32(byte_view(out)) != entry.checksum:
                raise OffloadError(
                    f"swap file {entry.location!r} read back with a CRC-32 other than the one written: the disk or "
                    "something outside tidal changed it, and its content is lost; write it again or resume from a "
                    "checkpoint, and check the disk (dmesg)"
                )
            return result

        return then(self._engine.read(entry.location, out), finish)

    def delete(self, key: str) -> None:
        super().delete(key)
        self._files.pop(key, None)  # activations use a new key per tensor per step: the map must not grow

    def _allocate(self, entry: _Entry[str]) -> torch.Tensor:
        return empty_aligned(entry.shape, entry.dtype, pinned=False)

    def _release(self, entry: _Entry[str]) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.location)

    def _close_tier(self) -> None:
        self._engine.close()
        self._remove_directory()

    # Slices use buffered I/O (any offset); Linux writes back dirty cached pages before an O_DIRECT
    # read of the same range, and the write is synced before returning.
    def _read_slice(self, entry: _Entry[str], start: int, nbytes: int) -> torch.Tensor:
        out = torch.empty(nbytes, dtype=torch.uint8)
        fd = os.open(entry.location, os.O_RDONLY | os.O_CLOEXEC)
        try:
            got = os.preadv(fd, [byte_view(out)], start)
        except OSError as exc:
            raise OffloadError(f"reading {entry.location!r} failed ({exc.strerror}); check the disk") from exc
        finally:
            os.close(fd)
        if got != nbytes:
            raise OffloadError(
                f"{entry.location!r} is shorter than written: its content is lost; resume from a checkpoint"
            )
        return out

    def _write_slice(self, key: str, entry: _Entry[str], start: int, source: torch.Tensor) -> None:
        fd = os.open(entry.location, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, byte_view(source), start)
            os.fdatasync(fd)
        except OSError as exc:
            raise OffloadError(f"writing into {entry.location!r} failed ({exc.strerror}); check the disk") from exc
        finally:
            os.close(fd)
        if entry.checksum is not None:
            with open(entry.location, "rb") as f:
                checksum = zlib.crc32(f.read(entry.nbytes))
            self._commit(key, dataclasses.replace(entry, checksum=checksum))
