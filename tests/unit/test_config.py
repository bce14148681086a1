"""tidal.config and tidal.deepspeed_config: schema, round trips, overrides, errors, DeepSpeed import."""

from __future__ import annotations

import json
import math
import pickle
import warnings
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from tidal.config import Config, ConfigError
from tidal.deepspeed_config import DeepSpeedImport, import_deepspeed, is_deepspeed_config

NON_DEFAULT = {
    "device": "cpu",
    "parallel": {
        "dp": 2,
        "tp": 2,
        "pp": 4,
        "sp": 2,
        "ep": 2,
        "pipeline": {"schedule": "interleaved", "microbatches": 8, "stages_per_rank": 2},
        "sequence": {"method": "ring"},
        "tensor": {"sequence_parallel": True, "loss_parallel": False},
    },
    "train": {
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 8,
        "gradient_clipping": 1.0,
        "global_batch_size": 64,
        "seed": 1234,
        "steps": 500,
    },
    "zero": {"stage": 3, "prefetch_modules": 2, "reshard_after_forward": False},
    "precision": {
        "dtype": "fp16",
        "loss_scale": 1024.0,
        "initial_scale_power": 12,
        "scale_window": 500,
        "hysteresis": 4,
        "min_loss_scale": 0.5,
    },
    "offload": {
        "optimizer": {
            "device": "nvme",
            "path": "/nvme/opt",
            "chunk_mb": 32,
            "ratio": 0.25,
            "update_in_backward": False,
        },
        "activations": {
            "device": "cpu",
            "path": None,
            "min_bytes": 4096,
            "prefetch_layers": 2,
            "policy": {"encoder.*": "recompute", "head": "keep", "*.mlp": "offload"},
        },
        "params": {"device": "nvme", "path": "/nvme/params"},
        "nvme": {"block_size": 262144, "queue_depth": 32, "threads": 2, "engine": "threads"},
    },
    "comm": {
        "bucket_mb": 12.5,
        "overlap_grad_reduce": False,
        "overlap": {"tp": "on", "moe": "off", "chunks": 2},
        "timeout_s": 120.0,
    },
    "checkpoint": {"dir": "/ckpt", "interval": 100, "keep": 5},
    "logging": {"interval": 10, "progress": False, "trace": "/tmp/trace.json", "level": "debug"},
}


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every setting (an empty mapping counts as one setting)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _get(tree: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        tree = tree[key]
    return tree


def _error(fn: Any, *args: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    assert info.value.problems and all(isinstance(p, str) and p for p in info.value.problems)
    return info.value


DEFAULT_LEAVES = sorted(_leaves(Config().to_dict()))


def _fields(model: type[BaseModel]) -> list[tuple[str, Any]]:
    found = []
    for name, field in model.model_fields.items():
        found.append((f"{model.__name__}.{name}", field))
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found.extend(_fields(field.annotation))
    return found


# --- schema, defaults, round trips ---------------------------------------------------------------


def test_defaults_run_on_a_laptop() -> None:
    config = Config()
    assert config == Config.load() == Config.from_dict({}) == Config.from_yaml_text("")
    assert config.device == "auto" and config.parallel.dp == "auto" and config.parallel.pipeline.schedule == "1f1b"
    assert config.zero.stage == 0 and config.precision.dtype == "fp32" and config.precision.loss_scale == "dynamic"
    assert config.offload.optimizer.device == config.offload.params.device == "none"
    assert config.offload.activations.min_bytes == config.offload.nvme.block_size == 1048576
    assert config.comm.bucket_mb == 25.0 and config.checkpoint.keep == 2 and config.logging.level == "info"


@pytest.mark.parametrize(("name", "field"), _fields(Config), ids=lambda v: v if isinstance(v, str) else "")
def test_every_field_has_a_one_line_docstring(name: str, field: Any) -> None:
    assert field.description and "\n" not in field.description, name


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(ValidationError):
        config.zero = config.zero  # type: ignore[misc]
    with pytest.raises(ValidationError):
        config.zero.stage = 3  # type: ignore[misc]


@pytest.mark.parametrize("data", [{}, NON_DEFAULT], ids=["defaults", "every-section"])
def test_yaml_round_trip(data: dict[str, Any]) -> None:
    config = Config.from_dict(data)
    assert Config.from_yaml_text(config.to_yaml()) == config
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()


def test_non_default_config_touches_every_setting() -> None:
    config, default = Config.from_dict(NON_DEFAULT).to_dict(), Config().to_dict()
    unchanged = {path for path in DEFAULT_LEAVES if _get(config, path) == _get(default, path)}
    assert unchanged == {"offload.activations.path"}  # None is the only valid value with device=cpu
    assert config["offload"]["activations"]["policy"] == {"encoder.*": "recompute", "head": "keep", "*.mlp": "offload"}


def test_yaml_file_round_trip(tmp_path: Any) -> None:
    config = Config.from_dict(NON_DEFAULT)
    for name in ("run.yaml", "run.yml"):
        path = tmp_path / name
        path.write_text(config.to_yaml())
        assert Config.from_yaml(path) == config == Config.load(str(path)) == Config.load(path)


def test_load_sources(tmp_path: Any) -> None:
    config = Config.from_dict(NON_DEFAULT)
    assert Config.load(config) is config
    assert Config.load(NON_DEFAULT) == config
    path = tmp_path / "tidal.json"
    path.write_text(json.dumps(NON_DEFAULT))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Config.load(path) == config
    assert Config.load(None, ["zero.stage=2"]).zero.stage == 2
    assert "must end in .yaml, .yml or .json" in str(_error(Config.load, tmp_path / "run.toml"))
    assert "cannot read config file" in str(_error(Config.load, tmp_path / "missing.yaml"))
    (tmp_path / "bad.json").write_text("{")
    assert "not valid JSON" in str(_error(Config.load, tmp_path / "bad.json"))
    (tmp_path / "latin1.yaml").write_bytes(b"device: \xff")
    assert "cannot read config file" in str(_error(Config.load, tmp_path / "latin1.yaml"))
    assert "must be a Config, a mapping, a file path or None" in str(_error(Config.load, 42))


def test_config_error_survives_pickling() -> None:
    error = _error(Config.from_dict, {"zero": {"stage": 9}, "train": {"seed": -1}})
    copy = pickle.loads(pickle.dumps(error))
    assert copy.problems == error.problems and str(copy) == str(error) and len(error.problems) == 2


# --- error messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"offload": {"optimizer": {"device": "disk"}}},
            "offload.optimizer.device = 'disk': must be one of 'none', 'cpu', 'nvme'",
        ),
        ({"zero": {"stage": 4}}, "zero.stage = 4: must be <= 3"),
        ({"parallel": {"dp": 0}}, "parallel.dp = 0: must be >= 1 or 'auto'"),
        ({"parallel": {"tp": True}}, "parallel.tp = True: must be an integer"),
        ({"precision": {"loss_scale": "static"}}, "precision.loss_scale = 'static': must be 'dynamic' or a number"),
        ({"comm": {"bucket_mb": math.inf}}, "comm.bucket_mb = inf: must be a finite number"),
        ({"offload": {"nvme": {"block_size": 12288}}}, "offload.nvme.block_size = 12288: must be a power of two"),
        ({"offload": {"optimizer": {"ratio": 1.5}}}, "offload.optimizer.ratio = 1.5: must be <= 1"),
        ({"offload": {"activations": {"policy": {"x.*": "drop"}}}}, "offload.activations.policy.x.* = 'drop'"),
        ({"zero": 3}, "zero = 3: must be a mapping with keys stage, prefetch_modules, reshard_after_forward"),
        ({"train": {"seed": 10**5000}}, "train.seed = <int>: must be <= 4294967295"),
    ],
)
def test_bad_values_name_key_value_and_rule(data: dict[str, Any], expected: str) -> None:
    assert expected in str(_error(Config.from_dict, data))


