"""One training step (forward + backward) of the real model under fake tensors: bytes per module.

    trace = trace_model(model, batch, precision="bf16")            # any nn.Module and an example batch
    trace = trace_causal_lm(LlamaConfig(...), micro_batch=1, seq_len=2048, precision="bf16")
    trace.total.param_bytes, trace.total.grad_bytes, trace.total.saved_bytes, trace.forward_peak_bytes  # bytes
    trace.module("model.layers.0.mlp").saved_bytes; trace.subtree("model.layers.0").saved_bytes
    [block.saved_bytes for block in trace.blocks()]                 # per transformer layer

The step runs under torch's `FakeTensorMode`: every tensor has its real shape, dtype and strides but no
data, so a 70B model traces on a laptop in seconds. The model's own parameters and buffers are replaced
for the step by fake ones (`torch.func.functional_call`; the model is not changed), so the model may live
on the meta device, on the CPU, or anywhere else. Tensors claim the CPU: autocast follows CPU's op lists
and attention follows CPU's kernels.

What is recorded:
- parameter, buffer and gradient bytes per module (its own, not its children's; a tied parameter counts
  at the first module that owns it, as `named_parameters` lists it);
- saved activations: every tensor autograd saves for backward (`saved_tensors_hooks`), counted by the
  bytes of its storage, once however often it is saved, at the innermost module running when it was
  first saved (the root "" outside any module). Storages of parameters, buffers and the batch are not
  activations (they live on anyway), nor are views of them. Copies of parameters that autocast made and
  autograd saved (the bf16 weights a matmul keeps for backward) are counted apart, in
  `saved_param_cast_bytes`: one low-precision copy of the weights, alive from forward to backward (a
  run that keeps or gathers its parameters in that dtype would not make them);
- live bytes of all tensor storages (parameters, buffers, batch, activations, temporaries, gradients)
  at their high-water mark in forward and in backward, seen at the dispatcher. Not counted: kernels'
  internal scratch space and the allocator's caching and fragmentation;
- floating-point operations of forward and of backward (torch's `FlopCounterMode`: matmuls, convolutions
  and attention; elementwise ops count 0), and of each repeated block's forward; and the ops dispatched.

Gradients start as None (``zero_grad(set_to_none=True)``); optimizer state is not traced.

Limits: the bytes are those of torch's meta kernels, which match the CPU kernels except in rare cases
(layer_norm given a bf16 input and an fp32 weight keeps its per-row mean and rstd in fp32 on the CPU;
the meta kernel says bf16). Models whose shapes depend on data (token routing in MoE layers, ``nonzero``)
or that call ops without a meta kernel for their dtypes cannot run under fake tensors and raise torch's
error.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from tidal.config import PrecisionConfig
from tidal.parallel.data import repeated_blocks
from tidal.runtime.precision import autocast

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class ModuleRecord:
    """Bytes of one module in a traced step: its own, not its children's (see `ModelTrace.subtree`)."""

    name: str
    """Qualified name as `named_modules` gives it; "" is the root."""
    type_name: str
    """Class name, e.g. "LlamaDecoderLayer"."""
    param_bytes: int = 0
    """Parameters it owns directly, bytes (a tied parameter counts at its first owner only)."""
    buffer_bytes: int = 0
    """Buffers it owns directly, bytes."""
    grad_bytes: int = 0
    """Gradients of its parameters after backward, bytes (0 for frozen parameters)."""
    saved_bytes: int = 0
    """Saved activations it saved first while innermost running module, bytes of distinct storages."""
    saved_tensors: int = 0
    """Distinct storages behind `saved_bytes`, count."""
    saved_param_cast_bytes: int = 0
    """Autocast's low-precision copies of parameters that it saved for backward, bytes."""

    def __add__(self, other: ModuleRecord) -> ModuleRecord:
        """Field-wise sum of the byte counts, keeping this record's name and type."""
        counts = {
            f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)[2:]
        }  # after the name, type
        return ModuleRecord(self.name, self.type_name, **counts)


