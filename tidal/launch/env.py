"""Rank and world discovery: who am I, how many are we, and where do we meet.

Sources are tried in order, the first that matches wins:

1. tidal / torchrun environment: ``RANK`` and ``WORLD_SIZE`` (with ``LOCAL_RANK``, ``MASTER_ADDR``,
   ``MASTER_PORT``), as set by ``tidal launch``, torchrun or any torch.distributed.elastic agent, and by
   Ray Train's TorchTrainer under ``tidal ray`` (which also opens the process group; init reuses it).
2. MPI: OpenMPI (``OMPI_COMM_WORLD_*``), MPICH / Hydra and other PMI launchers (``PMI_RANK``,
   ``PMI_SIZE``), Intel MPI (``MPI_LOCALRANKID``) or PMIx (``PMIX_RANK``). mpi4py gives the rank and
   world; rank 0 opens the rendezvous store on a free port and broadcasts its address.
3. SLURM: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the first node of the job hosts the
   store on ``MASTER_PORT`` or a port derived from the job id.
4. Nothing: a single process, rank 0 of 1.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID")
"""Any of these in the environment means the process was started by an MPI launcher."""
SLURM_PORT_BASE = 20000
"""SLURM jobs without MASTER_PORT meet on SLURM_PORT_BASE + (job id mod SLURM_PORT_SPAN)."""
SLURM_PORT_SPAN = 20000


class DiscoveryError(RuntimeError):
    """The environment names a launcher but not enough to find the rank, world or meeting point."""


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process sits in the job, as its launcher told it."""

    rank: int
    world_size: int
    local_rank: int
    """Index of this process on its node (picks its GPU)."""
    local_world_size: int
    source: str
    """Which launcher it came from: "env" (tidal/torchrun), "mpi", "slurm" or "single"."""
    master_addr: str | None = None
    """Host of the rendezvous store; None for MPI, where rank 0 chooses it at init."""
    master_port: int | None = None


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int:
    for name in names:
        value = env.get(name)
        if value is not None and value != "":
            try:
                return int(value)
            except ValueError:
                raise DiscoveryError(f"environment variable {name}={value!r} is not an integer") from None
    if default is None:
        raise DiscoveryError(f"none of {', '.join(names)} is set; the launcher did not say this process's place")
    return default


def discover(env: Mapping[str, str] | None = None) -> ProcessInfo:
    """Read this process's place in the job from its environment (see the module docstring)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return ProcessInfo(
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK", default=0),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE", default=1),
            source="env",
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", default=29500),
        )
    if any(name in env for name in MPI_MARKERS):
        return _discover_mpi(env)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return _discover_slurm(env)
    return ProcessInfo(0, 1, 0, 1, "single")


def _discover_mpi(env: Mapping[str, str]) -> ProcessInfo:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise DiscoveryError(
            "this process was started by an MPI launcher, but mpi4py is not installed; "
            "pip install 'tidal[mpi]' (or mpi4py)"
        ) from exc
    comm = MPI.COMM_WORLD
    local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", default=-1)
    local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE", default=-1)
    if local_rank < 0 or local_size < 0:
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank, local_size = node.Get_rank(), node.Get_size()
        node.Free()
    return ProcessInfo(comm.Get_rank(), comm.Get_size(), local_rank, local_size, "mpi")


def _discover_slurm(env: Mapping[str, str]) -> ProcessInfo:
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    addr = env.get("MASTER_ADDR") or (first_slurm_host(nodes) if nodes else "127.0.0.1")
    port = _int(env, "MASTER_PORT", default=SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID", default=0) % SLURM_PORT_SPAN)
    local_size = _tasks_on_this_node(env.get("SLURM_TASKS_PER_NODE", ""), _int(env, "SLURM_NODEID", default=0))
    return ProcessInfo(
        rank=_int(env, "SLURM_PROCID"),
        world_size=_int(env, "SLURM_NTASKS"),
        local_rank=_int(env, "SLURM_LOCALID", default=0),
        local_world_size=local_size or 1,
        source="slurm",
        master_addr=addr,
        master_port=port,
    )


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as ``gpu[003-010,12],cpu1`` (``gpu003`` here).

    Uses ``scontrol show hostnames`` when it is installed, else expands the first entry itself.
    """
    if shutil.which("scontrol"):
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        raise DiscoveryError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _tasks_on_this_node(tasks_per_node: str, node_id: int) -> int:
    """Expand SLURM_TASKS_PER_NODE (``2(x3),1``) and return the count of node `node_id`."""
    counts: list[int] = []
    for part in filter(None, tasks_per_node.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not match:
            return 0
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_id] if node_id < len(counts) else 0


def rendezvous_store(info: ProcessInfo, timeout: timedelta) -> dist.Store:
    """Open the TCP store every rank of the job meets at.

    For MPI, rank 0 hosts the store on a free port (the OS picks it, so two jobs never collide) and
    broadcasts address and port to the others through mpi4py.
    """
    if info.source != "mpi":
        # Under torch.distributed.elastic the agent hosts the store and every worker is a client. Its keys
        # outlive a restart, so each attempt gets its own prefix: a restarted rank must never read the
        # address a rank of the failed attempt left behind.
        agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(
            info.master_addr or "127.0.0.1",
            info.master_port or 29500,
            info.world_size,
            is_master=info.rank == 0 and not agent_hosts,
            timeout=timeout,
            wait_for_workers=False,
        )
        return dist.PrefixStore(f"tidal/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    store = None
    if info.rank == 0:
        host = _reachable_host(single_node=info.local_world_size == info.world_size)
        store = dist.TCPStore(host, 0, info.world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        address = (store.host, store.port)
    address = comm.bcast(address if info.rank == 0 else None, root=0)
    if store is None:
        store = dist.TCPStore(address[0], address[1], info.world_size, is_master=False, timeout=timeout)
    return store


def _reachable_host(single_node: bool) -> str:
    """The address rank 0 offers: MASTER_ADDR when set, loopback for a one-node job, else the hostname's."""
    if os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    if single_node:
        return "127.0.0.1"
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError as exc:
        raise DiscoveryError(
            f"cannot resolve this host's name {socket.gethostname()!r} for a multi-node MPI job; "
            "set MASTER_ADDR to an address of rank 0's node that the other nodes reach"
        ) from exc
