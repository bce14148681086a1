"""Data parallel on 2 gloo ranks: PyTorch DDP and FSDP2 against tidal's ZeRO-0 and ZeRO-3, in one run.

    python benchmarks/dp.py            # the default run, a few minutes on 2 CPU cores
    python benchmarks/dp.py --quick    # a smaller model and fewer steps: a ~1 minute smoke run

Four runners train the same GPT-2 style model (transformers config, random init from one seed, no
dropout) with AdamW on the same per-rank batches:

- ``DDP``: ``torch.nn.parallel.DistributedDataParallel`` with its defaults;
- ``tidal ZeRO-0``: ``tidal.wrap(model, optimizer, {"zero": {"stage": 0}})``;
- ``FSDP2``: ``fully_shard`` on each block (``model.transformer.h[i]``) and the root, defaults;
- ``tidal ZeRO-3``: ``tidal.wrap(model, optimizer, {"zero": {"stage": 3}})``.

Every rank joins once with ``tidal.init`` and the baselines use the same data-parallel group and mesh.

Memory: each runner is built, warmed up and then measured for a few steps inside a `LiveTensorTracker`
that has watched it from construction on, so parameters, gradients, optimizer state and the
runners' own buffers are all counted. Peak = the tracker's CPU peak over the measured steps, per
rank, maximum over ranks.

Time: afterwards the runners take turns, in rounds (DDP, tidal ZeRO-0, FSDP2, tidal ZeRO-3, then
again), so that drift in machine load hits all four alike; the tracker is off there, since its
per-op cost would weigh more on the runner with more ops. Step time = wall time of forward,
backward, ``optimizer.step()`` and ``optimizer.zero_grad()``, started together after a barrier; the
slower rank's time per step, median over the timed steps.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tidal
from tidal.memory.tracker import LiveTensorTracker
from tidal.runtime.context import current

RUNNERS = ("DDP", "tidal ZeRO-0", "FSDP2", "tidal ZeRO-3")
TIDAL_LOGGING = {"progress": False, "interval": 1_000_000}
LR = 1e-3


@dataclass(frozen=True)
class Settings:
    """One benchmark run's sizes."""

    layers: int
    width: int
    """Hidden size, features."""
    heads: int
    seq: int
    """Tokens per sample."""
    vocab: int
    batch: int
    """Samples per rank per step."""
    warmup: int
    """Untimed steps per runner before anything is measured."""
    measured: int
    """Steps per runner under the memory tracker."""
    steps: int
    """Timed steps per runner, spread over the rounds."""
    rounds: int
    """Turns each runner takes in the timed phase (one step per turn by default)."""
    world: int
    """Ranks, processes."""
    seed: int = 0
    """Seed of the model's initial weights (the same for every runner)."""


@dataclass
class Result:
    """What one rank measured for one runner."""

    times_s: list[float]
    peak_bytes: int
    resident_bytes: int
    """Tracked bytes alive between steps (after zero_grad): parameters, optimizer state, buffers."""
    last_loss: float


class Runner:
    """One way of training the model: built, stepped on this rank's batches, timed."""

    def __init__(self, name: str, settings: Settings, batches: list[torch.Tensor]) -> None:
        self.batches = batches
        self.next_batch = 0
        self.times_s: list[float] = []
        self.last_loss = float("nan")
        self.model, self.optimizer = _BUILDERS[name](_gpt2(settings))

    def step(self) -> float:
        """One training step on the next batch; returns its wall time, seconds."""
        ids = self.batches[self.next_batch]
        self.next_batch += 1
        dist.barrier()
        start = time.perf_counter()
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        elapsed = time.perf_counter() - start
        self.last_loss = float(loss.detach())
        return elapsed


def _gpt2(settings: Settings) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(settings.seed)
    config = GPT2Config(
        vocab_size=settings.vocab,
        n_positions=settings.seq,
        n_embd=settings.width,
        n_layer=settings.layers,
        n_head=settings.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=settings.vocab - 1,
        eos_token_id=settings.vocab - 1,
    )
    return GPT2LMHeadModel(config)


def _adamw(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR)


def _ddp(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=current().topology.group("dp_sp"))
    return ddp, _adamw(ddp.parameters())