@pytest.mark.parametrize(
    ("data", "suggestion"),
    [
        (
            {"zero": {"stgae": 3}},
            "unknown key 'zero.stgae'; did you mean 'zero.stage'? valid keys: stage, "
            "prefetch_modules, reshard_after_forward",
        ),
        ({"offlaod": {}}, "unknown key 'offlaod'; did you mean 'offload'?"),
        ({"offload": {"optimzer": {}}}, "unknown key 'offload.optimzer'; did you mean 'offload.optimizer'?"),
        ({"offload": {"optimizer": {"devcie": "cpu"}}}, "did you mean 'offload.optimizer.device'?"),
        ({"parallel": {"pipeline": {"schedul": "gpipe"}}}, "did you mean 'parallel.pipeline.schedule'?"),
        ({"comm": {"overlap": {"chunk": 2}}}, "did you mean 'comm.overlap.chunks'?"),
        ({"zero": {"qqqq": 1}}, "unknown key 'zero.qqqq'; valid keys: stage,"),
    ],
)
def test_unknown_keys_suggest_the_closest_valid_key(data: dict[str, Any], suggestion: str) -> None:
    assert suggestion in str(_error(Config.from_dict, data))


@pytest.mark.parametrize(
    ("data", "fix"),
    [
        (
            {"offload": {"params": {"device": "nvme", "path": "/nvme"}}},
            "offload.params.device=nvme needs zero.stage=3 (parameters must be sharded to stream them), got "
            "zero.stage=0; set zero.stage=3 or offload.params.device=none",
        ),
        ({"offload": {"params": {"device": "cpu"}}, "zero": {"stage": 2}}, "set zero.stage=3"),
        (
            {"offload": {"optimizer": {"device": "nvme"}}},
            "set offload.optimizer.path=/path/on/nvme or offload.optimizer.device=cpu",
        ),
        ({"offload": {"activations": {"device": "nvme", "path": ""}}}, "set offload.activations.path="),
        ({"zero": {"stage": 3}, "offload": {"params": {"device": "nvme"}}}, "set offload.params.path="),
        (
            {"parallel": {"pipeline": {"stages_per_rank": 2}}},
            "set parallel.pipeline.schedule=interleaved or parallel.pipeline.stages_per_rank=1",
        ),
        (
            {"offload": {"optimizer": {"ratio": 0.5}}},
            "set offload.optimizer.device=cpu (or nvme) or offload.optimizer.ratio=0",
        ),
    ],
)
def test_cross_field_rules_name_the_fix(data: dict[str, Any], fix: str) -> None:
    assert fix in str(_error(Config.from_dict, data))


