"""NVMe store throughput against the disk's own limit, raw O_DIRECT sequential copies, in one run.

    python benchmarks/offload_store.py --dir /path/on/the/disk      # 1 GiB in 64 MiB keys, 8 rounds
    python benchmarks/offload_store.py --total-mib 4096 --threads 8 --queue-depth 4

Baselines (the disk's limit), each overwriting one file of the same total size in the same directory
and reading it back, with O_DIRECT (no page cache) and 1 MiB requests:

- `dd bs=1M oflag=direct conv=notrunc` / `iflag=direct`: one process, one request at a time;
- the same with as many dd processes as the engine has threads, each copying its own contiguous part of
  the file (`seek=`/`skip=`): the disk's limit at the engine's concurrency.

Every timed write replaces data already on disk, as an optimizer's state is rewritten every step:
dd overwrites its file in place, and the store, after two untimed writes of every key, overwrites the
blocks of the files its previous writes replaced. (Writing into newly allocated blocks is slower on
some disks, markedly so on a thin-provisioned cloud disk mounted with `discard`; neither side pays it.)

tidal: an `NvmeStore` in that directory with the engine settings given (default: `NvmeConfig()`).
All keys are written (every write issued, then every handle waited on), then all read back the same
way. Two kinds of source tensors are timed: page-aligned ones from `empty_aligned`, which the engine
moves without a copy, and plain `torch.empty` ones, which go through its per-worker bounce buffers.
Contents are random bytes; the first round checks that they read back unchanged.

Each round runs every runner's write then its read, runner after runner, starting one runner later
than the round before, so that drift in the disk's speed (cloud disks vary a lot, and the first
runner of a round is often faster) hits all alike. A ratio is tidal's throughput over dd's in the
same round, "best dd" being the dd variant with the higher median throughput in that
direction; throughputs and ratios printed are medians over the rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

import torch

from tidal.config import NvmeConfig
from tidal.memory.probe import format_bytes, format_rate
from tidal.offload import NvmeStore, empty_aligned

MIB = 1 << 20
TARGET = 0.90


def parse_args() -> argparse.Namespace:
    defaults = NvmeConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=".", help="directory on the disk to measure (default: the current one)")
    parser.add_argument("--total-mib", type=int, default=1024, help="bytes moved per direction, MiB (default 1024)")
    parser.add_argument("--chunk-mib", type=int, default=64, help="bytes per key, MiB (default 64)")
    parser.add_argument("--rounds", type=int, default=8, help="measurement rounds (default 8)")
    parser.add_argument("--block-kib", type=int, default=defaults.block_size // 1024, help="engine block size, KiB")
    parser.add_argument("--queue-depth", type=int, default=defaults.queue_depth, help="engine blocks per call")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="engine I/O threads")
    parser.add_argument("--engine", choices=("auto", "aio", "threads"), default=defaults.engine, help="engine kind")
    args = parser.parse_args()
    if args.total_mib % args.chunk_mib or args.total_mib % args.threads:
        parser.error(f"--total-mib {args.total_mib} must be a multiple of --chunk-mib and of --threads")
    return args


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def dd_parallel(path: str, mib: int, processes: int, writing: bool) -> None:
    """Copy `mib` MiB between /dev/zero or /dev/null and file `path` with `processes` dd's, one part each."""
    part = mib // processes
    runs = []
    for index in range(processes):
        if writing:
            operands = ["if=/dev/zero", f"of={path}", f"seek={index * part}", "oflag=direct", "conv=notrunc"]
        else:
            operands = [f"if={path}", "of=/dev/null", f"skip={index * part}", "iflag=direct"]
        command = ["dd", *operands, f"count={part}", "bs=1M", "status=none"]
        runs.append(subprocess.Popen(command, env={**os.environ, "LC_ALL": "C"}))
    if any(run.wait() for run in runs):
        raise SystemExit(f"dd failed on {path}; check that the directory is writable and has room")


def time_dd(path: str, mib: int, processes: int) -> tuple[float, float]:
    """Seconds to overwrite, then read, the `mib` MiB file `path` with `processes` dd's."""
    write = timed(lambda: dd_parallel(path, mib, processes, writing=True))
    return write, timed(lambda: dd_parallel(path, mib, processes, writing=False))


