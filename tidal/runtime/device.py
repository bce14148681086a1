"""The only module that knows CUDA from the CPU.

Everything else asks this module: which device a rank computes on, which collective backend it uses,
and which optional torch features this build offers. Feature detection happens once, here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Features:
    """What this torch build and machine offer, detected once per process."""

    torch_version: str
    cuda: bool
    """A CUDA device is visible and usable."""
    cuda_devices: int
    nccl: bool
    gloo: bool
    mpi: bool
    """torch was built with its own MPI backend (rare; tidal's MPI support does not need it)."""
    bf16_cpu: bool
    """bf16 matmuls run on this CPU (torch reports the AMX/AVX512-BF16 path or falls back correctly)."""


@functools.cache
def features() -> Features:
    """Detect the optional pieces of this torch build once and remember them."""
    cuda = torch.cuda.is_available()
    return Features(
        torch_version=torch.__version__,
        cuda=cuda,
        cuda_devices=torch.cuda.device_count() if cuda else 0,
        nccl=dist.is_available() and dist.is_nccl_available(),
        gloo=dist.is_available() and dist.is_gloo_available(),
        mpi=dist.is_available() and dist.is_mpi_available(),
        bf16_cpu=torch.backends.mkldnn.is_available(),
    )


@dataclass(frozen=True)
class Device:
    """The device one rank computes on and the collective backend that matches it."""

    type: str
    """"cuda" or "cpu"."""
    index: int | None
    """The CUDA device index for this rank; None on the CPU."""
    backend: str
    """The torch.distributed backend: "nccl" on CUDA, "gloo" on the CPU."""

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type, self.index) if self.index is not None else torch.device(self.type)

    def activate(self) -> None:
        """Make this rank's device the current one (a no-op on the CPU)."""
        if self.type == "cuda":
            torch.cuda.set_device(self.index)


def select_device(local_rank: int, prefer: str = "auto") -> Device:
    """Choose this rank's device.

    Args:
        local_rank: the rank's index on its node; on CUDA it picks the GPU (modulo the visible count).
        prefer: "auto" (CUDA when visible, else the CPU), "cuda" or "cpu".
    Raises:
        ValueError: `prefer` is unknown, or "cuda" is asked for where no GPU is visible.
    """
    feats = features()
    if prefer not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device={prefer!r} is not a device kind; choose one of auto, cuda, cpu")
    if prefer == "cuda" and not feats.cuda:
        raise ValueError("device='cuda' was asked for but no CUDA device is visible; use device='cpu' or 'auto'")
    if feats.cuda and prefer in ("auto", "cuda"):
        return Device("cuda", local_rank % feats.cuda_devices, "nccl" if feats.nccl else "gloo")
    return Device("cpu", None, "gloo")


def memory_stats(device: Device) -> dict[str, int]:
    """Memory the caching allocator holds for tensors on `device`.

    Returns:
        On CUDA: "allocated" (bytes in live tensors now) and "peak" (the most allocated since the
        process started or torch's peak counter was last reset), in bytes. On the CPU: {} (ask psutil).
    """
    if device.type != "cuda":
        return {}
    return {
        "allocated": torch.cuda.memory_allocated(device.torch_device),
        "peak": torch.cuda.max_memory_allocated(device.torch_device),
    }
