"""Data parallelism and ZeRO stages 0-3 over the topology's ``dp_sp`` group.

- Stage 0 (`Replicated`): every rank holds everything; gradients are averaged by asynchronous
  bucketed all-reduces during backward (`tidal.comm.buckets`).
- Stages 1 and 2 (`ShardedOptimizer`): each parameter's rows are split over the ranks (torch.chunk
  sizes, as DTensor's Shard(0)); the user's optimizer is re-pointed at this rank's rows, which are
  views into the model's parameters, so its state exists only for them. Stage 1 all-reduces full
  gradients; stage 2 reduce-scatters them so a rank only keeps its rows' gradient. After the step the
  updated rows are all-gathered back into every replica. A tensor-parallel (DTensor) parameter's rows
  are those of its local shard.
- Stage 3 (`FullyShardedFSDP2`): torch's FSDP2 (`fully_shard`) on each repeated block and the root,
  with the next blocks' all-gathers prefetched; the optimizer is re-pointed at FSDP2's DTensor
  parameters. Under pipeline parallelism each of this rank's stage modules is a root, and the schedule
  reduces and reshards once per step, after its last micro-batch's backward.

Expert weights (expert parallel, marked by `tidal.parallel.expert`) are held by the ``edp`` ranks, not
all of ``dp_sp`` (the ep ranks hold different experts): every stage broadcasts, reduces and shards them
over ``edp`` (see `Replicas`), their gradients summed there and divided by the ``dp_sp`` size.

With pipeline parallelism the strategies get this rank's stage parameters (`params`): stages 1-3 shard
and update only those, and the optimizer is re-pointed at them alone (other stages' parameters keep
``grad=None`` and no optimizer state here).

Every strategy presents the engine the same small surface (see `DataParallel`) and states its
optimizer state per parameter name, with sharded tensors as DTensors, so a checkpoint taken under
any stage and data-parallel size loads under any other.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from tidal.comm.buckets import GradientBuckets, copy_rows, lay_out_segments, row_range
from tidal.config import Config
from tidal.offload.chunks import cut_runs
from tidal.offload.params import apply_param_offload, fsdp_offload_policy
from tidal.parallel.shards import like, local, pipeline_copies
from tidal.parallel.topology import Topology
from tidal.runtime.device import Device

CommObserver = Callable[[str, int, dist.Work], object]


@dataclass(frozen=True)
class Replicas:
    """The ranks holding copies of one parameter: data parallelism averages its gradient over them and ZeRO
    splits its rows over them. ``dp_sp`` for dense parameters; ``edp`` for experts, since the ep ranks of a
    ``dp_sp`` group hold different experts."""

    group: dist.ProcessGroup
    mesh: DeviceMesh
    size: int
    rank: int

    @classmethod
    def named(cls, topology: Topology, name: str) -> Replicas:
        return cls(topology.group(name), topology.submesh(name), topology.size(name), topology.rank(name))


def is_expert(param: torch.Tensor) -> bool:
    """Whether `param` is an expert weight (`tidal.parallel.expert` marks them): its replicas are ``edp``."""
    return getattr(param, "_tidal_expert", False)


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
        self.dense = Replicas.named(topology, "dp_sp")
        self.expert = Replicas.named(topology, "edp")
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
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            parts = [(local(p.grad), self.world * _replicated(p.grad, self.tp) * pipeline_copies(p)) for p in params]
            return _counted_sq_sum(parts), self.world_group
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

    def replicas(self, param: torch.Tensor) -> Replicas:
        return self.expert if is_expert(param) else self.dense

    def _broadcast_from_first_rank(self) -> None:
        """Every tensor from the first rank of its replicas (a tensor-parallel shard: its dp replicas); the
        meta placeholders of other pipeline ranks' stages are skipped."""
        with torch.no_grad():
            for t in [*self.model.parameters(), *self.model.buffers()]:
                if t.is_meta:
                    continue
                group = self.replicas(t).group
                dist.broadcast(local(t), src=dist.get_global_rank(group, 0), group=group)


