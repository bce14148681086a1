"""Cluster jobs on Ray: ``tidal ray`` and ``tidal.ray.run``, on Ray Train's TorchTrainer.

    tidal ray --workers 4 --max-failures 2 --set checkpoint.dir=/shared/ckpt --set checkpoint.interval=50 \\
        examples/train_gpt.py --steps 1000
    result = tidal.ray.run(train, workers=4, max_failures=2, config="tidal.yaml")

Ray Train does what a cluster job needs and tidal should not own: it places the workers (one placement
group), opens the process group, restarts every worker when one fails (``FailureConfig``) and keeps a
run directory (``RunConfig.storage_path``). tidal adds what its own launcher gives a rank:

- **Discovery.** Before user code runs, Ray Train sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` and opens the default process group
  (``env://``). ``tidal.init()`` reads those variables and reuses that group: no user code changes.
- **Config.** ``--config`` travels as text (workers on other nodes need not see the file) and becomes
  the worker's ``TIDAL_CONFIG``; ``--set``/``--tp``... become ``TIDAL_SET``, as under ``tidal launch``.
- **Placement.** tp is the innermost dimension, so a tensor-parallel group is tp consecutive ranks, and
  Ray Train numbers ranks node by node. With tp equal to the world, the placement group is
  ``STRICT_PACK`` (one node); otherwise ``PACK``, and every worker checks before user code runs that its
  tp group lies on its node, failing with the fix if not.
- **Restarts.** A restarted attempt runs the user code again from the top; it resumes from its latest
  tidal checkpoint (``engine.load``) as after a ``tidal launch --max-restarts`` restart. tidal's
  checkpoints are already on storage every rank shares, so Ray Train's checkpoints are not used.
- **Results.** Rank 0 returns the final metrics of the run's Engine and its latest checkpoint path.
- **Logs.** Every line a worker's Python code writes to stdout or stderr starts with ``[rank<N>]: ``.

Without an address, a Ray for this job alone is started in-process on loopback and stopped at the end.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import runpy
import shutil
import string
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from tidal.config import Config
from tidal.launch.local import PREFIX_TEMPLATE, LaunchError
from tidal.parallel.topology import RankGrid
from tidal.runtime.checkpoint import latest_checkpoint
from tidal.runtime.context import CONFIG_ENV, OVERRIDES_ENV
from tidal.runtime.engine import ENGINE_ATTR, Engine

DRIVER_ENV = {
    # Ray folds lines that differ only in numbers, so "[rank0]: ..." and "[rank1]: ..." would merge.
    "RAY_DEDUP_LOGS": "0",
    # Ray Train also sends print() to a logger that writes to stderr: every line would show twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
"""Set (unless already set) in the driver before Ray is imported."""
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Set for the in-process Ray: a one-machine Ray, whose node address is loopback (Ray reads it at import)."""


class RayJobError(RuntimeError):
    """A Ray job that failed beyond its restart budget; the message names the failed ranks and their errors."""


@dataclass(frozen=True)
class RayResult:
    """What a finished Ray job returns."""

    metrics: dict[str, Any]
    """Rank 0's final metrics: the Engine's (step, loss, rates, summary) or what the train function returned."""
    checkpoint: str | None
    """The latest tidal checkpoint of the run's checkpoint root; None when it saved none."""
    path: str
    """Ray Train's run directory (under ``storage``)."""

    def summary(self) -> str:
        """One line: the metrics summary (or the metrics), then the checkpoint path."""
        shown = self.metrics.get("summary") or ", ".join(f"{k} {v}" for k, v in self.metrics.items())
        loss = self.metrics.get("loss")
        parts = [shown or "no metrics", *([f"final loss {loss:.4f}"] if isinstance(loss, float) else [])]
        return " | ".join([*parts, f"checkpoint {self.checkpoint or 'none'}"])


