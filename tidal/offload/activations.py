"""Saved-activation offload: tensors autograd saves in forward go to host memory or NVMe, and come back
ahead of use in backward; a per-module policy keeps, offloads or recomputes activations.

    offload = apply_activation_offload(model, config.offload.activations, config.offload.nvme, device)
    with offload.forward_context():        # around each training forward (several per step are fine)
        loss = model(batch).loss
    loss.backward()                         # outside the context (retain_graph works too)
    offload.stats; offload.reset_stats(); offload.close()

What moves: saved tensors of at least `min_bytes` packed under an "offload" module (default: inside
the repeated blocks). Parameters, buffers, views of them, leaves that require grad and tensor subclasses
stay put (they live on anyway); a tensor saved twice in one forward is stored once. Values come back
bit-identical, with their strides (contiguous when they had gaps or broadcast dimensions).

Prefetch: hooks on the repeated blocks cut a forward into segments (block i, or code between blocks). The
first unpack of a segment in backward fetches all of its tensors and those of the next `prefetch_layers`
blocks below it; the first unpack of a kept tensor (the head's, a kept block's) fetches the last
offloaded segment, so backward does not start by waiting for it. A store entry is freed when autograd
frees its saved tensor (after the node ran).

Policy: module-name globs (fnmatch, `*` matches dots too); a module takes the last pattern that matches it
or a module enclosing it. A tensor follows the innermost running module that keeps or offloads. "recompute"
modules run under non-reentrant checkpointing: only their inputs are saved, by the enclosing policy.

CUDA: copies run on the device layer's side stream from and to pinned pooled buffers; for NVMe a GPU
tensor is staged in pinned memory (the disk write starts once the copy is done) and returns through it
(the disk read is prefetched, the copy to the GPU runs at unpack). CPU: the same path, on a thread pool.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import threading
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from tidal.config import ActivationOffloadConfig, NvmeConfig
from tidal.offload.nvme import OffloadError
from tidal.offload.policy import Choice, apply_recompute, changes_policy, module_policies
from tidal.offload.store import BufferPool, CpuStore, Store
from tidal.offload.swap_file import SwapFileStore
from tidal.parallel.data import repeated_blocks
from tidal.runtime.device import Handle, copy_async, pin_memory_available, then


@dataclass
class ActivationOffloadStats:
    """Saved-activation traffic since the last `reset_stats()`."""

    offloaded_bytes: int = 0
    """Bytes written to the store in forward."""
    offloaded_tensors: int = 0
    """Saved tensors written to the store, count."""
    fetched_bytes: int = 0
    """Bytes read back from the store for backward."""
    prefetch_hits: int = 0
    """Unpacks whose tensor was fetched ahead and already there, count."""
    blocking_waits: int = 0
    """Unpacks that waited for their tensor (fetched on demand or prefetched too late), count."""


@dataclass(eq=False)
class _Segment:
    """The saved tensors of one block's forward (`layer`), or of the code between blocks (layer None)."""

    layer: int | None
    saved: list[weakref.ref[_Saved]] = field(default_factory=list)
    started: bool = False
    """Its first unpack happened (the prefetch ahead of it was issued then)."""


@dataclass(eq=False)
class _Forward:
    serial: int
    segments: list[_Segment]


