"""The one config schema of tidal: YAML (or a DeepSpeed JSON) in, a validated frozen ``Config`` out.

Every field has a default that runs on a laptop CPU. Every failure, whatever the input, is a
``ConfigError`` whose ``problems`` name the dotted key, the value, the rule it broke and the fix.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from tidal.config_errors import ConfigError, problems, show_value, yaml_problem

_INT64_MAX = 2**63 - 1
_Positive = Annotated[int, Field(ge=1, le=_INT64_MAX)]
_NonNegative = Annotated[int, Field(ge=0, le=_INT64_MAX)]
_PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_Tier = Literal["none", "cpu", "nvme"]
_Switch = Literal["auto", "on", "off"]


def _power_of_two(value: int) -> int:
    if value & (value - 1):
        raise ValueError(f"must be a power of two (the O_DIRECT alignment unit), e.g. {1 << value.bit_length()}")
    return value


class _Section(BaseModel):
    # strict: YAML already types its scalars, so true is never read as 1 nor "2" as 2
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, strict=True, use_attribute_docstrings=True
    )


class PipelineConfig(_Section):
    schedule: Literal["gpipe", "1f1b", "interleaved"] = "1f1b"
    """Pipeline schedule: gpipe, 1f1b or interleaved; default 1f1b."""
    microbatches: _Positive | None = None
    """Microbatches per step, count; default None (= parallel.pp)."""
    stages_per_rank: _Positive = 1
    """Model chunks (virtual stages) per pipeline rank, count; >1 only with interleaved; default 1."""


class SequenceConfig(_Section):
    method: Literal["ulysses", "ring"] = "ulysses"
    """Sequence-parallel attention: ulysses (all-to-all) or ring; default ulysses."""


class TensorConfig(_Section):
    sequence_parallel: bool = False
    """Shard norms and dropout along the sequence inside the tp group (Megatron-style); default False."""
    loss_parallel: bool = True
    """Vocabulary-parallel cross-entropy: no rank holds full-vocabulary logits; default True."""


class ParallelConfig(_Section):
    dp: _Positive | Literal["auto"] = "auto"
    """Data-parallel size, ranks; default auto (the ranks left after pp*sp*tp)."""
    tp: _Positive = 1
    """Tensor-parallel size, ranks; default 1."""
    pp: _Positive = 1
    """Pipeline-parallel size, stages; default 1."""
    sp: _Positive = 1
    """Sequence-parallel size, ranks; default 1."""
    ep: _Positive = 1
    """Expert-parallel size, ranks (ep x edp = dp x sp); default 1."""
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    """Pipeline schedule settings."""
    sequence: SequenceConfig = Field(default_factory=SequenceConfig)
    """Sequence-parallel settings."""
    tensor: TensorConfig = Field(default_factory=TensorConfig)
    """Tensor-parallel settings."""


class TrainConfig(_Section):
    micro_batch_size: _Positive = 1
    """Samples per rank per forward pass; default 1."""
    gradient_accumulation_steps: _Positive = 1
    """Micro-batches accumulated per optimizer step, count; default 1."""
    gradient_clipping: _PositiveFloat | None = None
    """Max global gradient L2 norm; default None (no clipping)."""
    global_batch_size: _Positive | None = None
    """Samples per optimizer step over all ranks, checked against micro*accum*dp at init; default None."""
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    """Random seed for torch, numpy and random (0 .. 2**32-1); default 0."""
    steps: _Positive | None = None
    """Optimizer steps the job will run, count (drives the progress bar and ETA); default None."""


class ZeroConfig(_Section):
    stage: Annotated[int, Field(ge=0, le=3)] = 0
    """ZeRO stage: 0 off, 1 optimizer states, 2 + gradients, 3 + parameters sharded; default 0."""
    prefetch_modules: _NonNegative = 1
    """Modules whose ZeRO-3 parameters are gathered ahead of use, count; default 1."""
    reshard_after_forward: bool = True
    """Free gathered ZeRO-3 parameters after forward and gather again in backward; default true."""


class PrecisionConfig(_Section):
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute dtype: fp32, bf16 or fp16 (mixed precision, fp32 master weights); default fp32."""
    loss_scale: Literal["dynamic"] | _PositiveFloat = "dynamic"
    """Loss scale, used with fp16 only: dynamic or a fixed factor > 0; default dynamic."""
    initial_scale_power: Annotated[int, Field(ge=0, le=64)] = 16
    """Dynamic loss scale starts at 2**this (0..64); default 16."""
    scale_window: _Positive = 1000
    """Overflow-free steps before the dynamic loss scale doubles, steps; default 1000."""
    hysteresis: _Positive = 2
    """Overflows tolerated before the dynamic loss scale halves, count; default 2."""
    min_loss_scale: _PositiveFloat = 1.0
    """Floor of the dynamic loss scale, factor; default 1.0."""


