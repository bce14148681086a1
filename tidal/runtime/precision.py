"""Mixed precision: autocast for bf16/fp16 compute, and dynamic loss scaling for fp16.

Parameters, gradients and optimizer state stay fp32 (the master copy); autocast runs the matmuls in
the low precision. fp16's narrow exponent needs the loss scaled up before backward so small
gradients do not flush to zero; the scale halves after an overflow (that step is skipped) and doubles
after `scale_window` clean steps, as DeepSpeed and torch.amp do.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from tidal.config import PrecisionConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(config: PrecisionConfig, device_type: str) -> contextlib.AbstractContextManager:
    """The autocast context for forward passes: a no-op for fp32."""
    if config.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[config.dtype])


class LossScaler:
    """Dynamic (or static) loss scale for fp16; inert (scale 1, never skips) for fp32 and bf16.

    Flow per optimizer step: backward runs on ``loss * scale``; `unscale_and_check` divides the
    gradients by the scale and reports whether any rank saw inf/nan; `update` moves the scale.
    """

    def __init__(self, config: PrecisionConfig) -> None:
        self.enabled = config.dtype == "fp16"
        self.dynamic = self.enabled and config.loss_scale == "dynamic"
        if not self.enabled:
            self.scale = 1.0
        elif self.dynamic:
            self.scale = float(2**config.initial_scale_power)
        else:
            self.scale = float(config.loss_scale)
        self.window = config.scale_window
        self.min_scale = config.min_loss_scale
        self.hysteresis = config.hysteresis
        self._hysteresis_left = config.hysteresis
        self._clean_steps = 0
        self.skipped_steps = 0

    def unscale_and_check(self, grads: Iterable[torch.Tensor], group: dist.ProcessGroup | None) -> bool:
        """Divide `grads` by the scale in place; True when any rank holds an inf or nan (skip the step).

        `group` spans every rank whose gradients feed this step (None: no process group).
        """
        if not self.enabled:
            return False
        grads = [g for g in grads if g is not None]
        bad = torch.zeros(1)
        for g in grads:
            local = g.to_local() if hasattr(g, "to_local") else g
            if not torch.isfinite(local).all():
                bad.fill_(1.0)
                break
        if group is not None:
            dist.all_reduce(bad, group=group)
        if bad.item() > 0:
            return True
        inv = 1.0 / self.scale
        for g in grads:
            (g.to_local() if hasattr(g, "to_local") else g).mul_(inv)
        return False

    def update(self, overflow: bool) -> None:
        """Move the scale after a step: down after `hysteresis` overflows, up after `window` clean steps."""
        if not self.enabled:
            return
        if overflow:
            self.skipped_steps += 1
            self._clean_steps = 0
            if not self.dynamic:
                return
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
                self._hysteresis_left = self.hysteresis
            return
        self._clean_steps += 1
        if self.dynamic and self._clean_steps % self.window == 0:
            self.scale *= 2.0
            self._hysteresis_left = self.hysteresis

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "clean_steps": self._clean_steps,
            "skipped_steps": self.skipped_steps,
            "hysteresis_left": self._hysteresis_left,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self._hysteresis_left = int(state["hysteresis_left"])


def global_grad_norm(local_sq_sum: torch.Tensor, group: dist.ProcessGroup | None) -> float:
    """sqrt of the sum over ranks of `local_sq_sum` (each rank's sum of squared gradient entries)."""
    total = local_sq_sum.detach().to(torch.float64).reshape(1)
    if group is not None:
        dist.all_reduce(total, group=group)
    return math.sqrt(total.item())


def scale_grads_(grads: Iterator[torch.Tensor] | Iterable[torch.Tensor], factor: float) -> None:
    """Multiply every gradient by `factor` in place (the clipping coefficient)."""
    for g in grads:
        (g.to_local() if hasattr(g, "to_local") else g).mul_(factor)
