"""Fixtures shared by the unit tests."""

import errno
import os

import pytest


@pytest.fixture
def refuse_o_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `os.open` refuse O_DIRECT with EINVAL, as tmpfs and some overlay filesystems do."""
    real_open = os.open

    def open_refusing_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_refusing_direct)
