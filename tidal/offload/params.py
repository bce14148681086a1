"""Parameter offload for ZeRO-3: each block's FSDP2 shards live on NVMe between uses and are read back just
before FSDP2 all-gathers them, the next block's read started early (forward order in forward, reverse in backward).

    for block in blocks:
        fully_shard(block, mesh=mesh, offload_policy=fsdp_offload_policy(config.offload.params, device))
    fully_shard(model, mesh=mesh, offload_policy=fsdp_offload_policy(config.offload.params, device))
    offload = apply_param_offload(model, blocks, config.offload.params, config.offload.nvme, device)
    loss.backward()
    with offload.resident_for_step():       # or offload.attach_optimizer(optimizer) once
        optimizer.step()
    offload.close()                         # parameters resident again, swap files removed

Where parameters live between uses (`offload.params.device`):

- nvme: in one file per sharded parameter (`NvmeStore` under `offload.params.path`). On the CPU the shards
  are host tensors already; on CUDA `fsdp_offload_policy` makes fully_shard keep them in unpinned host memory
  (torch copies them to the GPU for the all-gather) and this module streams that memory from disk.
- cpu: on CUDA torch's own `CPUOffloadPolicy` (pinned) does all of it, and `apply_param_offload` returns None.
  On the CPU the shards are in host memory already (the CPU is their home), so it returns None as well.
- The root module's own parameters (embeddings, final norm, tied head) stay resident: they are used first
  and last in every step, so streaming them would only stall both ends of the step.

One shard's life (`FSDPParam._sharded_param_data`, the padded 1-D tensor that the DTensor parameter's local
tensor views): freed by resizing its storage to 0 bytes, read back into the same storage (so every view,
the optimizer's DTensor parameter included, stays valid), freed again as soon as FSDP2's all-gather of its
block completed (the last block's is kept from forward into backward, which gathers it first). FSDP2 reads
only the gathered copy from then until the reshard, and forward and backward never change the shard, so
freeing writes nothing. Only `evict(changed=True)` (after the optimizer step)
and `load_state_dict` mark shards changed: they are written before they are freed next.

FSDP2 internals used (torch 2.13), only in `ParamOffload._hook` and the functions after the class: each block's
`FSDPParamGroup` (`_get_fsdp_state()._fsdp_param_groups`); its `unshard` and `wait_for_unshard`, wrapped per
instance (they are the one path to the all-gather in forward, backward and every prefetch); its `lazy_init`,
run early so FSDP2's first-forward re-padding never reads a freed shard; its `is_sharded`,
`_all_gather_result` and `_training_state` (whether an all-gather will read the shards, and in which pass);
`FSDPParam._sharded_param_data`. A torch without them fails in `apply_param_offload`, naming what is missing.
Not supported after `apply_param_offload`: `model.to()`/`.float()` (FSDP2 re-pads shards) and
`load_state_dict(assign=True)` (it replaces the parameters); apply offload last.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy

from tidal.config import NvmeConfig, ParamOffloadConfig
from tidal.offload.nvme_store import NvmeStore
from tidal.offload.store import Store
from tidal.runtime.device import Device, Handle

_GROUP_ATTRIBUTES = (
    "unshard",
    "wait_for_unshard",
    "lazy_init",
    "fsdp_params",
    "is_sharded",
    "is_unsharded",
    "_all_gather_result",
    "_training_state",
)


@dataclass
class _Shard:
    """One sharded parameter's data on this rank and where it is."""

    key: str
    data: torch.Tensor
    """`FSDPParam._sharded_param_data`: 1-D, the whole of its storage."""
    param: torch.Tensor
    """The DTensor parameter the optimizer holds; its local tensor views `data`."""
    nbytes: int
    resident: bool = True
    """The storage holds the data (False: 0 bytes allocated)."""
    stored: bool = False
    """The store holds the same data as the storage (freeing needs no write)."""
    reading: Handle[torch.Tensor] | None = None


def fsdp_offload_policy(config: ParamOffloadConfig, device: Device) -> OffloadPolicy:
    """The `offload_policy` for fully_shard: torch's CPU offload on CUDA (pinned for cpu, pageable for nvme)."""
    if device.type == "cuda" and config.device in ("cpu", "nvme"):
        return CPUOffloadPolicy(pin_memory=config.device == "cpu")
    return OffloadPolicy()