def test_fixed_loss_scale_is_allowed_without_fp16() -> None:
    assert Config.from_dict({"precision": {"dtype": "bf16", "loss_scale": 8}}).precision.loss_scale == 8.0


def test_all_problems_are_reported_at_once() -> None:
    error = _error(Config.from_dict, {"zero": {"stage": -1, "stgae": 1}, "device": "tpu", "train": 3})
    assert len(error.problems) == 4 and "4 problems" in str(error)


# --- overrides ----------------------------------------------------------------------------------------


def test_overrides_set_nested_keys_with_yaml_types() -> None:
    config = Config().with_overrides(
        [
            "offload.optimizer.device=nvme",
            "offload.optimizer.path=/mnt/nvme",
            "parallel.tp=2",
            "zero.reshard_after_forward=false",
            "train.gradient_clipping=0.5",
            "checkpoint.dir=null",
            "offload.activations.policy={'enc.*': recompute}",
            "offload.activations.policy.head=keep",
            " logging.level = debug",
        ]
    )
    assert config.offload.optimizer.device == "nvme" and config.offload.optimizer.path == "/mnt/nvme"
    assert config.parallel.tp == 2 and config.zero.reshard_after_forward is False
    assert config.train.gradient_clipping == 0.5 and config.checkpoint.dir is None
    assert config.offload.activations.policy == {"enc.*": "recompute", "head": "keep"}
    assert config.logging.level == "debug"
    assert Config().with_overrides("zero.stage=1").zero.stage == 1
    assert Config().with_overrides(["precision={dtype: bf16}"]).precision.dtype == "bf16"