def time_store(store: NvmeStore, sources: list[torch.Tensor], outs: list[torch.Tensor]) -> tuple[float, float]:
    """Seconds to write all `sources` (issued together), then to read them all into `outs`."""

    def write() -> None:
        for handle in [store.write(f"k{index}", tensor) for index, tensor in enumerate(sources)]:
            handle.wait()

    def read() -> None:
        for handle in [store.read(f"k{index}", out=out) for index, out in enumerate(outs)]:
            handle.wait()

    return timed(write), timed(read)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # random bits include NaNs, unequal to themselves


def allocate(keys: int, numel: int, aligned: bool) -> list[torch.Tensor]:
    """`keys` float32 tensors of `numel` elements: page-aligned ones, or plain `torch.empty` ones."""
    return [empty_aligned((numel,), torch.float32) if aligned else torch.empty(numel) for _ in range(keys)]


def main() -> None:
    args = parse_args()
    if shutil.which("dd") is None:
        raise SystemExit("dd was not found on PATH; it is the baseline (install coreutils)")
    config = NvmeConfig(
        block_size=args.block_kib * 1024, queue_depth=args.queue_depth, threads=args.threads, engine=args.engine
    )
    keys, numel = args.total_mib // args.chunk_mib, args.chunk_mib * MIB // 4
    total = args.total_mib * MIB
    kinds = {"aligned": True, "torch.empty": False}
    sources = {kind: allocate(keys, numel, aligned) for kind, aligned in kinds.items()}
    outs = {kind: allocate(keys, numel, aligned) for kind, aligned in kinds.items()}
    for tensor in (tensor for tensors in sources.values() for tensor in tensors):
        tensor.view(torch.uint8).random_()
    seconds: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="tidal-bench-", dir=args.dir) as work, NvmeStore(work, config) as store:
        raw = os.path.join(work, "dd.bin")
        dd_parallel(raw, args.total_mib, 1, writing=True)
        for kind in (*kinds, *kinds):  # every key written twice: later writes overwrite replaced files' blocks
            time_store(store, sources[kind], outs[kind])
        runners: dict[str, Callable[[], tuple[float, float]]] = {
            "dd, 1 process": lambda: time_dd(raw, args.total_mib, 1),
            f"dd, {config.threads} processes": lambda: time_dd(raw, args.total_mib, config.threads),
        }
        for kind in kinds:
            runners[f"tidal, {kind} tensors"] = lambda kind=kind: time_store(store, sources[kind], outs[kind])
        names = list(runners)
        for round_index in range(args.rounds):
            for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
                seconds.setdefault(name, []).append(runners[name]())
            if round_index == 0:
                for kind in kinds:
                    assert all(map(same_bytes, sources[kind], outs[kind])), f"{kind}: data read back differs"
        kind = store.engine_kind
        direct = "O_DIRECT" if store.direct else "buffered I/O (O_DIRECT refused: numbers include the page cache)"

    print(
        f"NVMe store vs dd (O_DIRECT, bs=1M): {format_bytes(total)} per direction in {keys} keys of "
        f"{format_bytes(args.chunk_mib * MIB)}, in {os.path.abspath(args.dir)}\n"
        f"engine: {kind}, {direct}, {config.threads} threads x {config.queue_depth} blocks of "
        f"{format_bytes(config.block_size)} per call; medians of {args.rounds} rounds; data verified\n"
    )
    print(f"{'':<28}{'write':>12}{'read':>12}")
    for name, times in seconds.items():
        rates = [format_rate(total / statistics.median(way)) for way in zip(*times, strict=True)]
        print(f"{name:<28}{rates[0]:>12}{rates[1]:>12}")
    dd_names = list(seconds)[:2]
    for kind in kinds:
        ours, ratios = seconds[f"tidal, {kind} tensors"], []
        for way in (0, 1):  # against the dd variant with the higher median throughput in this direction
            dd = seconds[min(dd_names, key=lambda name: statistics.median(times[way] for times in seconds[name]))]
            ratios.append(statistics.median(base[way] / us[way] for base, us in zip(dd, ours, strict=True)))
        verdict = "met" if min(ratios) >= TARGET else "missed"
        label = f"ratio {kind} / best dd"
        print(f"{label:<28}{ratios[0]:>12.2f}{ratios[1]:>12.2f}   (target {TARGET}: {verdict})")


if __name__ == "__main__":
    main()