def _chunks(params: list[torch.nn.Parameter], limit_bytes: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive groups of `params` of about `limit_bytes` each (at least one parameter per group)."""
    return cut_runs(params, (local(p).numel() * p.element_size() for p in params), limit_bytes)


def _sq_sum(grads: list[torch.Tensor], replicas: int = 1, plain: int = 1) -> torch.Tensor:
    """Sum of squared entries of the local parts of `grads`, as a float64 scalar; each part divided by the
    number of ranks holding it: `replicas` times the sizes of its DTensor Replicate mesh dimensions."""
    return _counted_sq_sum([(local(g), replicas * _replicated(g, plain)) for g in grads])


def _counted_sq_sum(parts: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """Sum over (tensor, holders) of the tensor's squared entries divided by its holders, float64 scalar."""
    by_count: dict[int, list[torch.Tensor]] = {}
    for part, count in parts:
        by_count.setdefault(count, []).append(part)
    total = torch.zeros((), dtype=torch.float64)
    for count, same in by_count.items():
        total += torch.nn.utils.get_total_norm(same).double() ** 2 / count
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
        self.experts = [p for p in params if is_expert(p)]
        dense = [p for p in params if not is_expert(p)]
        self._broadcast_from_first_rank()
        self.buckets = GradientBuckets(dense, ["all_reduce"] * len(dense), self.group, bucket_bytes, on_comm=on_comm)
        self.expert_buckets = None
        if self.experts:
            modes = ["all_reduce"] * len(self.experts)
            self.expert_buckets = _expert_buckets(self.experts, modes, self.expert, self.world, bucket_bytes, on_comm)

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
        return _sq_sum(dense, self.world, self.tp) + _sq_sum(expert, self.expert.size, self.tp), self.world_group


def _expert_buckets(
    experts: list[torch.nn.Parameter],
    modes: list[str],
    replicas: Replicas,
    world: int,
    bucket_bytes: int,
    on_comm: CommObserver | None,
    on_shard_grad: Callable[[torch.nn.Parameter, torch.Tensor], None] | None = None,
) -> GradientBuckets:
    """Buckets for expert gradients over `replicas` (edp), scaled by 1 / `world` (the dp_sp size): backward's
    all-to-all already brought every ep rank's tokens' contribution to the expert's owner, so the edp sum
    holds all dp_sp ranks' tokens."""
    return GradientBuckets(experts, modes, replicas.group, bucket_bytes, on_shard_grad, on_comm, scale=1.0 / world)


class ShardedOptimizer(DataParallel):
    """ZeRO stages 1 and 2: optimizer state (and with stage 2, gradients) kept for this rank's rows only.

    A parameter's rows are split over its `Replicas`: dense ones over ``dp_sp``, expert ones over ``edp``
    (each ep rank's experts are split among that expert's replicas only).

    Args:
        params: the parameters this rank trains (a pipeline stage's); default: all of the model's.
    """

    def __init__(
        self,
        model,
        optimizer,
        topology,
        stage: int,
        bucket_bytes: int,
        on_comm: CommObserver | None,
        params: list | None = None,
    ) -> None:
        super().__init__(model, optimizer, topology)
        self.stage = stage
        self.bucket_bytes = bucket_bytes
        self.on_comm = on_comm
        self._broadcast_from_first_rank()
        self.trained = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
        self.shards: dict[torch.nn.Parameter, torch.nn.Parameter] = {}
        self.owner: dict[int, torch.nn.Parameter] = {}
        for p in self.trained:
            if p.dim() > 0:  # a 0-dim parameter has no rows: every rank updates it
                rows = local(p)  # a tensor-parallel parameter: the rows of this rank's tp shard
                start, end = row_range(rows.shape[0], self.replicas(p).size, self.replicas(p).rank)
                shard = torch.nn.Parameter(rows[start:end])
                self.shards[p] = shard
                self.owner[id(shard)] = p
        held = None if params is None else set(params)  # a pipeline rank's optimizer lets the other stages go
        for group in optimizer.param_groups:
            group["params"] = [self.shards.get(p, p) for p in group["params"] if held is None or p in held]
        dense = [p for p in self.trained if not is_expert(p)]
        experts = [p for p in self.trained if is_expert(p)]
        receive = self._receive_shard_grad
        self.buckets = GradientBuckets(dense, self._modes(dense), self.group, bucket_bytes, receive, on_comm)
        self.expert_buckets = None
        if experts:
            modes, world = self._modes(experts), self.world
            self.expert_buckets = _expert_buckets(experts, modes, self.expert, world, bucket_bytes, on_comm, receive)
        # state of a tp-sharded parameter: its tp placement, then this rank's rows of the tp shard over dp_sp
        self._tp_dp_mesh = _tp_major_mesh(topology) if self.tp > 1 else None

    def _modes(self, params: list[torch.nn.Parameter]) -> list[str]:
        return ["reduce_scatter" if self.stage == 2 and p in self.shards else "all_reduce" for p in params]

    def _all_buckets(self) -> list[GradientBuckets]:
        return [self.buckets] + ([self.expert_buckets] if self.expert_buckets is not None else [])

    def _receive_shard_grad(self, param: torch.nn.Parameter, chunk: torch.Tensor) -> None:
        shard = self.shards[param]
        if shard.grad is None:
            shard.grad = chunk.clone()
        else:
            shard.grad.add_(chunk)

    def prepare_backward(self, boundary: bool) -> None:
        for buckets in self._all_buckets():
            buckets.arm(boundary)

    def finish_gradients(self) -> None:
        for buckets in self._all_buckets():
            if buckets.pending:
                buckets.reduce_now()
        if self.stage == 1:
            for p, shard in self.shards.items():
                if p.grad is not None:
                    rows = local(p.grad)
                    start, end = row_range(rows.shape[0], self.replicas(p).size, self.replicas(p).rank)
                    shard.grad = rows[start:end]

    def grad_sq_sum(self) -> tuple[torch.Tensor, dist.ProcessGroup | None]:
        # a shard's rows are held once over its replicas (dp_sp, or edp for an expert: other ep ranks hold other
        # experts), and by as many tp ranks as its parameter's tp replicas
        sharded = [
            (s.grad, _replicated(p, self.tp) * pipeline_copies(p)) for p, s in self.shards.items() if s.grad is not None
        ]
        replicated = [p for p in self.trained if p.grad is not None and p not in self.shards]
        total = _counted_sq_sum(sharded)
        if self.model_parallel:
            held = [
                (local(p.grad), self.replicas(p).size * _replicated(p.grad, self.tp) * pipeline_copies(p))
                for p in replicated
            ]
            return total + _counted_sq_sum(held), self.world_group
        if self.rank == 0:  # replicated gradients are equal on every rank: count them once
            total += _sq_sum([p.grad for p in replicated])
        return total, self.group

    def after_step(self) -> None:
        chunks = []
        for replicas in (self.dense, self.expert):
            mine = [p for p in self.shards if self.replicas(p) is replicas]
            chunks += [(chunk, replicas) for chunk in _chunks(mine, self.bucket_bytes)]
        works = [self._launch_gather(chunk, replicas) for chunk, replicas in chunks]
        with torch.no_grad():
            for chunk, replicas, offsets, segment, out, work, record in works:
                with record.blocked() if record is not None else contextlib.nullcontext():
                    work.wait()
                for p, starts in zip(chunk, offsets, strict=True):
                    copy_rows(local(p), out, starts, segment, replicas.size, into_segments=False)

    def _launch_gather(self, chunk: list[torch.nn.Parameter], replicas: Replicas):
        offsets, segment = lay_out_segments([local(p) for p in chunk], replicas.size)
        mine = torch.zeros(segment, dtype=chunk[0].dtype, device=chunk[0].device)
        for p, starts in zip(chunk, offsets, strict=True):
            rows = self.shards[p].data.reshape(-1)
            mine[starts[replicas.rank] : starts[replicas.rank] + rows.numel()].copy_(rows)
        out = torch.empty(segment * replicas.size, dtype=mine.dtype, device=mine.device)
        work = dist.all_gather_into_tensor(out, mine, group=replicas.group, async_op=True)
        record = self.on_comm("all_gather params", out.numel() * out.element_size(), work) if self.on_comm else None
        return chunk, replicas, offsets, segment, out, work, record

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.trained:
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
        if not isinstance(full, DTensor):  # an expert's: rows over edp (the checkpoint layout adds the ep split)
            return DTensor.from_local(
                value, self.replicas(full).mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride()
            )
        placements = [full.placements[0], Shard(0)]  # the tp split first, then its rows over dp_sp
        return DTensor.from_local(
            value, self._tp_dp_mesh, placements, run_check=False, shape=full.shape, stride=full.stride()
        )


def _tp_major_mesh(topology: Topology) -> DeviceMesh:
    """This pipeline rank's (tp, dp_sp) mesh, for checkpoint metadata only (it creates no process groups).

    Example, pp=1 dp=2 tp=2: ranks are laid out dp-major ``[[0, 1], [2, 3]]``; the tp-major mesh is
    ``[[0, 2], [1, 3]]``, so a (Shard(0), Shard(0)) DTensor on it splits rows over tp first, then each tp
    shard's rows over dp_sp, as `ShardedOptimizer` does."""
    ranks = topology.mesh.mesh[topology.rank("pp")].reshape(-1, topology.size("tp"))
    return DeviceMesh(topology.device_type, ranks.T.contiguous(), mesh_dim_names=("tp", "dp_sp"), _init_backend=False)


class FullyShardedFSDP2(DataParallel):
    """ZeRO stage 3 on torch's FSDP2: parameters sharded, gathered per block with prefetch.

    Args:
        stages: this rank's pipeline stage modules (parallel.pp > 1), each made an FSDP2 root over its own
            blocks; default: the model is the one root. The pipeline schedule (torch.distributed.pipelining)
            defers gradient reduction and resharding over a step's micro-batches and runs them once after
            the last backward, so the engine's accumulation switch is not used then.
    """

    stage = 3

    def __init__(
        self, model, optimizer, topology, config: Config, device: Device, stages: list[torch.nn.Module] | None = None
    ) -> None:
        from torch.distributed.fsdp import fully_shard

        super().__init__(model, optimizer, topology)
        self._broadcast_from_first_rank()
        roots = [model] if stages is None else stages
        held = {id(p) for root in roots for p in root.parameters()}
        names = {id(p): n for n, p in model.named_parameters()}
        # The optimizer lets go of the original parameters while FSDP2 copies them into shards, so each is
        # freed as soon as its shard exists: the peak stays near one copy of the model, not two.
        slots = [[names[id(p)] for p in group["params"] if id(p) in held] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["params"] = []
        reshard = config.zero.reshard_after_forward
        policy = fsdp_offload_policy(config.offload.params, device)
        blocks = []
        self.experts: list[torch.nn.Parameter] = []
        for root in roots:
            units = repeated_blocks(root) if stages is None else _stage_blocks(root)
            for experts in _expert_modules(root):  # sharded over their replicas (edp)
                fully_shard(experts, mesh=self.expert.mesh, reshard_after_forward=reshard, offload_policy=policy)
                self.experts += experts.parameters(recurse=False)
            for block in units:
                fully_shard(block, mesh=self.mesh, reshard_after_forward=reshard, offload_policy=policy)
            # The root keeps its parameters (embeddings, final norm) gathered from forward into backward: they
            # are needed again at once when backward starts, so freeing them would only cost a re-gather.
            fully_shard(root, mesh=self.mesh, reshard_after_forward=False, offload_policy=policy)
            ahead = config.zero.prefetch_modules
            if ahead > 1:  # FSDP2 already overlaps the next block's gather; deeper prefetch is explicit
                for i, block in enumerate(units):
                    block.set_modules_to_forward_prefetch(units[i + 1 : i + 1 + ahead])
                    block.set_modules_to_backward_prefetch(units[max(0, i - ahead) : i][::-1])
            blocks += units
        by_name = dict(model.named_parameters())
        for group, slot in zip(optimizer.param_groups, slots, strict=True):
            group["params"] = [by_name[name] for name in slot]
        self.pipelined = stages is not None
        self._synced = True
        self.param_offload = apply_param_offload(model, blocks, config.offload.params, config.offload.nvme, device)

    def prepare_backward(self, boundary: bool) -> None:
        if self.pipelined:  # the schedule switches the sync itself, per stage (see the class doc)
            return
        if boundary != self._synced:  # the setter walks every module: only when it changes
            self.model.set_requires_gradient_sync(boundary)
        self._synced = boundary

    def finish_gradients(self) -> None:
        if not self._synced:
            raise RuntimeError(
                "optimizer.step() came after a backward that did not reduce gradients; with zero.stage=3 "
                "step after every train.gradient_accumulation_steps-th backward (or outside engine.no_sync())"
            )
        # FSDP2 averaged expert gradients over edp; they are sums over edp divided by dp_sp (`_expert_buckets`).
        # Scaled here: FSDP2's own divide factor needs a pre-multiplied reduce-scatter, which gloo lacks.
        with torch.no_grad():
            for p in self.experts:
                if p.grad is not None:
                    p.grad.mul_(self.expert.size / self.world)

    def grad_sq_sum(self) -> tuple[torch.Tensor, dist.ProcessGroup | None]:
        if self.model_parallel:
            return _sq_sum(self.optimizer_grads(), plain=self.tp), self.world_group
        return _sq_sum(self.optimizer_grads()), self.group

    def _global_view(self, param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if isinstance(value, DTensor) or value.dim() == 0:
            return value
        return like(param, value)  # offloaded state is kept as this rank's local shard


def _expert_modules(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `root` that hold expert weights themselves (`SwiGLUExperts`): FSDP2 units over edp."""
    return [m for m in root.modules() if any(is_expert(p) for p in m.parameters(recurse=False))]


def _stage_blocks(stage: torch.nn.Module) -> list[torch.nn.Module]:
    """A pipeline stage's blocks (`DecoderStage.blocks`, however few), else its repeated blocks."""
    blocks = getattr(stage, "blocks", None)
    if isinstance(blocks, torch.nn.ModuleList):
        return [m for m in blocks if any(True for _ in m.parameters())]
    return repeated_blocks(stage)


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
    stages: list[torch.nn.Module] | None = None,
) -> DataParallel:
    """Choose and build the strategy for ``config.zero.stage`` over the ``dp_sp`` group (on `device`).

    Args:
        params: the parameters this rank trains (a pipeline stage's); default: all of the model's.
        stages: this rank's pipeline stage modules (they hold `params`); ZeRO 3 shards each as an FSDP2 root.
    Raises:
        NotImplementedError: a pipeline (`params` given) with ZeRO 3 and no `stages`, with tied weights, or
            with parameters streamed from NVMe.
    """
    stage = config.zero.stage
    bucket_bytes = int(config.comm.bucket_mb * 2**20)
    if stage == 0:
        return Replicated(model, optimizer, topology, bucket_bytes, on_comm, params)
    if stage in (1, 2):
        return ShardedOptimizer(model, optimizer, topology, stage, bucket_bytes, on_comm, params)
    if params is not None:
        _check_pipelined_fsdp(model, config, stages)
    return FullyShardedFSDP2(model, optimizer, topology, config, device, stages)


def _check_pipelined_fsdp(model: torch.nn.Module, config: Config, stages: list[torch.nn.Module] | None) -> None:
    """Raise naming the fix where ZeRO 3 cannot run under pipeline parallelism."""
    if stages is None:
        raise NotImplementedError(
            "zero.stage=3 with parallel.pp > 1 needs the pipeline's stage modules: call "
            "apply_data_parallel(..., params=held, stages=pipeline.stages); or use zero.stage 1 or 2"
        )
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            raise NotImplementedError(
                f"zero.stage=3 with parallel.pp > 1 does not support tied weights ({seen[id(p)]} is {name}); "
                "use zero.stage 1 or 2, or untie them (tie_word_embeddings=False)"
            )
        seen[id(p)] = name
    if config.offload.params.device == "nvme":
        raise NotImplementedError(
            "offload.params.device=nvme with parallel.pp > 1 is not supported yet; use offload.params.device=cpu "
            "or none, or pp=1"
        )
