"""Collective matmuls against the plain form (collective, then matmul), forward + backward, 2 and 4 gloo ranks.

    python benchmarks/overlap.py                 # tp=2 and 4, both ops, three shapes each, MoE: ~4 min on 2 cores
    python benchmarks/overlap.py --quick         # tp=2, one shape, no MoE: a smoke run, ~20 s
    python benchmarks/overlap.py --no-moe        # tensor-parallel ops only

Ops (``tidal.comm.overlap``), each forward + backward on an input of ``tokens`` rows (split over tp
where sharded), hidden ``k`` and ``n`` output features per rank:

- ag+mm: `all_gather_matmul` (sequence-parallel colwise) against all-gather, wait, matmul; backward
  matmul, reduce-scatter, wait, weight-gradient matmul.
- mm+rs: `matmul_reduce_scatter` (sequence-parallel rowwise) against matmul, reduce-scatter, wait;
  backward all-gather, wait, two matmuls.
- moe: `benchmarks/overlap_moe.py` (dispatch + experts + combine, chunked against one piece).

The forms alternate within each round; a form's time is the slowest rank's, the median over rounds.
``comm`` and ``compute`` are the plain form's collectives alone and matmuls alone, timed the same
way, and ``bound = (comm + compute) / max(comm, compute)`` is the most any overlap can gain over an
idle link. ``cpu ms`` is the process CPU time (all threads, gloo's included) the collectives alone
take: over loopback gloo moves every byte with the CPU, and with one core per rank that CPU cannot
run beside the matmuls, so ``cpu bnd = (comm + compute) / max(comm, compute + cpu)`` is the most
overlap can gain on this machine.
``ratio = plain / overlapped`` (above 1: overlap is faster). ``off`` is what tensor parallel runs
with ``comm.overlap.tp: off`` (torch's DTensor collectives: gloo's own reduce-scatter, where plain
uses tidal's all-to-all form of it), so ``off/ovl`` is the gain a user sees. ``auto`` is what
`Overlap("auto")` decides on its first call: it times ``off`` against overlapped, forward and backward.

Ranks outnumber the cores at tp=4 (4 ranks on 2 cores here), and gloo moves bytes with the CPU
too, so the compute of one rank and the transfers compete for the same two cores: the bound is what
an idle link would allow, not what this machine can reach.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from tidal.comm.overlap import Overlap, all_gather_matmul, matmul_reduce_scatter, reduce_scatter
from tidal.parallel.expert import MoELayer
from tidal.parallel.tensor_plans import reduce_partial, replicated_local

OPS = ("ag+mm", "mm+rs")
OPS = ("ag+mm", "mm+rs")
MOE_SHAPES = ((2048, 1024, 64), (4096, 1024, 128))
"""(tokens per rank, hidden, expert ffn) for the MoE layer."""
SHAPES = ((2048, 1024, 128), (2048, 1024, 512), (4096, 2048, 256))
"""(tokens, k, n): tokens in all (sharded over tp for ag+mm's input and mm+rs's output), per-rank n."""
QUICK_SHAPES = ((1024, 512, 128),)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn, rounds_out: list[tuple[float, float]], group) -> None:
    """Append (wall s, process CPU s) of one call of `fn`, each the slowest rank's."""
    dist.barrier(group)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start, time.process_time() - cpu], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
    rounds_out.append(tuple(elapsed.tolist()))


