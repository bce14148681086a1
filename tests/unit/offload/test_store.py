"""CPU and NVMe stores: round trips, ordering of transfers, failures that keep the old content, cleanup."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import torch
from io_engines import ENGINES

from tidal.config import NvmeConfig
from tidal.offload import CpuStore, LeftoverSwapWarning, NvmeStore, OffloadError, empty_aligned
from tidal.offload.nvme import OWNER_FILE, SWAP_PREFIX
from tidal.offload.store import BufferPool
from tidal.offload.swap_file import SwapFileStore
from tidal.runtime.device import PAGE_BYTES

SMALL = NvmeConfig(block_size=4096, queue_depth=2, threads=3)
"""8 KiB spans, so the tensors below make many requests."""
SHAPES = [(), (0,), (1,), (3, 5), (100_003,), (64, 1024)]
DTYPES = [torch.float32, torch.bfloat16, torch.int8]


@pytest.fixture(params=["cpu", "nvme", "swapfile"])
def store(request, tmp_path):
    if request.param == "swapfile":
        store = SwapFileStore(tmp_path, SMALL)
    else:
        store = CpuStore() if request.param == "cpu" else NvmeStore(tmp_path, SMALL, verify=True)
    yield store
    store.close()


@pytest.fixture(params=ENGINES)
def nvme(tmp_path, request):
    store = NvmeStore(tmp_path, SMALL.model_copy(update={"engine": request.param}))
    assert store.engine_kind == request.param
    yield store
    store.close()


def sample(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(-128, 128, shape, generator=generator, dtype=dtype)


def swap_files(store: NvmeStore) -> list[str]:
    return sorted(name for name in os.listdir(store.directory) if name != OWNER_FILE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip(store, shape, dtype) -> None:
    tensor = sample(shape, dtype)
    assert store.write("k", tensor).wait() is None
    fresh = store.read("k").wait()
    assert fresh.dtype == dtype and fresh.shape == tensor.shape and torch.equal(fresh, tensor)
    out = torch.empty(tensor.numel(), dtype=dtype)  # any shape with the same elements
    assert store.read("k", out=out).wait() is out
    assert torch.equal(out, tensor.reshape(-1))
    assert store.nbytes() == tensor.numel() * tensor.element_size()


def test_non_contiguous_and_aligned_tensors(store) -> None:
    strided = sample((40, 30), torch.float32).t()
    store.write("strided", strided).wait()
    assert torch.equal(store.read("strided").wait(), strided)
    aligned = empty_aligned((1000,), torch.float32, pinned=False)
    assert aligned.data_ptr() % PAGE_BYTES == 0
    aligned.copy_(torch.arange(1000.0))
    store.write("aligned", aligned).wait()
    out = empty_aligned((1000,), torch.float32, pinned=False)
    assert torch.equal(store.read("aligned", out=out).wait(), aligned)


def test_many_requests_in_flight(store) -> None:
    tensors = {f"k{i}": sample((5000 + 777 * i,), torch.float32, seed=i) for i in range(32)}
    writes = [store.write(key, tensor) for key, tensor in tensors.items()]
    reads = {key: store.read(key) for key in tensors}  # each waits for its key's write, not the others
    for handle in writes:
        handle.wait()
    for key, handle in reads.items():
        assert torch.equal(handle.wait(), tensors[key])
    assert store.nbytes() == sum(t.numel() * 4 for t in tensors.values())


def test_transfers_on_one_key_keep_their_order(store) -> None:
    first, second = sample((9000,), torch.float32, 1), sample((9000,), torch.float32, 2)
    store.write("k", first)
    store.write("k", second)  # waits for the first write, which is then the key's content
    assert torch.equal(store.read("k").wait(), second)
    third = sample((9000,), torch.float32, 3)
    pending = store.read("k")
    store.write("k", third).wait()  # the read under way finished first, with the old content
    assert torch.equal(pending.wait(), second)
    assert torch.equal(store.read("k").wait(), third)
    assert "k" in store and "other" not in store


def test_delete_and_errors(store) -> None:
    store.write("k", torch.ones(10)).wait()
    with pytest.raises(ValueError, match="out is torch.float64 with 10 elements, but key 'k' holds torch.float32"):
        store.read("k", out=torch.empty(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-contiguous"):
        store.read("k", out=torch.empty(10, 2)[:, 0])
    store.delete("k")
    assert store.nbytes() == 0
    with pytest.raises(KeyError, match="nothing is stored under key 'k'"):
        store.read("k")
    with pytest.raises(KeyError, match="nothing to delete"):
        store.delete("k")
    store.close()
    store.close()
    with pytest.raises(OffloadError, match="closed; open a new store"):
        store.write("k", torch.ones(1))


def test_nvme_store_files(nvme) -> None:
    nvme.write("a", torch.ones(1000)).wait()
    nvme.write("b", torch.ones(1)).wait()
    assert swap_files(nvme) == ["00000000.swap", "00000001.swap"]
    assert os.path.getsize(os.path.join(nvme.directory, "00000000.swap")) == 4096
    nvme.delete("a")
    assert swap_files(nvme) == ["00000001.swap"]
    with pytest.raises(ValueError, match="NvmeStore.write takes CPU tensors, got one on meta"):
        nvme.write("m", torch.empty(3, device="meta"))


def test_overwrites_reuse_the_blocks_of_the_replaced_file(nvme) -> None:
    key_file = os.path.join(nvme.directory, "00000000.swap")
    inodes = set()
    for step in range(6):
        tensor = torch.full((5000,), float(step))
        nvme.write("a", tensor).wait()
        assert torch.equal(nvme.read("a").wait(), tensor)
        inodes.add(os.stat(key_file).st_ino)
        assert len(swap_files(nvme)) == (1 if step == 0 else 2)  # the key's file, and the one it replaced
    assert len(inodes) == 2  # two files take turns: no allocation after the first overwrite
    nvme.write("a", torch.ones(100)).wait()  # leaves a 20 KiB spare
    nvme.write("b", torch.arange(3000.0)).wait()  # takes it and shrinks it to 12 KiB
    assert torch.equal(nvme.read("b").wait(), torch.arange(3000.0))
    assert os.path.getsize(os.path.join(nvme.directory, "00000001.swap")) == 12288


def test_full_disk_on_overwrite_keeps_the_previous_content(nvme, fail_io, monkeypatch) -> None:
    old = sample((50_000,), torch.float32, 1)
    nvme.write("k", torch.zeros(50_000)).wait()
    nvme.write("k", old).wait()  # the first file is now a spare, which the failing write takes
    new = sample((60_000,), torch.bfloat16, 2)
    new_copy = new.clone()
    fail_io(errno.ENOSPC)
    handle = nvme.write("k", new)
    with pytest.raises(OffloadError) as failure:
        handle.wait()
    message = str(failure.value)
    assert f"{nvme.directory}/00000000.swap.tmp" in message and "ENOSPC" in message
    assert "120.0 KiB needed" in message and "free there" in message
    assert "more free space, or offload less at once" in message
    monkeypatch.undo()
    assert torch.equal(new, new_copy)
    assert torch.equal(nvme.read("k").wait(), old)
    assert nvme.nbytes() == old.numel() * 4
    assert swap_files(nvme) == ["00000000.swap"]
    nvme.write("k", new).wait()
    assert torch.equal(nvme.read("k").wait(), new)


def test_full_disk_before_any_data_moved_raises_at_write(nvme, monkeypatch) -> None:
    old = torch.arange(5000.0)
    nvme.write("k", old).wait()

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OffloadError, match="reserving space for .*ENOSPC.*20.0 KiB needed"):
        nvme.write("k", torch.zeros(5000))
    monkeypatch.undo()
    assert torch.equal(nvme.read("k").wait(), old)


def test_truncated_and_corrupted_files_are_refused(tmp_path) -> None:
    with NvmeStore(tmp_path, SMALL, verify=True) as store:
        store.write("cut", torch.ones(3000)).wait()
        store.write("flipped", torch.ones(3000)).wait()
        cut, flipped = (os.path.join(store.directory, name) for name in swap_files(store))
        os.truncate(cut, 4096)
        with pytest.raises(OffloadError, match="is 4096 bytes, but 12288 were written.*truncated"):
            store.read("cut")
        with open(flipped, "r+b") as file:
            file.seek(100)
            file.write(b"\x01")
        with pytest.raises(OffloadError, match="CRC-32"):
            store.read("flipped").wait()


def test_close_removes_the_files(tmp_path) -> None:
    store = NvmeStore(tmp_path, SMALL)
    store.write("k", torch.ones(10_000))  # not waited: close waits for it
    directory = store.directory
    assert os.path.basename(directory).startswith(f"{SWAP_PREFIX}{os.getpid()}-")
    store.close()
    assert not os.path.exists(directory) and os.listdir(tmp_path) == []


def test_swap_files_go_at_exit_and_a_crash_is_reported_next_time(tmp_path) -> None:
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    code = f"""if True:
        import os, signal, torch
        from tidal.offload import NvmeStore
        if os.fork() == 0:  # a child that is killed: no cleanup runs
            NvmeStore({str(crashed)!r}).write("k", torch.ones(1000)).wait()
            os.kill(os.getpid(), signal.SIGKILL)
        os.wait()
        NvmeStore({str(clean)!r}).write("k", torch.ones(1000)).wait()  # exits without close()
    """
    subprocess.run([sys.executable, "-c", code], check=True)
    assert os.listdir(clean) == []
    (leftover,) = os.listdir(crashed)
    with pytest.warns(LeftoverSwapWarning, match=f"{crashed / leftover} holds 1 swap files.*rm -rf"):
        NvmeStore(crashed, SMALL).close()
    assert os.listdir(crashed) == [leftover]
    assert sorted(os.listdir(crashed / leftover)) == ["00000000.swap", OWNER_FILE]


def test_buffer_pool_reuses_buffers_of_a_similar_size() -> None:
    pool = BufferPool(pinned=False)
    buffer = pool.take(10_000)
    assert buffer.numel() == 12_288 and buffer.data_ptr() % PAGE_BYTES == 0
    pool.give(buffer)
    assert pool.take(100) is not buffer  # far smaller: a new buffer, the big one stays spare
    assert pool.take(9000) is buffer
    assert pool.take(9000) is not buffer
