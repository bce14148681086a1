"""`tidal.init()` and `tidal.shutdown()`: one process's entry into and exit from a job.

init discovers the process's place (`tidal.launch.env`), picks its device (`tidal.runtime.device`),
opens the process group, reads the config (the argument, then the launcher's ``--config`` and
``--set``), and builds the Topology. The result is one immutable `Context`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType

import torch.distributed as dist

from tidal.config import Config, ConfigError
from tidal.launch.env import ProcessInfo, discover, rendezvous_store
from tidal.parallel.topology import Topology
from tidal.runtime.device import Device, select_device

CONFIG_ENV = "TIDAL_CONFIG"
"""Path of the config file `tidal launch --config` passes to its workers."""
OVERRIDES_ENV = "TIDAL_SET"
"""JSON list of ``key=value`` overrides `tidal launch` passes to its workers (--set, --tp, ...)."""


@dataclass(frozen=True)
class Context:
    """What `tidal.init()` found and built for this process."""

    config: Config
    topology: Topology
    device: Device
    process: ProcessInfo
    owns_process_group: bool
    """tidal opened the process group (and `shutdown` closes it); False when the caller had one open."""

    @property
    def rank(self) -> int:
        return self.process.rank

    @property
    def world_size(self) -> int:
        return self.process.world_size

    @property
    def local_rank(self) -> int:
        return self.process.local_rank


_active: Context | None = None
"""The one context of this process; `init` is idempotent, so it returns this while it is set."""


def resolve_config(config: Config | Mapping | str | os.PathLike | None = None) -> Config:
    """The config a worker runs with: `config` (else the launcher's --config file, else defaults),
    then the launcher's overrides on top (command-line flags win, as with any CLI)."""
    source = config if config is not None else os.environ.get(CONFIG_ENV) or None
    raw = os.environ.get(OVERRIDES_ENV, "[]")
    try:
        overrides = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{OVERRIDES_ENV}={raw!r} is not a JSON list of 'key=value' strings"]) from exc
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError([f"{OVERRIDES_ENV}={raw!r} is not a JSON list of 'key=value' strings"])
    return Config.load(source, overrides=overrides)


def init(config: Config | Mapping | str | os.PathLike | None = None) -> Context:
    """Join the job this process belongs to and return its `Context`.

    Args:
        config: a `Config`, a dict, a YAML file or a DeepSpeed JSON file; None takes the file passed by
            ``tidal launch --config`` or the defaults. The launcher's ``--set``/``--tp``... apply on top.
    Returns:
        The context; a second call returns the same one (calling with a different config is an error).
    Raises:
        ConfigError: a bad config, or a global batch size that does not match the parallel sizes.
        TopologyError: parallel sizes that do not fit the world.
        DiscoveryError: a launcher's environment that does not say where this process belongs.
    """
    global _active
    _record_uncaught_exceptions()
    cfg = resolve_config(config)
    if _active is not None:
        if config is not None and cfg != _active.config:
            raise RuntimeError("tidal.init() was already called with another config; call tidal.shutdown() first")
        return _active
    info = discover()
    device = select_device(info.local_rank, cfg.device)
    device.activate()
    timeout = timedelta(seconds=cfg.comm.timeout_s)
    owns = not dist.is_initialized()
    if owns:
        _open_process_group(info, device, timeout)
    elif dist.get_world_size() != info.world_size and info.source != "single":
        raise RuntimeError(
            f"a process group of {dist.get_world_size()} ranks is already open, but the launcher says the world "
            f"has {info.world_size}; close it (dist.destroy_process_group()) before tidal.init()"
        )
    try:
        p = cfg.parallel
        topology = Topology(
            pp=p.pp, dp=None if p.dp == "auto" else p.dp, sp=p.sp, tp=p.tp, ep=p.ep, device_type=device.type
        )
        _check_global_batch(cfg, topology.grid.dp)
    except BaseException:
        if owns:
            dist.destroy_process_group()
        raise
    _active = Context(cfg, topology, device, info, owns)
    return _active


def shutdown() -> None:
    """Leave the job: close the process group tidal opened. Safe to call twice or without init."""
    global _active
    if _active is not None and _active.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _active = None


def current() -> Context | None:
    """The active context, or None before `init` / after `shutdown`."""
    return _active


def _open_process_group(info: ProcessInfo, device: Device, timeout: timedelta) -> None:
    kwargs = {"backend": device.backend, "timeout": timeout, "rank": info.rank, "world_size": info.world_size}
    if device.type == "cuda":
        kwargs["device_id"] = device.torch_device
    if info.source == "single":
        dist.init_process_group(store=dist.HashStore(), **kwargs)
    else:
        dist.init_process_group(store=rendezvous_store(info, timeout), **kwargs)


def _check_global_batch(cfg: Config, dp: int) -> None:
    t = cfg.train
    if t.global_batch_size is None:
        return
    per_step = t.micro_batch_size * t.gradient_accumulation_steps * dp
    if per_step != t.global_batch_size:
        raise ConfigError(
            [
                f"train.global_batch_size={t.global_batch_size} but micro_batch_size={t.micro_batch_size} x "
                f"gradient_accumulation_steps={t.gradient_accumulation_steps} x dp={dp} = {per_step}; "
                "change one of them so they agree, or leave global_batch_size unset"
            ]
        )


def _record_uncaught_exceptions() -> None:
    """Write an uncaught exception to the elastic error file, so `tidal launch` prints the failing
    rank's traceback in its summary (torch's ``@record`` does this, but only for decorated functions)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or getattr(sys.excepthook, "_tidal", False):
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        stack = "".join(traceback.format_exception(kind, value, tb))
        # The schema torch.distributed.elastic reads back for its failure summary.
        record = {"message": {"message": f"{kind.__name__}: {value}", "extraInfo": {"py_callstack": stack}}}
        record["message"]["extraInfo"]["timestamp"] = str(int(time.time()))
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps(record))
        previous(kind, value, tb)

    hook._tidal = True  # type: ignore[attr-defined]
    sys.excepthook = hook