def _forms(op: str, tokens: int, k: int, n: int, chunks: int, group):
    """The plain and overlapped forward + backward of `op`, its plain collectives / matmuls alone, and the
    auto trial's two forms as tensor parallel runs them (plain: torch's DTensor collectives)."""
    tp = group.size()
    mesh = DeviceMesh.from_group(group, "cpu")
    gen = torch.Generator().manual_seed(dist.get_rank())
    if op == "ag+mm":
        shard = torch.randn(tokens // tp, k, generator=gen)
        b = torch.randn(k, n, generator=gen) / k**0.5
        gy = torch.randn(tokens, n, generator=gen)
        full, dx_full, dx = torch.empty(tokens, k), torch.empty(tokens, k), torch.empty(tokens // tp, k)

        def comm():
            dist.all_gather_into_tensor(full, shard, group=group)
            reduce_scatter(dx, dx_full, group)

        def compute():
            y = full @ b
            torch.matmul(gy, b.t(), out=dx_full)
            return y, full.t() @ gy

        def plain():
            comm_gather = dist.all_gather_into_tensor(full, shard, group=group, async_op=True)
            comm_gather.wait()
            y = full @ b
            torch.matmul(gy, b.t(), out=dx_full)
            reduce_scatter(dx, dx_full, group)
            return y, full.t() @ gy

        x_leaf, b_leaf = shard.clone().requires_grad_(), b.clone().requires_grad_()

        def overlapped():
            (y,) = all_gather_matmul(x_leaf, [b_leaf], group, chunks=chunks)
            y.backward(gy)

        def plain_op(x, b):  # what BlockInput runs when overlap is off
            return [replicated_local(DTensor.from_local(x, mesh, [Shard(0)]), mesh) @ b]

        trial = (plain_op, lambda x, b: all_gather_matmul(x, [b], group, chunks=chunks), (shard, b))
    elif op == "moe":
        return _moe_forms(tokens, k, n, chunks, group, gen)
    else:
        x = torch.randn(tokens, k, generator=gen)
        b = torch.randn(k, n, generator=gen) / k**0.5
        gy = torch.randn(tokens // tp, n, generator=gen)
        y_full, y, g_full = torch.empty(tokens, n), torch.empty(tokens // tp, n), torch.empty(tokens, n)

        def comm():
            reduce_scatter(y, y_full, group)
            dist.all_gather_into_tensor(g_full, gy, group=group)

        def compute():
            torch.matmul(x, b, out=y_full)
            return g_full @ b.t(), x.t() @ g_full

        def plain():
            torch.matmul(x, b, out=y_full)
            reduce_scatter(y, y_full, group)
            dist.all_gather_into_tensor(g_full, gy, group=group)
            return g_full @ b.t(), x.t() @ g_full

        x_leaf, b_leaf = x.clone().requires_grad_(), b.clone().requires_grad_()

        def overlapped():
            matmul_reduce_scatter(x_leaf, b_leaf, group, chunks=chunks).backward(gy)

        def plain_op(x, b):  # what LocalLinear rowwise runs when overlap is off
            return reduce_partial(x @ b, mesh, sequence_parallel=True)

        trial = (plain_op, lambda x, b: matmul_reduce_scatter(x, b, group, chunks=chunks), (x, b))
    return {"plain": plain, "overlapped": overlapped, "comm": comm, "compute": compute}, trial


def _moe_forms(tokens: int, hidden: int, ffn: int, chunks: int, group, gen):
    """A MoE layer of 2 experts per rank, top-2, `tokens` per rank: one-piece against chunked exchange."""
    tp = group.size()
    torch.manual_seed(0)
    layer = MoELayer(hidden, ffn, 2 * tp, 2, group=group)
    x = torch.randn(tokens, hidden, generator=gen)
    g = torch.randn(tokens, hidden, generator=gen)
    rows = torch.randn(2 * tokens, hidden, generator=gen)  # what one rank sends: tokens x top-2
    received = torch.empty_like(rows)
    per_expert = [rows.shape[0] // 2, rows.shape[0] - rows.shape[0] // 2]

    def step(overlap):
        def run():
            layer.overlap = overlap
            layer(x).backward(g)
            layer.zero_grad(set_to_none=True)

        return run

    def comm():  # dispatch and combine, forward and backward: four exchanges of the rows, even splits
        for _ in range(4):
            dist.all_to_all_single(received, rows, group=group)

    def compute():
        leaf = rows.detach().requires_grad_()
        layer.experts(leaf, per_expert).backward(rows)

    def auto() -> bool:
        layer.overlap = Overlap("auto", chunks)
        layer(x).backward(g)
        layer.zero_grad(set_to_none=True)
        return bool(next(iter(layer.overlap.decisions.values())))

    forms = {"plain": step(None), "overlapped": step(Overlap("on", chunks)), "comm": comm, "compute": compute}
    forms["dtensor"] = forms["plain"]  # overlap off runs the one-piece exchange
    return forms, auto


def _forward_backward(form, inputs):
    """One forward + backward of `form(*inputs)` on leaf copies, as the auto trial runs it."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]

    def run():
        out = form(*leaves)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return run


def _rank(rank: int, world: int, port: int, cases: list, rounds: int, chunks: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD
    try:
        for op, tokens, k, n in cases:
            forms, trial = _forms(op, tokens, k, n, chunks, group)
            if "dtensor" not in forms:
                forms["dtensor"] = _forward_backward(trial[0], trial[2])
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in forms}
            order = list(forms)
            for i in range(rounds + 1):  # round 0 warms up
                for name in order if i % 2 else reversed(order):
                    out = [] if i == 0 else times[name]
                    _timed(forms[name], out, group)
            if callable(trial):
                auto = trial()
            else:
                plain_op, overlapped_op, inputs = trial
                auto = Overlap("auto", chunks).choose((op,), group, plain_op, overlapped_op, inputs) is overlapped_op
            if rank == 0:
                med = {name: statistics.median(wall for wall, _ in v) for name, v in times.items()}
                med["comm cpu"] = statistics.median(cpu for _, cpu in times["comm"])
                results.put((op, world, tokens, k, n, med, auto))
    finally:
        dist.destroy_process_group()


def run(world: int, shapes, rounds: int, chunks: int, ops=OPS) -> list[tuple]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    cases = [(op, *shape) for shape in shapes for op in ops]
    mp.start_processes(
        _rank, args=(world, _free_port(), cases, rounds, chunks, results), nprocs=world, start_method="spawn"
    )
    return [results.get() for _ in cases]


def _print(op: str, tp: int, tokens: int, k: int, n: int, med: dict, auto: bool) -> None:
    comm, compute, comm_cpu = med["comm"], med["compute"], med["comm cpu"]
    bound = (comm + compute) / max(comm, compute)
    cpu_bound = (comm + compute) / max(comm, compute + min(comm_cpu, comm))
    ratio = med["plain"] / med["overlapped"]
    print(
        f"{op:7} {tp:>2} {tokens:>6} {k:>5} {n:>5} {comm * 1e3:>8.1f} {comm_cpu * 1e3:>7.1f} "
        f"{compute * 1e3:>10.1f} {bound:>6.2f} {cpu_bound:>7.2f} {med['plain'] * 1e3:>9.1f} "
        f"{med['overlapped'] * 1e3:>10.1f} {ratio:>6.2f} {med['dtensor'] * 1e3:>7.1f} "
        f"{med['dtensor'] / med['overlapped']:>7.2f} {'on' if auto else 'off':>5}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", default="2,4", help="tp sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="tp=2, one small shape, 3 rounds, no MoE")
    parser.add_argument("--no-moe", action="store_true")
    parser.add_argument("--ops", default=",".join(OPS), help="tensor-parallel ops, comma-separated ('' for none)")
    ns = parser.parse_args()
    worlds = [2] if ns.quick else [int(w) for w in ns.worlds.split(",")]
    shapes = QUICK_SHAPES if ns.quick else SHAPES
    rounds = 3 if ns.quick else ns.rounds
    print(f"# load average before: {os.getloadavg()[0]:.2f}; chunks={ns.chunks}, {rounds} rounds, median")
    print(
        f"{'op':7} {'tp':>2} {'tokens':>6} {'k':>5} {'n':>5} {'comm ms':>8} {'cpu ms':>7} {'compute ms':>10} "
        f"{'bound':>6} {'cpu bnd':>7} {'plain ms':>9} {'overlap ms':>10} {'ratio':>6} {'off ms':>7} {'off/ovl':>7} "
        f"{'auto':>5}"
    )
    for world in worlds:
        for row in run(world, shapes, rounds, ns.chunks, [op for op in ns.ops.split(",") if op in OPS]):
            _print(*row)
    if not ns.quick and not ns.no_moe:
        print("\nmoe: tokens per rank, hidden k, expert ffn n; 2 experts per rank, top-2; off = plain")
        for world in worlds:
            for row in run(world, MOE_SHAPES, rounds, ns.chunks, ("moe",)):
                _print(*row)
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
