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
(`trace_model` under fake tensors) gives the activations, which `tidal.memory.activations` lays out per rank.

Budgets: device memory per rank (GPU memory; on a machine without GPUs the device is the host), host memory
and NVMe space per node, shared by the ``ranks_per_node`` ranks placed there (consecutive ranks).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tidal.config import Config
from tidal.memory.activations import ActivationProfile, activation_tiers, block_choices, rank_activations, trace_profile
from tidal.memory.cost import StepTime, step_time
from tidal.memory.estimate import (
    TIERS,
    MemoryEstimate,
    estimate,
)
from tidal.memory.hardware import Hardware, hardware_for
from tidal.memory.presets import ModelSpec, resolve_model
from tidal.memory.probe import format_bytes, probe_gpus, probe_host
from tidal.memory.shape import ModelShape, StepWork, model_shape

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
            self.choices[key] = block_choices(spec, config, count)
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
            rank_activations(
                profile, config, choices, r.coords[0], in_flight, r.grads.device, r, est.sizes["dp"] * est.sizes["sp"]
            )
        )
        ranks.append(replace(r, activations=activation_tiers(parts[-1], config)))
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
