"""Pipeline parallelism: cut a causal LM into stages and train it with GPipe, 1F1B or interleaved 1F1B.

    runner = PipelineRunner(model, topology, config)     # config.parallel.pipeline picks the schedule
    loss = runner.train_step(input_ids)                  # on every pp rank; grads left on this rank's stages
    optimizer.step(); optimizer.zero_grad()
    runner.measured_bubble()                             # idle/total per pp rank in that step, and the theory

The model's repeated blocks are cut into ``pp * stages_per_rank`` contiguous stages; stage ``i`` runs on
pp rank ``i % pp`` (the looped placement interleaving needs). The first stage also runs the embeddings,
the last the final norm and the LM head; the loss is computed on the last stage. Stage modules hold the
model's own submodules, so the optimizer and checkpoints keep the model's parameter names; parameters
of other ranks' stages keep ``grad=None`` here and the optimizer skips them.

The schedules are torch.distributed.pipelining's; tidal adds the splitting of Hugging Face models (their
decoder layers need position ids, causal masks and rotary embeddings that the model's own forward would
have built, so each stage rebuilds them), timing of every micro-step for the bubble, and the gradient sum
of weights shared between stages (GPT-2 ties its LM head to the token embedding).

A model tensor parallel has already split is cut the same way: its stages hold DTensor parameters, pass
sequence shards between them under sequence parallelism (`DecoderStage.sequence_shards`), and take a
``loss_fn`` for vocabulary-split logits from the caller (`tidal.runtime.parallelize`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from tidal.config import Config
from tidal.parallel.shards import PIPELINE_COPIES, like, local
from tidal.parallel.topology import Topology


class PipelineError(ValueError):
    """Pipeline sizes that do not fit the model or the batch; the message names the fix."""


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy as Hugging Face computes it: logits (b, s, vocab) at position t
    predict labels (b, s) at t+1; label -100 is ignored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


# -- stages -------------------------------------------------------------------------------------------


class DecoderStage(nn.Module):
    """One stage of a decoder-only LM: token ids (b, s) or hidden (b, s / sequence_shards, h) in; hidden, or
    logits (b, s, vocab) on the last stage, out. Holds the model's own blocks ``[lo, hi)``."""

    sequence_shards = 1
    """Pieces the hidden states between blocks are cut into along the sequence: tp under tensor-parallel
    sequence parallelism, else 1. Positions and masks are built for the whole sequence."""

    def __init__(self, blocks: nn.ModuleList, lo: int, hi: int, *, first: bool, last: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks[lo:hi])
        self.layers = (lo, hi)
        self.first = first
        self.last = last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1] if self.first else x.shape[1] * self.sequence_shards
        positions = torch.arange(length, device=x.device).unsqueeze(0)
        hidden = self.embed(x, positions) if self.first else x
        hidden = self.run_blocks(hidden, positions)
        return self.head(hidden) if self.last else hidden

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_blocks(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _causal_mask(config: object, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
    """The mask the model's own forward builds for an unpadded batch of ``positions.shape[1]`` tokens (None
    where attention is causal by flag); `hidden` may be a sequence shard: only its batch, dtype and device count."""
    from transformers.masking_utils import create_causal_mask

    whole = hidden[:, :1].expand(-1, positions.shape[1], -1)  # a view: the mask is sized from its length
    return create_causal_mask(
        config=config, inputs_embeds=whole, attention_mask=None, past_key_values=None, position_ids=positions
    )


class GPT2Stage(DecoderStage):
    """A stage of a transformers GPT-2 (``transformer.wte/wpe/h/ln_f``, ``lm_head``)."""

    def __init__(self, model: nn.Module, lo: int, hi: int, *, first: bool, last: bool) -> None:
        body = model.transformer
        super().__init__(body.h, lo, hi, first=first, last=last)
        self.config = body.config
        if first:
            self.wte, self.wpe, self.drop = body.wte, body.wpe, body.drop
        if last:
            self.ln_f, self.lm_head = body.ln_f, model.lm_head

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.drop(self.wte(ids) + self.wpe(positions))

    def run_blocks(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mask = _causal_mask(self.config, hidden, positions)
        for block in self.blocks:
            hidden = block(hidden, attention_mask=mask, position_ids=positions)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden))


class LlamaStage(DecoderStage):
    """A stage of a transformers Llama-style model (``model.embed_tokens/layers/norm/rotary_emb``, ``lm_head``):
    Llama, Mistral, Qwen2 and the like. Every stage computes the rotary (cos, sin) from the model's module."""

    def __init__(self, model: nn.Module, lo: int, hi: int, *, first: bool, last: bool) -> None:
        body = model.model
        super().__init__(body.layers, lo, hi, first=first, last=last)
        self.config = body.config
        self.rotary_emb = body.rotary_emb
        if first:
            self.embed_tokens = body.embed_tokens
        if last:
            self.norm, self.lm_head = body.norm, model.lm_head

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def run_blocks(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mask = _causal_mask(self.config, hidden, positions)
        rotary = self.rotary_emb(hidden, positions)
        for layer in self.blocks:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


STAGE_TYPES: dict[str, type[DecoderStage]] = {"transformer.h": GPT2Stage, "model.layers": LlamaStage}
"""Where a model family keeps its blocks -> the stage module that runs a slice of them."""


def _blocks_path(model: nn.Module) -> str:
    lists = {name: len(m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    found = [path for path in STAGE_TYPES if path in lists]
    if not found:
        largest = max(lists, key=lists.get, default=None)
        seen = f"its largest ModuleList is {largest!r}" if largest else "it has no ModuleList"
        raise PipelineError(
            f"cannot split {type(model).__name__} into pipeline stages: {seen}; pipeline parallelism supports "
            f"causal LMs whose blocks are at {' or '.join(STAGE_TYPES)} (GPT-2, Llama-style)"
        )
    return found[0]


def stage_bounds(num_layers: int, num_stages: int, balance: list[int] | None = None) -> list[tuple[int, int]]:
    """Layer ranges ``[lo, hi)`` of each stage: `balance` (layers per stage) or an even split, the first
    stages taking one more layer when the count does not divide."""
    if balance is None:
        base, extra = divmod(num_layers, num_stages)
        balance = [base + (i < extra) for i in range(num_stages)]
    elif len(balance) != num_stages:
        raise PipelineError(
            f"balance={balance} has {len(balance)} entries for {num_stages} stages; give one layer count per stage"
        )
    elif sum(balance) != num_layers or min(balance) < 1:
        raise PipelineError(
            f"balance={balance} must give every stage at least one layer and sum to the model's {num_layers} "
            f"layers (it sums to {sum(balance)})"
        )
    ends = [sum(balance[: i + 1]) for i in range(num_stages)]
    return [(end - n, end) for end, n in zip(ends, balance, strict=True)]


def build_stages(
    model: nn.Module,
    pp: int,
    *,
    stages_per_rank: int = 1,
    balance: list[int] | None = None,
    sequence_shards: int = 1,
) -> list[DecoderStage]:
    """All ``pp * stages_per_rank`` stage modules of `model` in pipeline order, sharing the model's parameters
    (`sequence_shards`: see `DecoderStage.sequence_shards`)."""
    path = _blocks_path(model)
    num_layers = len(model.get_submodule(path))
    num_stages = pp * stages_per_rank
    if num_stages > num_layers:
        if stages_per_rank == 1:
            raise PipelineError(f"pp={pp} exceeds the model's {_layers(num_layers)}; choose pp <= {num_layers}")
        raise PipelineError(
            f"pp={pp} x stages_per_rank={stages_per_rank} = {num_stages} stages exceeds the model's "
            f"{_layers(num_layers)}; choose pp*stages_per_rank <= {num_layers}"
        )
    stage_type = STAGE_TYPES[path]
    bounds = stage_bounds(num_layers, num_stages, balance)
    stages = [stage_type(model, lo, hi, first=i == 0, last=i == num_stages - 1) for i, (lo, hi) in enumerate(bounds)]
    for stage in stages:
        stage.sequence_shards = sequence_shards
    return stages


def _layers(n: int) -> str:
    return f"{n} layer" if n == 1 else f"{n} layers"


def local_stage_ids(topology: Topology, stages_per_rank: int = 1) -> list[int]:
    """Indices of the stages this rank runs: pp rank r holds r, r+pp, r+2pp, ... (looped placement)."""
    pp, rank = topology.size("pp"), topology.rank("pp")
    return [rank + k * pp for k in range(stages_per_rank)]


def split_model(
    model: nn.Module, topology: Topology, *, stages_per_rank: int = 1, balance: list[int] | None = None
) -> list[nn.Module]:
    """This rank's stage modules, in pipeline order, of `model` cut into ``pp * stages_per_rank`` stages.

    Args:
        balance: layers per stage (``pp * stages_per_rank`` entries, e.g. from the planner); None splits evenly.
    Raises:
        PipelineError: more stages than layers, a model whose blocks are not found, or a bad `balance`.
    """
    stages = build_stages(model, topology.size("pp"), stages_per_rank=stages_per_rank, balance=balance)
    return [stages[i] for i in local_stage_ids(topology, stages_per_rank)]


# -- schedules ----------------------------------------------------------------------------------------

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}
"""config.parallel.pipeline.schedule -> the torch.distributed.pipelining schedule that runs it."""


def check_schedule(schedule: str, pp: int, microbatches: int, stages_per_rank: int) -> None:
    """Raise `PipelineError` naming the fix when the schedule cannot run these sizes (the config schema
    already rejects unknown schedules and stages_per_rank > 1 without interleaving)."""
    key = "parallel.pipeline"
    if schedule == "interleaved":
        if stages_per_rank < 2:
            raise PipelineError(
                f"{key}.schedule=interleaved needs {key}.stages_per_rank > 1 (model chunks per rank), got "
                f"{stages_per_rank}; set {key}.stages_per_rank=2 or {key}.schedule=1f1b"
            )
        if microbatches % pp:
            raise PipelineError(
                f"{key}.microbatches={microbatches} is not a multiple of pp={pp} (interleaved 1F1B runs "
                f"micro-batches in rounds of pp); choose microbatches in {{{pp}, {2 * pp}, {3 * pp}, ...}}"
            )
    if schedule == "1f1b" and microbatches < pp:
        raise PipelineError(
            f"{key}.microbatches={microbatches} is below pp={pp}; 1f1b needs at least one micro-batch per stage; "
            f"choose microbatches >= {pp}"
        )


def theoretical_bubble(pp: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """Idle share of an ideal schedule with equal stage times: (p-1)/(v*m+p-1); v=1 for GPipe and 1F1B."""
    return (pp - 1) / (stages_per_rank * microbatches + pp - 1)


@dataclass(frozen=True)
class PipelineBubble:
    """The bubble of one step: each pp rank's idle time (not in a micro-batch's forward, loss or backward)
    over the step's wall time (the longest rank's), beside the ideal schedule's fraction."""

    per_rank: tuple[float, ...]
    theoretical: float
    step_seconds: float

    @property
    def mean(self) -> float:
        """Mean over the pp ranks, fraction in [0, 1]."""
        return sum(self.per_rank) / len(self.per_rank)


class _BusyClock:
    """Busy and total seconds of one step on this rank: host clocks on the CPU, device events on an
    accelerator (its kernels run asynchronously, so host timestamps would time launches, not compute)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.events = device.type != "cpu"
        self.spans: list[tuple] = []
        self.start = self._mark()

    def _mark(self) -> float | torch.Event:
        if not self.events:
            return time.perf_counter()
        event = torch.Event(self.device, enable_timing=True)
        event.record()
        return event

    def _seconds(self, a: float | torch.Event, b: float | torch.Event) -> float:
        return a.elapsed_time(b) / 1e3 if self.events else b - a

    def restart(self) -> None:
        self.spans.clear()
        self.start = self._mark()

    def timed(self, fn: Callable) -> Callable:
        """`fn`, adding the time of each call to the busy spans."""

        def run(*args, **kwargs):
            begin = self._mark()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spans.append((begin, self._mark()))

        return run

    def finish(self) -> tuple[float, float]:
        """(total, busy) seconds since `restart`."""
        end = self._mark()
        if self.events:
            end.synchronize()
        return self._seconds(self.start, end), sum(self._seconds(a, b) for a, b in self.spans)


class _TimedStage(PipelineStage):
    """A PipelineStage whose forward and backward of each micro-batch count as busy time on `clock`."""

    def __init__(self, *args, clock: _BusyClock, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.forward_one_chunk = clock.timed(self.forward_one_chunk)
        self.backward_one_chunk = clock.timed(self.backward_one_chunk)


# -- runner -------------------------------------------------------------------------------------------


class PipelineRunner:
    """Trains `model` split over the topology's pp group with the schedule `config.parallel.pipeline` names.

    Args:
        model: a GPT-2 or Llama-style transformers causal LM, whole on every rank (each runs its stages).
        loss_fn: ``(logits (b, s, vocab), labels (b, s)) -> mean loss`` of one micro-batch; the step's loss
            and gradients are the mean over micro-batches.
        balance: layers per stage (``pp * stages_per_rank`` entries); None splits evenly.
    Raises:
        PipelineError: sizes the model or schedule cannot run (see `build_stages`, `check_schedule`).

    Attributes:
        stages: this rank's stage modules, in pipeline order.
        named_parameters: the model's (name, parameter) pairs those stages hold, in model order: what this
            rank trains, reduces over data parallel and shards with ZeRO.
    """

    def __init__(
        self,
        model: nn.Module,
        topology: Topology,
        config: Config,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = causal_lm_loss,
        *,
        balance: list[int] | None = None,
    ) -> None:
        settings = config.parallel.pipeline
        self.pp = topology.size("pp")
        self.schedule_name = settings.schedule
        self.stages_per_rank = settings.stages_per_rank
        self.microbatches = settings.microbatches or self.pp
        check_schedule(self.schedule_name, self.pp, self.microbatches, self.stages_per_rank)
        # tensor parallel (applied before the split) with sequence parallel passes sequence shards between stages
        shards = topology.size("tp") if config.parallel.tensor.sequence_parallel else 1
        stages = build_stages(
            model, self.pp, stages_per_rank=self.stages_per_rank, balance=balance, sequence_shards=shards
        )
        self.stage_ids = local_stage_ids(topology, self.stages_per_rank)
        self.stages = [stages[i] for i in self.stage_ids]
        self.num_stages = len(stages)
        self.group = topology.group("pp")
        self.device = next(model.parameters()).device
        self.first = 0 in self.stage_ids
        self.last = self.num_stages - 1 in self.stage_ids
        self.shared = _shared_parameters(model, stages, self.pp, topology.rank("pp"))
        held = {p for stage in self.stages for p in stage.parameters()}
        self.named_parameters = [(n, p) for n, p in model.named_parameters() if p in held]
        self.loss_fn = loss_fn
        self.loss_scale = 1.0
        """What backward starts from is the loss times this (fp16's loss scale, set before each step); the
        loss `train_step` returns is not scaled."""
        self.clock = _BusyClock(self.device)
        self._schedule = None
        self._shape: tuple[int, ...] | None = None
        self._bubble: PipelineBubble | None = None

    def _build_schedule(self, shape: tuple[int, ...]):
        """Stages and schedule for micro-batches of `shape`; rebuilt when it changes (torch infers the
        activation shapes once, from the first micro-batch)."""
        if shape == self._shape:
            return self._schedule
        runtime = [
            _TimedStage(stage, i, self.num_stages, self.device, group=self.group, clock=self.clock)
            for stage, i in zip(self.stages, self.stage_ids, strict=True)
        ]
        m = self.microbatches
        loss = self.clock.timed(lambda logits, labels: self.loss_fn(logits, labels) * (self.loss_scale / m))
        schedule_type = SCHEDULES[self.schedule_name]
        # scale_grads=False: the loss is divided instead, so gradients accumulate across train_step calls
        self._schedule = schedule_type(
            runtime if self.schedule_name == "interleaved" else runtime[0], m, loss_fn=loss, scale_grads=False
        )
        self._shape = shape
        return self._schedule

    def train_step(self, batch: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One forward and backward of `batch` through the pipeline; every pp rank calls it with the same batch.

        Args:
            batch: token ids (b, s), labels = ids; or a mapping with ``input_ids`` and optional ``labels``.
                b must be a multiple of the micro-batch count.
        Returns:
            The batch's mean loss (a 0-dim fp32 tensor), the same on every pp rank. Gradients are added to
            this rank's stage parameters; the caller runs the optimizer.
        """
        ids, labels = _inputs(batch)
        if ids.shape[0] % self.microbatches:
            raise PipelineError(
                f"a batch of {ids.shape[0]} samples does not split into parallel.pipeline.microbatches="
                f"{self.microbatches} equal micro-batches; use a batch size that is a multiple of {self.microbatches}"
            )
        schedule = self._build_schedule((ids.shape[0] // self.microbatches, *ids.shape[1:]))
        losses: list[torch.Tensor] = []
        args = (ids.to(self.device),) if self.first else ()
        target = labels.to(self.device) if self.last else None
        stash = {p: p.grad for p in self.shared}
        for p in self.shared:
            p.grad = None  # the shared-weight sum below must add this step's gradients only
        dist.all_reduce(torch.zeros(1, device=self.device), group=self.group)  # one start line for the step windows
        self.clock.restart()
        schedule.step(*args, target=target, losses=losses, return_outputs=False)
        total, busy = self.clock.finish()
        self._sum_shared_grads(stash)
        loss = torch.stack(losses).sum().float() / self.loss_scale if self.last else torch.zeros((), device=self.device)
        stats = [torch.zeros(3, device=self.device) for _ in range(self.pp)]
        mine = torch.cat([loss.detach().reshape(1), torch.tensor([total, busy], device=self.device)])
        dist.all_gather(stats, mine, group=self.group)
        step_seconds = max(s[1].item() for s in stats)
        self._bubble = PipelineBubble(
            tuple(1 - s[2].item() / step_seconds for s in stats),  # busy <= own window <= the longest
            theoretical_bubble(self.pp, self.microbatches, self.stages_per_rank),
            step_seconds,
        )
        return stats[-1][0].clone()

    def _sum_shared_grads(self, stash: dict[nn.Parameter, torch.Tensor | None]) -> None:
        """Sum the gradients of weights used by stages on several pp ranks (tied embeddings) over the pp
        group, and add them back to the gradients they had before the step."""
        if not self.shared:
            return
        # on local shards: a tensor-parallel weight's pp peers hold the same shard of it (same tp rank)
        parts = [local(p) for p in self.shared]
        grads = [
            local(p.grad) if p.grad is not None else torch.zeros_like(part)
            for p, part in zip(self.shared, parts, strict=True)
        ]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for (p, owned), part in zip(self.shared.items(), parts, strict=True):
            grad = flat[offset : offset + part.numel()].view_as(part)
            offset += part.numel()
            if owned:
                p.grad = like(p, grad.clone()) if stash[p] is None else stash[p].add_(like(p, grad))

    def measured_bubble(self) -> PipelineBubble:
        """The bubble of the last `train_step` (every pp rank's, from the same gathered timings)."""
        if self._bubble is None:
            raise RuntimeError("no step measured yet; call train_step(batch) first")
        return self._bubble


def _inputs(batch: torch.Tensor | Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return batch, batch
    other = sorted(set(batch) - {"input_ids", "labels"})
    if other:
        raise PipelineError(
            f"train_step got {', '.join(other)}; pipeline stages take input_ids and labels only (no padding "
            "masks): pack the batch into full sequences and mark positions to skip with labels=-100"
        )
    return batch["input_ids"], batch.get("labels", batch["input_ids"])


def _shared_parameters(model: nn.Module, stages: list[DecoderStage], pp: int, rank: int) -> dict[nn.Parameter, bool]:
    """Parameters held by stages on more than one pp rank (in model order) -> whether this rank holds one;
    each is marked with how many ranks hold it (`PIPELINE_COPIES`)."""
    holders: dict[nn.Parameter, set[int]] = {}
    for i, stage in enumerate(stages):
        for p in stage.parameters():
            holders.setdefault(p, set()).add(i % pp)
    shared = {p: rank in holders[p] for p in model.parameters() if len(holders.get(p, ())) > 1}
    for p in shared:
        setattr(p, PIPELINE_COPIES, len(holders[p]))  # the gradient norm counts it once over the pipeline
    return shared