def test_overrides_leave_the_original_untouched() -> None:
    config = Config()
    config.with_overrides(["zero.stage=3"])
    assert config.zero.stage == 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("zero.stgae=3", "unknown key 'zero.stgae'; did you mean 'zero.stage'?"),
        ("paralel.tp=2", "unknown key 'paralel'; did you mean 'parallel'?"),
        ("parallel.tp=two", "parallel.tp = 'two': must be an integer"),
        ("parallel.tp", "override 'parallel.tp' is not KEY=VALUE"),
        ("=3", "has an empty key"),
        ("zero..stage=3", "has an empty key"),
        ("zero.stage=[", "is not valid YAML"),
        ("zero.stage.x=1", "'zero.stage' is a value (0), not a section"),
    ],
)
def test_bad_overrides(override: str, message: str) -> None:
    error = _error(Config().with_overrides, [override])
    assert message in str(error) and error.source == "overrides"


def test_non_string_override() -> None:
    assert "is not KEY=VALUE" in str(_error(Config().with_overrides, [3]))


# --- fuzzing: only ConfigError may escape ------------------------------------------------------------

ALL_KEY_NAMES = sorted({part for path in DEFAULT_LEAVES for part in path.split(".")})
KEYS = st.one_of(
    st.sampled_from(ALL_KEY_NAMES), st.text(max_size=8), st.integers(), st.none(), st.booleans(), st.floats()
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**200),
    st.integers(min_value=4300, max_value=4400).map(lambda digits: 10**digits),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["auto", "nvme", "cpu", "none", "dynamic", "interleaved", "fp16", "on"]),
)
JUNK = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5), max_leaves=25
)
SECTIONED = st.dictionaries(
    st.sampled_from(list(Config.model_fields)),
    st.dictionaries(st.sampled_from(ALL_KEY_NAMES), JUNK, max_size=4) | JUNK,
    max_size=5,
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_config_errors(fn: Any, *args: Any) -> Config | None:
    try:
        return fn(*args)
    except ConfigError as error:
        assert error.problems and all(isinstance(p, str) and p for p in error.problems)
        assert str(error)
        return None


@FUZZ
@given(st.one_of(JUNK, SECTIONED))
def test_from_dict_junk_raises_only_config_error(data: Any) -> None:
    config = _only_config_errors(Config.from_dict, data)
    if config is not None:
        assert Config.from_yaml_text(config.to_yaml()) == config


@FUZZ
@given(st.one_of(st.text(), st.text(alphabet="abcdez01._-:{}[],&*!|>'\"#%@`~?\n\t ", max_size=60)))
def test_from_yaml_text_junk_raises_only_config_error(text: str) -> None:
    _only_config_errors(Config.from_yaml_text, text)


@pytest.mark.parametrize("text", ["a: &x [*x]", "d: 2020-13-45", "n: 1" + "0" * 5000, "!!binary x", "[1, 2]", "7"])
def test_from_yaml_text_awkward_documents(text: str) -> None:
    _error(Config.from_yaml_text, text)


YAML_VALUES = [
    "2",
    "-1",
    "true",
    "null",
    "~",
    "{a: b}",
    "[1, 2]",
    "1.0e400",
    ".nan",
    "nvme",
    "'3'",
    "0x10",
    "{stage: 3}",
]


def _cyclic() -> dict[str, Any]:
    section: dict[str, Any] = {}
    section["x"] = section
    return {"zero_optimization": section, "zero": section}


def _deep(depth: int) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for _ in range(depth):
        tree = {"a": tree}
    return {"zero": tree, "wandb": tree}


@pytest.mark.parametrize("data", [_cyclic(), _deep(5000)], ids=["cyclic", "deep"])
@pytest.mark.parametrize("load", [Config.from_dict, import_deepspeed], ids=["tidal", "deepspeed"])
def test_awkward_mappings(load: Any, data: dict[str, Any]) -> None:
    _error(load, data)


OVERRIDE_KEYS = st.sampled_from(DEFAULT_LEAVES + ["zero.stgae", "offload", "a.b.c", "", ".", "zero.stage.x"])


@FUZZ
@given(
    st.lists(
        st.text(max_size=30)
        | st.builds("{}={}".format, OVERRIDE_KEYS, st.text(max_size=12))
        | st.builds("{}={}".format, OVERRIDE_KEYS, st.sampled_from(YAML_VALUES)),
        max_size=4,
    )
)
def test_with_overrides_junk_raises_only_config_error(overrides: list[str]) -> None:
    _only_config_errors(Config().with_overrides, overrides)


BAD_VALUES = ["x", "", -1, 0, 3, 1.5, -0.5, math.nan, math.inf, None, [], {}, {"a": 1}, True, 10**30, 4096]


@FUZZ
@given(st.sampled_from(DEFAULT_LEAVES), st.sampled_from(BAD_VALUES))
def test_one_mutated_key_names_itself_or_round_trips(path: str, value: Any) -> None:
    *sections, field = path.split(".")
    data: dict[str, Any] = {}
    node = data
    for section in sections:
        node = node.setdefault(section, {})
    node[field] = value
    try:
        config = Config.from_dict(data)
    except ConfigError as error:
        assert path in str(error), (path, value, str(error))
    else:
        assert Config.from_yaml_text(config.to_yaml()) == config


@FUZZ
@given(st.one_of(JUNK, st.dictionaries(st.sampled_from(["zero_optimization", "fp16", "bf16", "aio"]), JUNK)))
def test_import_deepspeed_junk_raises_only_config_error(data: Any) -> None:
    _only_config_errors(import_deepspeed, data)


# --- DeepSpeed import -------------------------------------------------------------------------------

ZERO3_NVME = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 8,
    "gradient_clipping": 1.0,
    "steps_per_print": 10,
    "wall_clock_breakdown": False,
    "zero_allow_untested_optimizer": True,
    "bf16": {"enabled": True},
    "fp16": {"enabled": False, "loss_scale": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-4, "warmup_num_steps": 100}},
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme", "pin_memory": True, "buffer_count": 4},
        "offload_param": {"device": "cpu", "pin_memory": True},
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 52428800,
        "sub_group_size": 1e9,
        "stage3_prefetch_bucket_size": 5e7,
        "stage3_param_persistence_threshold": 1e5,
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "aio": {"block_size": 262144, "queue_depth": 32, "thread_count": 1, "single_submit": False, "overlap_events": True},
}
ZERO3_NVME_MAPPED = {
    "train_micro_batch_size_per_gpu": ("train.micro_batch_size", 4),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", 8),
    "gradient_clipping": ("train.gradient_clipping", 1.0),
    "steps_per_print": ("logging.interval", 10),
    "bf16.enabled": ("precision.dtype", "bf16"),
    "zero_optimization.stage": ("zero.stage", 3),
    "zero_optimization.offload_optimizer.device": ("offload.optimizer.device", "nvme"),
    "zero_optimization.offload_optimizer.nvme_path": ("offload.optimizer.path", "/local_nvme"),
    "zero_optimization.offload_param.device": ("offload.params.device", "cpu"),
    "zero_optimization.overlap_comm": ("comm.overlap_grad_reduce", True),
    "zero_optimization.reduce_bucket_size": ("comm.bucket_mb", 200.0),  # 52428800 fp32 elements
    "aio.block_size": ("offload.nvme.block_size", 262144),
    "aio.queue_depth": ("offload.nvme.queue_depth", 32),
    "aio.thread_count": ("offload.nvme.threads", 1),
}


