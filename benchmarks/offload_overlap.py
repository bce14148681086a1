"""Overlap of optimizer offload to NVMe: offloaded step time against max(step in memory, pure I/O), in one run.

    python benchmarks/offload_overlap.py --dir /path/on/nvme             # >= 4 GB of AdamW state, 2 rounds
    python benchmarks/offload_overlap.py --state-gb 0.5 --rounds 1        # a quick run

Model: `--layers` x (Linear(width, width) + GELU), as many layers as it takes for AdamW's state
(exp_avg + exp_avg_sq, fp32: 8 bytes per parameter) to reach `--state-gb` GB; a fixed batch of
`--batch` random rows, the loss the mean square of the output. Every configuration is built from the
same seed and wrapped by `tidal.wrap` at zero.stage=`--zero` (0: one rank holds the whole state), with
`torch.optim.AdamW(..., fused=True)`: the offloaded update picks the fused CPU kernel itself, so the
in-memory side gets it too.

Four runners, each timed over `--steps` steps after `--warmup` untimed ones (the first offloaded
step creates the files, the second allocates the blocks the later ones overwrite):

- memory (a): optimizer state in host memory, next to the parameters (no offload);
- offload (b): `offload.optimizer.device=nvme` in `--dir`, `chunk_mb=--chunk-mb`: each chunk updated as
  backward finishes its gradients (`update_in_backward`, the default where it is exact), its state read
  and written while backward computes, the next step's first chunks read during the forward;
- offload at step (b'): the same with `update_in_backward=false`: every chunk at `optimizer.step()`;
- I/O (c): the same bytes in the same chunks as (b)'s files (sizes taken from its chunks) through an
  `NvmeStore` with the same settings, no compute, after two untimed writes of every chunk. Two
  orders: every read then every write ("serial"), and the offload's own schedule (reads
  `READ_AHEAD` chunks ahead, each chunk written once read, through a ring of `READ_AHEAD + 2`
  buffers: "pipelined"). The I/O time is the faster of the two.

Only one model is in memory at a time (built, measured, deleted), in an order that starts one runner
later every round, so drift in the machine's load hits all alike. Step times are medians over the
steps of all rounds; each step is split into forward + backward and the optimizer step (which holds
the offloaded update). The ratio is offload / max(memory, I/O); target <= 1.10. Also printed: the
update alone, offloaded update / max(update in memory, I/O): whether the I/O hides behind the update.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

import tidal
from tidal.config import NvmeConfig
from tidal.memory.probe import format_bytes
from tidal.offload import NvmeStore, empty_aligned
from tidal.offload.optimizer import READ_AHEAD

TARGET = 1.10
GB = 10**9
LOGGING = {"progress": False, "interval": 10**9}
LR = 1e-4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="directory on the NVMe disk (default: a temp dir under /tmp)")
    parser.add_argument("--state-gb", type=float, default=4.0, help="AdamW state to reach, GB (default 4)")
    parser.add_argument("--width", type=int, default=4096, help="Linear layer width (default 4096)")
    parser.add_argument("--batch", type=int, default=16, help="rows per batch (default 16)")
    parser.add_argument("--chunk-mb", type=float, default=64.0, help="offload.optimizer.chunk_mb (default 64)")
    parser.add_argument("--zero", type=int, default=0, help="zero.stage (default 0: one rank holds all the state)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per runner and round (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per runner and round (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the runners (default 2)")
    return parser.parse_args()


def build_model(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*(m for _ in range(layers) for m in (torch.nn.Linear(width, width), torch.nn.GELU())))


def make_batch(rows: int, width: int) -> torch.Tensor:
    """The one batch every step trains on: `rows` x `width` standard normal values from seed 1."""
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(1))


def time_training(args: argparse.Namespace, layers: int, offload: dict | None) -> tuple[list, list[int], list[float]]:
    """Wrap a fresh model, train `warmup + steps` steps; returns per timed step (forward + backward s,
    optimizer step s), the offloaded chunks' file sizes (empty without offload) and every step's loss."""
    model = build_model(args.width, layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    config = {"zero": {"stage": args.zero}, "logging": LOGGING, **({"offload": offload} if offload else {})}
    model, optimizer = tidal.wrap(model, optimizer, config)
    batch = make_batch(args.batch, args.width)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(batch).pow(2).mean()
        loss.backward()
        backward_end = time.perf_counter()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
        if step >= args.warmup:
            times.append((backward_end - start, time.perf_counter() - backward_end))
    offloaded = tidal.engine(model).optimizer_offload
    sizes = [] if offloaded is None else [chunk.nbytes for chunk in offloaded.chunks]
    if offloaded is not None:
        offloaded.close()
    del model, optimizer, offloaded
    gc.collect()
    return times, sizes, losses


def time_io(directory: str, sizes: list[int], rounds: int) -> list[tuple[float, float]]:
    """Per round, seconds to read and write every chunk of `sizes` bytes: (serial, pipelined)."""
    ring = [empty_aligned((max(sizes),), torch.uint8) for _ in range(READ_AHEAD + 2)]
    keys = [f"chunk{index}" for index in range(len(sizes))]

    def view(index: int) -> torch.Tensor:
        return ring[index % len(ring)][: sizes[index]]

    def serial() -> None:  # buffers are shared by several transfers: only the time counts, not the bytes
        for handle in [store.read(key, out=view(i)) for i, key in enumerate(keys)]:
            handle.wait()
        for handle in [store.write(key, view(i)) for i, key in enumerate(keys)]:
            handle.wait()

    def pipelined() -> None:
        reads, writes = {}, {}
        for i, key in enumerate(keys):
            for ahead in range(i, min(i + READ_AHEAD + 1, len(keys))):
                if ahead not in reads:
                    if ahead - len(ring) in writes:
                        writes.pop(ahead - len(ring)).wait()  # the buffer's previous chunk is on disk
                    reads[ahead] = store.read(keys[ahead], out=view(ahead))
            reads.pop(i).wait()
            writes[i] = store.write(key, view(i))
        for handle in writes.values():
            handle.wait()

    with NvmeStore(directory, NvmeConfig()) as store:
        for _ in range(2):  # later writes overwrite the blocks of the files they replace, as the offload's do
            for handle in [store.write(key, view(i)) for i, key in enumerate(keys)]:
                handle.wait()
        return [(timed(serial), timed(pipelined)) for _ in range(rounds)]


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    per_layer = args.width * args.width + args.width
    layers = max(1, math.ceil(args.state_gb * GB / (8 * per_layer)))
    state_bytes = 8 * per_layer * layers
    tidal.init({"logging": LOGGING})
    results: dict[str, list[tuple[float, float]]] = {"offload": [], "I/O": [], "memory": [], "at step": []}
    sizes: list[int] = []
    with tempfile.TemporaryDirectory(prefix="tidal-overlap-", dir=args.dir) as work:
        offload = {"optimizer": {"device": "nvme", "path": work, "chunk_mb": args.chunk_mb}}
        at_step = {"optimizer": {**offload["optimizer"], "update_in_backward": False}}

        def offloaded() -> list[tuple[float, float]]:
            times, sizes[:], _ = time_training(args, layers, offload)
            return times

        runners: dict[str, Callable[[], list[tuple[float, float]]]] = {
            "offload": offloaded,  # first: the I/O runner needs its chunk sizes
            "I/O": lambda: time_io(work, sizes, args.steps),
            "memory": lambda: time_training(args, layers, None)[0],
            "at step": lambda: time_training(args, layers, at_step)[0],
        }
        names = list(runners)
        for round_index in range(args.rounds):
            for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
                results[name] += runners[name]()
                print(f"round {round_index + 1}, {name}: " + ", ".join(f"{sum(t):.2f} s" for t in results[name]))

    def median(name: str, part: int | None = None) -> float:
        return statistics.median(sum(t) if part is None else t[part] for t in results[name])

    io_serial, io_pipelined = median("I/O", 0), median("I/O", 1)
    io = min(io_serial, io_pipelined)
    print(
        f"\nOptimizer offload overlap: {layers} x (Linear({args.width}) + GELU), {layers * per_layer / 1e6:.0f}M "
        f"params, AdamW state {format_bytes(state_bytes)} in {len(sizes)} chunks of up to "
        f"{format_bytes(max(sizes))}, batch {args.batch}, zero.stage={args.zero}\n"
        f"medians of {args.rounds} rounds x {args.steps} steps (after {args.warmup} warmup steps); "
        f"NVMe dir {args.dir or tempfile.gettempdir()}\n"
    )
    print(f"{'':<34}{'step':>9}{'fwd+bwd':>10}{'opt.step':>10}")
    rows = (
        ("(a) state in memory", "memory"),
        ("(b) state on NVMe, update in bwd", "offload"),
        ("(b') state on NVMe, update at step", "at step"),
    )
    for label, name in rows:
        print(f"{label:<34}{median(name):>8.2f}s{median(name, 0):>9.2f}s{median(name, 1):>9.2f}s")
    rate = 2 * sum(sizes) / io / GB
    print(f"{'(c) pure I/O, serial':<34}{io_serial:>8.2f}s")
    print(f"{'(c) pure I/O, pipelined':<34}{io_pipelined:>8.2f}s   (best: {rate:.2f} GB/s read + write)")
    ratio = median("offload") / max(median("memory"), io)
    verdict = "met" if ratio <= TARGET else "missed"
    print(f"\nratio b / max(a, c)               {ratio:>8.2f}    (target <= {TARGET}: {verdict})")
    at_step = median("at step") / max(median("memory"), io)
    print(f"ratio b' / max(a, c)              {at_step:>8.2f}    (update at step)")
    update = median("at step", 1) / max(median("memory", 1), io)
    print(f"update only: b'.step / max(a.step, c) {update:>4.2f}    (1.00: the I/O hides fully behind the update)")
    print("(b) updates each chunk as backward finishes its gradients, so its fwd+bwd holds the update and I/O")


if __name__ == "__main__":
    main()