def apply_param_offload(
    model: torch.nn.Module, blocks: list[torch.nn.Module], config: ParamOffloadConfig, nvme: NvmeConfig, device: Device
) -> ParamOffload | None:
    """Stream the shards of `blocks` (each already fully_shard-ed, as is `model`) from NVMe; None when not needed.

    Args:
        model: the root FSDP2 module; its own parameters stay resident.
        blocks: the repeated blocks in forward order, each passed to fully_shard before.
        config: `offload.params`; device none or cpu returns None (see the module docstring).
        nvme: the NVMe I/O engine settings.
        device: this rank's compute device.
    Raises:
        ValueError: device nvme without a path, or a block's shards not in host memory.
        RuntimeError: a block is not fully_shard-ed, or this torch's FSDP2 lacks what the hooks use.
    """
    if config.device == "none":
        return None
    if config.device == "cpu":
        on_device = [n for n, p in model.named_parameters() if p.device.type != "cpu"]
        if device.type == "cuda" and on_device:
            raise ValueError(
                f"offload.params.device=cpu, but {on_device[0]} (and {len(on_device) - 1} more) are sharded on "
                f"{device.type}; pass offload_policy=fsdp_offload_policy(config.offload.params, device) to every "
                "fully_shard call"
            )
        return None
    if config.path is None:
        raise ValueError("offload.params.device=nvme needs a directory; set offload.params.path=/nvme/dir")
    groups = [group for block in blocks for group in _fsdp2_groups(block)]
    for group in groups:
        group.lazy_init()  # FSDP2 re-pads shards here once; with a shard freed it would copy from 0 bytes
    shards = [[_shard(f"{i}.{j}", p) for j, p in enumerate(group.fsdp_params)] for i, group in enumerate(groups)]
    shards = [[s for s in unit if s.nbytes > 0] for unit in shards]
    offload = ParamOffload(model, groups, shards, NvmeStore(config.path, nvme))
    offload.evict(offload.params(), changed=True)
    return offload


class ParamOffload:
    """The streamed shards of a model's blocks; build it with `apply_param_offload`."""

    def __init__(self, model: torch.nn.Module, groups: list[Any], shards: list[list[_Shard]], store: Store) -> None:
        self.store = store
        self._groups = groups
        self._units = shards
        """Per FSDPParamGroup in forward order, its non-empty shards."""
        self._by_param = {id(s.param): s for unit in shards for s in unit}
        self._handles = [
            model.register_state_dict_pre_hook(lambda *_: self.materialize(self.params())),
            model.register_load_state_dict_pre_hook(lambda *_: self._materialize_for_change()),
        ]
        for index, group in enumerate(groups):
            self._hook(index, group)
        self._closed = False

    def params(self) -> list[torch.Tensor]:
        """The streamed parameters (FSDP2's DTensors, as the optimizer holds them)."""
        return [s.param for unit in self._units for s in unit]

    def resident_bytes(self) -> int:
        """Bytes of streamed shards in memory now (storage sizes), on this rank."""
        return sum(s.data.untyped_storage().nbytes() for unit in self._units for s in unit)

    def prefetch(self, params: Iterable[torch.Tensor]) -> None:
        """Start reading these parameters back (not waiting); `materialize` finishes the reads."""
        for s in self._shards(params):
            self._start_read(s)

    def materialize(self, params: Iterable[torch.Tensor]) -> None:
        """Make these parameters resident (blocking; the reads run together); others are ignored."""
        shards = self._shards(params)
        for s in shards:
            self._start_read(s)
        for s in shards:
            self._finish_read(s)

    def evict(self, params: Iterable[torch.Tensor], changed: bool) -> None:
        """Free these parameters' memory, writing them first when `changed` (blocking; writes run together)."""
        shards = self._shards(params)
        for s in shards:
            self._finish_read(s)
            s.stored = s.stored and not (changed and s.resident)
        writes = [(s, self.store.write(s.key, s.data)) for s in shards if s.resident and not s.stored]
        for s, handle in writes:
            handle.wait()
            s.stored = True
        for s in shards:
            if s.resident:
                s.data.untyped_storage().resize_(0)
                s.resident = False

    @contextlib.contextmanager
    def resident(self, changed: bool = False) -> Iterator[None]:
        """Every streamed parameter resident inside the block; evicted after (written back when `changed`)."""
        params = self.params()
        self.materialize(params)
        try:
            yield
        finally:
            self.evict(params, changed)

    def resident_for_step(self) -> contextlib.AbstractContextManager[None]:
        """Around `optimizer.step()`: all parameters resident, written back and freed after the step."""
        return self.resident(changed=True)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Make every `optimizer.step()` run as inside `resident_for_step()` (step hooks; removed by close)."""
        self._handles += [
            optimizer.register_step_pre_hook(lambda *_: self.materialize(self._optimizer_params(optimizer))),
            optimizer.register_step_post_hook(lambda *_: self.evict(self._optimizer_params(optimizer), True)),
        ]

    def close(self) -> None:
        """Make every parameter resident again, unhook FSDP2 and the optimizer, remove the swap files."""
        if self._closed:
            return
        self.materialize(self.params())
        for group in self._groups:
            for name in ("unshard", "wait_for_unshard"):
                vars(group).pop(name, None)
        for handle in self._handles:
            handle.remove()
        self.store.close()
        self._closed = True

    def _hook(self, index: int, group: Any) -> None:
        """Wrap this FSDPParamGroup's `unshard` (read before, prefetch the next) and `wait_for_unshard` (free after)."""
        unshard, wait_for_unshard = group.unshard, group.wait_for_unshard

        def unshard_resident(async_op: bool = False) -> None:
            if _will_gather(group):
                self.materialize([s.param for s in self._units[index]])
            step = -1 if _in_backward(group) else 1
            if 0 <= index + step < len(self._groups) and _will_gather(self._groups[index + step]):
                for s in self._units[index + step]:
                    self._start_read(s)
            unshard(async_op)

        def wait_then_free() -> None:
            wait_for_unshard()
            # backward gathers the last block first: keep its shard from forward instead of re-reading it
            keep = index == len(self._groups) - 1 and torch.is_grad_enabled() and not _in_backward(group)
            if group.is_unsharded and not keep:
                self.evict([s.param for s in self._units[index]], changed=False)

        group.unshard, group.wait_for_unshard = unshard_resident, wait_then_free

    def _start_read(self, s: _Shard) -> None:
        if not s.resident and s.reading is None:
            s.data.untyped_storage().resize_(s.nbytes)
            s.reading = self.store.read(s.key, out=s.data)

    def _finish_read(self, s: _Shard) -> None:
        if s.reading is not None:
            handle, s.reading = s.reading, None
            handle.wait()
            s.resident = True

    def _materialize_for_change(self) -> None:
        """Before load_state_dict: everything resident and marked changed (written when next freed)."""
        self.materialize(self.params())
        for unit in self._units:
            for s in unit:
                s.stored = False

    def _shards(self, params: Iterable[torch.Tensor]) -> list[_Shard]:
        return [s for s in (self._by_param.get(id(p)) for p in params) if s is not None]

    @staticmethod
    def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [p for group in optimizer.param_groups for p in group["params"]]


