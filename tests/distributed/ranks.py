"""Run a function on N processes as the ranks of one job, with a deadline that names a stuck rank.

    results = run_ranks(fn, world=2, args=(...,))     # fn(rank, world, *args) on every rank

Each rank gets the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a
free port) unless `env` replaces them, one thread, and a faulthandler alarm: a rank still running at
the deadline prints its Python stack to stderr and exits, and `run_ranks` fails naming it.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import queue as queue_module
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable, rank: int, world: int, args: tuple, env: Mapping[str, str], timeout: float, queue) -> None:
    os.environ.update(env)
    faulthandler.dump_traceback_later(timeout, exit=True)
    import torch

    torch.set_num_threads(1)
    try:
        # Pickled here by value: the queue's own pickler would share tensors through memory that
        # disappears when this process exits.
        queue.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        sys.exit(1)


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    args: Sequence[Any] = (),
    env: Sequence[Mapping[str, str]] | None = None,
    timeout: float = 60.0,
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on `world` fresh processes and return the results by rank.

    Raises:
        AssertionError: a rank raised (its traceback is in the message), exited without a result, or
            was still running after `timeout` seconds (named in the message; its stack is on stderr).
    """
    if env is None:
        port = str(free_port())
        env = [
            {
                "RANK": str(r),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(r),
                "LOCAL_WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            }
            for r in range(world)
        ]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world, tuple(args), env[r], timeout, queue), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout + 10
    try:
        while len(results) < world and time.monotonic() < deadline:
            try:
                rank, status, value = queue.get(timeout=0.5)
                results[rank] = (status, pickle.loads(value) if status == "ok" else value)
            except queue_module.Empty:
                if all(p.exitcode is not None for r, p in enumerate(procs) if r not in results):
                    break
        # A rank with no result at all (stuck, or killed by its alarm) is the cause; errors of the
        # others (a peer's connection closed) follow from it, so it is named first.
        missing = [r for r in range(world) if r not in results]
        errors = {r: v for r, (s, v) in results.items() if s == "error"}
        if missing:
            states = {
                r: "still running" if procs[r].exitcode is None else f"exit code {procs[r].exitcode}" for r in missing
            }
            others = f"; rank {min(errors)} then failed:\n{errors[min(errors)]}" if errors else ""
            raise AssertionError(
                f"ranks {missing} did not finish within {timeout:.0f} s: {states}; "
                f"a stuck rank's stack is printed on stderr{others}"
            )
        if errors:
            raise AssertionError(f"rank {min(errors)} failed:\n{errors[min(errors)]}")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[r][1] for r in range(world)]
