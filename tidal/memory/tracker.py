"""`LiveTensorTracker`: the bytes of tensor storages alive, per device type, seen at the dispatcher.

    tracker = LiveTensorTracker().track(model, optimizer)   # what exists before entering
    with tracker:
        loss = model(x).sum()
        loss.backward()
        optimizer.step()
    tracker.peak_bytes("cpu"), tracker.current_bytes("cpu")   # bytes

It is a `TorchDispatchMode`, so it works the same on the CPU and on CUDA (no allocator statistics
needed). While it is active, every storage that a dispatched op creates is counted once, by storage
identity: views, in-place ops and collectives that write into their inputs add nothing. A storage is
released when it is freed (a weak reference on the storage object; torch keeps that object alive as
long as the storage itself). ``UntypedStorage.resize_`` is not a dispatched op, so while any tracker
is active it is wrapped: FSDP2 frees and re-allocates its unsharded parameters that way.

What it counts: storages created by ops run while it is active (on this thread, and autograd's
threads, which inherit the mode), storages grown by ``resize_`` while it is active (any thread), and
storages handed to `track`. Not counted: scratch space a kernel allocates and frees internally, and
allocator caching or fragmentation (it counts bytes requested, not bytes reserved). Releases are seen
whenever they happen, also after the tracker exits, so it can be entered again later and resume.

Not for training by default: every op pays a Python call (a few microseconds).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    is_traceable_wrapper_subclass,
    is_traceable_wrapper_subclass_type,
)
from torch.utils._pytree import tree_leaves

_ORIGINAL_RESIZE = torch.UntypedStorage.resize_
_RESIZE_INHERITED = "resize_" not in vars(torch.UntypedStorage)
"""UntypedStorage inherits resize_ from its C base; the wrapper is removed again rather than replaced."""
_resize_listeners: list[LiveTensorTracker] = []
_resize_lock = threading.Lock()


def _resize_and_notify(storage: torch.UntypedStorage, size: int) -> torch.UntypedStorage:
    result = _ORIGINAL_RESIZE(storage, size)
    for tracker in list(_resize_listeners):
        tracker._observe_resize(storage)
    return result


class LiveTensorTracker(TorchDispatchMode):
    """Live and peak bytes of tensor storages per device type ("cpu", "cuda", ...).

    Use as a context manager (it may be entered again after it exits, not while it is active).
    `track` adds tensors that exist already; `current_bytes`, `peak_bytes` and `reset_peak` read and
    restart the counts. Thread-safe: releases may come from any thread.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.RLock()
        self._live: dict[int, tuple[str, int, weakref.ref]] = {}
        """id(storage) -> (device type, bytes, weak reference whose callback releases it)."""
        self._current: dict[str, int] = {}
        self._peak: dict[str, int] = {}
        self._active = False

    # -- reading -------------------------------------------------------------------------------------

    def current_bytes(self, device_type: str = "cpu") -> int:
        """Bytes of the counted storages on `device_type` alive now."""
        return self._current.get(device_type, 0)

    def peak_bytes(self, device_type: str = "cpu") -> int:
        """Highest `current_bytes(device_type)` since the tracker was made or `reset_peak` was called."""
        return self._peak.get(device_type, 0)

    def reset_peak(self) -> None:
        """Start the peaks again from the current bytes (e.g. after warmup, before the measured steps)."""
        with self._lock:
            self._peak = dict(self._current)

    # -- counting ------------------------------------------------------------------------------------

    def track(self, *objs: torch.Tensor | torch.nn.Module | torch.optim.Optimizer) -> LiveTensorTracker:
        """Count storages that already exist: tensors, a module's parameters, buffers and gradients,
        an optimizer's parameters, gradients and state. Sharded tensors (DTensor) count their local
        shard. Each storage is counted once however often it is passed. Returns the tracker."""
        with self._lock:
            for obj in objs:
                for tensor in _tensors_of(obj):
                    for plain in _plain_tensors(tensor):
                        storage = _storage(plain)
                        if storage is not None and id(storage) not in self._live:
                            self._add(storage)
            self._update_peak()
        return self

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        device = storage.device.type
        nbytes = storage.nbytes()
        self._live[key] = (device, nbytes, weakref.ref(storage, lambda _: self._release(key)))
        self._current[device] = self._current.get(device, 0) + nbytes

    def _release(self, key: int) -> None:
        with self._lock:
            entry = self._live.pop(key, None)
            if entry is not None:
                self._current[entry[0]] -= entry[1]

    def _refresh_size(self, storage: torch.UntypedStorage) -> None:
        """A counted storage may have been resized (``resize_``, an ``out=`` op): count its new size."""
        key = id(storage)
        device, old, ref = self._live[key]
        new = storage.nbytes()
        if new != old:
            self._live[key] = (device, new, ref)
            self._current[device] += new - old

    def _update_peak(self) -> None:
        for device, nbytes in self._current.items():
            if nbytes > self._peak.get(device, 0):
                self._peak[device] = nbytes

    def _observe_resize(self, storage: torch.UntypedStorage) -> None:
        with self._lock:
            if id(storage) in self._live:
                self._refresh_size(storage)
            elif storage.nbytes() > 0 and storage.device.type != "meta":
                self._add(storage)  # allocated by resize_ while active: created here
            self._update_peak()

    def _observe_outputs(self, func: Any, out: Any, args: tuple, kwargs: dict) -> None:
        inputs: set[int] | None = None
        with self._lock:
            for leaf in tree_leaves(out):
                storage = _storage(leaf) if isinstance(leaf, torch.Tensor) else None
                if storage is None:
                    continue
                key = id(storage)
                if key in self._live:
                    self._refresh_size(storage)
                    continue
                # An output may be an input returned as is (a view, an in-place op, a collective that
                # writes into its argument); storages that existed before the op were not created by it.
                # lift_fresh is the exception: it hands out the tensor that torch.tensor() just made.
                if func is not torch.ops.aten.lift_fresh.default:
                    if inputs is None:
                        inputs = _storage_ids((args, kwargs))
                    if key in inputs:
                        continue
                self._add(storage)
            self._update_peak()

    # -- the mode ------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        if any(is_traceable_wrapper_subclass_type(t) for t in types):
            # DTensor and other wrapper subclasses: let them run their ops on plain local tensors,
            # which come back through this mode; the wrappers themselves hold no storage.
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._observe_outputs(func, out, args, kwargs)
        return out

    def __enter__(self) -> LiveTensorTracker:
        if self._active:
            raise RuntimeError("this LiveTensorTracker is already active; enter it once at a time")
        with self._lock:
            for _, _, ref in list(self._live.values()):
                storage = ref()
                if storage is not None:  # resized while inactive: count its size now
                    self._refresh_size(storage)
            self._update_peak()
        with _resize_lock:
            if not _resize_listeners:
                torch.UntypedStorage.resize_ = _resize_and_notify
            _resize_listeners.append(self)
        self._active = True
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._active = False
        with _resize_lock:
            _resize_listeners.remove(self)
            if not _resize_listeners:
                _restore_resize()