@dataclass(frozen=True)
class ModelTrace:
    """What one forward + backward of a model costs, per module and in total, in bytes."""

    modules: tuple[ModuleRecord, ...]
    """One record per module, in `named_modules` order (the root "" first)."""
    block_names: tuple[str, ...]
    """Qualified names of the repeated blocks (transformer layers), `repeated_blocks` order; may be empty."""
    precision: str
    """Compute dtype the step ran in: "fp32", "bf16" or "fp16" (autocast over fp32 parameters)."""
    input_bytes: int
    """The batch (all tensors passed to the model), bytes of distinct storages."""
    forward_peak_bytes: int
    """Highest live bytes during forward and the loss (parameters, buffers, batch, activations, temporaries)."""
    after_forward_bytes: int
    """Live bytes when backward starts: parameters, buffers, batch, saved tensors and the loss."""
    backward_peak_bytes: int
    """Highest live bytes during backward (what is live when it starts, plus temporaries and gradients)."""
    after_backward_bytes: int
    """Live bytes after backward: parameters, buffers, batch and gradients (saved tensors are freed)."""
    forward_flops: int = 0
    """Floating-point operations of forward and the loss, count (`FlopCounterMode`'s: a multiply-add is 2)."""
    backward_flops: int = 0
    """Floating-point operations of backward, count."""
    block_forward_flops: tuple[int, ...] = ()
    """Forward floating-point operations of each repeated block (its subtree), `block_names` order, count."""
    forward_ops: int = 0
    """Ops dispatched in forward and the loss (views included), count."""
    backward_ops: int = 0
    """Ops dispatched in backward, count."""
    forward_point: tuple[int, int] = (0, 0)
    """At forward's high-water mark: (bytes other than parameters, buffers, batch and parameter casts,
    bytes of autocast's parameter casts)."""
    backward_points: tuple[tuple[int, int, int], ...] = ()
    """Moments of backward that may hold its high-water mark however gradients, activations and casts are
    scaled (those no other moment exceeds in all three): (other bytes, gradient bytes, parameter-cast bytes),
    other as in `forward_point`. A rank that keeps ``f`` of the gradients and ``a`` of the rest peaks in
    backward at ``max(a * other + f * grads + ...)`` over them."""

    @property
    def total(self) -> ModuleRecord:
        """The whole model's bytes: every record summed (`subtree` of the root)."""
        return self.subtree("")

    def module(self, name: str) -> ModuleRecord:
        """The record of the module called `name` (its own bytes only)."""
        for record in self.modules:
            if record.name == name:
                return record
        raise KeyError(f"no module {name!r} in this trace; names look like {self.modules[-1].name!r}")

    def subtree(self, name: str) -> ModuleRecord:
        """The bytes of module `name` and everything inside it, summed into one record named `name`."""
        total = ModuleRecord(name, self.module(name).type_name)
        prefix = f"{name}." if name else ""
        for record in self.modules:
            if record.name == name or record.name.startswith(prefix):
                total += record
        return total

    def blocks(self) -> list[ModuleRecord]:
        """`subtree` of each repeated block (transformer layer), in order."""
        return [self.subtree(name) for name in self.block_names]


