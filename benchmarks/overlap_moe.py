"""MoE exchange in pieces against the plain exchange: one `MoELayer` forward + backward on gloo ranks.

    python benchmarks/overlap_moe.py                 # 2 and 4 ranks, two shapes each, 4 pieces: ~2 min on 2 cores
    python benchmarks/overlap_moe.py --quick         # 2 ranks, one small shape, 3 steps: a smoke run, ~15 s

Each rank holds ``experts / world`` experts (top-k routing, no capacity limit) and ``tokens`` tokens of
width ``hidden``; every expert a SwiGLU FFN of inner width ``ffn``. Forms, timed side by side in one run
(alternating order, one untimed warm-up round), one thread per rank:

- plain: ``MoELayer.overlap = None``, today's default without the engine: torch's functional all-to-alls,
  dispatch, experts, combine, nothing overlapped.
- overlap: ``Overlap("on", chunks)``: the exchange in `chunks` pieces, each piece's all-to-alls travelling
  while another piece's experts compute, forward and backward (`tidal.parallel.expert_exchange`).
- one piece: ``Overlap("off")``: the same code as overlap with one piece, to tell what the pieces gain
  from what the code path costs.

``comm`` is the four row all-to-alls of one step alone (dispatch and combine, forward and backward,
with the splits this routing gives) and ``compute`` the experts' forward + backward alone (on the rows
each rank receives, weight gradients included), timed the same way; ``bound = (comm + compute) /
max(comm, compute)`` is the most any overlap can gain over an idle link. Over loopback gloo moves every
byte with the CPU, and here every rank has one core at most (fewer at 4 ranks on 2 cores), so the
transfers and the experts compete for the same cores: the bound is what an idle link would allow, not
what this machine can reach. A time is the slowest rank's, the median over `steps`;
``ratio = plain / overlap`` (above 1: the pieces are faster), ``1p/ovl`` the same against one piece;
``fwd`` and ``bwd`` split each step. ``auto`` is what ``Overlap("auto")`` (the engine's default,
``comm.overlap.moe``) chooses on its first call: pieces (on) or one piece (off).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPES = ((2048, 1024, 32), (4096, 1024, 48))
"""(tokens per rank, hidden, expert ffn) of the full run."""
QUICK_SHAPES = ((1024, 512, 32),)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slowest(seconds: list[float], group) -> list[float]:
    times = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    return times.tolist()


def _timed_step(layer, x: torch.Tensor, g: torch.Tensor, overlap, group) -> list[float]:
    """(forward s, backward s) of one layer step, each the slowest rank's."""
    layer.overlap = overlap
    layer.zero_grad(set_to_none=True)
    leaf = x.detach().requires_grad_()
    dist.barrier(group)
    start = time.perf_counter()
    out = layer(leaf)
    forward = time.perf_counter()
    out.backward(g)
    return _slowest([forward - start, time.perf_counter() - forward], group)


def _timed(fn: Callable[[], object], group) -> float:
    dist.barrier(group)
    start = time.perf_counter()
    fn()
    return _slowest([time.perf_counter() - start], group)[0]


def _parts(layer, x: torch.Tensor, group) -> tuple[Callable, Callable]:
    """The step's row all-to-alls alone and its experts' forward + backward alone, with this routing."""
    with torch.no_grad():
        _, _, top = layer.gate(x)
    counts = torch.bincount(top.reshape(-1), minlength=layer.num_experts)
    received_counts = torch.empty_like(counts)
    dist.all_to_all_single(received_counts, counts, group=group)
    received_counts = received_counts.view(layer.ep, layer.local_experts)
    send = counts.view(layer.ep, layer.local_experts).sum(1).tolist()
    receive = received_counts.sum(1).tolist()
    rows, received = x.new_ones((sum(send), x.shape[1])), x.new_empty((sum(receive), x.shape[1]))
    blocks = received_counts.reshape(-1).tolist()  # as the exchange runs them: (source, local expert) blocks
    grouped = torch.randn(sum(receive), x.shape[1])

    def comm() -> None:  # dispatch, combine; combine's gradient, dispatch's gradient
        for _ in range(2):
            dist.all_to_all_single(received, rows, receive, send, group=group)
            dist.all_to_all_single(rows, received, send, receive, group=group)

    def compute() -> None:
        leaf = grouped.detach().requires_grad_()
        layer.experts(leaf, blocks).backward(grouped)
        layer.zero_grad(set_to_none=True)

    return comm, compute


