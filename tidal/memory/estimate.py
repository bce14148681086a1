"""Per-rank, per-tier bytes of a training job, computed from the model's shapes and the runtime's own rules.

    model = build_on_meta()                       # parameter shapes only; nothing is allocated
    est = estimate(model, config, world_size=8, optimizer=torch.optim.AdamW)
    print(format_estimate(est))                   # tidal.memory.report: one table per distinct rank
    est.peak("device")                            # the largest rank's predicted peak, bytes

What is counted, per rank, in each tier (device, cpu, nvme):

- params: the parameters this rank holds: tensor-parallel shards (the shapes `tensor_plans` gives), experts
  divided over ep, ZeRO-3 shards padded as FSDP2 pads them (``ceil(rows / dp_sp)`` rows on every rank). Under
  pipeline parallelism a rank keeps its stages' parameters only (the others become meta placeholders at wrap);
  with ZeRO 3 those are sharded.
- grads: gradients alive when the optimizer step starts: full for ZeRO 0-1, this rank's rows for ZeRO 2,
  padded shards for ZeRO 3; none for offloaded chunks the optimizer updated during backward.
- optimizer: state of the parameters this rank updates (ZeRO 1-3: its rows, torch.chunk sizes), ``slots``
  parameter-shaped tensors plus scalar tensors (Adam's step) per parameter, probed from the optimizer class.
  Offloaded chunks hold fp32 state in host memory (cpu) or in one 4 KiB-padded file each (nvme).
- masters: fp32 copies an offloaded chunk updates when its parameters are not fp32 host tensors. Mixed
  precision itself needs none: tidal keeps parameters in their own dtype and autocasts.
- activations: saved activations, given by the caller per micro-batch (the trace will give them), times the
  micro-batches a pipeline stage holds at once.
- buffers: the runtime's own, each named (`Buffer`): gradient buckets, ZeRO gathers, FSDP2's unsharded
  blocks, offload staging, NVMe bounce buffers. Persistent ones live from the first step on; transient ones
  only inside a step, and the peak adds all of them as if alive at once (an upper bound).

Every rule mirrors the code that executes it (`tidal.parallel.data`, `tidal.comm.buckets`,
`tidal.offload.optimizer`), calling it where it is a pure function (row ranges, segment layouts, stage
splits, tensor plans) so the estimate cannot drift from a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from tidal.comm.buckets import FIRST_BUCKET_BYTES, SCATTERS_IN_FLIGHT, lay_out_segments, row_range
from tidal.config import Config
from tidal.offload.chunks import ALIGN_BYTES, KERNEL_OPTIONS, cut_runs, updates_in_backward
from tidal.offload.nvme import padded_size
from tidal.offload.optimizer import READ_AHEAD
from tidal.parallel.data import _chunks, repeated_blocks
from tidal.parallel.topology import RankGrid

TIERS = ("device", "cpu", "nvme")
"""Where bytes live: the compute device, host memory, NVMe files."""
CATEGORIES = ("params", "grads", "optimizer", "masters", "activations", "buffers")
"""What the bytes are, in table order."""
SCATTER_BUFFER = "gradient reduce-scatter send/receive"
"""The ZeRO 2 buckets' send and receive buffers (`Buffer.name`)."""
FSDP_SCATTER_BUFFER = "FSDP2 gradient reduce-scatter (one block)"
"""One block's unsharded gradients and their reduced shard under ZeRO 3 (`Buffer.name`)."""


@dataclass(frozen=True)
class TierBytes:
    """Bytes in each tier."""

    device: int = 0
    cpu: int = 0
    nvme: int = 0

    def __add__(self, other: TierBytes) -> TierBytes:
        return TierBytes(self.device + other.device, self.cpu + other.cpu, self.nvme + other.nvme)

    def __getitem__(self, tier: str) -> int:
        return getattr(self, tier)

    @classmethod
    def on(cls, tier: str, nbytes: int) -> TierBytes:
        return cls(**{tier: nbytes})


