"""The dry run: will this job fit, how long will a step take, and if it does not fit, what is the fastest
change that does.

    report = plan("llama-70b", {"zero": {"stage": 3}, "precision": {"dtype": "bf16"}}, world_size=8,
                  budgets=Budgets.probe(gpu_mem="80GiB", cpu_mem="1TiB"), micro_batch=1, seq_len=4096)
    report.fits, report.usage, report.change.overrides    # bool, tier -> bytes, ("offload.optimizer.device=cpu", ...)
    report.time.seconds, report.time.transfers            # predicted step (`tidal.memory.cost`) on report.hardware
    print(format_plan(report)); report.runnable_config().to_yaml()   # what tidal.wrap(config=...) runs

The search (`tidal.memory.search`) ranks candidate changes by predicted step time and takes the first that
fits; given `world_size` and a config without sizes it also searches tp, pp and the ZeRO stage.

Per rank, `estimate` gives parameters, gradients, optimizer state, masters and runtime buffers; the trace
(`trace_model` under fake tensors) gives the activations, which this module lays out per rank:

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

Budgets: device memory per rank (GPU memory; on a machine without GPUs the device is the host), host memory
and NVMe space per node, shared by the ``ranks_per_node`` ranks placed there (consecutive ranks).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from tidal.config import Config
from tidal.memory.cost import ModelShape, StepTime, StepWork, model_shape, step_time
from tidal.memory.estimate import (
    FSDP_SCATTER_BUFFER,
    SCATTER_BUFFER,
    TIERS,
    MemoryEstimate,
    RankEstimate,
    TierBytes,
    estimate,
)
from tidal.memory.hardware import Hardware, hardware_for
from tidal.memory.presets import ModelSpec, resolve_model
from tidal.memory.probe import format_bytes, probe_gpus, probe_host
from tidal.memory.trace import ModelTrace, trace_causal_lm, trace_model
from tidal.parallel.data import repeated_blocks
from tidal.parallel.pipeline import stage_bounds

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30}
_UNITS["ti"] = 2**40
_UNIT_ACTIVATIONS = 2**30
"""Bytes per stage handed to `estimate` to read back how many micro-batches each rank keeps in flight."""


def parse_bytes(text: str | int) -> int:
    """ "80GiB" -> 80 * 2**30, "512GB" -> 512e9, "1.5TiB", "4096" (bytes)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match:
        raise ValueError(f"size {text!r} is not a byte count; write e.g. 80GiB, 512GB or 1.5TiB")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


@dataclass(frozen=True)
class Budgets:
    """What the job may use: device memory per rank, host memory and NVMe space per node, bytes."""

    device: int | None
    """Memory of one device (GPU); None when the device is the host (then `cpu` holds both tiers)."""
    cpu: int
    """Host memory of one node, shared by its ranks."""
    nvme: int
    """Free space under `nvme_path` on one node (0 without a path: nothing may go to NVMe)."""
    ranks_per_node: int | None
    """Ranks that share one node's host memory and NVMe; None: the whole job runs on one node."""
    nvme_path: str | None = None
    """Directory on the NVMe drive that offloaded state would use."""
    source: tuple[str, ...] = ()
    """Where each number came from (a flag or a probe of this machine)."""

    @property
    def device_type(self) -> str:
        return "cpu" if self.device is None else "cuda"

    @classmethod
    def probe(
        cls,
        *,
        gpu_mem: str | int | None = None,
        cpu_mem: str | int | None = None,
        nvme: str | None = None,
        nvme_space: str | int | None = None,
        ranks_per_node: int | None = None,
    ) -> Budgets:
        """Budgets from the flags given, the rest probed on this machine (GPU total, host available memory,
        the free space of `nvme` unless `nvme_space` gives it). Without GPUs and without `gpu_mem`, the device is
        this host. Ranks per node: default the GPUs found here, else 8 with `gpu_mem`, else the whole job here."""
        device = None if gpu_mem is None else parse_bytes(gpu_mem)
        source = [] if device is None else [f"device: --gpu-mem {format_bytes(device)}"]
        gpus = probe_gpus().gpus if device is None else ()
        if gpus:
            device = min(g.total_bytes for g in gpus)
            source.append(f"device: {len(gpus)} GPU(s) probed, {format_bytes(device)} each")
        elif device is None:
            source.append("device: no GPU and no --gpu-mem: the device is this host's memory")
        host = probe_host()
        cpu = host.available_bytes if cpu_mem is None else parse_bytes(cpu_mem)
        source.append("cpu: " + ("--cpu-mem" if cpu_mem is not None else "available host memory probed"))
        if nvme and nvme_space is not None:
            free = parse_bytes(nvme_space)
            source.append(f"nvme: --nvme-space for {nvme}")
        else:
            free = shutil.disk_usage(nvme).free if nvme else 0
            source.append(f"nvme: free space of {nvme}" if nvme else "nvme: no --nvme path, nothing may go to NVMe")
        if ranks_per_node is None and device is not None:
            ranks_per_node = len(gpus) or 8
        return cls(device, cpu, free, ranks_per_node, nvme, tuple(source))


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


