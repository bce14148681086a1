"""The activation swap file: extents reused and merged, the file's growth, a full disk, cleanup."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from io_engines import ENGINES

from tidal.config import NvmeConfig
from tidal.offload import OffloadError
from tidal.offload.nvme import ALIGN, OWNER_FILE, page_span
from tidal.offload.swap_file import MIN_GROWTH, SWAP_FILE, Extents, SwapFileStore

SMALL = NvmeConfig(block_size=4096, queue_depth=2, threads=3)


@pytest.fixture(params=ENGINES)
def swap(tmp_path, request):
    store = SwapFileStore(tmp_path, SMALL.model_copy(update={"engine": request.param}))
    assert store.engine_kind == request.param
    yield store
    store.close()


def test_extents_best_fit_split_and_merge() -> None:
    space = Extents()
    a, b, c, d = (space.take(size) for size in (100, 50, 200, 30))
    assert (a, b, c, d, space.end) == (0, 100, 150, 350, 380)
    space.give(a, 100)
    space.give(c, 200)
    assert space.take(40) == a  # the smallest free extent that fits (100 of them, not 200): split
    assert space.take(60) == a + 40  # the rest of it, exactly
    space.give(b, 50)  # b alone: its neighbours are both taken
    assert space.free_bytes() == 250
    space.give(a, 40)
    space.give(a + 40, 60)  # merges with a's 40 before it and b's 50 after it, then with c's 200
    assert space.free_bytes() == 350 and space.take(350) == 0
    space.give(0, 350)
    space.give(d, 30)  # the last extent: the end moves back over everything free
    assert (space.end, space.free_bytes()) == (0, 0)


def test_tensors_round_trip_and_freed_space_is_reused(swap) -> None:
    tensors = {f"t{i}": torch.randn(1000 + 777 * i) for i in range(6)}
    for key, tensor in tensors.items():
        swap.write(key, tensor)
    for key, tensor in tensors.items():
        back = swap.read(key).wait()
        assert torch.equal(back, tensor)
        assert back.data_ptr() % ALIGN == tensor.data_ptr() % ALIGN  # its pages read whole: no bounce copy
    size, unused = swap.file_bytes()
    assert size == MIN_GROWTH and unused == size - sum(page_span(t)[1] for t in tensors.values())
    for key in tensors:
        swap.delete(key)
    assert swap.file_bytes() == (size, size)
    for step in range(3):  # the same tensors again: the same space, the file does not grow
        for key, tensor in tensors.items():
            swap.write(key, tensor + step)
        for key, tensor in tensors.items():
            assert torch.equal(swap.read(key).wait(), tensor + step)
            swap.delete(key)
        assert swap.file_bytes() == (size, size)
    assert sorted(os.listdir(swap.directory)) == sorted([OWNER_FILE, SWAP_FILE])


def test_rewriting_a_key_frees_its_old_extent(swap) -> None:
    swap.write("k", torch.ones(4096)).wait()
    zeros = torch.zeros(2048)
    swap.write("k", zeros).wait()
    assert torch.equal(swap.read("k").wait(), zeros)
    size, unused = swap.file_bytes()
    assert unused == size - page_span(zeros)[1]


def test_a_read_into_a_tensor_elsewhere_in_its_page_is_copied_there(swap) -> None:
    tensor = torch.randn(3000)
    swap.write("k", tensor).wait()
    block = torch.zeros(3000 + 2048)
    for start in (0, 1, 7, 1024):  # out at other places in a page than the tensor written
        out = block.zero_()[start : start + 3000]
        assert swap.read("k", out=out).wait() is out and torch.equal(out, tensor)
        assert not block[:start].any() and not block[start + 3000 :].any()  # nothing around it touched


def test_the_file_grows_and_a_full_disk_fails_the_write_that_needed_space(swap, monkeypatch) -> None:
    swap.write("small", torch.arange(10.0)).wait()
    big = torch.randn(MIN_GROWTH // 4 + 1)  # does not fit in the first MIN_GROWTH bytes
    real = os.posix_fallocate

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OffloadError, match="growing swap file .*ENOSPC.*needed.*free there"):
        swap.write("big", big)
    assert "big" not in swap and torch.equal(swap.read("small").wait(), torch.arange(10.0))
    monkeypatch.setattr(os, "posix_fallocate", real)
    swap.write("big", big).wait()
    assert torch.equal(swap.read("big").wait(), big) and swap.file_bytes()[0] > MIN_GROWTH


def test_a_failed_write_frees_its_extent_and_reports_the_file(swap, fail_io) -> None:
    swap.write("a", torch.ones(1024)).wait()
    size, unused = swap.file_bytes()
    fail_io(errno.EIO)
    with pytest.raises(OffloadError, match=f"writing '{swap.path}' failed.*EIO"):
        swap.write("b", torch.ones(1024)).wait()
    assert "b" not in swap and swap.file_bytes() == (size, unused)
    assert torch.equal(swap.read("a").wait(), torch.ones(1024))


def test_close_removes_the_directory(tmp_path) -> None:
    swap = SwapFileStore(tmp_path, SMALL)
    swap.write("a", torch.ones(10)).wait()
    swap.close()
    swap.close()
    assert not os.path.exists(swap.directory)
    with pytest.raises(OffloadError, match="closed"):
        swap.write("a", torch.ones(10))