@dataclass(frozen=True)
class Script:
    """A Python script run as a Ray worker's train function, as ``python SCRIPT ARGS`` would run it."""

    path: str
    args: tuple[str, ...] = ()

    def __call__(self) -> Engine | None:
        """Run the script as ``__main__`` with ``sys.argv`` and ``sys.path[0]`` set as Python sets them.

        Returns:
            The tidal Engine left among the script's globals (for the job's metrics), or None.
        Raises:
            RuntimeError: the script called ``sys.exit`` with a non-zero code or a message.
        """
        argv, path = sys.argv, list(sys.path)
        sys.argv = [self.path, *self.args]
        sys.path.insert(0, os.path.dirname(self.path))
        try:
            scope = runpy.run_path(self.path, run_name="__main__")
        except SystemExit as stop:
            if stop.code in (None, 0):
                return None
            raise RuntimeError(f"{self.path} exited with {stop.code!r}") from None
        finally:
            sys.argv, sys.path[:] = argv, path
        return next(filter(None, map(_engine_of, scope.values())), None)


@dataclass(frozen=True)
class _Job:
    """What every worker runs and with which environment; pickled to the workers."""

    target: Callable[[], Any]
    config_name: str | None
    config_text: str | None
    overrides: tuple[str, ...]
    tp: int
    checkpoint_dir: str | None
    cwd: str


def run(
    train_fn: Callable[[], Any],
    *,
    workers: int,
    config: Config | Mapping | str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    address: str | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    max_failures: int = 0,
    storage: str | os.PathLike | None = None,
    name: str | None = None,
) -> RayResult:
    """Run `train_fn` on `workers` Ray Train workers, one rank each, and return rank 0's results.

    Args:
        train_fn: called with no arguments on every worker (bind arguments with functools.partial); it
            calls ``tidal.init()``/``tidal.wrap`` as under ``tidal launch``. It may return a dict of
            metrics, or the Engine or a wrapped model (the result then has its metrics and checkpoint).
            ``Script(path, args)`` runs a script file.
        config: the workers' base config: a Config, a mapping, a YAML/DeepSpeed JSON file, or None.
        overrides: ``KEY=VALUE`` overrides, applied on top of any config the user code passes to init.
        address: the Ray cluster, "auto", HOST:PORT or ray://HOST:PORT; None starts a local Ray for the
            job (an already open Ray session is used as it is).
        cpus_per_worker, gpus_per_worker: what Ray reserves for each worker.
        max_failures: restarts of every worker after a failure; -1 restarts without limit.
        storage: root of Ray Train's run directories; None is Ray's default (~/ray_results).
        name: the run directory's name; None lets Ray Train choose.
    Returns:
        The final metrics and checkpoint path (also printed).
    Raises:
        RayJobError: a worker failed more than `max_failures` times.
        LaunchError, ConfigError, TopologyError: arguments that cannot work, before any worker starts.
    """
    for flag, value, low in (("workers", workers, 1), ("gpus-per-worker", gpus_per_worker, 0)):
        if value < low:
            raise LaunchError(f"--{flag}={value} must be at least {low}")
    if cpus_per_worker <= 0 or max_failures < -1:
        raise LaunchError(f"--cpus-per-worker={cpus_per_worker} must be > 0, --max-failures={max_failures} >= -1")
    cfg = Config.load(config, overrides=overrides)
    p = cfg.parallel
    RankGrid.create(workers, pp=p.pp, dp=None if p.dp == "auto" else p.dp, sp=p.sp, tp=p.tp, ep=p.ep)
    job = _job(train_fn, config, tuple(overrides), cfg)
    ray = _import_ray(local=address is None)
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    gpus = gpus_per_worker > 0 and cfg.device != "cpu"
    trainer = TorchTrainer(
        functools.partial(_worker_main, job),
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=gpus,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus else {})},
            placement_strategy=placement_strategy(p.tp, workers),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage).resolve()) if storage else None,
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    with _connected(ray, address, cpus=math.ceil(workers * cpus_per_worker)):
        try:
            result = trainer.fit()
        except TrainingFailedError as failure:
            raise RayJobError(failure_message(failure, max_failures)) from None
    final = result.return_value or {}
    out = RayResult(final.get("metrics", {}), final.get("checkpoint"), str(result.path))
    print(f"tidal ray: finished: {out.summary()}", flush=True)
    return out