def _block_choices(spec: ModelSpec, config: Config, count: int) -> list[str]:
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


def _rank_activations(
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


def _activation_tiers(parts: dict[str, int], config: Config) -> TierBytes:
    tier = config.offload.activations.device
    device = sum(v for k, v in parts.items() if k != "offloaded")
    return TierBytes.on("device", device) + TierBytes.on("cpu" if tier == "none" else tier, parts["offloaded"])


class _Cache:
    """Traces per (micro-batch, sequence, precision), estimates per config, model shapes per (tp, ep) and block
    choices per activation setting, shared by one search."""

    def __init__(self) -> None:
        self.profiles: dict[tuple, ActivationProfile] = {}
        self.estimates: dict[str, MemoryEstimate] = {}
        self.shapes: dict[tuple[int, int], ModelShape] = {}
        self.choices: dict[str, list[str]] = {}

    def profile(self, spec: ModelSpec, micro_batch: int, seq_len: int, precision: str) -> ActivationProfile:
        key = (micro_batch, seq_len, precision)
        if key not in self.profiles:
            self.profiles[key] = trace_profile(spec, micro_batch, seq_len, precision)
        return self.profiles[key]

    def estimate(self, spec: ModelSpec, config: Config, world: int, device_type: str) -> MemoryEstimate:
        data = config.to_dict()
        data.pop("train")
        data["offload"]["activations"] = config.offload.activations.device  # only its tier matters here
        key = f"{data}/{world}/{device_type}"
        if key not in self.estimates:
            units = config.parallel.pp * _UNIT_ACTIVATIONS
            self.estimates[key] = estimate(spec.model, config, world, activations=units, device_type=device_type)
        return self.estimates[key]

    def shape(self, spec: ModelSpec, tp: int, ep: int) -> ModelShape:
        if (tp, ep) not in self.shapes:
            self.shapes[tp, ep] = model_shape(spec.model, tp, ep)
        return self.shapes[tp, ep]

    def block_choices(self, spec: ModelSpec, config: Config, count: int) -> list[str]:
        a = config.offload.activations
        key = f"{a.device}/{sorted(a.policy.items())}/{count}"
        if key not in self.choices:
            self.choices[key] = _block_choices(spec, config, count)
        return self.choices[key]

    def work(self, spec: ModelSpec, micro_batch: int, seq_len: int, precision: str) -> StepWork:
        """The traced work of this micro-batch, or (not traced yet) a traced one's scaled: for ranking only."""
        traced = self.profiles.get((micro_batch, seq_len, precision))
        if traced is None:
            near = next(((m, p) for (m, s, d), p in self.profiles.items() if (s, d) == (seq_len, precision)), None)
            if near is not None:
                return near[1].work.scaled(micro_batch / near[0])
            traced = self.profile(spec, micro_batch, seq_len, precision)
        return traced.work


@dataclass(frozen=True)
class PlanReport:
    """The dry run of one job: per-rank bytes, usage against the budgets, the verdict, the predicted step
    time, and a change."""

    model: str
    config: Config
    """The config planned (flags and --set applied)."""
    world_size: int
    micro_batch: int
    seq_len: int
    budgets: Budgets
    estimate: MemoryEstimate
    """Per rank and tier, activations from the trace (see the module doc)."""
    usage: dict[str, int]
    """Predicted use in each budget's unit: device per rank, cpu and nvme per node (max over nodes), bytes."""
    over: tuple[str, ...]
    """Tiers whose use exceeds the budget."""
    activation_parts: tuple[dict[str, int], ...] = ()
    """Per rank, its activation bytes by part: saved, weight copies, recompute inputs, recomputed block,
    offload prefetch, workspace, batch (device), offloaded (offload.activations' tier) and freed in backward
    (device, zero or negative)."""
    change: Change | None = None
    """What the planner recommends instead: when this does not fit, the fastest change found that fits; with
    the parallel-size search, the fastest plan found (also when this fits); None: nothing better found."""
    notes: tuple[str, ...] = field(default=())
    hardware: Hardware | None = None
    """The device and links the step time is predicted for."""
    time: StepTime | None = None
    """Predicted time of one optimizer step and its parts (`tidal.memory.cost`)."""

    @property
    def fits(self) -> bool:
        return not self.over

    def limit(self, tier: str) -> int | None:
        """The budget that `usage[tier]` is checked against (None: the device is the host, see cpu)."""
        return {"device": self.budgets.device, "cpu": self.budgets.cpu, "nvme": self.budgets.nvme}[tier]

    def runnable_config(self) -> Config:
        """The config to run: the change's when one was found, else this one."""
        return self.change.report.config if self.change is not None else self.config


@dataclass(frozen=True)
class Change:
    """Config overrides, and the re-planned report with them applied (which fits)."""

    overrides: tuple[str, ...]
    report: PlanReport


def plan(
    model_spec: str | ModelSpec,
    config: Config | Mapping[str, Any] | str | None = None,
    world_size: int | None = None,
    budgets: Budgets | None = None,
    micro_batch: int | None = None,
    seq_len: int | None = None,
    *,
    search: bool = True,
    hardware: Hardware | None = None,
    search_sizes: bool | None = None,
    _cache: _Cache | None = None,
) -> PlanReport:
    """Predict per-rank, per-tier bytes and the step time of training `model_spec` under `config`, check the
    bytes against the budgets and, when they do not fit, search for the fastest change that does (module doc).

    Args:
        model_spec: a preset name, a config.json, ``module:function`` (see `resolve_model`) or a ModelSpec.
        config: the tidal config (Config, mapping, file or None for defaults).
        world_size: ranks; default: the product of the config's sizes (dp "auto" counts 1).
        budgets: default `Budgets.probe()` on this machine.
        micro_batch: sequences per micro-batch; default ``train.micro_batch_size`` (written into the config).
        seq_len: tokens per sequence; default 2048, at most the model's positions (ignored for module:function).
        search: look for a change (False: evaluate this config only).
        hardware: the device and links to predict for; default `hardware_for(budgets)`.
        search_sizes: also search tp, pp (dp the rest) and the ZeRO stage for the fastest plan that fits;
            default: when `world_size` is given and the config sets no sizes (tp = pp = 1, dp auto).
    Raises:
        ModelSpecError, ConfigError, TopologyError: a bad MODEL, config or sizes.
    """
    spec = resolve_model(model_spec) if isinstance(model_spec, str) else model_spec
    config = Config.load(config)
    if micro_batch is not None:
        config = config.with_overrides([f"train.micro_batch_size={micro_batch}"])
    par = config.parallel
    if search_sizes is None:
        search_sizes = world_size is not None and par.tp == par.pp == 1 and par.dp == "auto"
    if world_size is None:
        world_size = par.pp * par.tp * par.sp * (1 if par.dp == "auto" else par.dp)
    if seq_len is None:
        positions = getattr(spec.hf_config, "max_position_embeddings", None) or getattr(
            spec.hf_config, "n_positions", 2048
        )
        seq_len = min(2048, positions)
    budgets = budgets or Budgets.probe()
    cache = _cache or _Cache()
    report = _evaluate(spec, config, world_size, budgets, seq_len, cache, hardware or hardware_for(budgets))
    search_sizes = search and search_sizes and world_size > 1
    if not search or (report.fits and not search_sizes):
        return report
    from tidal.memory.search import parallel_layouts, search_change  # it plans candidates with this module

    layouts = parallel_layouts(spec, report, cache) if search_sizes else [((), config)]
    change = search_change(spec, report, cache, layouts, sized=search_sizes)
    return replace(report, change=change if change is None or change.overrides else None)


def _evaluate(
    spec: ModelSpec, config: Config, world: int, budgets: Budgets, seq_len: int, cache: _Cache, hardware: Hardware
) -> PlanReport:
    est = cache.estimate(spec, config, world, budgets.device_type)
    profile = cache.profile(spec, config.train.micro_batch_size, seq_len, config.precision.dtype)
    choices = cache.block_choices(spec, config, len(profile.block_saved))
    ranks, parts = [], []
    for r in est.ranks:
        in_flight = sum(r.activations[t] for t in TIERS) / _UNIT_ACTIVATIONS
        parts.append(
            _rank_activations(
                profile, config, choices, r.coords[0], in_flight, r.grads.device, r, est.sizes["dp"] * est.sizes["sp"]
            )
        )
        ranks.append(replace(r, activations=_activation_tiers(parts[-1], config)))
    notes = [n for n in est.notes if not n.startswith("activations not given")]
    est = replace(est, ranks=tuple(ranks), notes=tuple(notes))
    per_node = min(budgets.ranks_per_node or world, world)
    nodes = [est.ranks[i : i + per_node] for i in range(0, world, per_node)]
    host = [sum(r.peak("cpu") + (r.peak("device") if budgets.device is None else 0) for r in n) for n in nodes]
    usage = {"device": est.peak("device"), "cpu": max(host), "nvme": max(sum(r.peak("nvme") for r in n) for n in nodes)}
    checked = [t for t in TIERS if t != "device" or budgets.device is not None]
    over = tuple(t for t in checked if usage[t] > _limit(budgets, t))
    notes = (*spec.notes, *_assumptions(config))
    micro = config.train.micro_batch_size
    time = _predict(spec, config, world, budgets, seq_len, cache, hardware, est.optimizer.slots)
    return PlanReport(
        spec.name,
        config,
        world,
        micro,
        seq_len,
        budgets,
        est,
        usage,
        over,
        activation_parts=tuple(parts),
        notes=notes,
        hardware=hardware,
        time=time,
    )


def _predict(
    spec: ModelSpec,
    config: Config,
    world: int,
    budgets: Budgets,
    seq_len: int,
    cache: _Cache,
    hardware: Hardware,
    slots: int,
) -> StepTime:
    """`step_time` of `config` (the work of a micro-batch not traced yet is scaled from one traced)."""
    work = cache.work(spec, config.train.micro_batch_size, seq_len, config.precision.dtype)
    par = config.parallel
    return step_time(
        work,
        cache.shape(spec, par.tp, par.ep),
        config,
        world,
        hardware,
        ranks_per_node=budgets.ranks_per_node,
        choices=cache.block_choices(spec, config, len(work.block_flops)),
        device_type=budgets.device_type,
        optimizer_slots=slots,
    )


def _limit(budgets: Budgets, tier: str) -> int:
    return {"device": budgets.device or 0, "cpu": budgets.cpu, "nvme": budgets.nvme}[tier]


def _assumptions(config: Config) -> list[str]:
    out = []
    if config.parallel.tp > 1 and not config.parallel.tensor.sequence_parallel:
        out.append("tp without sequence_parallel: activations assumed split over tp (norm/residual ones are not)")
    return out
