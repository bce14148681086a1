"""Per-module activation policy: which modules keep their saved tensors, offload them, or recompute.

    policies = module_policies(model, {"*.h.*": "offload", "*.h.0": "keep", "*.mlp": "recompute"})
    apply_recompute(model, policies)        # recompute modules run under non-reentrant checkpointing

A module takes the last pattern (fnmatch, `*` matches dots too) that matches its qualified name or the
name of a module enclosing it. A "recompute" module saves only its inputs, and those follow the
enclosing module's policy, which is how recompute and offload combine.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.utils.checkpoint import checkpoint

Choice = Literal["keep", "offload", "recompute"]


class _RecomputedForward:
    """A module's forward under non-reentrant activation checkpointing: saves its inputs, recomputes in backward."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def apply_recompute(model: torch.nn.Module, policies: dict[str, Choice]) -> bool:
    """Run the outermost modules marked "recompute" under checkpointing, in place (the state_dict keys stay
    the same; applying twice wraps once). Returns whether any module is recomputed."""
    for name, choice in policies.items():
        if choice == "recompute" and not any(policies.get(parent) == "recompute" for parent in _parents(name)):
            module = model.get_submodule(name)
            if not isinstance(module.__dict__.get("forward"), _RecomputedForward):
                module.forward = _RecomputedForward(module.forward)
    return "recompute" in policies.values()


def module_policies(model: torch.nn.Module, policy: dict[str, Choice]) -> dict[str, Choice]:
    """Each module's policy: the last pattern matching its name or an enclosing module's; unmatched ones left out."""
    names = [name for name, _ in model.named_modules()]
    for pattern in policy:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(
                f"offload.activations.policy pattern {pattern!r} matches no module of {type(model).__name__} "
                f"(module names look like {[n for n in names if n][:4]}); fix the pattern or remove it"
            )
    resolved: dict[str, Choice] = {}
    for name in names:
        scope = [*_parents(name), name]
        for pattern, choice in policy.items():
            if any(fnmatch.fnmatchcase(enclosing, pattern) for enclosing in scope):
                resolved[name] = choice
    return resolved


def changes_policy(name: str, policies: dict[str, Choice]) -> bool:
    """Whether module `name` keeps or offloads where the nearest enclosing module that does so does not."""
    enclosing = [policies[p] for p in _parents(name) if policies.get(p) in ("keep", "offload")]
    return policies[name] in ("keep", "offload") and policies[name] != (enclosing[-1] if enclosing else None)


def _parents(name: str) -> list[str]:
    """The qualified names of the modules enclosing module `name`, the root ("") included."""
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(len(parts))] if name else []