def _restore_resize() -> None:
    if _RESIZE_INHERITED:
        del torch.UntypedStorage.resize_
    else:
        torch.UntypedStorage.resize_ = _ORIGINAL_RESIZE


def _tensors_of(obj: torch.Tensor | torch.nn.Module | torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        for p in obj.parameters():
            yield p
            if p.grad is not None:
                yield p.grad
        yield from obj.buffers()
    elif isinstance(obj, torch.optim.Optimizer):
        for group in obj.param_groups:
            for p in group["params"]:
                yield p
                if p.grad is not None:
                    yield p.grad
        for state in obj.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))
    else:
        raise TypeError(f"LiveTensorTracker.track() takes tensors, modules and optimizers, got {type(obj).__name__}")


def _plain_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors holding `tensor`'s data: itself, or a wrapper subclass's inner tensors."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            inner = getattr(tensor, name)
            if isinstance(inner, torch.Tensor):  # DTensor also names its (opaque) device mesh
                yield from _plain_tensors(inner)
    else:
        yield tensor


def _storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    """`tensor`'s storage, or None when it has no real one (sparse layouts, meta and fake tensors)."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return None if storage.device.type == "meta" else storage


def _storage_ids(tree: Any) -> set[int]:
    ids = set()
    for leaf in tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            storage = _storage(leaf)
            if storage is not None:
                ids.add(id(storage))
    return ids
