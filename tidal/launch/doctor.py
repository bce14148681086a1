"""`tidal doctor`: one screen on what this machine offers tidal.

Reports torch and its backends, GPUs (NVML), host memory and cores, a directory's free space and disk
bandwidth, and whether MPI, Ray and DeepSpeed are installed. Nothing missing is an error: the report
says what is absent and why, and `run` always returns 0.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess

from tidal.memory.probe import (
    DEFAULT_DISK_TEST_BYTES,
    GpuProbe,
    format_bytes,
    format_rate,
    probe_disk,
    probe_gpus,
    probe_host,
)
from tidal.runtime.device import features

_LABEL_WIDTH = 10
_MPIEXEC_TIMEOUT_S = 10


def run(directory: str = ".", size_bytes: int = DEFAULT_DISK_TEST_BYTES) -> int:
    """Print the report for `directory` (disk test of `size_bytes` bytes); returns the exit status, 0."""
    print(report(directory, size_bytes))
    return 0


def report(directory: str = ".", size_bytes: int = DEFAULT_DISK_TEST_BYTES) -> str:
    """The doctor's report as text, one line or a few per section.

    Args:
        directory: where the disk test writes its temporary file (e.g. the planned NVMe offload path).
        size_bytes: bytes the disk test writes and reads back.
    """
    sections = [
        ("torch", _torch_lines()),
        ("gpus", _gpu_lines(probe_gpus())),
        ("host", _host_lines()),
        ("disk", _disk_lines(directory, size_bytes)),
        ("mpi", _mpi_lines()),
        ("ray", [_package_text("ray")]),
        ("deepspeed", [_package_text("deepspeed")]),
    ]
    lines = []
    for label, texts in sections:
        lines.append(f"{label:<{_LABEL_WIDTH}} {texts[0]}")
        lines.extend(f"{'':<{_LABEL_WIDTH}} {text}" for text in texts[1:])
    return "\n".join(lines)


def _torch_lines() -> list[str]:
    feats = features()
    cuda = f"yes ({feats.cuda_devices} devices)" if feats.cuda else "no"
    flags = {"nccl": feats.nccl, "gloo": feats.gloo, "torch mpi": feats.mpi, "bf16 on cpu": feats.bf16_cpu}
    backends = ", ".join(f"{name} {_yes_no(present)}" for name, present in flags.items())
    return [f"{feats.torch_version}; cuda {cuda}; {backends}"]


def _gpu_lines(probe: GpuProbe) -> list[str]:
    if not probe.gpus:
        return [f"none ({probe.error})"]
    lines = [f"{len(probe.gpus)} via NVML"]
    for gpu in probe.gpus:
        nvlinks = "" if gpu.nvlinks is None else f", {gpu.nvlinks} NVLinks active"
        lines.append(
            f"[{gpu.index}] {gpu.name}: {format_bytes(gpu.total_bytes)} total, "
            f"{format_bytes(gpu.free_bytes)} free{nvlinks}"
        )
    return lines


def _host_lines() -> list[str]:
    host = probe_host()
    physical = "unknown" if host.physical_cores is None else str(host.physical_cores)
    return [
        f"memory {format_bytes(host.total_bytes)} total, {format_bytes(host.available_bytes)} available; "
        f"cores {physical} physical, {host.logical_cores} logical"
    ]


def _disk_lines(directory: str, size_bytes: int) -> list[str]:
    try:
        disk = probe_disk(directory, size_bytes)
    except ValueError as exc:
        return [str(exc)]
    lines = [f"{disk.path}: {format_bytes(disk.free_bytes)} free of {format_bytes(disk.total_bytes)}"]
    if disk.write_bytes_per_s is not None and disk.read_bytes_per_s is not None:
        mode = "O_DIRECT" if disk.direct else "buffered"
        lines.append(
            f"write {format_rate(disk.write_bytes_per_s)}, read {format_rate(disk.read_bytes_per_s)} "
            f"({mode}, {format_bytes(disk.test_bytes)} sequential, 1 MiB blocks)"
        )
    if disk.note is not None:
        lines.append(disk.note)
    return lines


def _mpi_lines() -> list[str]:
    mpiexec = shutil.which("mpiexec")
    launcher = "mpiexec not on PATH" if mpiexec is None else f"mpiexec {mpiexec} ({_mpiexec_version(mpiexec)})"
    return [f"mpi4py {_package_text('mpi4py')}; {launcher}"]


def _mpiexec_version(mpiexec: str) -> str:
    """The line of `mpiexec --version` that names the version (MPICH prints a banner line first)."""
    try:
        done = subprocess.run(
            [mpiexec, "--version"], capture_output=True, text=True, timeout=_MPIEXEC_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"version unknown: {exc}"
    lines = [" ".join(line.split()) for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if not lines:
        return f"version unknown: `--version` printed nothing, exit status {done.returncode}"
    return next((line for line in lines if "version" in line.lower()), lines[0])


def _package_text(name: str) -> str:
    """Whether package `name` is installed and its version, found without importing it."""
    if importlib.util.find_spec(name) is None:
        return "not installed"
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "installed (version unknown)"


def _yes_no(present: bool) -> str:
    return "yes" if present else "no"