class OptimizerOffloadConfig(_Section):
    device: _Tier = "none"
    """Tier holding optimizer state: none (device), cpu or nvme; default none."""
    path: str | None = None
    """Directory for NVMe swap files, needed when device is nvme; default None."""
    chunk_mb: _PositiveFloat = 64.0
    """Optimizer state moved and updated per chunk, MiB; default 64.0."""
    ratio: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.0
    """Share of optimizer chunks kept and updated on the device, 0..1; default 0.0."""
    update_in_backward: bool = True
    """Update host chunks in backward once their gradients are final (1 rank, ZeRO 0, no clip/fp16); default true."""


class ActivationOffloadConfig(_Section):
    device: _Tier = "none"
    """Tier for saved activations: none (kept on device), cpu or nvme; default none."""
    path: str | None = None
    """Directory for NVMe activation files, needed when device is nvme; default None."""
    min_bytes: _NonNegative = 1048576
    """Smallest saved tensor that is offloaded, bytes; default 1048576 (1 MiB)."""
    prefetch_layers: _NonNegative = 1
    """Layers whose activations are fetched back ahead of backward, count; default 1."""
    policy: dict[str, Literal["keep", "offload", "recompute"]] = Field(default_factory=dict)
    """Module-name glob -> keep, offload or recompute; default empty (planner decides)."""


class ParamOffloadConfig(_Section):
    device: _Tier = "none"
    """Tier holding parameters between uses (needs zero.stage=3): none, cpu or nvme; default none."""
    path: str | None = None
    """Directory for NVMe parameter files, needed when device is nvme; default None."""


class NvmeConfig(_Section):
    block_size: Annotated[int, Field(ge=4096, le=2**30), AfterValidator(_power_of_two)] = 1048576
    """Bytes per NVMe request, a power of two >= 4096; default 1048576 (1 MiB)."""
    queue_depth: _Positive = 8
    """Requests in flight per thread, count; default 8."""
    threads: _Positive = 4
    """I/O threads, count; default 4."""
    engine: Literal["auto", "threads", "aio"] = "auto"
    """I/O engine: auto (= threads), threads (O_DIRECT pool) or aio (DeepSpeed libaio, not wired yet); default auto."""


class OffloadConfig(_Section):
    optimizer: OptimizerOffloadConfig = Field(default_factory=OptimizerOffloadConfig)
    """Optimizer state offload."""
    activations: ActivationOffloadConfig = Field(default_factory=ActivationOffloadConfig)
    """Saved-activation offload and recompute."""
    params: ParamOffloadConfig = Field(default_factory=ParamOffloadConfig)
    """Parameter offload (streaming)."""
    nvme: NvmeConfig = Field(default_factory=NvmeConfig)
    """NVMe I/O engine settings shared by all tiers."""


class OverlapConfig(_Section):
    tp: _Switch = "auto"
    """Collective matmuls overlapping tensor-parallel communication: auto, on or off; default auto."""
    moe: _Switch = "auto"
    """Overlap of expert all-to-all with expert compute: auto, on or off; default auto."""
    chunks: _Positive = 4
    """Pieces each overlapped collective is split into, count; default 4."""


