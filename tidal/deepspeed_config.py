"""Import a DeepSpeed JSON config into a tidal ``Config``, reporting every key that does not carry over.

Mapped keys set their tidal field (with unit conversion where DeepSpeed counts differently); every
other key is listed in ``DeepSpeedImport.unsupported`` as ``dotted.key = value: reason``, so nothing
is dropped silently. Sections with ``"enabled": false`` (and fp16/bf16 without ``enabled``, which
DeepSpeed leaves off) have no effect in DeepSpeed and import as nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from tidal.config import Config, ConfigError, read_json, show_value

_KINDS = {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string"}

# DeepSpeed key -> (tidal key, kind of JSON value DeepSpeed expects there)
_MAPPED: dict[str, tuple[str, str]] = {
    "train_micro_batch_size_per_gpu": ("train.micro_batch_size", "int"),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", "int"),
    "gradient_clipping": ("train.gradient_clipping", "number"),
    "train_batch_size": ("train.global_batch_size", "int"),
    "steps_per_print": ("logging.interval", "int"),
    "zero_optimization.stage": ("zero.stage", "int"),
    "zero_optimization.reduce_bucket_size": ("comm.bucket_mb", "number"),
    "zero_optimization.overlap_comm": ("comm.overlap_grad_reduce", "bool"),
    "zero_optimization.offload_optimizer.device": ("offload.optimizer.device", "str"),
    "zero_optimization.offload_optimizer.nvme_path": ("offload.optimizer.path", "str"),
    "zero_optimization.offload_optimizer.ratio": ("offload.optimizer.ratio", "number"),
    "zero_optimization.offload_param.device": ("offload.params.device", "str"),
    "zero_optimization.offload_param.nvme_path": ("offload.params.path", "str"),
    "bf16.enabled": ("precision.dtype", "bool"),
    "bfloat16.enabled": ("precision.dtype", "bool"),
    "fp16.enabled": ("precision.dtype", "bool"),
    "fp16.loss_scale": ("precision.loss_scale", "number"),
    "fp16.initial_scale_power": ("precision.initial_scale_power", "int"),
    "fp16.loss_scale_window": ("precision.scale_window", "int"),
    "fp16.hysteresis": ("precision.hysteresis", "int"),
    "fp16.min_loss_scale": ("precision.min_loss_scale", "number"),
    "aio.block_size": ("offload.nvme.block_size", "int"),
    "aio.queue_depth": ("offload.nvme.queue_depth", "int"),
    "aio.thread_count": ("offload.nvme.threads", "int"),
    "activation_checkpointing.cpu_checkpointing": ("offload.activations.device", "bool"),
}

# where DeepSpeed's meaning differs from tidal's; a result of None leaves tidal's default
_CONVERT: dict[str, Callable[[Any], Any]] = {
    "gradient_clipping": lambda norm: norm or None,  # 0 means no clipping
    "zero_optimization.reduce_bucket_size": lambda elements: elements * 4 / 2**20,  # fp32 elements -> MiB
    "zero_optimization.offload_optimizer.ratio": lambda offloaded: round(1.0 - offloaded, 12),
    "bf16.enabled": lambda on: "bf16" if on else None,
    "bfloat16.enabled": lambda on: "bf16" if on else None,
    "fp16.enabled": lambda on: "fp16" if on else None,
    "fp16.loss_scale": lambda scale: "dynamic" if scale == 0 else scale,
    "activation_checkpointing.cpu_checkpointing": lambda on: "cpu" if on else None,
}

_WRAPPED = "tidal wraps the optimizer/scheduler you pass to tidal.wrap()"
_PINNED = "always on in tidal (the CPU tier is a pinned memory pool)"
_PLANNED = "tidal's planner sizes this from memory budgets (see `tidal plan`)"
_BUCKETS = "tidal always reduce-scatters and all-gathers in comm.bucket_mb buckets"
_REASONS = {
    "optimizer": _WRAPPED,
    "scheduler": _WRAPPED,
    "zero_allow_untested_optimizer": "tidal accepts any torch.optim optimizer",
    "wall_clock_breakdown": "tidal always logs step timing; set logging.trace for a Chrome trace",
    "zero_optimization.contiguous_gradients": "always on in tidal (gradients live in contiguous buckets)",
    "zero_optimization.allgather_partitions": _BUCKETS,
    "zero_optimization.allgather_bucket_size": _BUCKETS,
    "zero_optimization.reduce_scatter": _BUCKETS,
    "zero_optimization.sub_group_size": "tidal steps the optimizer in offload.optimizer.chunk_mb chunks",
    "zero_optimization.stage3_prefetch_bucket_size": "tidal prefetches by module count: zero.prefetch_modules",
    "zero_optimization.stage3_param_persistence_threshold": _PLANNED,
    "zero_optimization.stage3_max_live_parameters": _PLANNED,
    "zero_optimization.stage3_max_reuse_distance": _PLANNED,
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": (
        "tidal saves sharded checkpoints (torch.distributed.checkpoint) that load at any world size"
    ),
    "zero_optimization.offload_optimizer.pin_memory": _PINNED,
    "zero_optimization.offload_param.pin_memory": _PINNED,
    "zero_optimization.offload_optimizer.buffer_count": "tidal pipelines optimizer chunks read/update/write",
    "zero_optimization.offload_param.buffer_count": _PLANNED,
    "zero_optimization.offload_param.buffer_size": _PLANNED,
    "zero_optimization.offload_param.max_in_cpu": _PLANNED,
    "aio.single_submit": "tidal's NVMe engine chooses how it submits requests",
    "aio.overlap_events": "tidal's NVMe engine chooses how it submits requests",
    "activation_checkpointing.partition_activations": "set offload.activations.policy to recompute or offload",
    "activation_checkpointing.contiguous_memory_optimization": _PLANNED,
}

_SECTIONS = {
    "zero_optimization",
    "zero_optimization.offload_optimizer",
    "zero_optimization.offload_param",
    "fp16",
    "bf16",
    "bfloat16",
    "aio",
    "activation_checkpointing",
}
_NULL_MEANS_DEFAULT = _SECTIONS | set(_MAPPED)
_OFF_UNLESS_ENABLED = {"fp16", "bf16", "bfloat16"}  # DeepSpeed's default for these is enabled=false
_TOP_LEVEL = frozenset(
    {key.split(".")[0] for key in (*_MAPPED, *_REASONS)}
    | {"amp", "prescale_gradients", "gradient_predivide_factor", "communication_data_type", "tensorboard"}
    | {"flops_profiler", "wandb", "csv_monitor", "comms_logger", "elasticity", "memory_breakdown"}
) - set(Config.model_fields)


@dataclass(frozen=True)
class DeepSpeedImport:
    """The result of importing a DeepSpeed config."""

    config: Config
    """The tidal config holding every mapped DeepSpeed setting."""
    unsupported: list[str]
    """One ``dotted.key = value: reason`` line per DeepSpeed key that was not mapped."""


def is_deepspeed_config(data: object) -> bool:
    """True for a mapping with a top-level key only DeepSpeed uses (e.g. zero_optimization)."""
    return isinstance(data, Mapping) and any(key in _TOP_LEVEL for key in data)


def import_deepspeed(source: Mapping[str, Any] | str | os.PathLike[str], *, name: str | None = None) -> DeepSpeedImport:
    """Translate a DeepSpeed config (a mapping or a .json path) into a tidal Config.

    ``name`` labels error messages (default: the path). Raises ConfigError for a value of the
    wrong type (naming the DeepSpeed key) and for values tidal rejects (naming both keys).
    """
    if isinstance(source, (str, os.PathLike)):
        name = name or str(source)
        source = read_json(source)
    name = name or "DeepSpeed config"
    if not isinstance(source, Mapping):
        raise ConfigError(
            f"a DeepSpeed config must be a JSON object, got {type(source).__name__} {show_value(source)}",
            name,
        )
    settings: dict[str, Any] = {}  # tidal key -> value
    origins: dict[str, str] = {}  # tidal key -> DeepSpeed key that set it
    unsupported: list[str] = []
    try:
        leaves = list(_leaves(source, "", name))
    except RecursionError as exc:
        raise ConfigError("the DeepSpeed config is nested too deeply (or refers to itself)", name) from exc
    for key, value in leaves:
        if key not in _MAPPED:
            unsupported.append(f"{key} = {_json(value)}: {_REASONS.get(key, 'no tidal equivalent')}")
            continue
        if value == "auto":
            unsupported.append(f'{key} = "auto": left to tidal\'s default')
            continue
        target, kind = _MAPPED[key]
        converted = _CONVERT.get(key, lambda same: same)(_typed(key, value, kind, name))
        if converted is None:
            continue
        if target in settings and settings[target] != converted:
            raise ConfigError(
                f"DeepSpeed keys '{origins[target]}' and '{key}' both set {target} "
                f"({settings[target]!r} vs {converted!r}); keep one of them",
                name,
            )
        settings[target], origins[target] = converted, key
    return DeepSpeedImport(_build(settings, origins, name), unsupported)


def _leaves(node: Mapping[Any, Any], prefix: str, name: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every setting; optimizer/scheduler blocks count as one setting."""
    for raw_key, value in node.items():
        key = f"{prefix}{raw_key}"
        if key in _SECTIONS and value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"DeepSpeed key '{key}' = {_json(value)}: must be an object; fix it in {name}", name)
        if value is None and key in _NULL_MEANS_DEFAULT:
            continue  # DeepSpeed reads null as "use the default"
        if not isinstance(value, Mapping) or key in _REASONS:
            yield key, value
        elif value.get("enabled", key not in _OFF_UNLESS_ENABLED) is not False:
            yield from _leaves(value, f"{key}.", name)


