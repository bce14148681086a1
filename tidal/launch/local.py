"""Start a job's worker processes: torch.distributed.elastic on each node, or `mpiexec`.

Process supervision (restarts, rendezvous, stopping every rank when one fails, killing whole process
groups on SIGTERM) is torch.distributed.elastic's; this module only turns tidal's launch options into
its LaunchConfig, passes the config to the workers, and reports a failure in one readable summary.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tidal.runtime.context import CONFIG_ENV, OVERRIDES_ENV

PR_SET_CHILD_SUBREAPER = 36
"""prctl option (linux/prctl.h): orphaned descendants re-parent to this process instead of init."""
PREFIX_TEMPLATE = "[rank${rank}]: "
"""Every worker line on the launcher's console starts with its global rank."""


class LaunchError(ValueError):
    """Launch options that cannot work; the message says what to change."""


@dataclass(frozen=True)
class LaunchOptions:
    """What to start and how; fields mirror torchrun's flags."""

    target: str
    """The script path, or the module name when `module` is set."""
    args: tuple[str, ...] = ()
    module: bool = False
    nproc_per_node: int = 1
    nnodes: str = "1"
    """Node count, or an elastic range "MIN:MAX"."""
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_backend: str = "c10d"
    rdzv_id: str | None = None
    max_restarts: int = 0
    monitor_interval: float = 0.1
    """Seconds between the agent's looks at its workers: how soon a failed rank stops the others."""
    log_dir: str | None = None
    tee: str = "3"
    """Streams copied to the console with the rank prefix: 0 none, 1 stdout, 2 stderr, 3 both."""
    redirects: str = "0"
    config_file: str | None = None
    overrides: tuple[str, ...] = ()
    launcher: str = "elastic"
    """"elastic" (torch.distributed.elastic) or "mpi" (mpiexec)."""
    mpi_args: tuple[str, ...] = field(default_factory=tuple)
    """Extra arguments for mpiexec (a hostfile, binding options)."""

    def node_range(self) -> tuple[int, int]:
        try:
            low, _, high = self.nnodes.partition(":")
            lo, hi = int(low), int(high or low)
        except ValueError:
            raise LaunchError(f"--nnodes={self.nnodes!r} is not N or MIN:MAX") from None
        if not 0 < lo <= hi:
            raise LaunchError(f"--nnodes={self.nnodes!r} needs 0 < MIN <= MAX")
        return lo, hi

    def command(self) -> list[str]:
        """The worker's command line: the same Python, unbuffered, running the script or module."""
        return [sys.executable, "-u", *(["-m"] if self.module else []), self.target, *self.args]


def worker_environment(opts: LaunchOptions) -> dict[str, str]:
    """The variables every worker gets on top of the launcher's environment (config and overrides)."""
    env = {OVERRIDES_ENV: json.dumps(list(opts.overrides))}
    if opts.config_file:
        path = Path(opts.config_file)
        if not path.is_file():
            raise LaunchError(f"--config {opts.config_file!r} is not a file")
        env[CONFIG_ENV] = str(path.resolve())
    if opts.nproc_per_node > 1:
        # Several ranks per node each with all cores would oversubscribe the CPU; torchrun does the same.
        env.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    return env


def launch(opts: LaunchOptions) -> int:
    """Run the job to its end and return the launcher's exit code (0 when every rank succeeded)."""
    if opts.nproc_per_node < 1:
        raise LaunchError(f"--nproc-per-node={opts.nproc_per_node} must be at least 1")
    if not opts.module and not Path(opts.target).is_file():
        raise LaunchError(f"script {opts.target!r} does not exist; give a path, or -m MODULE")
    if opts.launcher not in ("elastic", "mpi"):
        raise LaunchError(f"--launcher={opts.launcher!r} is not a launcher; choose elastic or mpi")
    os.environ.update(worker_environment(opts))
    _become_subreaper()
    try:
        return _launch_mpi(opts) if opts.launcher == "mpi" else _launch_elastic(opts)
    finally:
        stop_descendants()


def _launch_elastic(opts: LaunchOptions) -> int:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    min_nodes, max_nodes = opts.node_range()
    backend, endpoint, rdzv_configs = opts.rdzv_backend, opts.rdzv_endpoint, {}
    run_id = opts.rdzv_id or os.environ.get("TIDAL_RUN_ID", "tidal")
    if max_nodes == 1 and not endpoint and opts.master_port is None:
        # One node: the rendezvous store binds port 0, so the OS picks a free port and jobs never collide.
        backend, endpoint, run_id = "c10d", "127.0.0.1:0", str(uuid.uuid4())
    elif not endpoint:
        backend, endpoint = "static", f"{opts.master_addr}:{opts.master_port or 29500}"
        rdzv_configs = {"rank": opts.node_rank}
    config = LaunchConfig(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_per_node=opts.nproc_per_node,
        run_id=run_id,
        rdzv_endpoint=endpoint,
        rdzv_backend=backend,
        rdzv_configs=rdzv_configs,
        max_restarts=opts.max_restarts,
        monitor_interval=opts.monitor_interval,
        log_line_prefix_template=PREFIX_TEMPLATE,
        logs_specs=DefaultLogsSpecs(
            log_dir=opts.log_dir, redirects=Std.from_str(opts.redirects), tee=Std.from_str(opts.tee)
        ),
        shutdown_timeout=10,
    )
    command = opts.command()
    try:
        elastic_launch(config, command[0])(*command[1:])
    except ChildFailedError as failure:
        print(f"tidal launch: the job failed\n{failure.format_msg()}", file=sys.stderr, flush=True)
        return 1
    except SignalException as stop:
        print(f"tidal launch: stopped by {stop.sigval.name}; all workers were terminated", file=sys.stderr)
        return 128 + int(stop.sigval)
    return 0


def _launch_mpi(opts: LaunchOptions) -> int:
    mpiexec = shutil.which("mpiexec") or shutil.which("mpirun")
    if mpiexec is None:
        raise LaunchError("--launcher mpi needs mpiexec on PATH; pip install 'tidal[mpi]' (mpich + mpi4py)")
    lo, hi = opts.node_range()
    if lo != hi:
        raise LaunchError(f"--launcher mpi starts a fixed world; give --nnodes N, not {opts.nnodes!r}")
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30).stdout
    prefix = ["--tag-output"] if "Open MPI" in version or "OpenRTE" in version else ["-prepend-rank"]
    cmd = [mpiexec, "-n", str(lo * opts.nproc_per_node), *prefix, *opts.mpi_args, *opts.command()]
    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code != 0:
        print(f"tidal launch: mpiexec exited with code {code}; see the rank-prefixed lines above", file=sys.stderr)
        return code if code > 0 else 128 - code
    return 0


def _become_subreaper() -> None:
    """Make orphans of the job (children of a rank that died) re-parent to the launcher, not to init,
    so `stop_descendants` can find and reap them. Linux only; elsewhere orphans go to init as usual."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def stop_descendants(grace_s: float = 5.0) -> None:
    """Terminate every process left below the launcher (SIGTERM, then SIGKILL after `grace_s`), and reap it."""
    leftovers = psutil.Process().children(recursive=True)
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(leftovers, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)
