"""The device a plan is for: peak FLOP/s, memory and link bandwidths, as data the step-time model reads.

    hw = Hardware.named("H100")                      # built-in figures (`GPUS`), vendor data sheets
    hw = Hardware.named("H100", inter_bw=25e9)       # one figure replaced (a flag, a measured link)
    hw = hardware_for(budgets)                       # the GPU probed here; H100 for a --gpu-mem plan; else
                                                     # this host, measured in about a second

Bandwidths are one direction per device (a ring collective's rate), bytes/s; FLOP/s are dense peaks, which
`Hardware.rate` scales by `efficiency`. Figures for a cluster other than this machine come from flags
(`dataclasses.replace`), as the budgets do.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tidal.memory.planner import Budgets


@dataclass(frozen=True)
class Hardware:
    """One device and its links; bandwidths one direction, bytes/s; compute FLOP/s."""

    name: str
    flops: float
    """Peak dense FLOP/s in 16-bit (bf16/fp16) matmuls."""
    fp32_flops: float
    """Peak FLOP/s in fp32 (torch's default fp32 matmuls do not use TF32)."""
    intra_bw: float
    """Per device, to devices of its node (NVLink, else PCIe)."""
    inter_bw: float
    """Per device, across nodes (its network adapter)."""
    pcie_bw: float
    """Per device, to and from host memory."""
    memory_bw: float | None = None
    """Device memory, for the optimizer update; None: the update is not counted."""
    nvme_bw: float = 3e9
    """NVMe reads or writes per node, shared by its ranks; default 3e9."""
    host_bw: float = 100e9
    """Host memory bandwidth a CPU optimizer step reaches per node, shared by its ranks; default 100e9."""
    efficiency: float = 0.5
    """Share of peak FLOP/s a step's counted FLOPs reach; default 0.5 (Megatron-Core reports up to 47% MFU
    on H100, communication included)."""
    op_overhead: float = 5e-6
    """Host time to dispatch one aten op (views included) in eager PyTorch, seconds; default 5e-6."""
    async_ops: bool = True
    """Ops are queued ahead of the device (GPU), so dispatch hides behind compute; False on a CPU."""
    source: str = ""
    """Where the figures come from."""

    def rate(self, precision: str) -> float:
        """FLOP/s a step reaches in `precision` ("fp32", "bf16", "fp16")."""
        return (self.fp32_flops if precision == "fp32" else self.flops) * self.efficiency

    @classmethod
    def named(cls, name: str, **overrides: Any) -> Hardware:
        """The built-in figures of GPU `name` (see `GPUS`; case-insensitive), with `overrides` replaced."""
        key = name.upper()
        if key not in GPUS:
            raise ValueError(f"no figures for GPU {name!r}; known: {', '.join(GPUS)}; or pass the numbers")
        return replace(GPUS[key], **{k: v for k, v in overrides.items() if v is not None})


_VENDOR = "NVIDIA data sheets, dense (no sparsity); inter-node: a typical NIC per GPU for its generation"
GPUS: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware("H100", 989e12, 67e12, 450e9, 50e9, 64e9, 3.35e12, source=f"H100 SXM5: {_VENDOR}"),
        Hardware("H100-PCIE", 756e12, 51e12, 64e9, 50e9, 64e9, 2.0e12, source=f"H100 PCIe: {_VENDOR}"),
        Hardware("H200", 989e12, 67e12, 450e9, 50e9, 64e9, 4.8e12, source=f"H200 SXM: {_VENDOR}"),
        Hardware("A100", 312e12, 19.5e12, 300e9, 25e9, 32e9, 2.039e12, source=f"A100 SXM4 80GB: {_VENDOR}"),
        Hardware("A100-PCIE", 312e12, 19.5e12, 32e9, 25e9, 32e9, 1.935e12, source=f"A100 PCIe 80GB: {_VENDOR}"),
        Hardware("L40S", 362e12, 91.6e12, 32e9, 12.5e9, 32e9, 864e9, source=f"L40S: {_VENDOR}"),
        Hardware("L4", 121e12, 30.3e12, 32e9, 12.5e9, 32e9, 300e9, source=f"L4: {_VENDOR}"),
        Hardware("A10", 125e12, 31.2e12, 32e9, 12.5e9, 32e9, 600e9, source=f"A10: {_VENDOR}"),
    )
}
"""Built-in devices: 16-bit and fp32 peak FLOP/s, NVLink (one direction: half the data sheet's total) or
PCIe between GPUs of a node, network per GPU, PCIe to the host, memory bandwidth."""