def placement_strategy(tp: int, workers: int) -> str:
    """Ray's placement strategy for the job's workers: STRICT_PACK (one node) when one tp group is the
    whole job, else PACK (as few nodes as fit; each worker then checks its tp group is on its node)."""
    return "STRICT_PACK" if 1 < tp == workers else "PACK"


def failure_message(failure: Exception, max_failures: int) -> str:
    """What a failed job reports: the budget, then each failed rank with its error (a worker that died
    first, as the likely cause; the others usually failed waiting on it)."""
    budget = "no restarts allowed" if max_failures == 0 else f"after {max_failures} restart(s)"
    failures = getattr(failure, "worker_failures", None)
    if not failures:
        return f"the job failed ({budget}): {failure}"
    ranks = sorted(failures, key=lambda rank: (not _died(failures[rank]), rank))
    listed = "\n".join(f"  rank {rank}: {_headline(failures[rank])}" for rank in ranks)
    return (
        f"the job failed ({budget}; raise --max-failures / max_failures to retry more)\n"
        f"failed workers:\n{listed}\nrank {ranks[0]}'s error (with its log file):\n{failures[ranks[0]]}"
    )


def _died(error: BaseException) -> bool:
    """True when the worker process itself died (killed, crashed) rather than raising."""
    return "died" in str(error).lower()


def _headline(error: BaseException) -> str:
    """One line for a failed rank: that its process died, or the last line of its error."""
    if _died(error):
        return f"its process died ({type(error).__name__})"
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:200]


def _job(target: Callable[[], Any], config: object, overrides: tuple[str, ...], cfg: Config) -> _Job:
    """The job the workers run: a script path made absolute, the config as text, the driver's directory."""
    if isinstance(target, Script):
        if not Path(target.path).is_file():
            raise LaunchError(f"script {target.path!r} does not exist; give the path of a Python file")
        target = Script(str(Path(target.path).resolve()), tuple(target.args))
    name, text = None, None
    if isinstance(config, (str, os.PathLike)):
        name, text = Path(config).name, Path(config).read_text()
    elif config is not None:
        name, text = "config.yaml", Config.load(config).to_yaml()
    return _Job(target, name, text, overrides, cfg.parallel.tp, cfg.checkpoint.dir, os.getcwd())


def _import_ray(local: bool) -> Any:
    """Import Ray with the driver's settings; the local-only setting only when Ray is not imported yet
    (its node address is fixed at import, and a driver and its workers must agree on it)."""
    for name, value in DRIVER_ENV.items():
        os.environ.setdefault(name, value)
    if local and "ray" not in sys.modules:
        for name, value in LOCAL_ENV.items():
            os.environ.setdefault(name, value)
    import ray

    return ray


@contextlib.contextmanager
def _connected(ray: Any, address: str | None, cpus: int) -> Iterator[None]:
    """Join the cluster for the job: the caller's Ray session if one is open (left open), else the
    cluster at `address`, else a new local Ray with at least `cpus` CPUs (stopped at the end)."""
    if ray.is_initialized():
        yield
        return
    if address is None:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus), include_dashboard=False)
    else:
        try:
            ray.init(address=address)
        except ConnectionError as exc:
            raise LaunchError(
                f"no Ray cluster answers at --address {address}: {exc}; start one (ray start --head) "
                "or leave --address out to run on a local Ray"
            ) from exc
    try:
        yield
    finally:
        ray.shutdown()


