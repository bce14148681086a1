"""One way to make the transfers of both NVMe engines fail."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import pytest

from tidal.offload.aio import KernelAio


@pytest.fixture
def fail_io(monkeypatch) -> Callable[..., None]:
    """`fail_io(code, after=0, writing=True)`: from now on, the transfer requests (spans) after the first
    `after` in that direction fail with OSError(`code`), in the thread pool (pwritev/preadv) and in kernel
    AIO (reported as the kernel reports a failed request); `monkeypatch.undo()` ends it."""

    def fail(code: int = errno.EIO, *, after: int = 0, writing: bool = True) -> None:
        seen = [0]

        def due() -> bool:
            seen[0] += 1
            return seen[0] > after

        name = "pwritev" if writing else "preadv"
        real_call = getattr(os, name)

        def call(*args: object) -> int:
            if due():
                raise OSError(code, os.strerror(code))
            return real_call(*args)

        real_submit = KernelAio.submit

        def submit(ring: KernelAio, *args: object, writing: bool, done: Callable[[OSError | None], None]) -> None:
            if writing == (name == "pwritev") and due():
                done(OSError(code, os.strerror(code)))
                return
            real_submit(ring, *args, writing=writing, done=done)

        monkeypatch.setattr(os, name, call)
        monkeypatch.setattr(KernelAio, "submit", submit)

    return fail