def _fsdp2(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    mesh = current().topology.submesh("dp_sp")
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, _adamw(model.parameters())


def _tidal(stage: int) -> Callable[[torch.nn.Module], tuple[torch.nn.Module, torch.optim.Optimizer]]:
    def build(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        return tidal.wrap(model, _adamw(model.parameters()), {"zero": {"stage": stage}, "logging": TIDAL_LOGGING})

    return build


_BUILDERS = {"DDP": _ddp, "tidal ZeRO-0": _tidal(0), "FSDP2": _fsdp2, "tidal ZeRO-3": _tidal(3)}


def _batches(settings: Settings, rank: int) -> list[torch.Tensor]:
    """This rank's token ids for every step any runner takes, the same sequence for each runner."""
    gen = torch.Generator().manual_seed(1000 + rank)
    count = settings.warmup + settings.measured + settings.steps
    return [torch.randint(0, settings.vocab, (settings.batch, settings.seq), generator=gen) for _ in range(count)]


def _build_and_measure_memory(name: str, settings: Settings, batches: list[torch.Tensor]) -> tuple[Runner, int, int]:
    """Build `name` under a tracker, warm it up, and measure its peak over `settings.measured` steps.

    Returns ``(runner, peak bytes, resident bytes)``."""
    tracker = LiveTensorTracker()
    with tracker:
        runner = Runner(name, settings, batches)
        tracker.track(runner.model, runner.optimizer)  # anything the wrappers made outside a dispatched op
        for _ in range(settings.warmup):
            runner.step()
        tracker.reset_peak()
        for _ in range(settings.measured):
            runner.step()
    return runner, tracker.peak_bytes("cpu"), tracker.current_bytes("cpu")


def _rank_main(rank: int, settings: Settings, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(settings.world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(settings.world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    tidal.init({"logging": TIDAL_LOGGING})
    batches = _batches(settings, rank)
    runners, memory = {}, {}
    for name in RUNNERS:
        runners[name], *memory[name] = _build_and_measure_memory(name, settings, batches)
    base, extra = divmod(settings.steps, settings.rounds)
    for round_index in range(settings.rounds):
        for name in RUNNERS:
            runner = runners[name]
            for _ in range(base + (round_index < extra)):
                runner.times_s.append(runner.step())
    mine = {name: Result(r.times_s, *memory[name], r.last_loss) for name, r in runners.items()}
    everyone: list[dict[str, Result] | None] = [None] * settings.world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        _report(settings, everyone)
    tidal.shutdown()


@dataclass(frozen=True)
class Summary:
    """One runner's row of the table, over both ranks."""

    median_s: float
    """Median over the timed steps of the slower rank's step time, seconds."""
    min_s: float
    max_s: float
    peak_bytes: int
    """Tracked peak of the rank with the higher one, bytes."""
    resident_bytes: int
    last_loss: float
    """Rank 0's loss at its last step (the same on every runner when they agree)."""


def _summarize(name: str, by_rank: list[dict[str, Result]]) -> Summary:
    per_step = [max(ts) for ts in zip(*(r[name].times_s for r in by_rank), strict=True)]
    return Summary(
        median_s=statistics.median(per_step),
        min_s=min(per_step),
        max_s=max(per_step),
        peak_bytes=max(r[name].peak_bytes for r in by_rank),
        resident_bytes=max(r[name].resident_bytes for r in by_rank),
        last_loss=by_rank[0][name].last_loss,
    )


def _report(settings: Settings, by_rank: list[dict[str, Result]]) -> None:
    """Print the table and the ratios."""
    rows = {name: _summarize(name, by_rank) for name in RUNNERS}
    params = sum(p.numel() for p in _gpt2(settings).parameters())
    print(
        f"GPT-2 {settings.layers} layers, width {settings.width}, {settings.heads} heads, seq {settings.seq}, "
        f"vocab {settings.vocab}: {params / 1e6:.2f} M params; {settings.world} gloo ranks x 1 thread, "
        f"batch {settings.batch} per rank; AdamW"
    )
    print(
        f"{settings.warmup} warmup + {settings.measured} memory-measured steps per runner, then "
        f"{settings.steps} timed steps each in {settings.rounds} interleaved rounds"
    )
    print()
    header = f"{'runner':<14}{'step median':>13}{'min':>9}{'max':>9}{'peak/rank':>13}{'resident':>12}{'loss':>9}"
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        print(
            f"{name:<14}{row.median_s:>12.3f}s{row.min_s:>8.3f}s{row.max_s:>8.3f}s"
            f"{row.peak_bytes / 2**20:>9.2f} MiB{row.resident_bytes / 2**20:>8.2f} MiB{row.last_loss:>9.4f}"
        )
    ddp, zero0, fsdp2, zero3 = (rows[name] for name in RUNNERS)
    faster = "(>= 1.0: tidal at least as fast)"
    ratios = [
        ("DDP step time / tidal ZeRO-0 step time", ddp.median_s / zero0.median_s, faster),
        ("FSDP2 step time / tidal ZeRO-3 step time", fsdp2.median_s / zero3.median_s, faster),
        ("tidal ZeRO-3 peak / FSDP2 peak", zero3.peak_bytes / fsdp2.peak_bytes, "(<= 1.0 target)"),
        ("tidal ZeRO-0 peak / DDP peak", zero0.peak_bytes / ddp.peak_bytes, "(info)"),
    ]
    print()
    for label, value, note in ratios:
        print(f"{label:<42}{value:>7.3f}  {note}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run: 2 layers, seq 128, few steps")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default 4)")
    parser.add_argument("--width", type=int, default=256, help="hidden size (default 256)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sample (default 256)")
    parser.add_argument("--vocab", type=int, default=512, help="vocabulary size (default 512)")
    parser.add_argument("--batch", type=int, default=None, help="samples per rank per step (default 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per runner (default 2)")
    parser.add_argument("--measured", type=int, default=None, help="memory-measured steps per runner (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per runner (default 20)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 20: one step each)")
    args = parser.parse_args(argv)
    # (default, --quick) for the sizes that --quick shrinks
    sizes = {"layers": (4, 2), "seq": (256, 128), "batch": (4, 4), "warmup": (2, 1), "measured": (2, 1)}
    sizes |= {"steps": (20, 4), "rounds": (20, 4)}
    chosen = {k: getattr(args, k) if getattr(args, k) is not None else v[args.quick] for k, v in sizes.items()}
    settings = Settings(width=args.width, heads=args.heads, vocab=args.vocab, world=2, **chosen)
    if settings.rounds > settings.steps:
        parser.error(f"--rounds {settings.rounds} is more than --steps {settings.steps}; every round needs a step")
    mp.spawn(_rank_main, args=(settings, _free_port()), nprocs=settings.world)


if __name__ == "__main__":
    main()
