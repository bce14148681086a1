"""Expert weights in checkpoints: every expert under its global index, whatever the ep size.

    experts = ExpertCheckpointLayout(model, topology)          # after apply_expert_parallel
    state = {"model": experts.model_state(model.state_dict()), "optim": {"state": experts.optimizer_state(by_name)}}

A checkpoint holds each expert weight at its global shape under `MoELayer`'s names: ``<block>.experts.w1``
and ``w3`` (E, F, H), ``w2`` (E, H, F), expert e at row e. So a checkpoint taken at ep=2 loads at ep=1
(a transformers Mixtral not converted), ep=4, or another data-parallel size or ZeRO stage, optimizer
state included, and DCP reshards the rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from tidal.parallel.expert import MIXTRAL_BLOCKS, MoELayer
from tidal.parallel.topology import Topology
from tidal.runtime.deferred import DeferredTensors


class ExpertCheckpointLayout:
    """Expert tensors as a checkpoint names and shapes them: every expert under its global index, so the
    checkpoint does not depend on the ep size it was taken at.

    A parameter's checkpoint entries are views of it (and of its same-shaped optimizer state), so DCP's
    load writes into the model and the optimizer in place:

    - `MoELayer` experts held El = E/ep per rank: the (El, ...) tensors become DTensors sharded
      ``Shard(0)`` over the ep mesh, of global shape (E, ...). Rank r of ep holds rows r*El .. r*El+El-1,
      exactly its experts (`MoELayer.first_expert`); DCP writes each expert once (edp replicas hold equal
      shards, deduplicated by offset) and reshards on load. DTensors rather than one key per expert: the
      keys and shapes are those of the ep=1 model, the optimizer state follows without renaming, and
      DCP already reshards DTensors (ZeRO's rows) the same way. A tensor ZeRO already split over ``edp``
      (a Shard(0) DTensor of shape (El, ...): ZeRO 1/2 optimizer state, ZeRO 3 parameters) becomes a
      DTensor on the (ep, edp) mesh, (Shard(0), Shard(0)): experts over ep first, then their rows over edp.
    - an unconverted transformers Mixtral block (ep=1): the fused gate_up_proj (E, 2F, H) becomes the
      views w1 = [:, :F] and w3 = [:, F:], down_proj becomes w2, as `convert_mixtral_moe` splits them;
      a DTensor's local halves (ZeRO-3's Shard(0) rows, tp's [gate_r | up_r]) as DTensors of the halves.
      Fused weights split any other way keep their key.

    Other tensors (and an optimizer's step counts, which are not parameter-shaped) pass unchanged.

    Args:
        model: the model as wrapped (after `apply_expert_parallel`).
        topology: its topology; None or ep=1 shards nothing.
        deferred: the placeholders of offloaded optimizer state; a view of the fused weights' state is
            a new placeholder that reads (and writes back) its half.
    """

    def __init__(self, model: nn.Module, topology: Topology | None, deferred: DeferredTensors | None = None) -> None:
        self.deferred = deferred or DeferredTensors()
        self._views: dict[str, list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]] = {}
        self._shapes = {name: p.shape for name, p in model.named_parameters()}
        mesh = topology.submesh("ep") if topology is not None and topology.size("ep") > 1 else None
        ep_edp = _ep_major_mesh(topology) if mesh is not None else None
        for name, m in model.named_modules():
            prefix = f"{name}.experts" if name else "experts"
            if isinstance(m, MoELayer) and m.group is not None:
                for w in ("w1", "w3", "w2"):
                    sharded = functools.partial(_sharded, mesh=mesh, ep_edp=ep_edp, experts=m.num_experts)
                    self._views[f"{prefix}.{w}"] = [(f"{prefix}.{w}", sharded)]
            elif type(m).__name__ in MIXTRAL_BLOCKS and _halves_are_views(m.experts.gate_up_proj):
                self._views[f"{prefix}.gate_up_proj"] = [
                    (f"{prefix}.w1", functools.partial(self._half, half=0)),
                    (f"{prefix}.w3", functools.partial(self._half, half=1)),
                ]
                self._views[f"{prefix}.down_proj"] = [(f"{prefix}.w2", lambda t: t)]

    def model_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A model state dict (parameter name -> tensor) with the expert weights as checkpoint entries."""
        return {key: value for name, tensor in state.items() for key, value in self._entries(name, tensor)}

    def optimizer_state(self, state: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        """Optimizer state by parameter name, ``{name: {"exp_avg": ..., "step": ...}}``, likewise."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, entry in state.items():
            for key, value in entry.items():
                for saved, view in self._entries(name, value):
                    out.setdefault(saved, {})[key] = view
        return out

    def _entries(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The checkpoint's (name, tensor) pairs for `tensor`, the parameter `name` or a state of it."""
        views = self._views.get(name)
        if views is None:
            return [(name, tensor)]
        if tensor.shape != self._shapes[name]:  # a step count: the same for every part
            return [(saved, tensor) for saved, _ in views]
        return [(saved, view(tensor)) for saved, view in views]

    def _half(self, tensor: torch.Tensor, half: int) -> torch.Tensor:
        """The gate (`half` 0) or up (1) half of a fused (E, 2F, ...) tensor along dim 1, as a view: a DTensor's
        local half (tp keeps [gate_r | up_r] on rank r), or a placeholder reading its half of an offloaded one."""
        if isinstance(tensor, DTensor):
            placements = [Shard(1) if _splits_dim_1(p) else p for p in tensor.placements]
            shape = torch.Size((tensor.shape[0], tensor.shape[1] // 2, *tensor.shape[2:]))
            local = self._half(tensor.to_local(), half)
            return DTensor.from_local(
                local, tensor.device_mesh, placements, run_check=False, shape=shape, stride=_contiguous(shape)
            )
        rows = tensor.shape[1] // 2
        entry = self.deferred.find(tensor)
        if entry is None:
            return tensor.narrow(1, half * rows, rows)

        def write(part: torch.Tensor) -> None:
            whole = entry.read().clone()
            whole.narrow(1, half * rows, rows).copy_(part)
            entry.write(whole)

        shape = (tensor.shape[0], rows, *tensor.shape[2:])
        return self.deferred.placeholder(shape, tensor.dtype, lambda: entry.read().narrow(1, half * rows, rows), write)


def _halves_are_views(fused: torch.Tensor) -> bool:
    """Whether the gate and up halves of a fused gate_up_proj are views of its local tensor: dim 1 is not
    split, or split over one mesh dimension in 2 pieces (tp's [gate_r | up_r]) into even local halves."""
    if not isinstance(fused, DTensor):
        return True
    split = [p for p in fused.placements if _splits_dim_1(p)]
    if not split:
        return True
    even = fused.to_local().shape[1] % 2 == 0
    return len(split) == 1 and isinstance(split[0], _StridedShard) and split[0].split_factor == 2 and even


def _splits_dim_1(placement) -> bool:
    # torch's _StridedShard is not a Shard subclass in every version
    return isinstance(placement, (Shard, _StridedShard)) and placement.dim == 1


def _contiguous(shape: torch.Size) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


def _sharded(tensor: torch.Tensor, mesh: DeviceMesh, ep_edp: DeviceMesh, experts: int) -> DTensor:
    """This rank's experts (El, ...) as a DTensor of all `experts` (E, ...), Shard(0) over the ep `mesh`; a
    DTensor of their rows split over edp (ZeRO) as (Shard(0), Shard(0)) over the `ep_edp` mesh."""
    shape = torch.Size((experts, *tensor.shape[1:]))
    if not isinstance(tensor, DTensor):
        return DTensor.from_local(tensor, mesh, [Shard(0)], run_check=False, shape=shape, stride=_contiguous(shape))
    if tensor.device_mesh.mesh_dim_names != ("edp",) or tensor.placements != (Shard(0),):
        raise NotImplementedError(
            f"expert tensors split as {tensor.placements} over mesh {tensor.device_mesh.mesh_dim_names} cannot be "
            "checkpointed yet; only rows split over edp (ZeRO's Shard(0)) are"
        )
    return DTensor.from_local(
        tensor.to_local(), ep_edp, [Shard(0), Shard(0)], run_check=False, shape=shape, stride=_contiguous(shape)
    )


def _ep_major_mesh(topology: Topology) -> DeviceMesh:
    """This rank's (ep, edp) mesh, for checkpoint metadata only (it creates no process groups).

    Example, world 4, ep=2 (edp=2): the expert grid is edp-major ``[[0, 1], [2, 3]]`` (ep = (0, 1) and
    (2, 3)); the ep-major mesh is ``[[0, 2], [1, 3]]``, so (Shard(0), Shard(0)) on it splits the experts over
    ep first, then each ep rank's experts' rows over edp, as ZeRO does."""
    grid = topology.expert_mesh.mesh[topology.rank("pp")][..., topology.rank("tp")]  # (edp, ep)
    return DeviceMesh(topology.device_type, grid.T.contiguous(), mesh_dim_names=("ep", "edp"), _init_backend=False)