def trace_model(
    model: torch.nn.Module,
    batch: Any,
    *,
    precision: str | PrecisionConfig = "fp32",
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
) -> ModelTrace:
    """Trace one forward + backward of `model` on `batch` under fake tensors; see the module doc.

    Args:
        model: any module, on any device (meta included); it runs in its current train/eval mode and is
            left unchanged (its parameters are swapped for fake ones during the step only).
        batch: a Mapping (called as ``model(**batch)``), a tuple or list (``model(*batch)``) or one value
            (``model(batch)``); its tensors only give shapes, dtypes and strides (values are not read).
        precision: "fp32", "bf16" or "fp16" (autocast, as `tidal.runtime.precision` runs it), or the config.
        loss_fn: turns the model's output into the scalar loss; default: the output's ``loss`` (attribute
            or key), else the sum of the output tensor.
    Raises:
        ValueError: an unknown precision.
    """
    config = precision if isinstance(precision, PrecisionConfig) else _precision_config(precision)
    names = {module: name for name, module in model.named_modules()}
    with FakeTensorMode(allow_non_fake_inputs=True):
        params = {n: _fake_like(p) for n, p in model.named_parameters()}
        buffers = {n: _fake_like(b) for n, b in model.named_buffers()}
        fake_batch = _fake_tree(batch)
        owned = set(map(id, _storages([*params.values(), *buffers.values()])))
        inputs = _storages(tree_leaves(fake_batch))
        live = _LiveBytes(params=owned)
        live.track(*params.values(), *buffers.values(), *tree_leaves(fake_batch))
        base = live.current
        grad_hooks = [
            p.register_post_accumulate_grad_hook(lambda p: live.mark_grad(p.grad))
            for p in params.values()
            if p.requires_grad
        ]
        saved = _SavedTensorRecorder(live, excluded=owned | set(map(id, inputs)))
        hooks = _register_stack_hooks(model, saved.stack)
        forward_flops, backward_flops = _flop_counter(), _flop_counter()
        try:
            # the counters sit under `live`: ops they decompose to count are not live-byte events
            with forward_flops, live, saved, autocast(config, "cpu"):
                output = _call(model, {**params, **buffers}, fake_batch)
                loss = (loss_fn or _default_loss)(output)
            del output  # a training loop keeps only the loss
            forward_peak, after_forward, forward_ops = live.peak, live.current, live.ops
            forward_point = (live.peak_point[0] - base, live.peak_point[2])
            live.reset_peak()
            live.points = []
            with backward_flops, live:
                loss.backward()
            del loss
            backward_peak, after_backward = live.peak, live.current
            backward_points = _upper_points([(o - base, g, c) for o, g, c in live.points])
        finally:
            for hook in (*hooks, *grad_hooks):
                hook.remove()
    records = _records(names, params, buffers, saved)
    block_names = tuple(names[block] for block in repeated_blocks(model))
    by_module = forward_flops.get_flop_counts()  # keyed "<root class>.<qualified name>"
    return ModelTrace(
        modules=tuple(records),
        block_names=block_names,
        precision=config.dtype,
        input_bytes=sum(storage.nbytes() for storage in inputs),
        forward_peak_bytes=forward_peak,
        after_forward_bytes=after_forward,
        backward_peak_bytes=backward_peak,
        after_backward_bytes=after_backward,
        forward_flops=forward_flops.get_total_flops(),
        backward_flops=backward_flops.get_total_flops(),
        block_forward_flops=tuple(
            sum(by_module.get(f"{type(model).__name__}.{name}", {}).values()) for name in block_names
        ),
        forward_ops=forward_ops,
        backward_ops=live.ops - forward_ops,
        forward_point=forward_point,
        backward_points=backward_points,
    )


def _upper_points(points: list[tuple[int, int, int]]) -> tuple[tuple[int, int, int], ...]:
    """The points no other point reaches or exceeds in every coordinate (the only candidates for the
    maximum of a combination with non-negative weights), in order of their first coordinate."""
    out: list[tuple[int, int, int]] = []
    for p in sorted(set(points), reverse=True):
        if not any(q[1] >= p[1] and q[2] >= p[2] for q in out):  # every q kept has q[0] >= p[0]
            out.append(p)
    return tuple(sorted(out))


def trace_causal_lm(
    model: torch.nn.Module | PretrainedConfig,
    *,
    micro_batch: int,
    seq_len: int,
    precision: str | PrecisionConfig = "fp32",
) -> ModelTrace:
    """Trace one step of a causal LM on `micro_batch` x `seq_len` tokens (``input_ids`` and ``labels``).

    Args:
        model: a transformers model, or a transformers config, which is built on the meta device in train
            mode (no memory, whatever its size).
        micro_batch: sequences per step, count.
        seq_len: tokens per sequence, count.
        precision: as for `trace_model`.
    """
    if not isinstance(model, torch.nn.Module):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model)
        model.train()
    ids = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
    return trace_model(model, {"input_ids": ids, "labels": ids}, precision=precision)


