"""One micro-batch's activations from the trace (`ActivationProfile`), laid out per rank for the planner.

    profile = trace_profile(spec, micro_batch=1, seq_len=4096, precision="bf16")
    parts = rank_activations(profile, config, block_choices(spec, config, n), pp_rank, in_flight, grads, rank)

The trace (`trace_model` under fake tensors) of one micro-batch, laid out per rank by part:

- saved activations of one micro-batch, per pipeline stage: the blocks (transformer layers) the stage holds
  (`stage_bounds`, looped over ``stages_per_rank``), the code before the first block on the first stage,
  everything after (final norm, head, loss) on the last; times the micro-batches the schedule keeps in
  flight on that rank (the rule in `estimate`). Under ZeRO 3 autocast's bf16 weight copies kept for
  backward are added (at ZeRO 0-2 `estimate` counts them as a buffer already).
- divided by ``tp * sp``. Assumption: every saved tensor is split over tp and sp ranks. That is exact for
  sequence parallelism and for tensor parallelism with ``parallel.tensor.sequence_parallel``; without it the
  norms' and residuals' activations are replicated over tp ranks and this under-counts them.
- workspace: what the step holds beyond saved tensors and gradients at its forward or backward high-water
  mark (logits, attention scores, a layer's temporaries), from the trace's peaks, plus the batch.
- recompute (``offload.activations.policy`` "recompute" on the blocks): a block keeps only its input; in
  backward one block's activations exist again. Offload (cpu/nvme): the blocks' saved tensors move to that
  tier; the device keeps the rest and ``1 + prefetch_layers`` blocks' worth.
- freed in backward (negative): the parts above plus all the gradients would be an upper bound, since
  backward frees activations while gradients appear. A rank running the whole model with every block kept
  takes the trace's own high-water mark instead (`ActivationProfile.traced_peak`: the moments of backward
  as (activations and temporaries, gradients, weight casts), each scaled to this rank), and this part is
  the difference. On six architectures x three configs the predicted peak is within 7% of real CPU steps
  (`benchmarks/plan_accuracy.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tidal.config import Config
from tidal.memory.estimate import FSDP_SCATTER_BUFFER, SCATTER_BUFFER, TIERS, RankEstimate, TierBytes
from tidal.memory.presets import ModelSpec
from tidal.memory.shape import StepWork
from tidal.memory.trace import ModelTrace, trace_causal_lm, trace_model
from tidal.parallel.data import repeated_blocks
from tidal.parallel.pipeline import stage_bounds


@dataclass(frozen=True)
class ActivationProfile:
    """One micro-batch's activations on one rank without model parallelism, from a trace, in bytes."""

    block_saved: tuple[int, ...]
    """Saved activations of each repeated block (transformer layer), autocast weight copies excluded."""
    block_casts: tuple[int, ...]
    """Autocast's low-precision weight copies each block keeps for backward."""
    block_inputs: tuple[int, ...]
    """The hidden-state input of each block: what it keeps when recomputed."""
    head_saved: int
    """Saved before the first block (embeddings)."""
    tail_saved: int
    """Saved after the last block and outside modules (final norm, head, loss)."""
    tail_casts: int
    """Autocast's weight copies kept outside the blocks (the head's), counted on the last stage."""
    forward_workspace: int
    """Forward's high-water mark above what it keeps for backward."""
    backward_workspace: int
    """Backward's high-water mark above what forward kept plus all gradients (0 when below)."""
    batch_bytes: int
    work: StepWork | None = None
    """FLOPs, ops and bytes of the micro-batch, for the step-time prediction."""
    grad_bytes: int = 0
    """Gradients of the whole model after backward."""
    param_bytes: int = 0
    """Parameters of the whole model."""
    forward_point: tuple[int, int] = (0, 0)
    """The trace's `ModelTrace.forward_point`: (activations and temporaries, parameter casts) at forward's peak."""
    backward_points: tuple[tuple[int, int, int], ...] = ()
    """The trace's `ModelTrace.backward_points`: (activations and temporaries, gradients, parameter casts) at
    the moments of backward that may hold its peak."""

    @classmethod
    def from_trace(cls, trace: ModelTrace, block_inputs: list[int], tokens: int = 0) -> ActivationProfile:
        blocks = trace.blocks()
        names = set(trace.block_names)
        first = trace.block_names[0] if names else None
        inside = tuple(f"{n}." for n in names)
        head = tail = casts = 0
        before_first = True
        for record in trace.modules:
            if record.name == first:
                before_first = False
            if record.name in names or record.name.startswith(inside):
                continue
            ancestor = first is not None and (first.startswith(f"{record.name}.") or record.name == "")
            casts += record.saved_param_cast_bytes
            if before_first and not ancestor:
                head += record.saved_bytes
            else:
                tail += record.saved_bytes
        grads = trace.total.grad_bytes
        return cls(
            block_saved=tuple(b.saved_bytes for b in blocks),
            block_casts=tuple(b.saved_param_cast_bytes for b in blocks),
            block_inputs=tuple(block_inputs),
            head_saved=head,
            tail_saved=tail,
            tail_casts=casts,
            forward_workspace=max(0, trace.forward_peak_bytes - trace.after_forward_bytes),
            backward_workspace=max(0, trace.backward_peak_bytes - trace.after_forward_bytes - grads),
            batch_bytes=trace.input_bytes,
            work=StepWork.from_trace(trace, tokens, block_inputs[0] if block_inputs else 0),
            grad_bytes=grads,
            param_bytes=trace.total.param_bytes,
            forward_point=trace.forward_point,
            backward_points=trace.backward_points,
        )

    def traced_peak(self, activations: float, grads: float, casts: float) -> int:
        """The step's high-water mark above parameters, buffers and batch, as the trace saw it, with its
        activations and temporaries scaled by `activations`, gradients by `grads` and parameter casts by
        `casts`: the larger of forward's peak and the highest moment of backward."""
        forward = activations * self.forward_point[0] + casts * self.forward_point[1]
        backward = (activations * o + grads * g + casts * c for o, g, c in self.backward_points)
        return int(max(forward, *backward))