def _typed(key: str, value: Any, kind: str, name: str) -> Any:
    """``value`` checked against ``kind`` (integral floats become ints, numbers become floats)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (kind == "bool" and isinstance(value, bool)) or (kind == "str" and isinstance(value, str)):
        return value
    if kind == "int" and number and (isinstance(value, int) or value.is_integer()):
        return int(value)
    if kind == "number" and number:
        try:
            return float(value)
        except OverflowError:
            pass
    raise ConfigError(
        f"DeepSpeed key '{key}' = {_json(value)}: must be {_KINDS[kind]} (or \"auto\"); fix it in {name}",
        name,
    )


def _build(settings: dict[str, Any], origins: dict[str, str], name: str) -> Config:
    nested: dict[str, Any] = {}
    for target, value in settings.items():
        *sections, field = target.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[field] = value
    try:
        return Config.from_dict(nested, source=name)
    except ConfigError as exc:
        problems = [_blame(problem, origins) for problem in exc.problems]
        raise ConfigError(problems, name) from exc


def _blame(problem: str, origins: dict[str, str]) -> str:
    """``problem`` with the DeepSpeed keys behind the tidal keys it names."""
    keys = [ds_key for target, ds_key in origins.items() if target in problem]
    return f"{problem} (from DeepSpeed {', '.join(keys)})" if keys else problem


def _json(value: Any) -> str:
    return show_value(value, json.dumps)
