"""Atomic, reshardable checkpoints through torch.distributed.checkpoint (DCP).

    root/
      latest                     the name of the newest complete checkpoint, e.g. "step-00000100"
      step-00000100/
        .metadata, __0_0.distcp  DCP's files: every rank writes its own shards, replicated tensors once
        extras-rank0.pt, ...     each rank's extras (step, RNG, scheduler...), read with weights_only=True
        meta.json                written last: step, world size, time, versions, the extras files
      .tmp-step-00000200-1a2b/   a save in progress, or one a crash cut short (the next save removes it)

A save fills a ``.tmp-*`` directory, renames it to ``step-N``, and only then replaces `latest` (write
``latest.tmp``, fsync, ``os.replace``): a crash at any moment leaves `latest` naming a complete
checkpoint. Re-saving an existing step first points `latest` at a hard-linked copy of the old one.
One job owns a root, and every rank sees it at the same path (a shared filesystem across nodes).

DCP matches tensors by key and global shape, so a state saved as ``Shard(0)`` DTensors on N ranks
loads into full tensors on one process or other shardings on M ranks. Non-tensor leaves (numbers,
strings, tuples, None) are saved once and written back into the dict given to `load_checkpoint`.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

from tidal.runtime.deferred import DeferredTensors, WeightsOnlyLoadPlanner

LATEST = "latest"
"""Name of the pointer file in a root; it holds the directory name of the newest complete checkpoint."""
META = "meta.json"
"""Written last into a checkpoint directory: a directory without it is an unfinished save."""
TEMP_PREFIX = ".tmp-"
"""Directories of saves in progress; any other than the one `latest` names is stale once a save ends."""
_STEP_DIR = re.compile(r"step-(\d+)")
# DCP warns on every no_dist call; tidal asks for no_dist on purpose when there is no process group.
_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message names the path, the cause and the fix."""


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint of `step` inside a root: ``step-00000100`` for 100."""
    return f"step-{step:08d}"


def extras_name(rank: int) -> str:
    """The file name of rank `rank`'s extras inside a checkpoint directory."""
    return f"extras-rank{rank}.pt"


@dataclass(frozen=True)
class _Ranks:
    """The ranks taking part in a collective save or load: a process group, or this process alone."""

    group: dist.ProcessGroup | None
    distributed: bool
    rank: int
    size: int

    @classmethod
    def of(cls, process_group: dist.ProcessGroup | None) -> _Ranks:
        if not dist.is_initialized():
            return cls(None, False, 0, 1)
        return cls(process_group, True, dist.get_rank(process_group), dist.get_world_size(process_group))

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, by rank (collective when distributed)."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value, group=self.group)
        return out

    def raise_first(self, errors: list[str | None]) -> None:
        """Raise the lowest rank's error on every rank, so that all of them leave the collective together."""
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            rank, message = failed[0]
            raise CheckpointError(message if self.size == 1 else f"rank {rank}: {message}")


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    extras: dict[str, Any],
    *,
    keep: int | None = None,
    process_group: dist.ProcessGroup | None = None,
    deferred: DeferredTensors | None = None,
) -> Path:
    """Save `state` and this rank's `extras` as the checkpoint of `step` under `root`; collective.

    Args:
        root: the checkpoint root; created when missing.
        step: the training step, a non-negative int; it names the directory ``step-{step:08d}``.
        state: nested dicts/lists whose leaves are tensors, DTensors and python values; tensors are
            saved by DCP (each rank its own shards, replicated tensors once), python values once.
        extras: this rank's own things (step, RNG, scheduler, scaler, config); saved with torch.save
            and checked to load back with ``torch.load(weights_only=True)``.
        keep: keep this many newest complete checkpoints (by step) and delete older ones; None keeps
            all. The one `latest` names is never deleted.
        process_group: the group saving together; None is the default group, or this process alone
            when torch.distributed is not initialized.
        deferred: the placeholders in `state` that stand for tensors read one at a time as they are written.
    Returns:
        The checkpoint directory, ``root/step-{step:08d}``, on every rank.
    Raises:
        ValueError: `step` or `keep` is not a valid number.
        CheckpointError: on every rank, when any rank failed (unwritable root, full disk, extras that
            weights_only loading cannot read); `latest` and earlier checkpoints are then untouched.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} must be a non-negative integer")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep={keep!r} must be a positive integer, or None to keep every checkpoint")
    ranks = _Ranks.of(process_group)
    root = Path(root)
    final = root / checkpoint_name(step)
    payload, error = _attempt(lambda: _serialize_extras(extras))
    temp = None
    if ranks.rank == 0 and error is None:
        temp, error = _attempt(lambda: _make_temp_dir(root, step))
    gathered = ranks.gather((temp, error))
    temp = gathered[0][0]
    try:
        ranks.raise_first([e for _, e in gathered])
        fix = f"check the free space and permissions under {root}"
        planner = (deferred or DeferredTensors()).save_planner()
        storage = {"storage_writer": dcp.FileSystemWriter(temp), "planner": planner}
        _call_dcp(dcp.save, f"writing the state to {temp}", fix, ranks, state, **storage)
        _, error = _attempt(lambda: _write_file(temp / extras_name(ranks.rank), payload))
        ranks.raise_first(ranks.gather(error))
        if ranks.rank == 0:
            _, error = _attempt(lambda: _publish(root, temp, final, step, ranks.size))
            if error is not None:
                error = f"publishing {temp} as {final} failed: {error}; `latest` still names a complete checkpoint"
        ranks.raise_first(ranks.gather(error))
    except CheckpointError:
        if ranks.rank == 0 and temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    if ranks.rank == 0:
        _prune(root, keep)
    # No rank runs ahead (to a load, or a next save of the same root) before rank 0 has pruned.
    ranks.gather(None)
    return final


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint directory `root/latest` names, or None when there is none (a fresh start).

    Raises:
        CheckpointError: `latest` cannot be read, or names a directory that is missing or has no
            meta.json (an unfinished save). No other checkpoint is picked in its place.
    """
    root = Path(root)
    pointer = root / LATEST
    try:
        name = _latest_name(root)
    except OSError as exc:
        raise CheckpointError(f"cannot read {pointer}: {exc}; make it readable or delete it to start fresh") from exc
    if name is None:
        return None
    if not name or name != Path(name).name or name in (".", ".."):
        raise CheckpointError(f"{pointer} holds {name!r}, not a directory name inside {root}; delete it or fix it")
    path = root / name
    if not (path / META).is_file():
        what = "has no meta.json (an unfinished save)" if path.exists() else "does not exist"
        raise CheckpointError(
            f"{pointer} names {path}, which {what}; write the name of a complete checkpoint (a directory "
            f"holding {META}) into {pointer}, or delete {pointer} to start fresh"
        )
    return path


