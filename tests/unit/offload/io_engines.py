"""The NVMe engines the store tests run on."""

from __future__ import annotations

import pytest

from tidal.runtime.device import features

ENGINES = [
    "threads",
    pytest.param("aio", marks=pytest.mark.skipif(not features().kernel_aio, reason="kernel AIO refused here")),
]
"""offload.nvme.engine values the store tests run on (aio where this kernel allows it)."""
