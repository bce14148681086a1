"""Models the planner knows by name, and how a MODEL argument becomes a model and a trace recipe.

    spec = resolve_model("llama-70b")              # a preset (transformers config as data, nothing downloaded)
    spec = resolve_model("path/to/config.json")    # a local Hugging Face config (a file or its directory)
    spec = resolve_model("my_pkg.models:build")    # a function returning (model, example_batch)
    spec.model                                     # built on the meta device (no memory), in train mode

Presets are the published architecture hyper-parameters of each family (the `config.json` shipped with the
checkpoints), written here as plain dicts so that planning needs no network and no weights.

Mixture-of-experts models cannot be traced under fake tensors yet: their experts run grouped matmuls (or
data-dependent token routing) that have no fake kernel for these dtypes. For them, `ModelSpec.trace_config`
is a dense stand-in with the same attention and an MLP of ``num_experts_per_tok * intermediate_size``: the
activations of balanced routing, where every token passes through top_k experts (router logits and the
per-expert copies of a token's hidden state are not counted). Parameters, gradients and optimizer state
still come from the real MoE model (all experts).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": {
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
    },
    "gpt2-xl": {
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_embd": 1600,
        "n_layer": 48,
        "n_head": 25,
    },
    "llama-7b": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama-13b": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama-70b": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "mixtral-8x7b": {
        "model_type": "mixtral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
    },
}
"""Preset name -> transformers config fields (``model_type`` picks the config class)."""


class ModelSpecError(ValueError):
    """A MODEL argument that names no preset, no readable config.json and no importable function."""


@dataclass
class ModelSpec:
    """A model to plan: built on the meta device, and what one micro-batch of it looks like."""

    name: str
    """The MODEL argument as given."""
    model: torch.nn.Module
    """The model on the meta device, in train mode (shapes only)."""
    hf_config: Any = None
    """Its transformers config, for causal LMs traced on ``input_ids``/``labels``; None for a user's model."""
    example_batch: Any = None
    """The batch a user's function returned (its tensors' shapes are one micro-batch); None for causal LMs."""
    trace_config: Any = None
    """The config to trace instead of `hf_config` (a dense stand-in for an MoE model); None: `hf_config`."""
    notes: tuple[str, ...] = ()
    """Assumptions made in resolving it."""


def resolve_model(model: str) -> ModelSpec:
    """Turn a MODEL argument into a `ModelSpec`: a preset name, a config.json (file or directory) or
    ``module:function`` returning ``(model, example_batch)``.

    Raises:
        ModelSpecError: it is none of those; the message lists the presets.
    """
    if model in PRESETS:
        return _from_hf_dict(model, dict(PRESETS[model]))
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelSpecError(f"cannot read the model config {str(path)!r}: {exc}") from exc
        if not isinstance(data, dict) or "model_type" not in data:
            raise ModelSpecError(f"{str(path)!r} has no 'model_type'; pass a Hugging Face config.json")
        return _from_hf_dict(model, data)
    if ":" in model and not path.exists():
        return _from_function(model)
    raise ModelSpecError(
        f"MODEL {model!r} is not a preset, a config.json or module:function; presets: {', '.join(PRESETS)}; "
        "or pass path/to/config.json, or my_module:build returning (model, example_batch)"
    )


def _from_hf_dict(name: str, data: dict[str, Any]) -> ModelSpec:
    from transformers import AutoConfig, AutoModelForCausalLM

    data = {k: v for k, v in data.items() if k not in ("architectures", "transformers_version", "torch_dtype")}
    model_type = data.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as exc:
        raise ModelSpecError(f"{name!r}: transformers does not know model_type {model_type!r} ({exc})") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.train()
    trace_config, notes = None, ()
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if experts:
        trace_config, notes = _dense_stand_in(config)
    return ModelSpec(name, model, hf_config=config, trace_config=trace_config, notes=notes)


def _dense_stand_in(config: Any) -> tuple[Any, tuple[str, ...]]:
    """A Llama config with `config`'s attention and a dense MLP as wide as the top_k experts a token visits."""
    from transformers import LlamaConfig

    top_k = getattr(config, "num_experts_per_tok", 2)
    heads = config.num_attention_heads
    dense = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=top_k * config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", heads),
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=getattr(config, "tie_word_embeddings", False),
    )
    note = (
        f"MoE activations traced on a dense stand-in (balanced routing: each token through top_k={top_k} experts "
        f"= one MLP of {top_k} x {config.intermediate_size}); router logits and per-expert token copies not counted"
    )
    return dense, (note,)


def _from_function(spec: str) -> ModelSpec:
    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ModelSpecError(
            f"cannot load {spec!r}: {exc}; module:function must be importable and return (model, example_batch). "
            f"Presets: {', '.join(PRESETS)}"
        ) from exc
    result = function()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise ModelSpecError(f"{spec} returned {type(result).__name__}; it must return (model, example_batch)")
    model, batch = result
    return ModelSpec(spec, model.train(), example_batch=batch)
