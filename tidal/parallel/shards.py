"""Plain-tensor views of DTensors, for code that moves bytes (gradient buckets, offload) rather than math."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of `tensor` (a DTensor's local shard, else the tensor), detached, sharing its storage."""
    with torch.no_grad():
        return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).detach()


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (a local shard) as a tensor laid out like `param`: a DTensor of the same mesh and placements
    when `param` is one, else `value` itself."""
    if not isinstance(param, DTensor):
        return value
    return DTensor.from_local(
        value, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


PIPELINE_COPIES = "_tidal_pipeline_copies"
"""Attribute of a parameter held by stages on more than one pipeline rank (a tied embedding and LM head): how
many hold it. Each has its whole gradient, so a gradient norm counts 1/copies of it on each."""


def pipeline_copies(param: torch.Tensor) -> int:
    """Pipeline ranks holding `param` (1 unless `PIPELINE_COPIES` says more)."""
    return getattr(param, PIPELINE_COPIES, 1)
