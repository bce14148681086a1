"""Offload tiers: tensors kept in host memory or on NVMe, moved asynchronously (see store.py)."""

from tidal.offload.nvme import IoEngine, LeftoverSwapWarning, OffloadError
from tidal.offload.nvme_store import NvmeStore
from tidal.offload.store import CpuStore, Store, empty_aligned
from tidal.offload.swap_file import SwapFileStore

__all__ = [
    "CpuStore",
    "IoEngine",
    "LeftoverSwapWarning",
    "NvmeStore",
    "OffloadError",
    "Store",
    "SwapFileStore",
    "empty_aligned",
]