def test_zero3_nvme_deepspeed_config_imports() -> None:
    imported = import_deepspeed(ZERO3_NVME)
    assert isinstance(imported, DeepSpeedImport)
    settings_ = _leaves(imported.config.to_dict())
    for ds_key, (tidal_key, value) in ZERO3_NVME_MAPPED.items():
        assert settings_[tidal_key] == value, ds_key
    reported = {line.split(" = ")[0]: line for line in imported.unsupported}
    # every DeepSpeed setting is mapped or reported; the disabled fp16 section has no effect
    ds_keys = set(_leaves({k: v for k, v in ZERO3_NVME.items() if k not in ("optimizer", "scheduler", "fp16")}))
    assert set(reported) == (ds_keys - set(ZERO3_NVME_MAPPED)) | {"optimizer", "scheduler"}
    wrapped = "tidal wraps the optimizer/scheduler you pass to tidal.wrap()"
    assert reported["optimizer"].startswith('optimizer = {"type": "AdamW"') and reported["optimizer"].endswith(wrapped)
    assert reported["scheduler"].endswith(wrapped)
    assert reported["zero_optimization.offload_optimizer.pin_memory"].startswith(
        "zero_optimization.offload_optimizer.pin_memory = true: always on in tidal"
    )
    assert reported["zero_optimization.contiguous_gradients"].endswith(
        "always on in tidal (gradients live in contiguous buckets)"
    )