@dataclass(frozen=True)
class Buffer:
    """One runtime buffer (or a family of them) on one tier."""

    name: str
    tier: str
    nbytes: int
    persistent: bool
    """Kept from the first step on (True), or alive only inside forward, backward or the step (False)."""
    exact: bool = True
    """The runtime allocates exactly this (True), or at most this (False: lazily, or sized at run time)."""
    phase: str = "train"
    """When a transient buffer lives: "train" (forward and backward, beside the activations) or "step" (the
    optimizer step, after backward freed the activations; one step buffer at a time)."""


@dataclass(frozen=True)
class OptimizerState:
    """The state an optimizer class keeps per parameter (probed by one step on a 2-element tensor)."""

    name: str
    slots: int
    """Parameter-shaped state tensors, count (AdamW 2, SGD with momentum 1, plain SGD 0)."""
    scalar_bytes: int
    """Bytes of 0-dim state tensors per parameter (Adam's float32 step: 4)."""
    scalar_tensors: int
    """0-dim state tensors per parameter, count (each takes its own 64-byte slot in an NVMe chunk file)."""
    kernel: str | None = None
    """The implementation its options ask for: "fused", "foreach", "single" (foreach=False); None: torch's
    default (foreach on CUDA, one tensor at a time elsewhere)."""

    def update_temporaries(self, device_type: str, updated: list[int]) -> int:
        """Bytes an on-device step allocates for a while, given the bytes of each parameter it updates:
        torch's foreach kernels one state-sized list (Adam's sqrt(v)), one tensor at a time two of the
        largest, fused none. Optimizers without state are taken as the one-at-a-time case."""
        kernel = self.kernel or ("foreach" if device_type == "cuda" else "single")
        if kernel == "fused" or not updated:
            return 0
        return sum(updated) if kernel == "foreach" else 2 * max(updated)


@dataclass(frozen=True)
class RankEstimate:
    """One rank's predicted bytes."""

    rank: int
    coords: tuple[int, int, int, int]
    """(pp, dp, sp, tp) coordinates of the rank."""
    params: TierBytes
    grads: TierBytes
    optimizer: TierBytes
    masters: TierBytes
    activations: TierBytes
    buffer_list: tuple[Buffer, ...] = ()

    def buffers(self, persistent: bool | None = None, phase: str | None = None) -> TierBytes:
        """Bytes of the buffers per tier: all, or only the persistent (True) / transient (False) ones, or
        only the transient ones of one `phase`."""
        total = TierBytes()
        for b in self.buffer_list:
            if persistent is not None and b.persistent != persistent:
                continue
            if phase is not None and (b.persistent or b.phase != phase):
                continue
            total += TierBytes.on(b.tier, b.nbytes)
        return total

    def category(self, name: str) -> TierBytes:
        return self.buffers() if name == "buffers" else getattr(self, name)

    def model_states(self) -> TierBytes:
        """Parameters, gradients, optimizer state and master copies."""
        return self.params + self.grads + self.optimizer + self.masters

    def steady(self, tier: str) -> int:
        """Bytes held between steps: model states and persistent buffers (gradients included)."""
        return (self.model_states() + self.buffers(persistent=True))[tier]

    def peak(self, tier: str) -> int:
        """Predicted peak: `steady` plus the larger of forward/backward (activations and the transient
        buffers living beside them, all counted as alive at once: an upper bound) and the largest of the
        optimizer step's transient buffers (the activations are gone by then; the update's temporaries are
        freed before the ZeRO all-gather that follows it)."""
        train = (self.activations + self.buffers(phase="train"))[tier]
        step = (b.nbytes for b in self.buffer_list if not b.persistent and b.phase == "step" and b.tier == tier)
        return self.steady(tier) + max([train, *step])


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-rank predicted bytes of one job; `estimate` builds it."""

    ranks: tuple[RankEstimate, ...]
    sizes: dict[str, int]
    """Parallel sizes: world, pp, dp, sp, tp, ep."""
    zero_stage: int
    device_type: str
    """"cuda" or "cpu"; on "cpu" the device tier is host memory too."""
    optimizer: OptimizerState
    notes: tuple[str, ...] = field(default=())
    """Assumptions behind numbers that are approximations."""

    def peak(self, tier: str) -> int:
        """The largest rank's predicted peak on `tier`, bytes."""
        return max(r.peak(tier) for r in self.ranks)

    def total(self, category: str, tier: str) -> int:
        """Bytes of `category` on `tier` summed over all ranks."""
        return sum(r.category(category)[tier] for r in self.ranks)