def _rank(rank: int, world: int, port: int, shape: tuple, chunks: int, steps: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from tidal.comm.overlap import Overlap
    from tidal.parallel.expert import MoELayer

    tokens, hidden, ffn, experts, top_k = shape
    group = dist.group.WORLD
    try:
        torch.manual_seed(0)  # the same router and experts everywhere; each rank its own tokens
        layer = MoELayer(hidden, ffn, experts, top_k, group=group)
        gen = torch.Generator().manual_seed(1 + rank)
        x, g = torch.randn(tokens, hidden, generator=gen), torch.randn(tokens, hidden, generator=gen)
        comm, compute = _parts(layer, x, group)
        forms = {
            "plain": lambda: _timed_step(layer, x, g, None, group),
            "overlap": lambda: _timed_step(layer, x, g, Overlap("on", chunks), group),
            "one_piece": lambda: _timed_step(layer, x, g, Overlap("off", chunks), group),
            "comm": lambda: [_timed(comm, group)],
            "compute": lambda: [_timed(compute, group)],
        }
        times: dict[str, list[list[float]]] = {name: [] for name in forms}
        for step in range(steps + 1):  # step 0 warms up
            for name in list(forms) if step % 2 else reversed(forms):
                measured = forms[name]()
                if step:
                    times[name].append(measured)
        auto = Overlap("auto", chunks)  # what the engine's default would choose here
        _timed_step(layer, x, g, auto, group)
        if rank == 0:
            med = {name: [statistics.median(col) for col in zip(*rows, strict=True)] for name, rows in times.items()}
            results.put((med, next(iter(auto.decisions.values()))))
    finally:
        dist.destroy_process_group()


def bench_moe(
    world: int, tokens: int, hidden: int, ffn: int, experts: int, top_k: int, chunks: int, steps: int
) -> dict[str, float | bool]:
    """Time one MoE layer's forward + backward on `world` gloo ranks (spawned here, one thread each), plain
    against in `chunks` pieces, side by side; seconds, each the slowest rank's median over `steps`.

    Returns ``plain_s``, ``overlap_s``, ``ratio`` (plain / overlap), ``comm_s`` (the row all-to-alls alone),
    ``compute_s`` (the experts alone), ``bound`` ((comm + compute) / max(comm, compute)), and
    ``one_piece_s`` (the overlap code in one piece), ``*_fwd_s`` / ``*_bwd_s`` of plain and overlap, and
    ``auto``: whether ``Overlap("auto")`` chose the pieces (its timed trial on the first call).
    """
    if experts % world:
        raise ValueError(f"experts={experts} does not divide over {world} ranks; choose a multiple of {world}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    shape = (tokens, hidden, ffn, experts, top_k)
    mp.start_processes(
        _rank, args=(world, _free_port(), shape, chunks, steps, results), nprocs=world, start_method="spawn"
    )
    med, auto = results.get()
    plain, overlap, one_piece = (sum(med[name]) for name in ("plain", "overlap", "one_piece"))
    comm, compute = med["comm"][0], med["compute"][0]
    return {
        "plain_s": plain,
        "overlap_s": overlap,
        "ratio": plain / overlap,
        "comm_s": comm,
        "compute_s": compute,
        "bound": (comm + compute) / max(comm, compute),
        "one_piece_s": one_piece,
        "plain_fwd_s": med["plain"][0],
        "plain_bwd_s": med["plain"][1],
        "overlap_fwd_s": med["overlap"][0],
        "overlap_bwd_s": med["overlap"][1],
        "auto": auto,
    }


HEADER = (
    f"{'ranks':>5} {'tokens':>6} {'hidden':>6} {'ffn':>4} {'E':>3} {'k':>2} {'C':>2} {'comm ms':>8} "
    f"{'compute':>8} {'bound':>6} {'plain ms':>9} {'fwd':>6} {'bwd':>6} {'overlap':>8} {'fwd':>6} {'bwd':>6} "
    f"{'ratio':>6} {'1 piece':>8} {'1p/ovl':>6} {'auto':>5}"
)


def row(world: int, tokens: int, hidden: int, ffn: int, experts: int, top_k: int, chunks: int, r: dict) -> str:
    """One line of the table under `HEADER` for a `bench_moe` result `r`."""
    ms = {k: v * 1e3 for k, v in r.items() if k.endswith("_s")}
    return (
        f"{world:>5} {tokens:>6} {hidden:>6} {ffn:>4} {experts:>3} {top_k:>2} {chunks:>2} {ms['comm_s']:>8.1f} "
        f"{ms['compute_s']:>8.1f} {r['bound']:>6.2f} {ms['plain_s']:>9.1f} {ms['plain_fwd_s']:>6.1f} "
        f"{ms['plain_bwd_s']:>6.1f} {ms['overlap_s']:>8.1f} {ms['overlap_fwd_s']:>6.1f} {ms['overlap_bwd_s']:>6.1f} "
        f"{r['ratio']:>6.2f} {ms['one_piece_s']:>8.1f} {r['one_piece_s'] / r['overlap_s']:>6.2f} "
        f"{'on' if r['auto'] else 'off':>5}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", default="2,4", help="rank counts, comma-separated")
    parser.add_argument("--experts-per-rank", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2 ranks, one small shape, 3 steps")
    ns = parser.parse_args()
    worlds = [2] if ns.quick else [int(w) for w in ns.worlds.split(",")]
    shapes = QUICK_SHAPES if ns.quick else SHAPES
    steps = 3 if ns.quick else ns.steps
    print(f"# load average before: {os.getloadavg()[0]:.2f}; {steps} steps, median of the slowest rank")
    print(HEADER)
    for world in worlds:
        for tokens, hidden, ffn in shapes:
            experts = ns.experts_per_rank * world
            r = bench_moe(world, tokens, hidden, ffn, experts, ns.top_k, ns.chunks, steps)
            print(row(world, tokens, hidden, ffn, experts, ns.top_k, ns.chunks, r), flush=True)
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
