"""Hardware probes: GPUs (NVML), host memory and cores (psutil), and one directory's disk bandwidth.

Each probe is a plain function that returns a frozen dataclass. `tidal doctor` prints them; the memory
planner takes them as its default budgets, and a caller can override any field with
`dataclasses.replace` (for example, to plan for a machine other than this one).
"""

from __future__ import annotations

import contextlib
import errno
import math
import mmap
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import psutil
import pynvml

MIB = 1 << 20
DEFAULT_DISK_TEST_BYTES = 64 * MIB
"""Bytes written and read back by `probe_disk` unless told otherwise."""
_BLOCK_BYTES = 1 * MIB
"""Size of each write/read call in the disk test; a multiple of every disk's logical block size."""
_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML sees it."""

    index: int
    """NVML device index (PCI bus order, which can differ from CUDA's order)."""
    name: str
    total_bytes: int
    free_bytes: int
    nvlinks: int | None
    """Active NVLink links; None where the GPU or driver does not report NVLink."""


@dataclass(frozen=True)
class GpuProbe:
    """The GPUs found, or why none are listed."""

    gpus: tuple[GpuInfo, ...]
    error: str | None
    """Why `gpus` is empty (NVML missing or failing, or no devices); None when GPUs were found."""


@dataclass(frozen=True)
class HostInfo:
    """Host memory in bytes and CPU core counts."""

    total_bytes: int
    available_bytes: int
    """Memory that can be given to new allocations without swapping (psutil's `available`)."""
    physical_cores: int | None
    """None where the OS does not report physical cores."""
    logical_cores: int


@dataclass(frozen=True)
class DiskInfo:
    """Space and sequential bandwidth of the filesystem that holds one directory."""

    path: str
    """The directory probed, as an absolute path."""
    free_bytes: int
    """Bytes free to this user."""
    total_bytes: int
    write_bytes_per_s: float | None
    """Sequential write bandwidth, including the final fsync; None when not measured (see `note`)."""
    read_bytes_per_s: float | None
    """Sequential read bandwidth from the disk, not the page cache; None when not measured."""
    direct: bool
    """The bandwidths were measured with O_DIRECT (True) or with buffered I/O plus fsync (False)."""
    test_bytes: int
    """Bytes written and read in the test (0 when the test was skipped)."""
    note: str | None
    """Why the bandwidths are None or O_DIRECT was not used; None when the O_DIRECT test ran."""


def probe_gpus() -> GpuProbe:
    """List the GPUs through NVML; never raises.

    Returns:
        The GPUs with their memory in bytes, or no GPUs and the reason (NVML library missing, driver
        not loaded, a query failing, or zero devices).
    """
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return GpuProbe((), f"NVML unavailable: {exc}")
    try:
        gpus = tuple(_gpu_info(index) for index in range(pynvml.nvmlDeviceGetCount()))
    except pynvml.NVMLError as exc:
        return GpuProbe((), f"NVML query failed: {exc}")
    finally:
        with contextlib.suppress(pynvml.NVMLError):  # the answer is complete; a failed shutdown changes nothing
            pynvml.nvmlShutdown()
    return GpuProbe(gpus, None if gpus else "NVML found no devices")


def _gpu_info(index: int) -> GpuInfo:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = pynvml.nvmlDeviceGetName(handle)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return GpuInfo(
        index=index,
        name=name.decode() if isinstance(name, bytes) else name,  # older nvidia-ml-py returns bytes
        total_bytes=int(memory.total),
        free_bytes=int(memory.free),
        nvlinks=_count_nvlinks(handle),
    )


def _count_nvlinks(handle: object) -> int | None:
    """Active NVLink links of one GPU; None if the first link cannot be queried (no NVLink)."""
    active = 0
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            state = pynvml.nvmlDeviceGetNvLinkState(handle, link)
        except pynvml.NVMLError:
            return active if link else None  # links past the last one answer "not supported"
        active += int(state == pynvml.NVML_FEATURE_ENABLED)
    return active


def probe_host() -> HostInfo:
    """Host memory (bytes) and CPU cores of this machine, via psutil."""
    memory = psutil.virtual_memory()
    return HostInfo(
        total_bytes=int(memory.total),
        available_bytes=int(memory.available),
        physical_cores=psutil.cpu_count(logical=False),
        logical_cores=psutil.cpu_count(logical=True) or 1,
    )


def probe_disk(path: str | os.PathLike[str], size_bytes: int = DEFAULT_DISK_TEST_BYTES) -> DiskInfo:
    """Measure free space and sequential write/read bandwidth of the filesystem holding `path`.

    Writes `size_bytes` (rounded up to whole 1 MiB blocks) to a temporary file in `path`, fsyncs it,
    reads it back, and removes it whatever happens. O_DIRECT is used where the filesystem accepts it;
    where it is refused (EINVAL), buffered I/O with fsync and a page-cache drop is used instead. The
    test is skipped, with bandwidths None, when the disk has less than twice the test size free.

    Args:
        path: an existing, writable directory.
        size_bytes: bytes to write and read; more gives steadier numbers and takes longer.
    Returns:
        Space in bytes and bandwidths in bytes per second.
    Raises:
        ValueError: `size_bytes` is not positive, or `path` is not an existing writable directory.
    """
    if size_bytes <= 0:
        raise ValueError(f"size_bytes={size_bytes} must be positive; pass the test size in bytes, e.g. 64 << 20")
    directory = os.path.abspath(os.fspath(path))
    if not os.path.isdir(directory):
        problem = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise ValueError(f"disk probe path {directory!r} {problem}; pass an existing, writable directory")
    try:
        handle, name = tempfile.mkstemp(prefix=".tidal-probe-", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise ValueError(f"cannot create a file in {directory!r} ({exc.strerror}); pass a writable directory") from exc
    os.close(handle)
    try:
        return _probe_space_and_bandwidth(directory, name, math.ceil(size_bytes / _BLOCK_BYTES))
    finally:
        os.remove(name)


def _probe_space_and_bandwidth(directory: str, name: str, blocks: int) -> DiskInfo:
    usage = shutil.disk_usage(directory)
    test_bytes = blocks * _BLOCK_BYTES

    def result(write: float | None, read: float | None, direct: bool, note: str | None) -> DiskInfo:
        tested = test_bytes if write is not None else 0
        return DiskInfo(directory, usage.free, usage.total, write, read, direct, tested, note)

    if usage.free < 2 * test_bytes:
        note = (
            f"bandwidth test skipped: {format_bytes(usage.free)} free is less than twice the "
            f"{format_bytes(test_bytes)} test file; pass a smaller size or free some space"
        )
        return result(None, None, False, note)
    fallback_note = None
    try:
        if hasattr(os, "O_DIRECT"):
            try:
                return result(*_measure(name, blocks, direct=True), True, None)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                fallback_note = f"O_DIRECT refused by this filesystem ({exc.strerror}); buffered I/O + fsync"
        else:
            fallback_note = "O_DIRECT is not offered on this OS; buffered I/O + fsync"
        return result(*_measure(name, blocks, direct=False), False, fallback_note)
    except OSError as exc:
        return result(None, None, False, f"bandwidth test failed: {exc}")


def _measure(name: str, blocks: int, direct: bool) -> tuple[float, float]:
    """Write `blocks` blocks to file `name` (fsync included), then read them back.

    Returns:
        (write, read) bandwidth in bytes per second.
    """
    flags = os.O_DIRECT if direct else 0
    with mmap.mmap(-1, _BLOCK_BYTES) as buffer:  # anonymous mmap: page-aligned, as O_DIRECT needs
        buffer.write(os.urandom(_BLOCK_BYTES))  # incompressible, so compressing filesystems can't flatter
        handle = os.open(name, os.O_WRONLY | flags)
        try:
            start = time.perf_counter()
            for _ in range(blocks):
                _expect_whole_block(os.write(handle, buffer), "write", name)
            os.fsync(handle)
            write_seconds = time.perf_counter() - start
            if not direct:
                os.posix_fadvise(handle, 0, 0, os.POSIX_FADV_DONTNEED)  # read the disk, not the page cache
        finally:
            os.close(handle)
        handle = os.open(name, os.O_RDONLY | flags)
        try:
            start = time.perf_counter()
            for _ in range(blocks):
                _expect_whole_block(os.readv(handle, [buffer]), "read", name)
            read_seconds = time.perf_counter() - start
        finally:
            os.close(handle)
    test_bytes = blocks * _BLOCK_BYTES
    return test_bytes / max(write_seconds, 1e-9), test_bytes / max(read_seconds, 1e-9)


def _expect_whole_block(transferred: int, operation: str, name: str) -> None:
    if transferred != _BLOCK_BYTES:
        raise OSError(f"short {operation} of {transferred} of {_BLOCK_BYTES} bytes on {name!r}")


def format_bytes(count: float) -> str:
    """A byte count in binary units with one decimal: 512 -> "512 B", 1536 -> "1.5 KiB"."""
    value = float(abs(count))
    unit = 0
    while round(value, 1) >= 1024 and unit < len(_BINARY_UNITS) - 1:
        value /= 1024
        unit += 1
    sign = "-" if count < 0 else ""
    if unit == 0:
        return f"{sign}{round(value)} B"
    return f"{sign}{value:.1f} {_BINARY_UNITS[unit]}"


def format_rate(bytes_per_s: float) -> str:
    """A bandwidth in decimal units, as disks are rated: 2.5e9 -> "2.50 GB/s", 3.2e8 -> "320.0 MB/s"."""
    if bytes_per_s >= 1e9:
        return f"{bytes_per_s / 1e9:.2f} GB/s"
    return f"{bytes_per_s / 1e6:.1f} MB/s"
