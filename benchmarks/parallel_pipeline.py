"""Pipeline bubble: measured idle fraction of 1F1B and interleaved 1F1B against the theory, p=2 and 4, m=4 and 8.

    python benchmarks/parallel_pipeline.py            # p=2 and p=4, a few minutes on 2 CPU cores
    python benchmarks/parallel_pipeline.py --quick    # smaller model, fewer steps: a smoke run

An 8-layer Llama-style model (transformers config, random init, width 256, seq 256, one sample per
micro-batch, so a stage takes several ms per micro-batch) is trained by `PipelineRunner` on p gloo ranks
(one thread each). For every schedule and micro-batch count m, after warm-up steps, each measured step
reports per pp rank idle / step time, where busy time is the wall time inside the stage forwards, losses
and backwards of the micro-batches and the step time is the slowest rank's (see
`PipelineRunner.measured_bubble`). The table gives the median over the measured steps of the mean over
ranks, beside the ideal (p-1)/(m+p-1) (interleaved with v stages per rank: (p-1)/(v*m+p-1)).

The measured value also holds what the theory leaves out: the send/receive of activations and
gradients, unequal stages (the first holds the embeddings, the last the head and loss), and, when the
ranks outnumber the cores, time a rank waits for a core.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

import tidal
from tidal.parallel.pipeline import PipelineBubble, PipelineRunner

SCHEDULES = (("1f1b", 1), ("interleaved", 2))
"""(schedule, stages per rank) measured."""
MICROBATCHES = (4, 8)


@dataclass(frozen=True)
class Settings:
    """One benchmark run's sizes."""

    layers: int
    width: int
    """Hidden size, features."""
    seq: int
    """Tokens per sample (one sample per micro-batch)."""
    warmup: int
    steps: int
    """Measured steps per configuration."""


def _model(s: Settings) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=s.width,
        intermediate_size=4 * s.width,
        num_hidden_layers=s.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=s.seq,
    )
    return LlamaForCausalLM(config)


def _measure(s: Settings, schedule: str, stages_per_rank: int, m: int) -> list[PipelineBubble]:
    """The bubble of each measured step."""
    pp = tidal.init().topology.size("pp")
    pipeline = {"schedule": schedule, "microbatches": m, "stages_per_rank": stages_per_rank}
    config = tidal.Config.from_dict({"parallel": {"pp": pp, "pipeline": pipeline}})
    model = _model(s)
    runner = PipelineRunner(model, tidal.init().topology, config)
    gen = torch.Generator().manual_seed(1)
    bubbles = []
    for step in range(s.warmup + s.steps):
        runner.train_step(torch.randint(0, 512, (m, s.seq), generator=gen))
        model.zero_grad()
        if step >= s.warmup:
            bubbles.append(runner.measured_bubble())
    return bubbles


def _rank_main(rank: int, world: int, s: Settings, port: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tidal.init({"device": "cpu", "parallel": {"pp": world}, "logging": {"progress": False}})
    results = {(name, v, m): _measure(s, name, v, m) for name, v in SCHEDULES for m in MICROBATCHES}
    if rank == 0:
        queue.put(results)
    tidal.shutdown()


def _run(s: Settings, pp: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_rank_main, args=(r, pp, s, port, queue)) for r in range(pp)]
    for p in procs:
        p.start()
    results = queue.get()
    for p in procs:
        p.join()
    return results


def _report(s: Settings, by_pp: dict[int, dict]) -> None:
    print(
        f"Llama {s.layers} layers, width {s.width}, seq {s.seq}, 1 sample per micro-batch; gloo ranks x 1 thread "
        f"on {os.cpu_count()} cores; {s.warmup} warmup + {s.steps} measured steps each"
    )
    print()
    header = (
        f"{'schedule':<13}{'p':>3}{'v':>3}{'m':>4}{'measured':>10}{'min':>8}{'max':>8}{'theory':>9}"
        f"{'meas/theory':>13}{'step':>9}{'F+B/mb':>9}"
    )
    print(header)
    print("-" * len(header))
    for pp, results in by_pp.items():
        for (name, v, m), bubbles in results.items():
            means = [b.mean for b in bubbles]
            ranks = [x for b in bubbles for x in b.per_rank]
            theory = bubbles[0].theoretical
            measured = statistics.median(means)
            step = statistics.median(b.step_seconds for b in bubbles)
            # busy time per micro-batch per stage (forward + loss + backward), mean over ranks and steps
            work = statistics.mean(b.step_seconds * (1 - x) / (v * m) for b in bubbles for x in b.per_rank)
            print(
                f"{name:<13}{pp:>3}{v:>3}{m:>4}{measured:>10.3f}{min(ranks):>8.3f}{max(ranks):>8.3f}"
                f"{theory:>9.3f}{measured / theory:>13.2f}{step:>8.3f}s{work * 1e3:>7.1f}ms"
            )
    print()
    print("measured: median over steps of the mean over pp ranks; min/max: any rank in any measured step;")
    print("step: the slowest rank's step wall time; F+B/mb: busy time of one micro-batch on one stage")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="width 128, seq 128, 1 warmup + 2 measured steps")
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4], help="pipeline sizes (default 2 4)")
    args = parser.parse_args(argv)
    s = Settings(8, 128, 128, 1, 2) if args.quick else Settings(8, 256, 256, 2, 5)
    _report(s, {pp: _run(s, pp) for pp in args.pp})


if __name__ == "__main__":
    main()