def parse_rate(text: str | float) -> float:
    """A per-second figure from a flag: "3GB/s" -> 3e9, "25GiB/s", "989TFLOP/s" or "989T" -> 9.89e14."""
    if isinstance(text, int | float):
        return float(text)
    from tidal.memory.planner import parse_bytes

    unit = re.sub(r"(?i)(flops?)?(/s)?\s*$", "", text.strip())
    try:
        return float(parse_bytes(unit))
    except ValueError:
        raise ValueError(f"rate {text!r} is not a number per second; write e.g. 3GB/s, 25GiB/s or 989TFLOP/s") from None


def match_gpu(name: str) -> str | None:
    """The `GPUS` key for a device name as NVML reports it ("NVIDIA H100 80GB HBM3" -> "H100"), or None."""
    upper = name.upper()
    for key in sorted(GPUS, key=len, reverse=True):
        base, _, variant = key.partition("-")
        if re.search(rf"\b{base}\b", upper) and (not variant or variant in upper):
            return key
    return None


@functools.cache
def measure_host() -> Hardware:
    """This host as the device (no GPU): matmul FLOP/s in fp32 and bf16, copy bandwidth and per-op dispatch
    time, measured in about a second with torch's current threads; gloo links at a nominal 0.5 GB/s (a
    16 MiB all-reduce between 2 processes on a 2-core host)."""
    a = torch.randn(512, 512)

    def per_second(work: float, fn) -> float:
        fn()
        start, runs = time.perf_counter(), 0
        while time.perf_counter() - start < 0.15:
            fn()
            runs += 1
        return work * runs / (time.perf_counter() - start)

    fp32 = per_second(2 * 512**3, lambda: a @ a)
    b = a.bfloat16()
    bf16 = per_second(2 * 512**3, lambda: b @ b)
    source, target = torch.ones(8 * 2**20), torch.empty(8 * 2**20)
    copy = per_second(2 * source.nbytes, lambda: target.copy_(source))  # read + write
    tiny = torch.zeros(1)
    overhead = 1 / per_second(1, lambda: tiny.add(1))
    return Hardware(
        "this host (measured)",
        bf16,
        fp32,
        intra_bw=0.5e9,
        inter_bw=0.5e9,
        pcie_bw=copy,
        memory_bw=copy,
        host_bw=copy,
        efficiency=1.0,
        op_overhead=overhead,
        async_ops=False,
        source=f"measured: matmul fp32 {fp32 / 1e9:.0f} GFLOP/s, bf16 {bf16 / 1e9:.0f}, copy {copy / 1e9:.1f} GB/s",
    )


def hardware_for(budgets: Budgets, gpu: str | None = None, **overrides: Any) -> Hardware:
    """The device to plan for: `gpu` by name, else the GPU probed here, else H100 when the budgets name a
    device memory (planning a cluster from elsewhere), else this host measured; `overrides` replace fields."""
    from tidal.memory.probe import probe_gpus

    assumed = ""
    if gpu is None and budgets.device is not None:
        found = probe_gpus().gpus
        gpu = match_gpu(found[0].name) if found else None
        if gpu is None:
            gpu, assumed = "H100", f"assumed ({found[0].name if found else 'no GPU here'}, none named): "
    hardware = measure_host() if gpu is None else Hardware.named(gpu)
    hardware = replace(hardware, source=assumed + hardware.source)
    return replace(hardware, **{k: v for k, v in overrides.items() if v is not None})