class CommConfig(_Section):
    bucket_mb: _PositiveFloat = 25.0
    """Gradient bucket size for asynchronous reduction, MiB; default 25."""
    overlap_grad_reduce: bool = True
    """Reduce gradient buckets during backward; default true."""
    overlap: OverlapConfig = Field(default_factory=OverlapConfig)
    """Compute/communication overlap settings."""
    timeout_s: _PositiveFloat = 600.0
    """How long a collective may wait for a missing rank before failing, seconds; default 600."""


class CheckpointConfig(_Section):
    dir: str | None = None
    """Checkpoint directory; default None (no checkpoints)."""
    interval: _NonNegative = 0
    """Save every this many steps, steps; default 0 (only when asked)."""
    keep: _Positive = 2
    """Newest checkpoints kept on disk, count; default 2."""


class LoggingConfig(_Section):
    interval: _Positive = 1
    """Log metrics every this many steps, steps; default 1."""
    progress: bool = True
    """Show a progress line; default true."""
    trace: str | None = None
    """Chrome trace output path; default None (no trace)."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level: debug, info, warning or error; default info."""


def _combination_problems(config: Config) -> Iterator[str]:
    """Cross-section rules, one message per broken rule naming both keys and the fix."""
    params = config.offload.params.device
    if params != "none" and config.zero.stage != 3:
        yield (
            f"offload.params.device={params} needs zero.stage=3 (parameters must be sharded to stream "
            f"them), got zero.stage={config.zero.stage}; set zero.stage=3 or offload.params.device=none"
        )
    for name in ("optimizer", "activations", "params"):
        tier = getattr(config.offload, name)
        if tier.device == "nvme" and not tier.path:
            yield (
                f"offload.{name}.device=nvme needs offload.{name}.path (a directory on the NVMe drive); "
                f"set offload.{name}.path=/path/on/nvme or offload.{name}.device=cpu"
            )
    pipeline = config.parallel.pipeline
    if pipeline.stages_per_rank > 1 and pipeline.schedule != "interleaved":
        yield (
            f"parallel.pipeline.stages_per_rank={pipeline.stages_per_rank} needs "
            f"parallel.pipeline.schedule=interleaved, got {pipeline.schedule}; "
            "set parallel.pipeline.schedule=interleaved or parallel.pipeline.stages_per_rank=1"
        )
    optimizer = config.offload.optimizer
    if optimizer.ratio > 0 and optimizer.device == "none":
        yield (
            f"offload.optimizer.ratio={optimizer.ratio} splits optimizer state between the device and "
            "an offload tier, but offload.optimizer.device=none; set offload.optimizer.device=cpu "
            "(or nvme) or offload.optimizer.ratio=0"
        )


