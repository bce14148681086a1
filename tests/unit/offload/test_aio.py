"""Kernel AIO on this machine's disk: requests queued past the limits, completions taken by any thread,
errors as the kernel reports them (a refused submission, a read past the end), close."""

from __future__ import annotations

import errno
import os
import threading

import pytest
import torch

from tidal.offload.aio import KernelAio
from tidal.offload.nvme import ALIGN
from tidal.runtime.device import empty_host, features

pytestmark = pytest.mark.skipif(not features().kernel_aio, reason="kernel AIO refused here")


@pytest.fixture
def direct_file(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    yield fd
    os.close(fd)


class Results:
    """Collects each request's completion: its error (None for success), once per request."""

    def __init__(self) -> None:
        self.errors: dict[int, OSError | None] = {}
        self._lock = threading.Lock()

    def done(self, index: int):
        def finished(error: OSError | None) -> None:
            with self._lock:
                assert index not in self.errors, "a request completed twice"
                self.errors[index] = error

        return finished


def test_requests_past_the_limits_wait_and_all_complete(direct_file) -> None:
    ring = KernelAio(max_bytes=3 * ALIGN, max_requests=2)  # 16 requests: most wait in the queue
    sources = [empty_host(2 * ALIGN).fill_(index) for index in range(16)]
    results = Results()
    for index, source in enumerate(sources):
        ring.submit(
            direct_file, source.data_ptr(), 2 * ALIGN, index * 2 * ALIGN, writing=True, done=results.done(index)
        )
    assert ring.pending() > 2
    ring.wait_until(lambda: len(results.errors) == 16)
    assert set(results.errors.values()) == {None} and ring.pending() == 0
    outs = [empty_host(2 * ALIGN) for _ in sources]
    reads = Results()
    for index, out in enumerate(outs):
        ring.submit(direct_file, out.data_ptr(), 2 * ALIGN, index * 2 * ALIGN, writing=False, done=reads.done(index))
    ring.close()  # waits for every request
    assert set(reads.errors.values()) == {None} and len(reads.errors) == 16
    for out, source in zip(outs, sources, strict=True):
        assert torch.equal(out, source)
    ring.close()  # a second close is a no-op
    with pytest.raises(OSError, match="closed"):
        ring.submit(direct_file, outs[0].data_ptr(), ALIGN, 0, writing=False, done=reads.done(99))


def test_threads_waiting_at_once_each_get_their_completion(direct_file) -> None:
    ring = KernelAio(max_bytes=1 << 20)
    buffers = [empty_host(64 * ALIGN).fill_(index) for index in range(8)]
    results = Results()
    for index, buffer in enumerate(buffers):
        ring.submit(
            direct_file, buffer.data_ptr(), 64 * ALIGN, index * 64 * ALIGN, writing=True, done=results.done(index)
        )

    def wait_for(index: int) -> None:
        ring.wait_until(lambda: index in results.errors)

    waiters = [threading.Thread(target=wait_for, args=(index,)) for index in range(8)]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join(timeout=30)
        assert not waiter.is_alive(), "a waiter missed a completion another thread took"
    assert results.errors == dict.fromkeys(range(8))
    ring.close()


def test_errors_arrive_through_the_callback_and_the_ring_stays_usable(direct_file) -> None:
    ring = KernelAio(max_bytes=1 << 20)
    buffer = empty_host(2 * ALIGN).fill_(7)
    results = Results()
    ring.submit(-1, buffer.data_ptr(), ALIGN, 0, writing=True, done=results.done(0))  # io_submit refuses it
    ring.submit(direct_file, buffer.data_ptr(), 2 * ALIGN, 0, writing=True, done=results.done(1))
    ring.wait_until(lambda: len(results.errors) == 2)
    assert results.errors[0].errno == errno.EBADF and results.errors[1] is None
    ring.submit(direct_file, buffer.data_ptr(), 2 * ALIGN, 8 * ALIGN, writing=False, done=results.done(2))
    ring.submit(direct_file, buffer.data_ptr(), 2 * ALIGN, ALIGN, writing=False, done=results.done(3))
    ring.wait_until(lambda: len(results.errors) == 4)
    assert results.errors[2].errno == errno.EIO  # past the end of the file
    assert results.errors[3].errno == errno.EIO  # half there: the rest, asked for again, is past the end
    ring.close()