# -- the optimizer ------------------------------------------------------------------------------------


def optimizer_state(optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer, **options) -> OptimizerState:
    """What `optimizer` (a class with `options`, or an instance: its first group's options) keeps per parameter.

    Any torch optimizer whose state is parameter-shaped tensors plus scalars is measured by a step at lr 0 on
    a probe (AdamW, Adam, SGD, Adagrad, RMSprop, ... are tested); one that cannot be probed gets Adam's 2 slots.
    """
    cls = type(optimizer) if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        options = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"} | options
    kernel = "fused" if options.get("fused") else {True: "foreach", False: "single"}.get(options.get("foreach"))
    options = {k: v for k, v in options.items() if k not in KERNEL_OPTIONS} | {"lr": 0.0}
    probe = torch.zeros(2)
    probe.grad = torch.ones(2)
    try:
        opt = cls([{"params": [probe], **options}])
        opt.step()
    except Exception:  # noqa: BLE001 - the same fallback as the offloaded optimizer's `state_slots`
        return OptimizerState(cls.__name__, 2, 4, 1, kernel)
    values = [v for v in opt.state[probe].values() if isinstance(v, torch.Tensor)]
    slots = sum(1 for v in values if v.shape == probe.shape)
    scalars = [v.element_size() for v in values if v.dim() == 0]
    return OptimizerState(cls.__name__, slots, sum(scalars), len(scalars), kernel)


# -- the model's parameters as this job lays them out ----------------------------------------------------