def trace_profile(spec: ModelSpec, micro_batch: int, seq_len: int, precision: str) -> ActivationProfile:
    """Trace one step of `spec` and reduce it to an `ActivationProfile` (hooks record each block's input)."""
    model = spec.model
    if spec.trace_config is not None:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(spec.trace_config).train()
    blocks = repeated_blocks(model)
    inputs = [0] * len(blocks)

    def record(index: int, args: tuple, kwargs: dict) -> None:
        hidden = next((a for a in (*args, kwargs.get("hidden_states")) if isinstance(a, torch.Tensor)), None)
        if hidden is not None:
            inputs[index] = hidden.untyped_storage().nbytes()

    hooks = [
        block.register_forward_pre_hook(lambda _, a, k, i=i: record(i, a, k), with_kwargs=True)
        for i, block in enumerate(blocks)
    ]
    try:
        if spec.example_batch is not None:
            trace = trace_model(model, spec.example_batch, precision=precision)
        else:
            trace = trace_causal_lm(model, micro_batch=micro_batch, seq_len=seq_len, precision=precision)
    finally:
        for hook in hooks:
            hook.remove()
    tokens = micro_batch * seq_len if spec.example_batch is None else 0
    profile = ActivationProfile.from_trace(trace, inputs, tokens)
    if spec.trace_config is not None and precision != "fp32":  # every expert's weights are cast, not top_k's
        casts = tuple(sum(2 * p.numel() for p in b.parameters() if p.dim() >= 2) for b in repeated_blocks(spec.model))
        profile = replace(profile, block_casts=casts)
    return profile


def block_choices(spec: ModelSpec, config: Config, count: int) -> list[str]:
    """keep, offload or recompute per block, as `offload.activations` resolves it (a policy on a block's
    submodules only leaves the block kept: the trace does not split a block's bytes)."""
    from tidal.offload.policy import module_policies

    a = config.offload.activations
    default = "keep" if a.device == "none" else "offload"
    if not a.policy:
        return [default] * count
    names = {id(m): n for n, m in spec.model.named_modules()}
    policies = module_policies(spec.model, a.policy)
    return [policies.get(names[id(b)], default) for b in repeated_blocks(spec.model)][:count]