@dataclass(eq=False)
class _Saved:
    """What autograd holds instead of an offloaded tensor; the store entry is freed when this dies."""

    key: str
    forward: _Forward
    segment: int
    dtype: torch.dtype
    shape: torch.Size
    stride: tuple[int, ...] | None
    """Strides to restore (dense tensors); None: restored contiguous."""
    device: torch.device
    nbytes: int
    fetch: Handle[torch.Tensor] | None = None
    uses: int = 1
    """Saves in forward that returned this (a tensor saved twice is stored once), count."""
    left: int = 0
    """Unpacks still to come in this backward, count; 0: none started."""
    unpacked: bool = False
    """All its saves were unpacked (its fetch is released; another backward fetches again)."""


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that offload activations in forward and prefetch them in backward; see the module doc.

    Args:
        model: the model whose forward runs inside `forward_context()`.
        store: where offloaded tensors go; None: nothing is offloaded (recompute only).
        policies: modules with an explicit "keep" or "offload" policy.
        min_bytes: smallest saved tensor that is offloaded, bytes.
        prefetch_layers: blocks whose tensors are fetched ahead in backward, count.
        staging: host buffers that tensors pass through between the GPU and a `SwapFileStore`; None: tensors
            go to the store and come back directly.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        store: Store[Any] | None,
        policies: dict[torch.nn.Module, Choice],
        *,
        min_bytes: int,
        prefetch_layers: int,
        staging: BufferPool | None = None,
    ) -> None:
        super().__init__(self._pack, self._unpack)
        self.model = model
        self.store = store
        """The store holding offloaded activations (None: recompute only)."""
        self.min_bytes = min_bytes
        self.prefetch_layers = prefetch_layers
        self._staging = staging
        self._lock = threading.Lock()
        self._closed = False
        self._stats = ActivationOffloadStats()
        self._forward: _Forward | None = None
        self._serials = itertools.count()
        self._stack: list[tuple[int | None, Choice | None]] = []
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], int, weakref.ref[_Saved]]] = {}
        self._param_storages: set[int] = set()
        self._writes: dict[str, Handle[Any]] = {}
        """Writes under way by key, oldest first; a staged GPU copy's handle returns the disk write it started."""
        self._dead: collections.deque[str] = collections.deque()
        self._awaiting: _Forward | None = None
        """The last forward that offloaded, until its backward starts (`_start_backward`)."""
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        if store is not None:
            layers = {block: index for index, block in enumerate(repeated_blocks(model))}
            for module in {**layers, **policies}:
                track = (layers.get(module), policies.get(module))
                self._hooks.append(module.register_forward_pre_hook(functools.partial(self._track, track, True)))
                exit_hook = functools.partial(self._track, track, False)
                self._hooks.append(module.register_forward_hook(exit_hook, always_call=True))

    def forward_context(self) -> contextlib.AbstractContextManager[object]:
        """The context to run one training forward in; backward runs after it was left."""
        if self._closed:
            raise OffloadError("this ActivationOffload is closed; apply_activation_offload again for a new one")
        return contextlib.nullcontext() if self.store is None else self

    @property
    def stats(self) -> ActivationOffloadStats:
        """Bytes and tensors moved, prefetch hits and blocking waits since the last `reset_stats()` (a copy)."""
        return replace(self._stats)

    def reset_stats(self) -> None:
        """Start counting anew; call it once per optimizer step for per-step numbers."""
        self._stats = ActivationOffloadStats()

    def close(self) -> None:
        """Remove the hooks and free the store, its buffers and its files. Closing twice is a no-op."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for hook in self._hooks:
                hook.remove()
            for write in self._writes.values():
                with contextlib.suppress(Exception):
                    write.wait()  # no copy into a pooled buffer may still run when the pool goes
            self._writes.clear()
            self._dead.clear()
            if self.store is not None:
                self.store.close()
            if self._staging is not None:
                self._staging.clear()

    def __enter__(self) -> ActivationOffload:
        if self._forward is not None:
            raise RuntimeError("forward_context() was entered twice at once; leave it before the next forward")
        self._forward = _Forward(next(self._serials), [_Segment(None)])
        self._stack.clear()
        self._seen.clear()
        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        self._param_storages = {ptr for ptr in map(_storage_pointer, tensors) if ptr is not None}
        super().__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        super().__exit__(*exc_info)
        if any(segment.saved for segment in self._forward.segments):
            self._awaiting = self._forward
        self._forward = None
        self._stack.clear()
        self._seen.clear()
        with self._lock:
            self._poll_writes()

    def _track(self, track: tuple[int | None, Choice | None], entering: bool, *_: object) -> None:
        """Forward (pre-)hook of a block or policy module: keep the stack of running modules and the segments."""
        if self._forward is None:
            return  # outside forward_context: an untracked forward, or recomputation in backward
        if entering:
            self._stack.append(track)
        elif self._stack:
            self._stack.pop()
        if track[0] is not None:
            self._forward.segments.append(_Segment(track[0] if entering else None))

    def _wanted(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor`, saved now, goes to the store."""
        if (
            type(tensor) is not torch.Tensor
            or tensor.layout != torch.strided
            or tensor.device.type not in ("cpu", "cuda")
        ):
            return False  # parameters, subclasses (DTensor, fake), sparse, meta
        if tensor.numel() == 0 or tensor.numel() * tensor.element_size() < self.min_bytes:
            return False
        if (tensor.is_leaf and tensor.requires_grad) or tensor.is_conj() or tensor.is_neg():
            return False
        if isinstance(tensor._base, torch.nn.Parameter) or _storage_pointer(tensor) in self._param_storages:
            return False
        inside_block = False
        for layer, choice in reversed(self._stack):
            if choice in ("keep", "offload"):
                return choice == "offload"
            inside_block = inside_block or layer is not None
        return inside_block

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | _Saved:
        if self._forward is None or not self._wanted(tensor):
            return tensor
        with self._lock:
            self._drain()
            self._poll_writes()
            seen = self._seen.get(id(tensor))
            if seen is not None and seen[0]() is tensor and seen[1] == tensor._version:
                saved = seen[2]()
                if saved is not None:
                    saved.uses += 1
                    return saved
            saved = self._offload(tensor, self._forward)
            self._seen[id(tensor)] = (weakref.ref(tensor), tensor._version, weakref.ref(saved))
            return saved

    def _offload(self, tensor: torch.Tensor, forward: _Forward) -> _Saved:
        data = tensor.detach()
        stride = tuple(data.stride()) if _dense(data) else None
        flat = data.as_strided((data.numel(),), (1,)) if stride is not None else data.contiguous().view(-1)
        segment = forward.segments[-1]
        layer = "x" if segment.layer is None else segment.layer
        nbytes = data.numel() * data.element_size()
        key = f"act{forward.serial}-s{len(forward.segments) - 1}-l{layer}-{len(segment.saved)}"
        assert self.store is not None
        if self._staging is not None:
            buffer = self._staging.take(nbytes)
            host = buffer[:nbytes].view(flat.dtype)
            to_disk = functools.partial(self._write_staged, key, host, buffer)
            self._writes[key] = then(copy_async(host, flat), to_disk)  # waited: returns the disk write it started
        else:
            self._writes[key] = self.store.write(key, flat)
        saved = _Saved(key, forward, len(forward.segments) - 1, data.dtype, data.shape, stride, data.device, nbytes)
        segment.saved.append(weakref.ref(saved))
        weakref.finalize(saved, self._retire, key).atexit = False  # at exit the store's own finalizer cleans up
        self._stats.offloaded_bytes += nbytes
        self._stats.offloaded_tensors += 1
        return saved

    def _unpack(self, packed: torch.Tensor | _Saved) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            if self._awaiting is not None:  # backward started on kept tensors (the head, kept last blocks)
                self._start_backward()
            return packed
        with self._lock:
            if self._closed:
                raise OffloadError(
                    f"saved activation {packed.key!r} was unpacked after ActivationOffload.close() freed it; "
                    "run backward before close()"
                )
            self._drain()
            if self._awaiting is packed.forward:
                self._awaiting = None  # this unpack starts the prefetch itself
            early = packed.fetch is not None
            segment = packed.forward.segments[packed.segment]
            if self.prefetch_layers > 0 and not segment.started:  # fetched early or not, the blocks below go now
                segment.started = True
                self._prefetch(packed.forward, packed.segment)
            if packed.fetch is None:
                self._fetch(packed)
            fetch, first = packed.fetch, packed.left == 0
            packed.left = (packed.left or packed.uses) - 1
            if packed.left == 0:  # the last of its saves: release the fetched tensor to autograd
                packed.fetch, packed.unpacked = None, True
            if first:  # a second save of the same tensor reuses the fetch: no hit, no wait
                hit = early and fetch.done()
                self._stats.prefetch_hits += hit
                self._stats.blocking_waits += not hit
        flat = fetch.wait()
        return flat.as_strided(packed.shape, packed.stride) if packed.stride is not None else flat.view(packed.shape)

    def _start_backward(self) -> None:
        """Fetch the tensors backward needs first, those of the last segment that offloaded any, while backward
        runs through what forward kept after it (the head and loss, blocks whose policy keeps them)."""
        with self._lock:
            forward, self._awaiting = self._awaiting, None
            if forward is None or self._closed or self.prefetch_layers == 0:
                return
            for index in range(len(forward.segments) - 1, -1, -1):
                segment = forward.segments[index]
                if any(ref() is not None for ref in segment.saved):
                    if not segment.started:
                        segment.started = True
                        self._prefetch(forward, index)
                    return

    def _prefetch(self, forward: _Forward, index: int) -> None:
        """Fetch segment `index`'s tensors and those of the `prefetch_layers` blocks below it (and code between)."""
        blocks = 0
        for below in range(index, -1, -1):
            segment = forward.segments[below]
            live = [saved for saved in (ref() for ref in segment.saved) if saved is not None and not saved.unpacked]
            for saved in live:
                if saved.fetch is None:
                    self._fetch(saved)
            blocks += below < index and bool(live) and segment.layer is not None
            if blocks == self.prefetch_layers:
                return

    def _fetch(self, saved: _Saved) -> None:
        """Start reading `saved` back onto its device."""
        assert self.store is not None
        self._finish_write(saved.key)
        numel = saved.nbytes // saved.dtype.itemsize
        if not isinstance(self.store, SwapFileStore):
            out = torch.empty(numel, dtype=saved.dtype, device=saved.device)
            saved.fetch = self.store.read(saved.key, out)
        elif self._staging is None:
            saved.fetch = self.store.read(saved.key)
        else:
            buffer = self._staging.take(saved.nbytes)
            host = buffer[: saved.nbytes].view(saved.dtype)
            upload = functools.partial(self._upload, buffer, host, saved.device)
            saved.fetch = then(self.store.read(saved.key, host), upload)
        self._stats.fetched_bytes += saved.nbytes

    def _write_staged(self, key: str, host: torch.Tensor, buffer: torch.Tensor) -> Handle[None]:
        """Start writing a GPU tensor staged in a pooled buffer to disk; the buffer goes back once written."""
        return then(self.store.write(key, host), functools.partial(self._staging.give, buffer))

    def _upload(self, buffer: torch.Tensor, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Copy a tensor read from disk into a pinned buffer onto `device`, and give the buffer back."""
        out = copy_async(torch.empty_like(host, device=device), host).wait()
        self._staging.give(buffer)
        return out

    def _poll_writes(self) -> None:
        """Release the sources of the finished writes, the oldest first; start the disk writes of staged copies."""
        while self._writes:
            key, write = next(iter(self._writes.items()))
            if not write.done():
                break  # a slow one only delays the release of later ones
            del self._writes[key]
            follow = write.wait()
            if follow is not None:
                self._writes[key] = follow
            else:
                _ = key in self.store  # settles the store's own handle, which holds the source tensor

    def _finish_write(self, key: str) -> None:
        """Wait for `key`'s write under way, if any, raising its error; the store then drops the source."""
        write = self._writes.pop(key, None)
        while write is not None:
            write = write.wait()  # a staged GPU copy returns the disk write it started
        _ = key in self.store

    def _retire(self, key: str) -> None:
        """Autograd freed a saved tensor: free its entry now, or at the next hook call if one is running."""
        self._dead.append(key)
        if self._lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._lock.release()

    def _drain(self) -> None:
        """Free the store entries of saved tensors that autograd freed (called with the lock held)."""
        while self._dead:
            key = self._dead.popleft()
            if self._closed or self.store is None:
                continue
            with contextlib.suppress(Exception):  # a failed write of a tensor nobody needs any more
                self._finish_write(key)
            with contextlib.suppress(KeyError):
                self.store.delete(key)


def apply_activation_offload(
    model: torch.nn.Module, config: ActivationOffloadConfig, nvme: NvmeConfig, device: torch.device
) -> ActivationOffload | None:
    """Apply the recompute policy to `model` in place and build the offload hooks for its forwards.

    Modules marked "recompute" (the outermost of nested ones) get their `forward` run under
    `torch.utils.checkpoint.checkpoint(use_reentrant=False)`; the model object and its state_dict keys
    stay the same.

    Args:
        model: the model (after parallelization) whose training forwards run in `forward_context()`.
        config: device (none, cpu, nvme), path, min_bytes, prefetch_layers and policy.
        nvme: the NVMe I/O engine's settings, for device "nvme".
        device: the device the model computes on (GPU tensors are staged in pinned memory).
    Returns:
        The offload, or None when there is nothing to do (device none and no module to recompute).
    Raises:
        ValueError: a policy pattern matches no module, "offload" is asked for with device none, or
            device nvme has no path.
    """
    policies = module_policies(model, config.policy)
    recomputed = apply_recompute(model, policies)
    tracked = {model.get_submodule(name): choice for name, choice in policies.items() if changes_policy(name, policies)}
    settings = {"min_bytes": config.min_bytes, "prefetch_layers": config.prefetch_layers}
    if config.device == "none":
        offloaded = sorted(name for name, choice in policies.items() if choice == "offload")
        if offloaded:
            raise ValueError(
                f"offload.activations.policy marks {offloaded[:3]} 'offload' but offload.activations.device is "
                "'none'; set device to cpu or nvme, or mark them keep or recompute"
            )
        return ActivationOffload(model, None, {}, **settings) if recomputed else None
    if config.device == "nvme" and not config.path:
        raise ValueError(
            "offload.activations.device='nvme' needs offload.activations.path; set it to a directory on a local "
            "NVMe disk, or use device cpu"
        )
    if not repeated_blocks(model) and "offload" not in policies.values():
        warnings.warn(
            f"{type(model).__name__} has no repeated blocks and offload.activations.policy marks no module "
            "'offload': no activation will be offloaded; name the modules to offload in the policy",
            stacklevel=2,
        )
    pinned = device.type == "cuda" and pin_memory_available()
    if config.device == "cpu":
        return ActivationOffload(model, CpuStore(pinned=pinned), tracked, **settings)
    staging = BufferPool(pinned) if device.type == "cuda" else None
    return ActivationOffload(model, SwapFileStore(config.path, nvme), tracked, staging=staging, **settings)


def _dense(tensor: torch.Tensor) -> bool:
    """Whether the tensor's elements fill a gap-free block of memory (any dimension order)."""
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(tensor.shape, tensor.stride(), strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _storage_pointer(tensor: torch.Tensor) -> int | None:
    """The address of the tensor's storage; None for tensors without one (subclasses, fake tensors)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