@dataclass
class _Param:
    name: str
    shape: tuple[int, ...]
    """This rank's local shape before ZeRO: tensor-parallel and expert-parallel splits applied."""
    itemsize: int
    trained: bool
    block: int | None
    """Index of its FSDP2 unit (repeated block), None for the root's own parameters."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def rows(self, world: int, rank: int) -> int:
        """Elements of this rank's torch.chunk rows of dim 0 (a 0-dim parameter: all of it)."""
        if not self.shape:
            return 1
        start, end = row_range(self.shape[0], world, rank)
        return (end - start) * (self.numel // self.shape[0] if self.shape[0] else 0)

    def padded_rows(self, world: int) -> int:
        """Elements of one FSDP2 shard: every rank holds ``ceil(rows / world)`` rows."""
        if not self.shape:
            return 1
        return math.ceil(self.shape[0] / world) * (self.numel // self.shape[0] if self.shape[0] else 0)


def _tp_shapes(model: nn.Module, tp: int) -> dict[int, tuple[int, ...]]:
    """id(parameter) -> its local shape under the built-in tensor plan at `tp` ranks."""
    from tidal.parallel.tensor import validate_tensor_parallel
    from tidal.parallel.tensor_plans import sharded_dims

    shapes: dict[int, tuple[int, ...]] = {}
    for _, module, style in validate_tensor_parallel(model, tp):
        for p_name, (dim, _) in sharded_dims(style, module).items():
            param = getattr(module, p_name, None)
            if isinstance(param, torch.Tensor):
                shape = list(param.shape)
                shape[dim] //= tp
                shapes[id(param)] = tuple(shape)
    return shapes


def _expert_ids(model: nn.Module) -> set[int]:
    """Parameters of the experts of mixture-of-experts blocks (Mixtral, tidal's MoELayer): split over ep."""
    from tidal.parallel.expert import MIXTRAL_BLOCKS, MoELayer

    found = set()
    for module in model.modules():
        if isinstance(module, MoELayer) or type(module).__name__ in MIXTRAL_BLOCKS:
            found.update(id(p) for p in module.experts.parameters())
    return found


def _params(model: nn.Module, grid: RankGrid) -> list[_Param]:
    tp_shapes = _tp_shapes(model, grid.tp) if grid.tp > 1 else {}
    experts = _expert_ids(model) if grid.ep > 1 else set()
    unit = {id(p): i for i, block in enumerate(repeated_blocks(model)) for p in block.parameters()}
    out = []
    for name, p in model.named_parameters():
        shape = tp_shapes.get(id(p), tuple(p.shape))
        if id(p) in experts:
            shape = (shape[0] // grid.ep, *shape[1:])
        out.append(_Param(name, shape, p.element_size(), p.requires_grad, unit.get(id(p))))
    return out


class _RankView:
    """The two `Topology` methods `local_stage_ids` reads, for a rank of a `RankGrid` (no process group)."""

    def __init__(self, grid: RankGrid, rank: int) -> None:
        self.grid, self.global_rank = grid, rank

    def size(self, name: str) -> int:
        return self.grid.size(name)

    def rank(self, name: str) -> int:
        return self.grid.group_ranks(name, self.global_rank).index(self.global_rank)


def _held_by_pp_rank(model: nn.Module, config: Config, grid: RankGrid) -> list[set[str]]:
    """Per pp rank, the names of the parameters its stages hold (the pipeline's own split)."""
    from tidal.parallel.pipeline import build_stages, local_stage_ids

    spr = config.parallel.pipeline.stages_per_rank
    stages = build_stages(model, grid.pp, stages_per_rank=spr)
    names = {id(p): n for n, p in model.named_parameters()}
    held = []
    for pp_rank in range(grid.pp):
        rank = grid.rank_at((pp_rank, 0, 0, 0))
        ids = local_stage_ids(_RankView(grid, rank), spr)
        held.append({names[id(p)] for i in ids for p in stages[i].parameters()})
    return held


# -- one rank -------------------------------------------------------------------------------------------


@dataclass
class _Job:
    config: Config
    grid: RankGrid
    device_type: str
    state: OptimizerState
    params: list[_Param]
    held: list[set[str]] | None
    activations: int | None
    order: list[str] | None
    """Parameter names in the optimizer's order (its groups one after the other): how offload cuts chunks."""


def _updates_in_backward(job: _Job, world: int) -> bool:
    """The engine's rule: host chunks update (and free their grads) during backward."""
    g = job.grid
    return updates_in_backward(
        job.config,
        zero_stage=job.config.zero.stage,
        dp_world=world,
        model_parallel=g.world_size > world or g.ep > 1,
        pipelined=g.pp > 1,
        device_type=job.device_type,
    )


def _rank(job: _Job, rank: int) -> RankEstimate:
    c, grid = job.config, job.grid
    coords = grid.coords(rank)
    world, me = grid.size("dp_sp"), coords[1] * grid.sp + coords[2]
    stage = c.zero.stage
    held = None if job.held is None else job.held[coords[0]]
    trained = [p for p in job.params if p.trained and (held is None or p.name in held)]
    buffers: list[Buffer] = []
    dev, host = "device", "cpu"
    param_tier = host if c.offload.params.device != "none" and job.device_type == "cuda" else dev

    # parameters and gradients
    if stage < 3:
        params = TierBytes.on(dev, sum(p.nbytes for p in job.params if held is None or p.name in held))
        sharded = stage == 2
        grad_bytes = {p.name: (p.rows(world, me) if sharded and p.shape else p.numel) * p.itemsize for p in trained}
    else:
        shard = {p.name: p.padded_rows(world) * p.itemsize for p in trained}
        whole = sum(p.nbytes for p in job.params if p.name not in shard and (held is None or p.name in held))
        streamed = c.offload.params.device == "nvme"
        on_nvme = sum(padded_size(shard[p.name]) for p in trained if streamed and p.block is not None)
        resident = sum(shard[p.name] for p in trained if not (streamed and p.block is not None))
        params = TierBytes.on(dev, whole) + TierBytes.on(param_tier, resident) + TierBytes.on("nvme", on_nvme)
        grad_bytes = dict(shard)
        buffers += _fsdp_buffers(job, trained, world)
    grad_tier = param_tier if stage == 3 else dev

    # optimizer state, master copies, offload staging
    by_name = {p.name: p for p in trained}
    updated = trained if job.order is None else [by_name[n] for n in job.order if n in by_name]
    opt_params = [(p, p.rows(world, me) if stage else p.numel) for p in updated]
    optimizer, masters, released, staging = _optimizer(job, opt_params, world)
    buffers += staging
    if c.offload.optimizer.device == "none" and job.state.slots:
        temporaries = job.state.update_temporaries(job.device_type, [n * p.itemsize for p, n in opt_params])
        buffers.append(Buffer("optimizer update temporaries", dev, temporaries, False, phase="step"))
    freed = set().union(*released)
    grads = TierBytes.on(grad_tier, sum(b for n, b in grad_bytes.items() if n not in freed))
    if released:
        largest = max(sum(grad_bytes[n] for n in chunk) for chunk in released)
        buffers.append(Buffer("gradients awaiting their chunk's update in backward", grad_tier, largest, False))

    buffers += _bucket_buffers(job, trained, world, me)
    buffers += _nvme_bounce(c)
    if c.precision.dtype != "fp32" and stage < 3:
        low = sum(p.numel * 2 for p in trained if len(p.shape) >= 2)
        buffers.append(Buffer("autocast low-precision weight copies", dev, low, False))
    activations = _activations(job, coords[0])
    return RankEstimate(rank, coords, params, grads, optimizer, masters, activations, tuple(buffers))


def _optimizer(job: _Job, opt_params: list[tuple[_Param, int]], world: int):
    """(state, masters, released grads by chunk, staging buffers) of the parameters this rank updates, in
    `OffloadedOptimizer`'s chunks: cut after each chunk reaches chunk_mb of fp32 state + master."""
    c, s = job.config, job.state
    per_element = 4 * (s.slots + 1)
    if c.offload.optimizer.device == "none":
        on_device = sum(n * p.itemsize * s.slots + s.scalar_bytes for p, n in opt_params)
        return TierBytes.on("device", on_device), TierBytes(), [], []
    chunk_bytes = c.offload.optimizer.chunk_mb * 2**20
    cuts = cut_runs(opt_params, (n * per_element for _, n in opt_params), chunk_bytes)
    on_device = round(c.offload.optimizer.ratio * len(cuts))
    tier = c.offload.optimizer.device
    state, masters = TierBytes(), TierBytes()
    host_chunks: list[tuple[int, int]] = []  # (file bytes, gradient staging bytes) in update order
    temporaries = 0  # the device chunks are updated one chunk at a time, with the optimizer's own kernel
    for i, cut in enumerate(cuts):
        if i < on_device:
            state += TierBytes.on("device", sum(n * p.itemsize * s.slots + s.scalar_bytes for p, n in cut))
            temporaries = max(temporaries, s.update_temporaries(job.device_type, [n * p.itemsize for p, n in cut]))
            continue
        need_master = [job.device_type != "cpu" or p.itemsize != 4 for p, _ in cut]  # else updated in place
        fp32 = sum(n * 4 * s.slots + s.scalar_bytes for _, n in cut)
        master = sum(n * 4 for (_, n), m in zip(cut, need_master, strict=True) if m)
        moving = sum(n for (_, n), m in zip(cut, need_master, strict=True) if m) * 4
        if tier == "cpu":
            state += TierBytes.on("cpu", fp32)
            masters += TierBytes.on("cpu", master)
            host_chunks.append((0, moving))
        else:
            align = _aligned
            nbytes = sum(s.slots * align(n * 4) + s.scalar_tensors * ALIGN_BYTES for _, n in cut)
            nbytes += sum(align(n * 4) for (_, n), m in zip(cut, need_master, strict=True) if m)
            state += TierBytes.on("nvme", padded_size(nbytes))
            host_chunks.append((nbytes, moving))
    released = []
    if _updates_in_backward(job, world):
        released = [{p.name for p, _ in cut} for cut in cuts[on_device:]]
    # staging: READ_AHEAD + 2 host buffers used round-robin over the host chunks in update order: reversed, or
    # (updating in backward) the order backward finishes them in, learnt in the first step: then a bound
    slots, exact = READ_AHEAD + 2, not released
    order = host_chunks[::-1]
    staging = []
    for slot in range(min(slots, len(order))):
        used = order[slot::slots] if exact else order
        staging.append(Buffer(f"offload staging buffer {slot}", "cpu", max(u[0] for u in used), True, exact))
        staging.append(Buffer(f"offload gradient staging {slot}", "cpu", max(u[1] for u in used), True, exact))
    if tier == "nvme":  # a rewritten file's old blocks are kept under a spare name for the next write
        staging.append(Buffer("NVMe spare files kept for reuse", "nvme", state.nvme, True, False))
    if temporaries:
        staging.append(Buffer("optimizer update temporaries", "device", temporaries, False, phase="step"))
    return state, masters, released, [b for b in staging if b.nbytes]


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


def _meta(p: _Param, numel: int | None = None) -> torch.Tensor:
    dtype = {1: torch.uint8, 2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[p.itemsize]
    return torch.empty(p.shape if numel is None else (numel,), dtype=dtype, device="meta")


def _bucket_buffers(job: _Job, trained: list[_Param], world: int, me: int) -> list[Buffer]:
    """Gradient buckets (`GradientBuckets`) and the ZeRO 1-2 parameter all-gather after the step."""
    c, stage = job.config, job.config.zero.stage
    bucket_bytes = int(c.comm.bucket_mb * 2**20)
    out = []
    if stage == 0 and world > 1 or stage in (1, 2):
        kept = [p for p in trained if stage < 2 or not p.shape]
        if kept:  # all-reduce buckets allocate their flat buffer once and keep it
            out.append(Buffer("gradient all-reduce buckets", "device", sum(p.nbytes for p in kept), True))
    if stage == 2:
        sizes, current, first = [], 0, True
        for p in reversed([p for p in trained if p.shape]):
            current += p.nbytes
            if current >= (min(bucket_bytes, FIRST_BUCKET_BYTES) if first else bucket_bytes):
                sizes.append(current)
                current, first = 0, False
        sizes = [*sizes, current]
        # the largest sends in flight at once, and every bucket's received chunk until the end of backward
        send = sum(sorted(sizes, reverse=True)[:SCATTERS_IN_FLIGHT]) + sum(math.ceil(s / world) for s in sizes)
        out.append(Buffer(SCATTER_BUFFER, "device", send, False))
    if stage in (1, 2):
        shards = [_meta(p) for p in trained if p.shape]
        gathered = 0
        for chunk in _chunks(shards, bucket_bytes):
            _, segment = lay_out_segments(chunk, world)
            gathered += segment * (world + 1) * chunk[0].element_size()
        out.append(Buffer("ZeRO parameter all-gather after the step", "device", gathered, False, phase="step"))
    return out


def _fsdp_buffers(job: _Job, trained: list[_Param], world: int) -> list[Buffer]:
    """FSDP2's unsharded parameters (root + gathered blocks) and one block's gradient reduce-scatter."""
    z = job.config.zero
    unsharded: dict[int | None, int] = {}
    for p in trained:
        unsharded[p.block] = unsharded.get(p.block, 0) + p.padded_rows(world) * world * p.itemsize
    root = unsharded.pop(None, 0)
    blocks = sorted(unsharded.values(), reverse=True)
    # a block gathered (prefetch_modules of them with deeper prefetch), plus the flat all-gather output it is
    # being copied out of: what a real step holds when backward starts (measured on GPT-2, 2 ranks)
    alive = len(blocks) if not z.reshard_after_forward else max(1, z.prefetch_modules)
    largest = blocks[0] if blocks else 0
    gathered = root + sum(blocks[:alive]) + largest
    return [
        Buffer("FSDP2 unsharded root + gathered blocks", "device", gathered, False),
        Buffer(FSDP_SCATTER_BUFFER, "device", 2 * largest, False),
    ]


def _nvme_bounce(c: Config) -> list[Buffer]:
    """One bounce buffer of block_size * queue_depth per I/O thread and store, allocated on first unaligned use."""
    n = c.offload.nvme
    stores = [name for name in ("optimizer", "params", "activations") if getattr(c.offload, name).device == "nvme"]
    each = n.block_size * n.queue_depth * n.threads
    return [Buffer(f"NVMe bounce buffers ({name} store)", "cpu", each, True, False) for name in stores]


def _activations(job: _Job, pp_rank: int) -> TierBytes:
    """Saved activations: per micro-batch bytes x the micro-batches a pipeline stage holds at once."""
    if job.activations is None:
        return TierBytes()
    p = job.config.parallel
    pp, spr = job.grid.pp, p.pipeline.stages_per_rank
    micro = p.pipeline.microbatches or pp
    share = job.activations / pp if pp > 1 else job.activations  # blocks split evenly over the stages
    if pp == 1:
        in_flight = 1
    elif p.pipeline.schedule == "gpipe":
        in_flight = micro
    elif p.pipeline.schedule == "1f1b":
        in_flight = min(micro, pp - pp_rank)
    else:  # interleaved 1F1B's warm-up, per model chunk
        in_flight = min(micro * spr, (spr - 1) * pp + 2 * (pp - 1 - pp_rank) + 1) / spr
    tier = job.config.offload.activations.device
    return TierBytes.on("device" if tier == "none" else tier, int(share * in_flight))


# -- the entry point -----------------------------------------------------------------------------------


def estimate(
    model: nn.Module,
    config: Config,
    world_size: int | None = None,
    *,
    optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer = torch.optim.AdamW,
    activations: int | None = None,
    device_type: str | None = None,
) -> MemoryEstimate:
    """Predict every rank's bytes per category and tier for training `model` under `config`.

    Args:
        model: the model, best on the meta device (only shapes, dtypes and module names are read).
        config: the tidal config the job runs with (parallel sizes, zero, precision, offload, comm, ...).
        world_size: ranks in the job; default: the product of the config's sizes (needs parallel.dp set).
        optimizer: the optimizer class (default options, one group in model order) or an instance built on
            `model` (its options, and its groups' order, which decides the offload chunks); see `optimizer_state`.
        activations: saved-activation bytes of one micro-batch on one rank (its tp/sp shapes, all layers);
            None leaves activations out. Pipeline parallelism divides them over the stages and multiplies by
            the micro-batches in flight.
        device_type: "cuda" or "cpu"; default from ``config.device`` ("auto": cuda when torch sees one).
    Raises:
        TopologyError: sizes that do not fit the world; TensorParallelError, PipelineError: as the runtime's.
    """
    p = config.parallel
    if world_size is None:
        if p.dp == "auto":
            raise ValueError("estimate() needs world_size when parallel.dp=auto; pass world_size=N or set parallel.dp")
        world_size = p.pp * p.dp * p.sp * p.tp
    grid = RankGrid.create(world_size, pp=p.pp, dp=None if p.dp == "auto" else p.dp, sp=p.sp, tp=p.tp, ep=p.ep)
    if device_type is None:
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        device_type = auto if config.device == "auto" else config.device
    job = _Job(
        config,
        grid,
        device_type,
        optimizer_state(optimizer),
        _params(model, grid),
        _held_by_pp_rank(model, config, grid) if grid.pp > 1 else None,
        activations,
        _optimizer_order(model, optimizer),
    )
    cache: dict[tuple[int, int], RankEstimate] = {}
    ranks = []
    for rank in range(world_size):
        pp_i, dp_i, sp_i, _ = grid.coords(rank)
        key = (pp_i, dp_i * grid.sp + sp_i)  # tp ranks hold equal shards (the plans check divisibility)
        if key not in cache:
            cache[key] = _rank(job, rank)
        same = cache[key]
        ranks.append(
            RankEstimate(rank, grid.coords(rank), *(same.category(n) for n in CATEGORIES[:5]), same.buffer_list)
        )
    notes = [
        "transient buffers of forward/backward are added as if all alive at once, beside the activations (an "
        "upper bound on their share of the peak); the step's are counted apart, after the activations are freed",
        "NVMe bounce buffers are allocated only for unaligned transfers: an upper bound",
    ]
    if activations is None:
        notes.append("activations not given: peaks leave them out")
    if device_type == "cpu":
        notes.append("the device is the CPU: the device and cpu tiers are both host memory")
    sizes = {"world": world_size, "pp": grid.pp, "dp": grid.dp, "sp": grid.sp, "tp": grid.tp, "ep": grid.ep}
    return MemoryEstimate(tuple(ranks), sizes, config.zero.stage, device_type, job.state, tuple(notes))


def _optimizer_order(
    model: nn.Module, optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer
) -> list[str] | None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"] if id(p) in names]
    if not order:
        raise ValueError(
            "the optimizer given to estimate() holds none of the model's parameters; build it on this model "
            "(a meta-device model is fine), or pass its class, e.g. optimizer=torch.optim.AdamW"
        )
    return order


# -- the table ------------------------------------------------------------------------------------------