def load_checkpoint(
    path_or_root: str | os.PathLike,
    state: dict[str, Any],
    *,
    process_group: dist.ProcessGroup | None = None,
    deferred: DeferredTensors | None = None,
) -> dict[str, Any]:
    """Load a checkpoint into `state` in place and return this rank's extras; collective.

    Args:
        path_or_root: a checkpoint directory (holding meta.json), or a root whose `latest` is used.
        state: the same keys as saved, every tensor leaf allocated at its global shape (a plain tensor
            or a DTensor of any sharding); DCP copies the saved values into them, resharding as needed.
            Non-tensor leaves are replaced in these dicts by the saved values.
        process_group: the group loading together; None as in `save_checkpoint`.
        deferred: the placeholders in `state` whose loaded values are written back one at a time.
    Returns:
        This rank's extras (tensors mapped to the CPU). A rank the saving job did not have (a job
        resumed on more ranks) gets rank 0's extras: step and scheduler are right, but its RNG state
        is rank 0's, so that rank's random stream repeats rank 0's.
    Raises:
        CheckpointError: no checkpoint at `path_or_root`, a key or shape of `state` the checkpoint
            lacks, or unreadable files; the message names the path.
    """
    path = _resolve(Path(path_or_root))
    ranks = _Ranks.of(process_group)
    storage = {"storage_reader": dcp.FileSystemReader(path), "planner": WeightsOnlyLoadPlanner(deferred)}
    fix = "`state` must hold the saved keys at their saved global shapes"
    _call_dcp(dcp.load, f"loading the state from {path}", fix, ranks, state, **storage)
    extras = path / extras_name(ranks.rank)
    if not extras.is_file():
        extras = path / extras_name(0)
    try:
        return torch.load(extras, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"loading {extras} failed: {_cause(exc)}; the checkpoint {path} is damaged") from exc


def _attempt(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(fn(), None)``, or ``(None, message)`` when it raised: a rank's failure, to share with the others."""
    try:
        return fn(), None
    except Exception as exc:
        return None, _cause(exc)


def _cause(exc: BaseException) -> str:
    """One line on what went wrong; for DCP's wrapped failures, the first failing rank's exception."""
    if isinstance(exc, CheckpointError):
        return str(exc)
    if isinstance(exc, CheckpointException) and exc.failures:
        rank = min(exc.failures)
        inner, _ = exc.failures[rank]
        return f"{_cause(inner)} (rank {rank})"
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if unsafe:  # torch's weights_only message is a page long; this is the line that matters
        return f"it holds a {unsafe.group(1)}, which torch.load(weights_only=True) refuses"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _serialize_extras(extras: dict[str, Any]) -> bytes:
    try:
        return _round_trip(extras)
    except Exception as exc:
        raise CheckpointError(
            f"{_first_unloadable(extras, 'extras')} cannot be read back by torch.load(weights_only=True): "
            f"{_cause(exc)}; keep extras to tensors, numbers, strings, None, lists, tuples and dicts "
            "(capture_rng() gives RNG states in that form)"
        ) from exc


def _round_trip(value: Any) -> bytes:
    """torch.save `value`, check that weights_only loading reads it back, and return the bytes."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    return buffer.getvalue()


def _first_unloadable(value: Any, where: str) -> str:
    """The innermost dict entry under `value` that fails `_round_trip`, as ``extras['a']['b']``."""
    for key, item in value.items() if isinstance(value, dict) else ():
        try:
            _round_trip(item)
        except Exception:
            return _first_unloadable(item, f"{where}[{key!r}]")
    return where


def _make_temp_dir(root: Path, step: int) -> Path:
    temp = root / f"{TEMP_PREFIX}{checkpoint_name(step)}-{uuid.uuid4().hex[:12]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        temp.mkdir()
    except OSError as exc:
        raise CheckpointError(
            f"cannot create the checkpoint directory {temp}: {_cause(exc)}; make {root} a writable directory "
            "or choose another root"
        ) from exc
    return temp


def _call_dcp(
    fn: Callable[..., Any], what: str, fix: str, ranks: _Ranks, state: dict[str, Any], **storage: Any
) -> None:
    """Run DCP's save or load; DCP shares a failure with every rank, so all of them raise."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
            fn(state, process_group=ranks.group, no_dist=not ranks.distributed, **storage)
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"{what} failed: {_cause(exc)}; {fix}") from exc


