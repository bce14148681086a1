"""Data parallelism and ZeRO stages 0-3 over the topology's ``dp_sp`` group.

- Stage 0 (`Replicated`): every rank holds everything; gradients are averaged by asynchronous
  bucketed all-reduces during backward (`tidal.comm.buckets`).
- Stages 1 and 2 (`ShardedOptimizer`): each parameter's rows are split over the ranks (torch.chunk
  sizes, as DTensor's Shard(0)); the user's optimizer is re-pointed at this rank's rows, which are
  views into the model's parameters, so its state exists only for them. Stage 1 all-reduces full
  gradients; stage 2 reduce-scatters them so a rank only keeps its rows' gradient. After the step the
  updated rows are all-gathered back into every replica.
- Stage 3 (`FullyShardedFSDP2`): torch's FSDP2 (`fully_shard`) on each repeated block and the root,
  with the next blocks' all-gathers prefetched; the optimizer is re-pointed at FSDP2's DTensor
  parameters.

Every strategy presents the engine the same small surface (see `DataParallel`) and states its
optimizer state per parameter name, with sharded tensors as DTensors, so a checkpoint taken under
any stage and data-parallel size loads under any other.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from tidal.comm.buckets import GradientBuckets, copy_rows, lay_out_segments, row_range
from tidal.config import Config
from tidal.offload.params import apply_param_offload, fsdp_offload_policy
from tidal.parallel.shards import like, local
from tidal.parallel.topology import Topology
from tidal.runtime.device import Device

CommObserver = Callable[[str, int, dist.Work], object]


class DataParallel:
    """The engine's view of a data-parallel strategy; one instance per wrapped model."""

    stage = 0

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, topology: Topology) -> None:
        self.model = model
        self.optimizer = optimizer
        self.group = topology.group("dp_sp")
        self.mesh = topology.submesh("dp_sp")
        self.world = topology.size("dp_sp")
        self.rank = topology.rank("dp_sp")
        self.model_parallel = topology.size("world") > self.world or topology.size("ep") > 1
        """Other ranks hold other parts of the model (tensor, pipeline or expert parallel)."""
        self.world_group = topology.group("world")
        self.tp = topology.size("tp")
        if optimizer.state:
            raise RuntimeError(
                "tidal.wrap() got an optimizer that has already stepped; wrap it before its first step "
                "(load earlier state afterwards with engine.load())"
            )

    def prepare_backward(self, boundary: bool) -> None:
        """Called as each micro-step starts: will its backward reduce gradients (a boundary) or not."""

    def finish_gradients(self) -> None:
        """Before the optimizer step: every gradient the optimizer reads is reduced and in place."""

    def optimizer_grads(self) -> list[torch.Tensor]:
        return [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def grad_sq_sum(self) -> tuple[torch.Tensor, dist.ProcessGroup | None]:
        """This rank's share of the squared gradient norm, and the group to sum it over (None: local).

        With model parallelism (tensor, pipeline, ...) every rank's share counts each piece of a
        gradient once over the whole job: a piece held by r ranks (data-parallel replicas, DTensor
        Replicate dimensions) adds 1/r of its square on each, and the shares are summed over the world."""
        if self.model_parallel:
            return _sq_sum(self.optimizer_grads(), self.world, self.tp), self.world_group
        return _sq_sum(self.optimizer_grads()), None

    def drop_grads(self) -> None:
        """Skip this step: the optimizer sees no gradient at all (fp16 overflow)."""
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                p.grad = None

    def after_step(self) -> None:
        """After the optimizer step: bring the replicas back in agreement."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """After the user's optimizer.zero_grad(): clear gradients the optimizer does not see."""

    def optimizer_param_names(self) -> dict[int, str]:
        """id(optimizer param) -> the model parameter name it stands for."""
        return {id(p): name for name, p in self.model.named_parameters()}

    def optimizer_state(
        self, state: Mapping[torch.Tensor, dict[str, torch.Tensor]] | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """The optimizer's per-parameter state by parameter name (sharded rows as DTensors).

        Args:
            state: the state by optimizer parameter when it is kept elsewhere (offloaded); default:
                the optimizer's own.
        """
        state = self.optimizer.state if state is None else state
        names = self.optimizer_param_names()
        return {
            names[id(p)]: {k: self._global_view(p, v) for k, v in state[p].items()}
            for g in self.optimizer.param_groups
            for p in g["params"]
            if p in state
        }

    def _global_view(self, param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value

    def _broadcast_from_first_rank(self, skip: set[int] = frozenset()) -> None:
        src = dist.get_global_rank(self.group, 0)
        with torch.no_grad():
            for t in [*self.model.parameters(), *self.model.buffers()]:
                if id(t) in skip:
                    continue
                dist.broadcast(local(t), src=src, group=self.group)  # a tensor-parallel shard: its dp replicas


def _chunks(params: list[torch.nn.Parameter], limit_bytes: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive groups of `params` of about `limit_bytes` each (at least one parameter per group)."""
    groups: list[list[torch.nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if groups[-1] and size >= limit_bytes:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.numel() * p.element_size()
    return [g for g in groups if g]


def _sq_sum(grads: list[torch.Tensor], replicas: int = 1, plain: int = 1) -> torch.Tensor:
    """Sum of squared entries of the local parts of `grads`, as a float64 scalar; each part divided by the
    number of ranks holding it: `replicas` times the sizes of its DTensor Replicate mesh dimensions."""
    by_count: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        by_count.setdefault(replicas * _replicated(g, plain), []).append(local(g))
    total = torch.zeros((), dtype=torch.float64)
    for count, parts in by_count.items():
        total += torch.nn.utils.get_total_norm(parts).double() ** 2 / count
    return total


def _replicated(tensor: torch.Tensor, plain: int = 1) -> int:
    """How many ranks of its mesh hold each element of a DTensor (product of Replicate dimensions); `plain`
    for a plain tensor (the tensor-parallel size: such parameters are copies on every tp rank)."""
    if not isinstance(tensor, DTensor):
        return plain
    mesh = tensor.device_mesh
    return math.prod(mesh.size(i) for i, placement in enumerate(tensor.placements) if placement.is_replicate())


class Replicated(DataParallel):
    """ZeRO stage 0: replicas everywhere, gradients all-reduced in buckets during backward."""

    def __init__(
        self, model, optimizer, topology, bucket_bytes: int, on_comm: CommObserver | None, params: list | None = None
    ) -> None:
        super().__init__(model, optimizer, topology)
        params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
        # Expert parameters (expert parallel) differ across the ep ranks: they are broadcast and reduced over
        # edp, their gradients summed there and divided by the dp_sp size (backward's all-to-all already
        # brought every ep rank's tokens' contribution to the expert's owner).
        self.experts = [p for p in params if getattr(p, "_tidal_expert", False)]
        expert_ids = {id(p) for p in self.experts}
        dense = [p for p in params if id(p) not in expert_ids]
        self._broadcast_from_first_rank(skip=expert_ids)
        self.buckets = GradientBuckets(dense, ["all_reduce"] * len(dense), self.group, bucket_bytes, on_comm=on_comm)
        self.expert_buckets = None
        if self.experts:
            self.edp = topology.size("edp")
            edp_group = topology.group("edp")
            with torch.no_grad():
                for p in self.experts:
                    dist.broadcast(local(p), src=dist.get_global_rank(edp_group, 0), group=edp_group)
            self.expert_buckets = GradientBuckets(
                self.experts,
                ["all_reduce"] * len(self.experts),
                edp_group,
                bucket_bytes,
                on_comm=on_comm,
                scale=1.0 / self.world,
            )

    def _all_buckets(self) -> list[GradientBuckets]:
        return [self.buckets] + ([self.expert_buckets] if self.expert_buckets is not None else [])

    def prepare_backward(self, boundary: bool) -> None:
        for buckets in self._all_buckets():
            buckets.arm(boundary and self.world > 1)

    def finish_gradients(self) -> None:
        for buckets in self._all_buckets():
            if buckets.pending and self.world > 1:
                buckets.reduce_now()

    def grad_sq_sum(self) -> tuple[torch.Tensor, dist.ProcessGroup | None]:
        if not self.experts:
            return super().grad_sq_sum()
        experts = {id(p) for p in self.experts}
        named = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        dense = [p.grad for p in named if id(p) not in experts]
        expert = [p.grad for p in named if id(p) in experts]
        return _sq_sum(dense, self.world, self.tp) + _sq_sum(expert, self.edp, self.tp), self.world_group


class ShardedOptimizer(DataParallel):
    """ZeRO stages 1 and 2: optimizer state (and with stage 2, gradients) kept for this rank's rows only."""

    def __init__(self, model, optimizer, topology, stage: int, bucket_bytes: int, on_comm: CommObserver | None) -> None:
        super().__init__(model, optimizer, topology)
        self.stage = stage
        self.bucket_bytes = bucket_bytes
        self.on_comm = on_comm
        self._broadcast_from_first_rank()
        self.shards: dict[torch.nn.Parameter, torch.nn.Parameter] = {}
        self.owner: dict[int, torch.nn.Parameter] = {}
        for p in model.parameters():
            if p.requires_grad and p.dim() > 0:  # a 0-dim parameter has no rows: every rank updates it
                start, end = row_range(p.shape[0], self.world, self.rank)
                shard = torch.nn.Parameter(p.data[start:end])
                self.shards[p] = shard
                self.owner[id(shard)] = p
        for group in optimizer.param_groups:
            group["params"] = [self.shards.get(p, p) for p in group["params"]]
        params = [p for p in model.parameters() if p.requires_grad]
        modes = ["reduce_scatter" if stage == 2 and p in self.shards else "all_reduce" for p in params]
        self.buckets = GradientBuckets(params, modes, self.group, bucket_bytes, self._receive_shard_grad, on_comm)

    def _receive_shard_grad(self, param: torch.nn.Parameter, chunk: torch.Tensor) -> None:
        shard = self.shards[param]
        if shard.grad is None:
            shard.grad = chunk.clone()
        else:
            shard.grad.add_(chunk)

    def prepare_backward(self, boundary: bool) -> None:
        self.buckets.arm(boundary)

    def finish_gradients(self) -> None:
        if self.buckets.pending:
            self.buckets.reduce_now()
        if self.stage == 1:
            for p, shard in self.shards.items():
                if p.grad is not None:
                    start, end = row_range(p.shape[0], self.world, self.rank)
                    shard.grad = p.grad[start:end]

    def grad_sq_sum(self) -> tuple[torch.Tensor, dist.ProcessGroup | None]:
        sharded = [s.grad for s in self.shards.values() if s.grad is not None]
        replicated = [p.grad for p in self.model.parameters() if p.grad is not None and p not in self.shards]
        total = _sq_sum(sharded)
        if self.model_parallel:
            return total + _sq_sum(replicated, self.world), self.world_group
        if self.rank == 0:  # replicated gradients are equal on every rank: count them once
            total += _sq_sum(replicated)
        return total, self.group

    def after_step(self) -> None:
        works = [self._launch_gather(chunk) for chunk in _chunks(list(self.shards), self.bucket_bytes)]
        with torch.no_grad():
            for chunk, offsets, segment, out, work, record in works:
                with record.blocked() if record is not None else contextlib.nullcontext():
                    work.wait()
                for p, starts in zip(chunk, offsets, strict=True):
                    copy_rows(p.data, out, starts, segment, self.world, into_segments=False)

    def _launch_gather(self, chunk: list[torch.nn.Parameter]):
        offsets, segment = lay_out_segments(chunk, self.world)
        mine = torch.zeros(segment, dtype=chunk[0].dtype, device=chunk[0].device)
        for p, starts in zip(chunk, offsets, strict=True):
            local = self.shards[p].data.reshape(-1)
            mine[starts[self.rank] : starts[self.rank] + local.numel()].copy_(local)
        out = torch.empty(segment * self.world, dtype=mine.dtype, device=mine.device)
        work = dist.all_gather_into_tensor(out, mine, group=self.group, async_op=True)
        record = self.on_comm("all_gather params", out.numel() * out.element_size(), work) if self.on_comm else None
        return chunk, offsets, segment, out, work, record

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model.parameters():
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def optimizer_param_names(self) -> dict[int, str]:
        names = super().optimizer_param_names()
        return {id(s): names[id(p)] for p, s in self.shards.items()} | names

    def _global_view(self, param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        full = self.owner.get(id(param))
        if full is None or value.shape != param.shape:  # replicated, or a scalar such as Adam's step
            return value
        return DTensor.from_local(value, self.mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())


class FullyShardedFSDP2(DataParallel):
    """ZeRO stage 3 on torch's FSDP2: parameters sharded, gathered per block with prefetch."""

    stage = 3

    def __init__(self, model, optimizer, topology, config: Config, device: Device) -> None:
        from torch.distributed.fsdp import fully_shard

        super().__init__(model, optimizer, topology)
        self._broadcast_from_first_rank()
        names = {id(p): n for n, p in model.named_parameters()}
        # The optimizer lets go of the original parameters while FSDP2 copies them into shards, so each is
        # freed as soon as its shard exists: the peak stays near one copy of the model, not two.
        slots = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["params"] = []
        reshard = config.zero.reshard_after_forward
        policy = fsdp_offload_policy(config.offload.params, device)
        blocks = repeated_blocks(model)
        for block in blocks:
            fully_shard(block, mesh=self.mesh, reshard_after_forward=reshard, offload_policy=policy)
        # The root keeps its parameters (embeddings, final norm) gathered from forward into backward: they
        # are needed again at once when backward starts, so freeing them would only cost a re-gather.
        fully_shard(model, mesh=self.mesh, reshard_after_forward=False, offload_policy=policy)
        ahead = config.zero.prefetch_modules
        if ahead > 1:  # FSDP2 already overlaps the next block's gather; deeper prefetch is explicit
            for i, block in enumerate(blocks):
                block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + ahead])
                block.set_modules_to_backward_prefetch(blocks[max(0, i - ahead) : i][::-1])
        by_name = dict(model.named_parameters())
        for group, slot in zip(optimizer.param_groups, slots, strict=True):
            group["params"] = [by_name[name] for name in slot]
        self._synced = True
        self.param_offload = apply_param_offload(model, blocks, config.offload.params, config.offload.nvme, device)

    def prepare_backward(self, boundary: bool) -> None:
        if boundary != self._synced:  # the setter walks every module: only when it changes
            self.model.set_requires_gradient_sync(boundary)
        self._synced = boundary

    def finish_gradients(self) -> None:
        if not self._synced:
            raise RuntimeError(
                "optimizer.step() came after a backward that did not reduce gradients; with zero.stage=3 "
                "step after every train.gradient_accumulation_steps-th backward (or outside engine.no_sync())"
            )

    def grad_sq_sum(self) -> tuple[torch.Tensor, dist.ProcessGroup | None]:
        if self.model_parallel:
            return _sq_sum(self.optimizer_grads(), plain=self.tp), self.world_group
        return _sq_sum(self.optimizer_grads()), self.group

    def _global_view(self, param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if isinstance(value, DTensor) or value.dim() == 0:
            return value
        return like(param, value)  # offloaded state is kept as this rank's local shard


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The children of the model's largest ModuleList/Sequential (transformer layers): FSDP2's units."""
    best: list[torch.nn.Module] = []
    best_size = 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList | torch.nn.Sequential) and len(module) > 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = [m for m in module if any(True for _ in m.parameters())], size
    return best


def apply_data_parallel(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    topology: Topology,
    config: Config,
    device: Device,
    on_comm: CommObserver | None = None,
    params: list[torch.nn.Parameter] | None = None,
) -> DataParallel:
    """Choose and build the strategy for ``config.zero.stage`` over the ``dp_sp`` group (on `device`).

    Args:
        params: the parameters this rank trains (a pipeline stage's); default: all of the model's.
    """
    stage = config.zero.stage
    bucket_bytes = int(config.comm.bucket_mb * 2**20)
    if params is not None and stage != 0:
        raise NotImplementedError(
            f"zero.stage={stage} with parallel.pp > 1 is not supported yet; use zero.stage=0 with pipeline "
            "parallelism (or pp=1)"
        )
    if stage == 0:
        return Replicated(model, optimizer, topology, bucket_bytes, on_comm, params)
    if stage in (1, 2):
        return ShardedOptimizer(model, optimizer, topology, stage, bucket_bytes, on_comm)
    return FullyShardedFSDP2(model, optimizer, topology, config, device)
