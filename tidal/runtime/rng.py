"""Random number generator states of one process: captured for a checkpoint, restored on resume.

The states come out in a form ``torch.load(weights_only=True)`` reads (numpy's key as a list of ints).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from tidal.runtime.device import features

try:
    import numpy as np
except ImportError:  # numpy is optional: its generator is then simply not captured
    np = None


def capture_rng() -> dict[str, Any]:
    """This process's random number generator states, in a form ``torch.load(weights_only=True)`` reads.

    Returns:
        ``{"torch": ByteTensor, "python": random.getstate()}``, plus ``"cuda"`` (the current CUDA
        device's ByteTensor) when CUDA is in use and ``"numpy"`` (the legacy global state, its key as
        a list of ints) when numpy is importable.
    """
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if features().cuda:
        states["cuda"] = torch.cuda.get_rng_state()
    if np is not None:
        name, key, pos, has_gauss, gauss = np.random.get_state()
        states["numpy"] = (name, key.tolist(), int(pos), int(has_gauss), float(gauss))
    return states


def restore_rng(states: dict[str, Any]) -> None:
    """Set the generators from `capture_rng`'s dict; a missing key (or CUDA/numpy absent here) is skipped."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "python" in states:
        random.setstate(states["python"])
    if "cuda" in states and features().cuda:
        torch.cuda.set_rng_state(states["cuda"])
    if "numpy" in states and np is not None:
        name, key, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
