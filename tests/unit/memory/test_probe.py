"""Hardware probes: host numbers against psutil, a real disk test, NVML failure paths, byte formats."""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace

import psutil
import pynvml
import pytest

from tidal.memory import probe
from tidal.memory.probe import GpuInfo, format_bytes, format_rate, probe_disk, probe_gpus, probe_host

MIB = 1 << 20


def test_host_matches_psutil() -> None:
    host = probe_host()
    assert host.total_bytes == psutil.virtual_memory().total
    assert 0 < host.available_bytes <= host.total_bytes
    assert host.logical_cores == psutil.cpu_count(logical=True)
    assert host.physical_cores is None or 1 <= host.physical_cores <= host.logical_cores


def test_disk_probe_measures_and_cleans_up(tmp_path) -> None:
    disk = probe_disk(tmp_path, size_bytes=4 * MIB)
    assert disk.path == str(tmp_path)
    assert 0 < disk.free_bytes <= disk.total_bytes
    assert disk.write_bytes_per_s is not None and disk.write_bytes_per_s > 0
    assert disk.read_bytes_per_s is not None and disk.read_bytes_per_s > 0
    assert disk.test_bytes == 4 * MIB
    assert disk.direct == (disk.note is None)
    assert list(tmp_path.iterdir()) == []


def test_disk_probe_rounds_size_up_to_whole_blocks(tmp_path) -> None:
    assert probe_disk(tmp_path, size_bytes=MIB + 1).test_bytes == 2 * MIB


def test_disk_probe_falls_back_to_buffered_when_o_direct_is_refused(tmp_path, refuse_o_direct) -> None:
    disk = probe_disk(tmp_path, size_bytes=2 * MIB)
    assert disk.direct is False
    assert disk.note is not None and "O_DIRECT refused" in disk.note
    assert disk.write_bytes_per_s is not None and disk.write_bytes_per_s > 0
    assert disk.read_bytes_per_s is not None and disk.read_bytes_per_s > 0
    assert list(tmp_path.iterdir()) == []


def test_disk_probe_reports_other_io_errors_and_cleans_up(tmp_path, monkeypatch) -> None:
    def failing_fsync(handle: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    disk = probe_disk(tmp_path, size_bytes=MIB)
    assert disk.write_bytes_per_s is None and disk.read_bytes_per_s is None
    assert disk.note is not None and "Input/output error" in disk.note
    assert list(tmp_path.iterdir()) == []


def test_disk_probe_skips_bandwidth_when_space_is_short(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(probe.shutil, "disk_usage", lambda path: SimpleNamespace(free=3 * MIB, total=8 * MIB))
    disk = probe_disk(tmp_path, size_bytes=2 * MIB)
    assert disk.write_bytes_per_s is None and disk.read_bytes_per_s is None
    assert disk.test_bytes == 0
    assert disk.note is not None and "skipped" in disk.note and "3.0 MiB" in disk.note
    assert list(tmp_path.iterdir()) == []


def test_disk_probe_rejects_missing_directory(tmp_path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(ValueError, match="does not exist") as info:
        probe_disk(missing, size_bytes=MIB)
    assert str(missing) in str(info.value)


def test_disk_probe_rejects_a_file(tmp_path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    with pytest.raises(ValueError, match="is not a directory") as info:
        probe_disk(plain, size_bytes=MIB)
    assert str(plain) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_disk_probe_rejects_unwritable_directory_by_mode(tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(ValueError, match="Permission denied") as info:
            probe_disk(locked, size_bytes=MIB)
        assert str(locked) in str(info.value)
    finally:
        locked.chmod(0o700)


def test_disk_probe_rejects_unwritable_directory(tmp_path, monkeypatch) -> None:
    def refuse(**kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(probe.tempfile, "mkstemp", refuse)
    with pytest.raises(ValueError, match="Permission denied.*writable directory") as info:
        probe_disk(tmp_path, size_bytes=MIB)
    assert str(tmp_path) in str(info.value)


def test_disk_probe_rejects_nonpositive_size(tmp_path) -> None:
    with pytest.raises(ValueError, match="size_bytes=0"):
        probe_disk(tmp_path, size_bytes=0)


def test_gpu_probe_without_nvml_reports_why() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        result = probe_gpus()
        assert result.gpus == ()
        assert result.error is not None and result.error.startswith("NVML unavailable")
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine; the GPU-less path is covered by the stubbed tests")


def test_gpu_probe_keeps_the_reason_when_nvml_init_fails(monkeypatch) -> None:
    def fail() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    result = probe_gpus()
    assert result.gpus == ()
    assert result.error is not None and "Driver Not Loaded" in result.error


def _stub_nvml(monkeypatch, count: int, names: list[object]) -> list[str]:
    """Replace the NVML device queries with a stub; returns the list of calls to nvmlShutdown."""
    shutdowns: list[str] = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: shutdowns.append("shutdown"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: count)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: index)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda handle: names[handle])
    monkeypatch.setattr(
        pynvml, "nvmlDeviceGetMemoryInfo", lambda handle: SimpleNamespace(total=80 << 30, free=(70 + handle) << 30)
    )

    def nvlink_state(handle: int, link: int) -> int:
        if handle == 1 or link >= 4:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return pynvml.NVML_FEATURE_ENABLED if link < 3 else pynvml.NVML_FEATURE_DISABLED

    monkeypatch.setattr(pynvml, "nvmlDeviceGetNvLinkState", nvlink_state)
    return shutdowns


def test_gpu_probe_converts_nvml_answers(monkeypatch) -> None:
    shutdowns = _stub_nvml(monkeypatch, 2, ["Stub GPU A", b"Stub GPU B"])
    result = probe_gpus()
    assert result.error is None
    assert result.gpus == (
        GpuInfo(0, "Stub GPU A", 80 << 30, 70 << 30, nvlinks=3),
        GpuInfo(1, "Stub GPU B", 80 << 30, 71 << 30, nvlinks=None),
    )
    assert shutdowns == ["shutdown"]


def test_gpu_probe_with_zero_devices_says_so(monkeypatch) -> None:
    _stub_nvml(monkeypatch, 0, [])
    assert probe_gpus() == probe.GpuProbe((), "NVML found no devices")


def test_gpu_probe_query_failure_gives_no_gpus_and_shuts_down(monkeypatch) -> None:
    shutdowns = _stub_nvml(monkeypatch, 2, ["Stub GPU A", "Stub GPU B"])

    def fail_memory_info(handle: int) -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", fail_memory_info)
    result = probe_gpus()
    assert result.gpus == ()
    assert result.error is not None and result.error.startswith("NVML query failed")
    assert shutdowns == ["shutdown"]


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (64 * MIB, "64.0 MiB"),
        (MIB - 1, "1.0 MiB"),
        (int(23.5 * (1 << 30)), "23.5 GiB"),
        (3 << 50, "3.0 PiB"),
        (5 << 60, "5120.0 PiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_bytes(count: int, text: str) -> None:
    assert format_bytes(count) == text


@pytest.mark.parametrize(
    ("rate", "text"), [(2.5e9, "2.50 GB/s"), (3.2e8, "320.0 MB/s"), (1e9, "1.00 GB/s"), (5e5, "0.5 MB/s")]
)
def test_format_rate(rate: float, text: str) -> None:
    assert format_rate(rate) == text