def _worker_main(job: _Job) -> dict[str, Any] | None:
    """What every Ray Train worker runs: check placement, set up the rank's output and environment, run
    the job; rank 0 returns the final metrics and checkpoint (Ray Train hands that to the driver)."""
    import ray.train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    with _rank_prefixed_output(rank), _job_environment(job):
        check_tp_placement(job.tp, rank, context.get_local_rank(), context.get_local_world_size())
        value = job.target()
        if rank != 0:
            return None
        engine = _engine_of(value)
        if engine is not None:
            metrics, root = engine_metrics(engine), engine.config.checkpoint.dir
        else:
            metrics, root = dict(value) if isinstance(value, Mapping) else {}, job.checkpoint_dir
        latest = latest_checkpoint(root) if root else None
    return {"metrics": metrics, "checkpoint": os.path.abspath(latest) if latest else None}


def check_tp_placement(tp: int, rank: int, local_rank: int, local_world_size: int) -> None:
    """Fail unless `rank`'s tensor-parallel group lies on its node.

    Ray Train numbers ranks node by node, so this node holds ranks [rank - local_rank, that +
    local_world_size); the tp group is ranks [rank - rank % tp, that + tp), tp being innermost.
    """
    first, group = rank - local_rank, rank - rank % tp
    if first <= group and group + tp <= first + local_world_size:
        return
    raise RuntimeError(
        f"rank {rank}'s tensor-parallel group (ranks {group}..{group + tp - 1}) spans nodes: this node holds "
        f"ranks {first}..{first + local_world_size - 1}. Size --cpus-per-worker/--gpus-per-worker so that each "
        f"node takes a multiple of tp={tp} workers, or lower tp"
    )


def engine_metrics(engine: Engine) -> dict[str, Any]:
    """An Engine's final metrics: the step reached, the last step's loss and rates, and the summary line."""
    last = engine.metrics.history[-1] if engine.metrics.history else None
    return {
        "step": engine.global_step,
        "loss": last.loss if last else None,
        "tokens_per_s": last.tokens_per_s if last else None,
        "samples_per_s": last.samples_per_s if last else None,
        "summary": engine.metrics.summary(),
    }


def _engine_of(value: object) -> Engine | None:
    """The Engine `value` is, or the one behind a wrapped model or optimizer; else None."""
    if isinstance(value, Engine):
        return value
    if isinstance(value, (torch.nn.Module, torch.optim.Optimizer)):
        return getattr(value, ENGINE_ATTR, None)
    return None


@contextlib.contextmanager
def _job_environment(job: _Job) -> Iterator[None]:
    """What `tidal launch` gives a rank: TIDAL_CONFIG (the config text, written to a temporary file),
    TIDAL_SET, and the driver's working directory when this node has it (Ray Train chdirs elsewhere).
    Nothing is restored afterwards: Ray ends the worker process with the attempt."""
    folder = tempfile.mkdtemp(prefix="tidal-ray-")
    os.environ[OVERRIDES_ENV] = json.dumps(list(job.overrides))
    os.environ.pop(CONFIG_ENV, None)
    if job.config_text is not None:
        path = Path(folder) / job.config_name
        path.write_text(job.config_text)
        os.environ[CONFIG_ENV] = str(path)
    if os.path.isdir(job.cwd):
        os.chdir(job.cwd)
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _LinePrefixer:
    """A text stream that starts every line written through it with `prefix`; the rest is `stream`'s."""

    def __init__(self, stream: TextIO, prefix: str) -> None:
        self._stream = stream
        self._prefix = prefix
        self._at_line_start = True

    def write(self, text: str) -> int:
        pieces = []
        for line in text.splitlines(keepends=True):
            if self._at_line_start:
                pieces.append(self._prefix)
            pieces.append(line)
            self._at_line_start = line.endswith(("\n", "\r"))
        self._stream.write("".join(pieces))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _rank_prefixed_output(rank: int) -> Iterator[None]:
    """Prefix this worker's stdout and stderr lines with its rank, as `tidal launch` does."""
    prefix = string.Template(PREFIX_TEMPLATE).substitute(rank=rank)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _LinePrefixer(sys.stdout, prefix), _LinePrefixer(sys.stderr, prefix)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams
