"""Predicted time of one optimizer step: the compute, plus the transfers that compute does not hide.

    work = StepWork.from_trace(trace, tokens=4096, boundary_bytes=...)  # tidal.memory.shape: one micro-batch
    hw = Hardware.named("H100")                   # tidal.memory.hardware
    t = step_time(work, model_shape(model, tp=8), config, 64, hw, ranks_per_node=8)
    t.seconds, t.compute, t.bubble, t.update      # seconds
    [(x.kind, x.nbytes, x.seconds, x.exposed) for x in t.transfers]

Compute: the trace's FLOPs (`FlopCounterMode` under fake tensors: forward, backward, and each block's forward
for recompute and pipeline stages), divided over tp * sp, at ``hardware.rate(precision)`` (peak x efficiency).
Each op also costs ``op_overhead`` of dispatch: hidden behind compute on a GPU (ops are queued ahead; the
pass takes the longer of the two), added on a CPU. Recompute adds its blocks' forward again in backward. A
pipeline rank runs its stages' blocks (the head's FLOPs on the last stage); the slowest rank paces the
pipeline, and the bubble adds ``b / (1 - b)`` of the work, ``b = (p-1) / (v*m + p-1)``.

Transfers (bytes one rank sends per step; ring collectives: all-reduce ``2(n-1)/n``, all-gather,
reduce-scatter and all-to-all ``(n-1)/n`` of the data; a group inside one node uses ``intra_bw``, else
``inter_bw``), each with what it overlaps:

- tp collectives, per block and micro-batch (bytes from the tokens, the width and the compute dtype): with
  ``parallel.tensor.sequence_parallel`` an all-gather before the column-parallel matmuls and a
  reduce-scatter after the row-parallel one, else all-reduces; backward the matching pair. With
  ``comm.overlap.tp`` on or auto each is hidden up to the matmul next to it, else exposed. Same for the ep
  all-to-alls (dispatch, combine) and the experts' matmuls with ``comm.overlap.moe``. sp: Ulysses
  all-to-alls exposed; ring passes hidden up to the block's attention. Exposed parts stall the block.
- per pass (one micro-batch's forward or backward), these share the pass's busy time (compute, dispatch,
  stalls above) as one hiding budget, in this order (what exceeds it is exposed): ZeRO-3 parameter
  all-gathers and parameter offload copies (prefetched one block ahead: the first block's is exposed),
  activation offload (out in forward; back in backward, exposed when prefetch_layers=0), pp sends, and in
  the last micro-batch's backward the dp gradient reduce (all-reduce at ZeRO 0-1, reduce-scatter at 2-3;
  the last bucket -- the embedding's, or at ZeRO 3 the root's parameters -- is exposed) and the gradients'
  copy to the optimizer's host.
- per step, exposed: the pipeline's fill and drain (p-1 sends each way), the ZeRO 1-2 all-gather of
  updated parameters, the offloaded optimizer's pipeline ``max(PCIe, NVMe, host update)`` (hidden in
  backward when the engine updates chunks there), and the device's optimizer update (memory-bound).

So a step costs ``max(compute, transfers)`` where they overlap and their sum where they cannot; more
bandwidth or FLOP/s never predicts a slower step. Not modelled: collective latency, link contention between
dimensions, uneven routing, kernels' efficiency at small shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from tidal.config import Config
from tidal.memory.hardware import Hardware
from tidal.memory.shape import ModelShape, StepWork, held_params, rank_blocks
from tidal.offload.chunks import updates_in_backward
from tidal.parallel.pipeline import theoretical_bubble
from tidal.parallel.topology import RankGrid


@dataclass(frozen=True)
class Transfer:
    """One kind of transfer over one step on one rank."""

    kind: str
    nbytes: int
    """Bytes this rank sends or copies."""
    seconds: float
    """Time on its link."""
    exposed: float
    """Seconds of it that compute did not hide."""
    overlaps: str
    """What it runs beside."""


OVERLAPS = {
    "tp collectives": "its matmul with comm.overlap.tp on/auto, else nothing",
    "sp attention exchange": "ring: the attention; Ulysses: nothing",
    "ep all-to-all": "the experts' matmuls with comm.overlap.moe on/auto, else nothing",
    "zero3 parameter gather": "the previous block's compute (the first block's: nothing)",
    "parameter offload": "the previous block's compute (the first block's: nothing)",
    "activation offload": "forward / backward compute (backward: nothing at prefetch_layers=0)",
    "pp activations": "the other micro-batches' compute, but the pipeline's fill and drain",
    "dp gradient reduce": "the last micro-batch's backward, but the last bucket",
    "optimizer offload": "gradient copies: backward; read/update/write pipeline: backward if updated there",
    "zero parameter gather after step": "nothing",
}
"""Transfer kind -> what it overlaps, in the order the report lists them."""


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds of one optimizer step on its slowest rank, and their parts."""

    seconds: float
    compute: float
    """FLOPs of forward, backward and recompute over the step's micro-batches, at the device's rate."""
    recompute: float
    """The part of `compute` that recomputes activations."""
    overhead: float
    """Op dispatch that compute did not hide."""
    bubble: float
    """Pipeline idle time."""
    update: float
    """The optimizer update of the state on the device."""
    transfers: tuple[Transfer, ...]
    micro_batches: int
    pp_rank: int
    """The pipeline rank these parts are of (the slowest)."""

    @property
    def exposed(self) -> float:
        """Seconds of transfers that compute did not hide."""
        return sum(t.exposed for t in self.transfers)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exposed": self.exposed}


class _Ledger:
    """Bytes, seconds and exposed seconds per transfer kind, over a step."""

    def __init__(self) -> None:
        self.rows: dict[str, list[float]] = {}

    def add(self, kind: str, nbytes: float, seconds: float, exposed: float, times: int = 1) -> None:
        row = self.rows.setdefault(kind, [0.0, 0.0, 0.0])
        for k, v in enumerate((nbytes, seconds, exposed)):
            row[k] += v * times

    def transfers(self) -> tuple[Transfer, ...]:
        order = [k for k in OVERLAPS if k in self.rows]
        return tuple(Transfer(k, int(self.rows[k][0]), *self.rows[k][1:], OVERLAPS[k]) for k in order)


class _Pass:
    """Transfers that share one forward or backward pass's busy time as their hiding budget (module doc)."""

    def __init__(self, busy: float) -> None:
        self.busy, self.items = busy, []

    def add(self, kind: str, nbytes: float, seconds: float, first: float = 0.0) -> None:
        """`first` of the `seconds` cannot overlap (nothing runs before it)."""
        if seconds > 0:
            self.items.append((kind, nbytes, seconds, min(first, seconds)))

    def settle(self, ledger: _Ledger, times: int) -> float:
        """Record the items `times` over; return the pass's time (busy + exposed)."""
        budget, total = self.busy, self.busy
        for kind, nbytes, seconds, first in self.items:
            hidden = min(seconds - first, budget)
            budget -= hidden
            ledger.add(kind, nbytes, seconds, seconds - hidden, times)
            total += seconds - hidden
        return total


def step_time(
    work: StepWork,
    shape: ModelShape,
    config: Config,
    world_size: int,
    hardware: Hardware,
    *,
    ranks_per_node: int | None = None,
    choices: Sequence[str] | None = None,
    device_type: str = "cuda",
    optimizer_slots: int = 2,
) -> StepTime:
    """Predict one optimizer step of `config` on `world_size` ranks (see the module doc).

    Args:
        work: one micro-batch's FLOPs, ops and bytes (`StepWork.from_trace`).
        shape: the model's parameters under the config's tp and ep (`model_shape`).
        ranks_per_node: ranks sharing a node (its NVMe and host memory; groups within it use intra_bw);
            default: all.
        choices: "keep", "offload" or "recompute" per repeated block; default all kept.
        device_type: "cuda", or "cpu" when the device is the host (no PCIe copies for the optimizer).
        optimizer_slots: parameter-shaped state tensors of the optimizer (AdamW: 2).
    """
    p = config.parallel
    grid = RankGrid.create(world_size, pp=p.pp, dp=None if p.dp == "auto" else p.dp, sp=p.sp, tp=p.tp, ep=p.ep)
    per_node = min(ranks_per_node or world_size, world_size)
    job = _Job(work, shape, config, grid, hardware, per_node, device_type, choices, optimizer_slots)
    ranks = [_rank_time(job, r) for r in range(grid.pp)]
    m, pace = job.micro, max(r.pace for r in ranks)
    fraction = theoretical_bubble(grid.pp, m, p.pipeline.stages_per_rank) if grid.pp > 1 else 0.0
    bubble = fraction / (1 - fraction) * m * pace
    worst = max(ranks, key=lambda r: r.total)
    return StepTime(
        worst.total + bubble,
        worst.compute,
        worst.recompute,
        worst.overhead,
        bubble,
        worst.update,
        worst.ledger.transfers(),
        m,
        worst.pp_rank,
    )


@dataclass
class _Job:
    """What every rank's time reads."""

    work: StepWork
    shape: ModelShape
    config: Config
    grid: RankGrid
    hw: Hardware
    per_node: int
    device_type: str
    choices: Sequence[str] | None
    slots: int
    links: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.choices = list(self.choices or ["keep"] * len(self.work.block_flops))
        self.rate = self.hw.rate(self.config.precision.dtype)
        self.act = 4 if self.config.precision.dtype == "fp32" else 2  # bytes of a compute-dtype element
        pp = self.config.parallel.pipeline
        train = self.config.train
        self.micro = (pp.microbatches or self.grid.pp) if self.grid.pp > 1 else train.gradient_accumulation_steps

    def bw(self, group: str) -> float:
        """Bandwidth of `group`'s ring: intra-node when the group of rank 0 lies in one node."""
        if group not in self.links:
            nodes = {r // self.per_node for r in self.grid.group_ranks(group, 0)}
            self.links[group] = self.hw.intra_bw if len(nodes) == 1 else self.hw.inter_bw
        return self.links[group]

    def offload_bw(self, tier: str) -> float:
        """Device <-> `tier` per rank: PCIe, and for NVMe this rank's share of the node's drive too."""
        pcie = self.hw.pcie_bw
        return min(pcie, self.hw.nvme_bw / self.per_node) if tier == "nvme" else pcie


_ALL = float("inf")
"""`_Pass.add(first=_ALL)`: none of it can overlap."""


def _busy(compute: float, dispatch: float, queued: bool) -> tuple[float, float]:
    """(busy time, overhead) of a pass: dispatch hides behind compute when ops are queued ahead."""
    if queued:
        return max(compute, dispatch), max(0.0, dispatch - compute)
    return compute + dispatch, dispatch


class _Rank(NamedTuple):
    pp_rank: int
    pace: float
    """One micro-batch's forward + backward, transfers included: what paces the pipeline."""
    total: float
    """The step without the bubble."""
    compute: float
    recompute: float
    overhead: float
    update: float
    ledger: _Ledger


def _rank_time(job: _Job, pp_rank: int) -> _Rank:
    g, c, w, s, hw = job.grid, job.config, job.work, job.shape, job.hw
    v = c.parallel.pipeline.stages_per_rank if g.pp > 1 else 1
    blocks, first, last = rank_blocks(len(w.block_flops), g.pp, v, pp_rank)
    split, m = g.tp * g.sp, job.micro
    tail = w.forward_flops - sum(w.block_flops) if last else 0
    total_fwd = w.forward_flops or 1
    back = w.backward_flops / w.forward_flops if w.forward_flops else 2.0
    f = {i: w.block_flops[i] / split / job.rate for i in blocks}
    recomputed = [i for i in blocks if job.choices[i] == "recompute"]
    c_f = sum(f.values()) + tail / split / job.rate
    c_rc = sum(f[i] for i in recomputed)
    c_b = c_f * back + c_rc
    share = (sum(w.block_flops[i] for i in blocks) + tail) / total_fwd
    rc_share = sum(w.block_flops[i] for i in recomputed) / total_fwd
    ledger = _Ledger()
    e_f, e_b = _block_local(job, blocks, f, recomputed, back, ledger)
    busy_f, ov_f = _busy(c_f + e_f, w.forward_ops * share * hw.op_overhead, hw.async_ops)
    dispatch_b = (w.backward_ops * share + w.forward_ops * rc_share) * hw.op_overhead
    busy_b, ov_b = _busy(c_b + e_b, dispatch_b, hw.async_ops)

    root, held_blocks = held_params(s, blocks, first, last, g.pp)
    held = root + sum(held_blocks)
    n = g.size("dp_sp")
    fwd, bwd, bwd_last = _Pass(busy_f), _Pass(busy_b), _Pass(busy_b)
    backward = (bwd, bwd_last)
    after = 0.0  # exposed after the passes: pipeline fill and drain, post-step gather, optimizer pipeline
    z = c.zero
    links = [("zero3 parameter gather", (n - 1) / n, job.bw("dp_sp"))] if z.stage == 3 and n > 1 else []
    if z.stage == 3 and c.offload.params.device != "none" and job.device_type == "cuda":
        links.append(("parameter offload", 1 / n, job.offload_bw(c.offload.params.device)))
    if links:
        ahead = (root + held_blocks[0]) if held_blocks else root
        for kind, share_n, bw in links:
            nbytes = share_n * held
            fwd.add(kind, nbytes, nbytes / bw, share_n * ahead / bw if z.prefetch_modules else _ALL)
            if z.reshard_after_forward and held_blocks:
                nbytes = share_n * sum(held_blocks)
                for pass_ in backward:
                    pass_.add(kind, nbytes, nbytes / bw, share_n * held_blocks[-1] / bw if z.prefetch_modules else _ALL)
    a = c.offload.activations
    moved = sum(w.block_saved[i] for i in blocks if job.choices[i] == "offload") / split
    if moved:
        bw = job.offload_bw(a.device if a.device != "none" else "cpu")
        fwd.add("activation offload", moved, moved / bw)
        for pass_ in backward:
            pass_.add("activation offload", moved, moved / bw, _ALL if a.prefetch_layers == 0 else 0.0)
    if g.pp > 1:
        boundary = w.boundary_bytes / g.sp / (g.tp if c.parallel.tensor.sequence_parallel else 1)
        send = boundary / job.bw("pp")
        for pass_ in (fwd, *backward):
            pass_.add("pp activations", v * boundary, v * send)
        after += (g.pp - 1) * 2 * send  # fill and drain: sends on the critical path (their time counted above)
        ledger.add("pp activations", 0, 0, (g.pp - 1) * 2 * send)
    if n > 1:
        factor = (2 if z.stage < 2 else 1) * (n - 1) / n
        e = g.edp
        experts = sum(s.block_experts[i] for i in blocks)
        dense = held - experts
        expert_factor = (2 if z.stage < 2 else 1) * (e - 1) / e if e > 1 else 0.0
        seconds = factor * dense / job.bw("dp_sp") + (expert_factor * experts / job.bw("edp") if e > 1 else 0.0)
        if z.stage == 3:
            tail_bytes = root or (held_blocks[0] if held_blocks else 0)
        else:
            tail_bytes = min(held, max(int(c.comm.bucket_mb * 2**20), s.first_param if first else 0))
        exposed = factor * tail_bytes / job.bw("dp_sp") if c.comm.overlap_grad_reduce else _ALL
        bwd_last.add("dp gradient reduce", factor * dense + expert_factor * experts, seconds, exposed)
        if z.stage in (1, 2):
            nbytes = (n - 1) / n * held
            seconds = nbytes / job.bw("dp_sp")
            after += seconds
            ledger.add("zero parameter gather after step", nbytes, seconds, seconds)
    update, pipeline = _optimizer(job, held, n, bwd_last, ledger)
    after += pipeline

    fwd_time = fwd.settle(ledger, m)
    bwd_time = bwd.settle(ledger, m - 1)
    last_time = bwd_last.settle(ledger, 1)
    total = m * fwd_time + (m - 1) * bwd_time + last_time + after + update
    return _Rank(pp_rank, fwd_time + bwd_time, total, m * (c_f + c_b), m * c_rc, m * (ov_f + ov_b), update, ledger)


def _optimizer(job: _Job, held: float, n: int, bwd_last: _Pass, ledger: _Ledger) -> tuple[float, float]:
    """Record the offloaded optimizer's traffic; return the device's update time and the pipeline's time
    exposed after backward (module doc)."""
    c, g, s, hw = job.config, job.grid, job.shape, job.hw
    o = c.offload.optimizer
    elements = held / s.itemsize / (n if c.zero.stage >= 1 else 1)
    access = (3 + 2 * job.slots) * 4  # fp32: read parameter, gradient, state; write parameter, state
    on_host = elements * (1 - o.ratio) if o.device != "none" else 0.0
    update = (elements - on_host) * access / hw.memory_bw if hw.memory_bw else 0.0
    if not on_host:
        return update, 0.0
    pcie = on_host * s.itemsize if job.device_type == "cuda" else 0.0  # each way: gradients out, parameters in
    nvme = on_host * (job.slots + 1) * 4 * 2 if o.device == "nvme" else 0.0  # state + master, read and written
    copies = pcie / hw.pcie_bw
    pipeline = max(copies, nvme / (hw.nvme_bw / job.per_node), on_host * access / (hw.host_bw / job.per_node))
    in_backward = updates_in_backward(
        c,
        zero_stage=c.zero.stage,
        dp_world=n,
        model_parallel=g.world_size > n or g.ep > 1,
        pipelined=g.pp > 1,
        device_type=job.device_type,
    )
    if in_backward:
        bwd_last.add("optimizer offload", 2 * pcie + nvme, pipeline)
        return update, 0.0
    bwd_last.add("optimizer offload", pcie, copies)
    ledger.add("optimizer offload", pcie + nvme, pipeline, pipeline)
    return update, pipeline


def _block_local(
    job: _Job, blocks: list[int], f: dict[int, float], recomputed: list[int], back: float, ledger: _Ledger
) -> tuple[float, float]:
    """Record tp, ep and sp exchanges of one micro-batch's blocks (times the micro-batches); return what they
    leave exposed in forward and in backward (recompute runs the forward ones again)."""
    g, c, w, s = job.grid, job.config, job.work, job.shape
    tok, act, t = w.tokens / g.sp, job.act, g.tp
    seqpar = c.parallel.tensor.sequence_parallel
    overlap_tp, overlap_moe = c.comm.overlap.tp != "off", c.comm.overlap.moe != "off"
    exposed_f = exposed_b = 0.0
    for i in blocks:
        fwd: list[tuple[str, float, float, float]] = []  # (kind, bytes, seconds, compute it may hide behind)
        bwd: list[tuple[str, float, float, float]] = []
        linear = expert = 0.0
        if t > 1 and s.sites:
            bw = job.bw("tp")
            for site in s.sites[i]:
                data = tok * site.features * act
                matmul = 2 * tok * site.weight / t / job.rate
                linear += matmul
                window = matmul if overlap_tp else 0.0
                half = (t - 1) / t * data  # all-gather or reduce-scatter; an all-reduce sends twice this
                reduce = half if seqpar else 2 * half
                if site.side == "in":
                    if seqpar:
                        fwd.append(("tp collectives", half, half / bw, window))
                    bwd.append(("tp collectives", reduce, reduce / bw, window))  # beside the weight gradient
                else:
                    fwd.append(("tp collectives", reduce, reduce / bw, window))
                    if seqpar:
                        bwd.append(("tp collectives", half, half / bw, 2 * window))
        moe = s.experts[i] if s.experts else None
        if moe is not None:
            expert = 2 * tok * moe.top_k * moe.expert_weight / t / job.rate
            if g.ep > 1:
                data = 2 * (g.ep - 1) / g.ep * tok * moe.top_k * moe.hidden * act  # dispatch + combine
                seconds, window = data / job.bw("ep"), expert if overlap_moe else 0.0
                fwd.append(("ep all-to-all", data, seconds, window))
                bwd.append(("ep all-to-all", data, seconds, 2 * window))
        if g.sp > 1:
            data = tok * s.hidden / t * act
            bw = job.bw("sp")
            if c.parallel.sequence.method == "ulysses":  # q, k, v and the output, each way
                data *= 4 * (g.sp - 1) / g.sp
                fwd.append(("sp attention exchange", data, data / bw, 0.0))
                bwd.append(("sp attention exchange", data, data / bw, 0.0))
            else:  # ring: k and v pass sp-1 times, beside the attention
                attention = max(0.0, f[i] - linear - expert)
                data *= 2 * (g.sp - 1)
                fwd.append(("sp attention exchange", data, data / bw, attention))
                bwd.append(("sp attention exchange", 2 * data, 2 * data / bw, back * attention))
        repeat = fwd if i in recomputed else []
        for ops, forward in ((fwd, True), (bwd, False), (repeat, False)):
            for kind, nbytes, seconds, window in ops:
                exposed = max(0.0, seconds - window)
                ledger.add(kind, nbytes, seconds, exposed, job.micro)
                if forward:
                    exposed_f += exposed
                else:
                    exposed_b += exposed
    return exposed_f, exposed_b