def rank_activations(
    profile: ActivationProfile,
    config: Config,
    choices: list[str],
    pp_rank: int,
    in_flight: float,
    grads: int,
    rank: RankEstimate | None = None,
    shards: int = 1,
) -> dict[str, int]:
    """One rank's activation bytes by part (module doc): "offloaded" lies on offload.activations' tier, the
    rest on the device."""
    par = config.parallel
    count, stages_per_rank = len(profile.block_saved), par.pipeline.stages_per_rank
    stages = [pp_rank + k * par.pp for k in range(stages_per_rank)]
    bounds = stage_bounds(count, par.pp * stages_per_rank) if par.pp > 1 else [(0, count)]
    blocks = [i for s in stages for i in range(*bounds[s])]
    zero3 = config.zero.stage == 3
    last = par.pp * stages_per_rank - 1 in stages
    ends = (profile.head_saved if 0 in stages else 0) + (profile.tail_saved if last else 0)
    casts = {i: profile.block_casts[i] if zero3 else 0 for i in blocks}
    by_choice: dict[str, list[int]] = {"keep": [], "offload": [], "recompute": []}
    for i in blocks:
        by_choice[choices[i]].append(i)
    split = par.tp * par.sp
    each = in_flight / split
    largest = {c: max((profile.block_saved[i] + casts[i] for i in ids), default=0) for c, ids in by_choice.items()}
    parts = {
        "saved": int((ends + sum(profile.block_saved[i] for i in by_choice["keep"])) * each),
        "weight copies": int(
            (sum(casts[i] for i in by_choice["keep"]) + (profile.tail_casts if zero3 and last else 0)) * each
        ),
        "recompute inputs": int(sum(profile.block_inputs[i] for i in by_choice["recompute"]) * each),
        "recomputed block": int(largest["recompute"] / split),
        "offload prefetch": int((1 + config.offload.activations.prefetch_layers) * largest["offload"] / split),
        "workspace": int(max(0, profile.forward_workspace / split - grads, profile.backward_workspace / split)),
        "batch": int(profile.batch_bytes / par.sp),
        "offloaded": int(sum(profile.block_saved[i] + casts[i] for i in by_choice["offload"]) * each),
    }
    whole = len(blocks) == count and rank is not None
    parts["freed in backward"] = -_backward_relief(profile, config, parts, rank, each, shards) if whole else 0
    return parts


def _backward_relief(
    profile: ActivationProfile, config: Config, parts: dict[str, int], rank: RankEstimate, each: float, shards: int
) -> int:
    """How far the parts above, plus this rank's gradients and the buffers that carry them, overshoot the
    step's real high-water mark: backward frees activations while gradients appear, so the two never peak
    together. The real mark comes from the trace's own moments (`ActivationProfile.traced_peak`), scaled
    as the parts are, for a rank that runs the whole model with every block kept (no pipeline, recompute
    or activation offload); else 0 (the parts stay an upper bound).

    Gradients in backward: under ZeRO 0-2 each is whole (this rank's tensor-parallel shard) until its
    bucket is reduced, and buckets go in registration order while gradients come in backward order (a
    tied embedding's comes first and goes last), so they count as whole; the ZeRO 2 send buffers that
    replace them are then covered too. Under ZeRO 3 FSDP2 reduce-scatters each block's once the block's
    backward is done: counted whole as well (an upper bound late in backward, where the activations left
    are few), which covers the reduce-scatter buffer. `shards`: ranks a ZeRO 3 shard is one of."""
    if not profile.backward_points or profile.grad_bytes <= 0 or not profile.param_bytes:
        return 0
    if any(parts[k] for k in ("recompute inputs", "recomputed block", "offload prefetch", "offloaded")):
        return 0
    if config.zero.stage == 3:  # unsharded: every rank's gathered copy
        whole = min(1.0, sum(rank.grads[t] for t in TIERS) * shards / profile.grad_bytes)
    else:
        whole = sum(rank.params[t] for t in TIERS) / profile.param_bytes
    scatters = (SCATTER_BUFFER, FSDP_SCATTER_BUFFER)
    covered = sum(b.nbytes for b in rank.buffer_list if b.name in scatters and b.tier == "device")
    casts = each if config.zero.stage == 3 else 0.0
    traced = profile.traced_peak(each, whole, casts)
    counted = parts["saved"] + parts["weight copies"] + parts["workspace"] + rank.grads.device + covered
    return max(0, counted - traced)


def activation_tiers(parts: dict[str, int], config: Config) -> TierBytes:
    tier = config.offload.activations.device
    device = sum(v for k, v in parts.items() if k != "offloaded")
    return TierBytes.on("device", device) + TierBytes.on("cpu" if tier == "none" else tier, parts["offloaded"])