def _fsdp2_groups(block: torch.nn.Module) -> list[Any]:
    """The FSDPParamGroups of a fully_shard-ed block, checked for everything the hooks use."""
    if not isinstance(block, FSDPModule):
        raise RuntimeError(
            f"block {type(block).__name__} is not fully_shard-ed; call fully_shard on every block and on the root "
            "before apply_param_offload"
        )
    groups = getattr(block._get_fsdp_state(), "_fsdp_param_groups", None)
    missing = [a for g in groups or [] for a in _GROUP_ATTRIBUTES if not hasattr(g, a)]
    if groups is None or missing:
        raise RuntimeError(
            f"torch {torch.__version__}'s FSDP2 lacks FSDPState._fsdp_param_groups or FSDPParamGroup.{missing}, "
            "which tidal's parameter offload hooks (written for torch 2.13); use torch 2.13 or "
            "offload.params.device=none"
        )
    return groups


def _shard(key: str, fsdp_param: Any) -> _Shard:
    """The record of one FSDPParam's shard, checked to be a host tensor owning all of its storage."""
    data = getattr(fsdp_param, "_sharded_param_data", None)
    name = getattr(fsdp_param, "_param_fqn", key)
    if type(data) is not torch.Tensor:
        raise RuntimeError(
            f"parameter {name}: FSDPParam._sharded_param_data is {type(data).__name__}, not a plain tensor (torch "
            f"{torch.__version__} or a tensor subclass); use torch 2.13 without subclassed parameters, or "
            "offload.params.device=none"
        )
    if data.device.type != "cpu":
        raise ValueError(
            f"parameter {name} is sharded on {data.device}, but offload.params.device=nvme streams host memory; "
            f"pass offload_policy=fsdp_offload_policy(config.offload.params, device) to every fully_shard call"
        )
    nbytes = data.numel() * data.element_size()
    if data.storage_offset() != 0 or data.untyped_storage().nbytes() != nbytes:
        raise RuntimeError(
            f"parameter {name}: its shard ({nbytes} bytes) shares a storage of {data.untyped_storage().nbytes()} "
            "bytes; freeing it would free other tensors; use offload.params.device=none for this model"
        )
    return _Shard(key, data, fsdp_param.sharded_param, nbytes)


def _will_gather(group: Any) -> bool:
    """Whether the group's next `unshard` all-gathers from the sharded data (not a no-op or post-forward mesh)."""
    return group._all_gather_result is None and group.is_sharded


def _in_backward(group: Any) -> bool:
    """Whether the group is being unsharded for backward (pre-backward or a backward prefetch)."""
    return group._training_state.name == "PRE_BACKWARD"