class Config(_Section):
    """The whole runtime's settings; build with ``Config.load`` (file, mapping, or defaults)."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Compute device: auto (cuda when available), cuda or cpu; default auto."""
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """Parallel dimension sizes and schedules."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Batch sizes, accumulation, clipping and seed."""
    zero: ZeroConfig = Field(default_factory=ZeroConfig)
    """ZeRO sharding of optimizer state, gradients and parameters."""
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    """Compute dtype and fp16 loss scaling."""
    offload: OffloadConfig = Field(default_factory=OffloadConfig)
    """What moves to CPU or NVMe."""
    comm: CommConfig = Field(default_factory=CommConfig)
    """Gradient buckets and overlap."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoint directory and cadence."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Metrics, progress and trace output."""

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        found = list(_combination_problems(self))
        if found:
            raise ValueError("\n".join(found))
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> Config:
        """Validate a nested mapping (section -> key -> value); missing keys take their defaults."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"the top level must be a mapping of sections ({', '.join(cls.model_fields)}), "
                f"got {type(data).__name__} {show_value(data)}",
                source,
            )
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(problems(exc, Config), source) from exc
        except RecursionError as exc:
            raise ConfigError("the mapping is nested too deeply (or refers to itself)", source) from exc

    @classmethod
    def from_yaml_text(cls, text: str, *, source: str | None = None) -> Config:
        """Parse YAML text (an empty document gives the defaults) and validate it."""
        if not isinstance(text, str):
            raise ConfigError(f"YAML text must be a str, got {type(text).__name__} {show_value(text)}", source)
        try:
            data = yaml.safe_load(text)
        except Exception as exc:  # PyYAML's constructors also raise ValueError/OverflowError/RecursionError
            raise ConfigError(f"not valid YAML: {yaml_problem(exc)}; fix it there", source) from exc
        return cls.from_dict({} if data is None else data, source=source)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> Config:
        """Read and validate a YAML file."""
        return cls.from_yaml_text(_read_text(path), source=str(path))

    @classmethod
    def load(
        cls,
        source: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        overrides: Sequence[str] = (),
    ) -> Config:
        """Build a config from a Config, a mapping, a .yaml/.yml file, a .json file (DeepSpeed or
        tidal keys) or None (defaults), then apply ``KEY=VALUE`` overrides."""
        if source is None:
            config = cls()
        elif isinstance(source, Config):
            config = source
        elif isinstance(source, Mapping):
            config = cls.from_dict(source)
        elif isinstance(source, (str, os.PathLike)):
            config = cls._load_file(Path(source))
        else:
            raise ConfigError(
                f"config source must be a Config, a mapping, a file path or None, got "
                f"{type(source).__name__} {show_value(source)}"
            )
        return config.with_overrides(overrides) if overrides else config

    @classmethod
    def _load_file(cls, path: Path) -> Config:
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            return cls.from_yaml(path)
        if suffix != ".json":
            raise ConfigError(f"config file '{path}' must end in .yaml, .yml or .json; rename it")
        data = read_json(path)
        # imported here: deepspeed_config builds Config, so it imports this module
        from tidal.deepspeed_config import import_deepspeed, is_deepspeed_config

        if not is_deepspeed_config(data):
            return cls.from_dict(data, source=str(path))
        imported = import_deepspeed(data, name=str(path))
        if imported.unsupported:
            listed = "\n  ".join(imported.unsupported)
            warnings.warn(f"{path}: DeepSpeed keys tidal does not map:\n  {listed}", stacklevel=3)
        return imported.config

    def with_overrides(self, overrides: Sequence[str]) -> Config:
        """A copy with dotted ``KEY=VALUE`` overrides applied; values are parsed as YAML
        (``2`` int, ``true`` bool, ``null`` None, ``{a: b}`` mapping) and replace the key whole."""
        data = self.to_dict()
        for item in [overrides] if isinstance(overrides, str) else overrides:
            keys, value = _parse_override(item)
            node = data
            for depth, key in enumerate(keys[:-1], start=1):
                child = node.setdefault(key, {})
                if not isinstance(child, dict):
                    prefix = ".".join(keys[:depth])
                    problem = f"'{prefix}' is a value ({show_value(child)}), not a section"
                    raise ConfigError(f"override {show_value(item)}: {problem}; set '{prefix}=...'", "overrides")
                node = child
            node[keys[-1]] = value
        return Config.from_dict(data, source="overrides")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of builtins, safe for JSON and YAML."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """YAML text that ``from_yaml_text`` reads back to an equal Config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _parse_override(item: object) -> tuple[list[str], Any]:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {show_value(item)} is not KEY=VALUE; write e.g. parallel.tp=2", "overrides")
    key, _, text = item.partition("=")
    keys = [part.strip() for part in key.split(".")]
    if not all(keys):
        example = "offload.optimizer.device=nvme"
        raise ConfigError(f"override {show_value(item)} has an empty key; write e.g. {example}", "overrides")
    try:
        value = yaml.safe_load(text)
    except Exception as exc:  # see from_yaml_text: PyYAML raises more than YAMLError
        problem = f"value {show_value(text)} is not valid YAML ({yaml_problem(exc)})"
        raise ConfigError(f"override {show_value(item)}: {problem}; quote it, e.g. key='text'", "overrides") from exc
    return keys, value


def _read_text(path: str | os.PathLike[str]) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, or a NUL in the path
        raise ConfigError(f"cannot read config file '{path}': {exc}", str(path)) from exc


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file, turning every failure into a ConfigError naming the file."""
    text = _read_text(path)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"not valid JSON: {exc}; fix the syntax at the place named", str(path)) from exc
