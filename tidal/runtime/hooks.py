"""Tensor hooks that do not keep their owner alive.

A hook registered on a tensor (`register_post_accumulate_grad_hook`, `register_hook`) is held by torch's
C++ side, where the garbage collector cannot see it. A bound method registered there keeps its object,
and all that object reaches, alive as long as the tensor lives; when that object also reaches the
tensor (gradient buckets hold their parameters), the cycle passes through C++ and is never collected:
a model and optimizer given to `tidal.wrap` were never freed, with their optimizer state and buffers.
`weak_hook` registers a stand-in that holds the method's object weakly.

    handle = param.register_post_accumulate_grad_hook(weak_hook(self._on_grad))
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any


def weak_hook(method: Callable[..., Any]) -> Callable[..., Any]:
    """A function calling bound `method` while its object lives, and doing nothing (returning None) after."""
    ref = weakref.WeakMethod(method)

    def hook(*args: Any) -> Any:
        bound = ref()
        return None if bound is None else bound(*args)

    return hook