def _write_file(path: Path, data: bytes) -> None:
    """Write and fsync `path`, so that a rename after it cannot publish a file the disk does not hold."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise CheckpointError(f"writing {path} failed: {_cause(exc)}; check the free space and permissions") from exc


def _fsync_dir(path: Path) -> None:
    """Make renames and new entries in the directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(root: Path, temp: Path, final: Path, step: int, world_size: int) -> None:
    """Finish `temp` (meta.json last), rename it to `final`, then point `latest` at it (rank 0)."""
    import tidal  # here, not at the top: the package's __init__ imports the engine, which imports this

    meta = {
        "step": step,
        "world_size": world_size,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tidal_version": tidal.__version__,
        "torch_version": torch.__version__,
        "extras": [extras_name(r) for r in range(world_size)],
    }
    _write_file(temp / META, json.dumps(meta, indent=2).encode())
    _fsync_dir(temp)
    leftovers = []
    if final.exists():
        if _latest_name(root) == final.name:
            # `latest` must name a complete directory while `final` is swapped: a hard-linked copy (the
            # renames this module relies on need a POSIX filesystem, and those all have hard links).
            backup = root / f"{TEMP_PREFIX}{final.name}-{uuid.uuid4().hex[:12]}-previous"
            shutil.copytree(final, backup, copy_function=os.link)
            _fsync_dir(backup)
            _point_latest(root, backup.name)
            leftovers.append(backup)
        old = root / f"{TEMP_PREFIX}{final.name}-{uuid.uuid4().hex[:12]}-replaced"
        os.rename(final, old)
        leftovers.append(old)
    try:
        os.rename(temp, final)
    except OSError:
        if leftovers:  # a failed save leaves the previous checkpoint where it was
            os.rename(leftovers[-1], final)
        raise
    _fsync_dir(root)
    _point_latest(root, final.name)
    for path in leftovers:
        _remove(path)


def _point_latest(root: Path, name: str) -> None:
    """Replace `root/latest` atomically: it names `name` or what it named before, never a torn write."""
    staging = root / f"{LATEST}.tmp"
    _write_file(staging, f"{name}\n".encode())
    os.replace(staging, root / LATEST)
    _fsync_dir(root)


def _latest_name(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None


def _prune(root: Path, keep: int | None) -> None:
    """Remove stale ``.tmp-*`` directories (with one warning) and the complete checkpoints beyond
    the newest `keep`; never the one `latest` names. A failure here only warns: the save succeeded."""
    latest = _latest_name(root)
    stale = sorted(p for p in root.iterdir() if p.name.startswith(TEMP_PREFIX) and p.name != latest)
    if stale:
        names = ", ".join(p.name for p in stale)
        warnings.warn(
            f"removing {len(stale)} unfinished checkpoint directories in {root} left by interrupted saves: {names}",
            stacklevel=3,
        )
    doomed = list(stale)
    if keep is not None:
        complete = sorted(
            (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and (p / META).is_file()
        )
        doomed += [p for _, p in complete[:-keep] if p.name != latest]
    for path in doomed:
        _remove(path)


def _remove(path: Path) -> None:
    """Delete a directory; a checkpoint is renamed to a ``.tmp-*`` name first, so a crash midway
    leaves a stale directory the next save removes rather than a half-deleted checkpoint."""
    try:
        if not path.name.startswith(TEMP_PREFIX):
            doomed = path.with_name(f"{TEMP_PREFIX}{path.name}-{uuid.uuid4().hex[:12]}-pruned")
            os.rename(path, doomed)
            path = doomed
        shutil.rmtree(path)
    except OSError as exc:
        warnings.warn(f"could not remove {path}: {_cause(exc)}; delete it by hand", stacklevel=2)


def _resolve(path: Path) -> Path:
    """A checkpoint directory from a directory or a root (through its `latest`)."""
    if (path / META).is_file():
        return path
    found = latest_checkpoint(path)
    if found is not None:
        return found
    what = "is neither a checkpoint (no meta.json: a partial save) nor a root (no 'latest')"
    raise CheckpointError(
        f"{path} {what if path.exists() else 'does not exist'}; pass a checkpoint directory (a step-* "
        "directory holding meta.json) or the root given to save_checkpoint"
    )
