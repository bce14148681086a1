"""The NVMe I/O engine on this machine's disk: spans, alignment, O_DIRECT fallback, failures; swap directories."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import subprocess
import sys
import threading
import warnings

import psutil
import pytest
import torch
from io_engines import ENGINES

from tidal.config import NvmeConfig
from tidal.offload import NvmeStore, nvme
from tidal.offload.nvme import (
    ALIGN,
    OWNER_FILE,
    SWAP_PREFIX,
    IoEngine,
    LeftoverSwapWarning,
    OffloadError,
    create_swap_directory,
    padded_size,
)
from tidal.runtime.device import PAGE_BYTES, copy_async, empty_host, features

SMALL = NvmeConfig(block_size=4096, queue_depth=2, threads=3)
"""8 KiB spans, so a few hundred KiB make dozens of requests in flight."""


@pytest.fixture(params=ENGINES)
def engine(tmp_path, request):
    engine = IoEngine(SMALL.model_copy(update={"engine": request.param}), str(tmp_path))
    assert engine.kind == request.param
    yield engine
    engine.close()


def random_bytes(nbytes: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8)


def test_host_buffers_are_page_aligned_and_copies_return_their_target() -> None:
    for nbytes in (1, 4095, 3 * PAGE_BYTES + 5):
        buffer = empty_host(nbytes)
        assert buffer.numel() == nbytes and buffer.dtype == torch.uint8
        assert buffer.data_ptr() % PAGE_BYTES == 0
    assert empty_host(0).numel() == 0
    source = torch.arange(10.0)
    target = torch.empty(10)
    assert copy_async(target, source).wait() is target
    assert torch.equal(target, source)
    with pytest.raises(ValueError, match="nbytes=-1"):
        empty_host(-1)


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "bounce"])
@pytest.mark.parametrize("nbytes", [1, ALIGN, 8192 * 7, 300_007])
def test_round_trip_pads_the_file(engine, tmp_path, aligned: bool, nbytes: int) -> None:
    data = random_bytes(nbytes + 1)[1:]  # starts one byte into its allocation
    if aligned:
        data = empty_host(nbytes).copy_(data)
    assert (data.data_ptr() % ALIGN == 0) == aligned
    path = str(tmp_path / "f")
    assert engine.write(path, data).wait() is None
    assert os.path.getsize(path) == padded_size(nbytes)
    out = empty_host(nbytes) if aligned else torch.empty(nbytes + 3, dtype=torch.uint8)[3:]
    engine.read(path, out).wait()
    assert torch.equal(out, data)


def test_empty_file_round_trip(engine, tmp_path) -> None:
    path = str(tmp_path / "empty")
    handle = engine.write(path, torch.empty(0, dtype=torch.uint8))
    assert handle.done()
    handle.wait()
    assert os.path.getsize(path) == 0
    engine.read(path, torch.empty(0, dtype=torch.uint8)).wait()


def test_many_transfers_in_flight(engine, tmp_path) -> None:
    sources = [random_bytes(40_000 + 4097 * index) for index in range(24)]
    writes = [engine.write(str(tmp_path / f"{i}"), data) for i, data in enumerate(sources)]
    for handle in writes:
        handle.wait()
    outs = [torch.empty_like(data) for data in sources]
    reads = [engine.read(str(tmp_path / f"{i}"), out) for i, out in enumerate(outs)]
    for handle, out, data in zip(reads, outs, sources, strict=True):
        handle.wait()
        assert torch.equal(out, data)


def test_handle_waits_for_the_transfer_and_can_be_waited_twice(tmp_path, monkeypatch) -> None:
    engine = IoEngine(SMALL, str(tmp_path))  # the pool: its system calls can be held from here
    release = threading.Event()
    real_pwritev = os.pwritev

    def slow_pwritev(*args):
        release.wait(timeout=10)
        return real_pwritev(*args)

    monkeypatch.setattr(os, "pwritev", slow_pwritev)
    handle = engine.write(str(tmp_path / "slow"), random_bytes(50_000))
    assert not handle.done()
    release.set()
    handle.wait()
    assert handle.done()
    handle.wait()
    engine.close()


def test_o_direct_refused_falls_back_to_buffered_io(tmp_path, refuse_o_direct) -> None:
    with pytest.warns(UserWarning, match="refuses O_DIRECT"):
        engine = IoEngine(SMALL, str(tmp_path))
    assert engine.direct is False and "buffered" in engine.note
    data = random_bytes(30_001)
    engine.write(str(tmp_path / "f"), data).wait()
    out = torch.empty_like(data)
    engine.read(str(tmp_path / "f"), out).wait()
    engine.close()
    assert torch.equal(out, data)


def test_store_on_a_filesystem_refusing_o_direct_works_buffered(tmp_path, refuse_o_direct) -> None:
    with pytest.warns(UserWarning, match="refuses O_DIRECT"), NvmeStore(tmp_path, SMALL) as store:
        assert store.direct is False
        tensor = torch.randn(12_345).to(torch.bfloat16)
        store.write("k", tensor).wait()
        assert torch.equal(store.read("k").wait(), tensor)


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "bounce"])
def test_failed_write_raises_at_wait_with_path_and_sizes_and_removes_the_file(
    engine, tmp_path, fail_io, aligned: bool
) -> None:
    fail_io(errno.EIO, after=2)
    path = str(tmp_path / "f.tmp")
    data = random_bytes(100_000)
    handle = engine.write(path, empty_host(102_400)[:100_000].copy_(data) if aligned else data)
    with pytest.raises(OffloadError) as failure:
        handle.wait()
    message = str(failure.value)
    assert path in message and "EIO" in message and "100.0 KiB needed" in message and "free there" in message
    assert "check the disk" in message
    with pytest.raises(OffloadError):
        handle.wait()
    assert not os.path.exists(path)


def test_full_disk_at_reservation_raises_at_once(engine, tmp_path, monkeypatch) -> None:
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    path = str(tmp_path / "f")
    with pytest.raises(OffloadError, match="ENOSPC.*1.0 MiB needed.*free there.*more free space"):
        engine.write(path, random_bytes(1 << 20))
    assert not os.path.exists(path)


def test_truncated_file_is_refused(engine, tmp_path) -> None:
    path = str(tmp_path / "f")
    engine.write(path, random_bytes(3 * ALIGN)).wait()
    os.truncate(path, ALIGN)
    with pytest.raises(OffloadError, match=f"is {ALIGN} bytes, but {3 * ALIGN} were written.*truncated"):
        engine.read(path, torch.empty(3 * ALIGN, dtype=torch.uint8))


def test_failed_read_raises_at_wait(engine, tmp_path, fail_io) -> None:
    path = str(tmp_path / "f")
    engine.write(path, random_bytes(3 * ALIGN)).wait()
    fail_io(errno.EIO, writing=False)
    with pytest.raises(OffloadError, match=f"reading '{path}' failed.*EIO.*check the disk"):
        engine.read(path, empty_host(3 * ALIGN)).wait()


def test_engine_choice(tmp_path, monkeypatch) -> None:
    auto = IoEngine(NvmeConfig(), str(tmp_path))
    assert auto.kind == ("aio" if features().kernel_aio else "threads")
    auto.close()
    monkeypatch.setattr(nvme, "features", lambda: dataclasses.replace(features(), kernel_aio=False))
    with pytest.raises(OffloadError, match="engine='aio' cannot work here: .*refuses kernel AIO.*'threads' or 'auto'"):
        IoEngine(NvmeConfig(engine="aio"), str(tmp_path))
    fallback = IoEngine(NvmeConfig(), str(tmp_path))
    assert fallback.kind == "threads"
    fallback.close()


def test_aio_needs_o_direct(tmp_path, refuse_o_direct) -> None:
    with pytest.raises(OffloadError, match="engine='aio' cannot work here: the filesystem .* refuses O_DIRECT"):
        IoEngine(NvmeConfig(engine="aio"), str(tmp_path))


def test_bad_arguments(tmp_path, engine) -> None:
    with pytest.raises(ValueError, match="contiguous 1-D uint8 CPU tensors, got torch.float32"):
        engine.write(str(tmp_path / "f"), torch.zeros(4))
    with pytest.raises(OffloadError, match="No such file"):
        engine.read(str(tmp_path / "missing"), torch.empty(4, dtype=torch.uint8))


def write_marker(directory, pid: int, host: str, started: float) -> None:
    os.makedirs(directory)
    (directory / OWNER_FILE).write_text(json.dumps({"pid": pid, "host": host, "started": started}))
    (directory / "00000000.swap").write_bytes(b"\0" * ALIGN)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftover_of_a_dead_process_is_reported_and_kept(tmp_path) -> None:
    leftover = tmp_path / f"{SWAP_PREFIX}crashed"
    write_marker(leftover, dead_pid(), socket.gethostname(), 1.0)
    with pytest.warns(LeftoverSwapWarning) as caught:
        directory = create_swap_directory(str(tmp_path))
    message = str(caught[0].message)
    assert str(leftover) in message and f"rm -rf {leftover}" in message and "1 swap files (4.0 KiB)" in message
    assert (leftover / "00000000.swap").exists()
    assert sorted(os.listdir(directory)) == [OWNER_FILE]


def test_live_foreign_and_unmarked_directories_are_not_reported(tmp_path) -> None:
    me = psutil.Process()
    write_marker(tmp_path / f"{SWAP_PREFIX}live", me.pid, socket.gethostname(), me.create_time())
    write_marker(tmp_path / f"{SWAP_PREFIX}reused-pid", me.pid, socket.gethostname(), me.create_time() - 100)
    write_marker(tmp_path / f"{SWAP_PREFIX}elsewhere", dead_pid(), "another-host", 1.0)
    os.makedirs(tmp_path / f"{SWAP_PREFIX}no-marker")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_swap_directory(str(tmp_path))
    reported = [str(warning.message) for warning in caught if warning.category is LeftoverSwapWarning]
    assert len(reported) == 1 and "reused-pid" in reported[0]  # the pid runs, but it is another process


def test_unwritable_parent_is_a_clear_error(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OffloadError, match="cannot create a swap directory in .*writable directory"):
        create_swap_directory(str(blocker / "sub"))