def test_fp16_dynamic_and_static_loss_scale() -> None:
    dynamic = {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 12,
        "loss_scale_window": 500,
        "hysteresis": 4,
        "min_loss_scale": 2,
    }
    precision = import_deepspeed({"fp16": dynamic}).config.precision
    assert (precision.dtype, precision.loss_scale, precision.initial_scale_power) == ("fp16", "dynamic", 12)
    assert (precision.scale_window, precision.hysteresis, precision.min_loss_scale) == (500, 4, 2.0)
    static = import_deepspeed({"fp16": {"enabled": True, "loss_scale": 128}}).config.precision
    assert (static.dtype, static.loss_scale) == ("fp16", 128.0)


def test_auto_values_are_left_to_tidal_defaults() -> None:
    imported = import_deepspeed(
        {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "fp16": {"enabled": "auto"},
            "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"},
        }
    )
    assert imported.config == Config.from_dict({"zero": {"stage": 2}})
    assert 'zero_optimization.reduce_bucket_size = "auto": left to tidal\'s default' in imported.unsupported
    assert len(imported.unsupported) == 4


def test_conversions_and_disabled_sections() -> None:
    imported = import_deepspeed(
        {
            "train_batch_size": 64,
            "gradient_clipping": 0,
            "zero_optimization": {
                "stage": 3,
                "offload_optimizer": {"device": "cpu", "ratio": 0.3},
                "offload_param": None,
            },
            "activation_checkpointing": {"cpu_checkpointing": True},
            "bf16": {"enabled": False},
            "fp16": {"loss_scale": 0},  # no "enabled": DeepSpeed leaves fp16 off
            "tensorboard": {"enabled": False, "output_path": "/tb"},
        }
    )
    config = imported.config
    assert config.train.global_batch_size == 64 and config.train.gradient_clipping is None
    assert config.offload.optimizer.ratio == pytest.approx(0.7)  # DeepSpeed's ratio is the share offloaded
    assert config.offload.activations.device == "cpu" and config.precision.dtype == "fp32"
    assert imported.unsupported == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"zero_optimization": {"stage": "three"}},
            "DeepSpeed key 'zero_optimization.stage' = \"three\": must be an integer",
        ),
        ({"train_micro_batch_size_per_gpu": True}, "'train_micro_batch_size_per_gpu' = true: must be an integer"),
        ({"bf16": {"enabled": "yes"}}, "'bf16.enabled' = \"yes\": must be true or false"),
        ({"gradient_clipping": [1]}, "'gradient_clipping' = [1]: must be a number"),
        ({"zero_optimization": 3}, "DeepSpeed key 'zero_optimization' = 3: must be an object"),
        ({"zero_optimization": {"stage": 5}}, "zero.stage = 5: must be <= 3 (from DeepSpeed zero_optimization.stage)"),
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "'bf16.enabled' and 'fp16.enabled' both set"),
        ([1, 2], "a DeepSpeed config must be a JSON object"),
    ],
)
def test_bad_deepspeed_values_name_the_deepspeed_key(data: Any, message: str) -> None:
    assert message in str(_error(import_deepspeed, data))


def test_load_deepspeed_json_warns_with_unsupported_keys(tmp_path: Any) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ZERO3_NVME))
    with pytest.warns(UserWarning, match="DeepSpeed keys tidal does not map") as record:
        config = Config.load(str(path), overrides=["train.seed=7"])
    assert len(record) == 1 and "wall_clock_breakdown" in str(record[0].message)
    assert config == import_deepspeed(path).config.with_overrides(["train.seed=7"])
    assert is_deepspeed_config(ZERO3_NVME) and not is_deepspeed_config(NON_DEFAULT)
    assert not is_deepspeed_config({"checkpoint": {}}) and not is_deepspeed_config([1])


def test_yaml_dump_of_deepspeed_import_round_trips() -> None:
    config = import_deepspeed(ZERO3_NVME).config
    assert Config.from_yaml_text(yaml.safe_dump(config.to_dict())) == config