def _cpu_attention_flops(query, key, value, *_: Any, out_shape: Any = None, **__: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *_: Any, out_shape: Any = None, **__: Any) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _flop_counter() -> FlopCounterMode:
    """torch's counter, plus the CPU flash-attention kernels the traced step runs (torch counts the CUDA ones)."""
    aten = torch.ops.aten
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
    }
    return FlopCounterMode(display=False, custom_mapping=cpu_attention)


class _LiveBytes(TorchDispatchMode):
    """Live and peak bytes of fake tensors' storages, by storage identity (`LiveTensorTracker`'s rule
    for real ones): a storage counts from the op that creates it until it is freed; views and in-place
    ops add nothing. It also knows which storages are autocast's copies of the `params` storages."""

    def __init__(self, params: set[int]) -> None:
        super().__init__()
        self.current = 0
        """Bytes of the counted storages alive now."""
        self.peak = 0
        """Highest `current` since made or `reset_peak`."""
        self.ops = 0
        """Ops dispatched through this mode, count."""
        self.grads = 0
        """Bytes of the counted storages that are parameters' gradients (`mark_grad`)."""
        self.casts = 0
        """Bytes of the counted storages that are autocast's copies of parameters."""
        self.peak_point = (0, 0, 0)
        """(`current` less grads and casts, grads, casts) when `peak` was reached."""
        self.points: list[tuple[int, int, int]] | None = None
        """When a list: the same triple after each storage counted."""
        self._grad_ids: set[int] = set()
        self._params = params
        self._lock = threading.RLock()
        self._live: dict[int, tuple[int, weakref.ref, bool]] = {}
        """id(storage) -> (bytes, weak reference that releases it, whether it is a parameter's cast)."""

    def track(self, *tensors: torch.Tensor) -> None:
        """Count the storages of tensors that exist already."""
        with self._lock:
            for storage in _storages(tensors):
                self._add(storage, cast=False)

    def reset_peak(self) -> None:
        self.peak = self.current
        self.peak_point = self._point()

    def mark_grad(self, grad: torch.Tensor | None) -> None:
        """Count `grad`'s storage as a gradient from now on (autograd accumulated it into a parameter)."""
        if grad is None:
            return
        with self._lock:
            for storage in _storages([grad]):
                self._add(storage, cast=False)
                key = id(storage)
                if key not in self._grad_ids and not self._live[key][2]:
                    self._grad_ids.add(key)
                    self.grads += self._live[key][0]
            self._moved()

    def _point(self) -> tuple[int, int, int]:
        return (self.current - self.grads - self.casts, self.grads, self.casts)

    def _moved(self) -> None:
        if self.points is not None:
            self.points.append(self._point())

    def is_param_cast(self, storage: torch.UntypedStorage) -> bool:
        """Whether `storage` was made by copying a parameter to another dtype (autocast's weight cast)."""
        entry = self._live.get(id(storage))
        return entry is not None and entry[1]() is storage and entry[2]

    def _add(self, storage: torch.UntypedStorage, cast: bool) -> None:
        key = id(storage)
        entry = self._live.get(key)
        if entry is not None and entry[1]() is storage:
            return
        nbytes = storage.nbytes()
        self._live[key] = (nbytes, weakref.ref(storage, lambda _: self._release(key)), cast)
        self.current += nbytes
        self.casts += nbytes if cast else 0
        if self.current > self.peak:
            self.peak = self.current
            self.peak_point = self._point()
        self._moved()

    def _release(self, key: int) -> None:
        with self._lock:
            entry = self._live.pop(key, None)
            if entry is not None:
                self.current -= entry[0]
                self.casts -= entry[0] if entry[2] else 0
                if key in self._grad_ids:
                    self._grad_ids.discard(key)
                    self.grads -= entry[0]

    def __torch_dispatch__(self, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        inputs = {id(s) for s in _storages(tree_leaves((args, kwargs)))}
        cast = func is torch.ops.aten._to_copy.default and bool(inputs & self._params)
        with self._lock:
            for storage in _storages(tree_leaves(out)):
                if id(storage) not in inputs:  # an input returned as is (a view, an in-place op)
                    self._add(storage, cast)
        return out


class _SavedTensorRecorder(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that charge each saved storage once to the innermost running module."""

    def __init__(self, live: _LiveBytes, excluded: set[int]) -> None:
        super().__init__(self._pack, _unpack)
        self.stack: list[str] = []
        """Names of the running modules, outermost first (kept by the module hooks)."""
        self.saved: dict[str, list[int]] = {}
        """Module name -> [activation bytes, activation storages, parameter-cast bytes]."""
        self._live = live
        self._excluded = excluded
        self._seen: dict[int, weakref.ref] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        for storage in _storages([tensor]):
            key = id(storage)
            seen = self._seen.get(key)
            if key in self._excluded or (seen is not None and seen() is storage):
                continue
            self._seen[key] = weakref.ref(storage)
            counts = self.saved.setdefault(self.stack[-1] if self.stack else "", [0, 0, 0])
            if self._live.is_param_cast(storage):
                counts[2] += storage.nbytes()
            else:
                counts[0] += storage.nbytes()
                counts[1] += 1
        return tensor


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _register_stack_hooks(model: torch.nn.Module, stack: list[str]) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that keep `stack` equal to the names of the modules running now."""

    def leave(*_: object) -> None:  # a forward hook's return value would replace the module's output
        stack.pop()

    hooks = []
    for name, module in model.named_modules():
        hooks.append(module.register_forward_pre_hook(lambda *_, name=name: stack.append(name)))
        hooks.append(module.register_forward_hook(leave, always_call=True))
    return hooks


def _records(
    names: dict[torch.nn.Module, str],
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    saved: _SavedTensorRecorder,
) -> list[ModuleRecord]:
    counts: dict[str, dict[str, int]] = {name: {} for name in names.values()}
    for tensors, field in ((params, "param_bytes"), (buffers, "buffer_bytes")):
        for qualified, tensor in tensors.items():
            owner = counts[qualified.rpartition(".")[0]]
            owner[field] = owner.get(field, 0) + _nbytes(tensor)
            if field == "param_bytes" and tensor.grad is not None:
                owner["grad_bytes"] = owner.get("grad_bytes", 0) + _nbytes(tensor.grad)
    for name, (nbytes, count, cast) in saved.saved.items():
        counts[name].update(saved_bytes=nbytes, saved_tensors=count, saved_param_cast_bytes=cast)
    return [ModuleRecord(name, type(module).__name__, **counts[name]) for module, name in names.items()]


def _precision_config(precision: str) -> PrecisionConfig:
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision={precision!r} is not one of fp32, bf16, fp16; pass one of those")
    return PrecisionConfig(dtype=precision)


def _fake_like(tensor: torch.Tensor) -> torch.Tensor:
    """A fake CPU tensor with `tensor`'s shape, strides, dtype and requires_grad (call under fake mode)."""
    fake = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu")
    return fake.requires_grad_(tensor.requires_grad)


def _fake_tree(tree: Any) -> Any:
    """`tree` with each tensor replaced by `_fake_like` of it; a tensor found twice (labels=input_ids) is
    replaced by one fake."""
    fakes: dict[int, torch.Tensor] = {}

    def fake(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) not in fakes:
            fakes[id(value)] = _fake_like(value)
        return fakes[id(value)]

    return tree_map(fake, tree)


def _storages(tensors: Iterable[Any]) -> list[torch.UntypedStorage]:
    """The distinct storages of the tensors among `tensors` (none for tensors without one)."""
    found: dict[int, torch.UntypedStorage] = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            try:
                storage = tensor.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            found.setdefault(id(storage), storage)
    return list(found.values())


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _call(model: torch.nn.Module, tensors: dict[str, torch.Tensor], batch: Any) -> Any:
    """`model` on `batch` with its parameters and buffers replaced by `tensors` for this call only."""
    if isinstance(batch, Mapping):
        return torch.func.functional_call(model, tensors, (), dict(batch))
    return torch.func.functional_call(model, tensors, tuple(batch) if isinstance(batch, tuple | list) else (batch,))


def _default_loss(output: Any) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(output, torch.Tensor):
        return output.sum()
    raise TypeError(
        f"the model returned {type(output).__name__} with no `loss`; pass loss_fn= to turn it into a scalar loss"
    )
