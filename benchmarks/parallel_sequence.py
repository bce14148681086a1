"""Sequence parallel attention: Ulysses against ring, step time and bytes sent per rank, sp=2 and 4, 1k-16k tokens.

    python benchmarks/parallel_sequence.py                         # sp=2 and 4, 1k-8k tokens: ~5 min on 2 cores
    python benchmarks/parallel_sequence.py --seqs 16k --iters 1    # 16k tokens alone: ~7 min (ring: ~90 s a call)
    python benchmarks/parallel_sequence.py --quick                 # sp=2, 1k and 2k tokens: a smoke run, ~25 s

One causal attention call (batch 1, 8 heads, head dim 64, float32; q/k/v shards of S/sp tokens in the
balanced causal layout) runs forward and backward on sp gloo ranks of one thread each, through
`ulysses_attention` (all-to-all over heads, then the CPU flash kernel of
``scaled_dot_product_attention`` on H/sp heads of the whole sequence) and `ring_attention` (k/v
shards travel the ring; each block's float32 scores are materialized). Only the attention call is
timed: q/k/v are made before, and every rank passes a barrier before each call. The methods
alternate within every round (the first one switches each round), so drift in the machine's load
hits both alike. Step time: the median over the measured rounds of the slowest rank's forward +
backward; ring/ulysses is the ratio of those medians at the same sp and sequence length.

Bytes are measured twice and set beside `communication_bytes` (what one rank sends, predicted):

- wire: the growth of ``wchar`` in ``/proc/self/io`` over a timed forward + backward, i.e. what the
  rank's threads wrote to their gloo sockets, message headers included (nothing else writes then);
- calls: in the first warm-up round, the payload handed to the collectives: funcol's all-to-all
  (intercepted at dispatch; a rank keeps its own 1/sp slice) and the isends of
  ``dist.batch_isend_irecv``. Forward and backward are each compared with the prediction exactly; a
  mismatch is printed under the table.

Peak: the highest resident set of any rank during the timed calls of one method (``VmHWM``, reset
before each call), the whole process included (~0.35 GiB of it is torch itself).

16k tokens is left out of the default run for time, not memory: at sp=2 the ring materializes up to
4k x 8k float32 scores per head and block and runs several elementwise passes over them, ~90 s a
call on one core, while its peak stays under 5 GiB per rank.

Ranks outnumber the cores at sp=4 (4 ranks on 2 cores here), so ranks also wait for a core and the
times are indicative: compare methods at the same sp, not sp=2 against sp=4. The byte counts are
exact at any load.
"""

from __future__ import annotations

import argparse
import os
import queue as queue_module
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import tidal
from tidal.parallel.sequence import check_ulysses_degree, communication_bytes, ring_attention, ulysses_attention

METHODS = ("ulysses", "ring")
BASELINE = "ulysses"
MB = 10**6
GIB = 2**30


@dataclass(frozen=True)
class Settings:
    """One benchmark run's sizes."""

    heads: int
    head_dim: int
    seqs: tuple[int, ...]
    """Sequence lengths, tokens (whole sequence, before sharding)."""
    warmup: int
    iters: int
    """Measured rounds per sequence length (each times every method once)."""
    batch: int = 1
    dtype: torch.dtype = torch.float32


def _wire_bytes() -> int:
    """Bytes this process (all its threads) has written so far: files, pipes and sockets alike."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5: reset the peak resident set size (VmHWM) to the current one


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class _CollectivePayload(TorchDispatchMode):
    """Counts the bytes this rank hands to other ranks through funcol all-to-alls and batched isends."""

    def __init__(self, sp: int) -> None:
        super().__init__()
        self.sp, self.sent = sp, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops._c10d_functional.all_to_all_single.default:
            x = args[0]  # equal splits (none given): one 1/sp slice stays on this rank
            self.sent += x.numel() * x.element_size() * (self.sp - 1) // self.sp
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._batch_isend_irecv = dist.batch_isend_irecv
        dist.batch_isend_irecv = self._count_sends  # ring.py calls it through the module
        return super().__enter__()

    def __exit__(self, *exc):
        dist.batch_isend_irecv = self._batch_isend_irecv
        return super().__exit__(*exc)

    def _count_sends(self, ops: list[dist.P2POp]) -> list:
        self.sent += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return self._batch_isend_irecv(ops)


def _attention(method: str, group: dist.ProcessGroup) -> Callable[..., torch.Tensor]:
    fn = ulysses_attention if method == "ulysses" else ring_attention
    return lambda q, k, v: fn(q, k, v, group, causal=True, balanced=True)


def _inputs(s: Settings, seq: int, sp: int, rank: int) -> tuple[torch.Tensor, ...]:
    """This rank's q, k, v [B, H, S/sp, D] (requiring grad) and the output gradient; random, different per rank."""
    gen = torch.Generator().manual_seed(seq * 16 + rank)
    shape = (s.batch, s.heads, seq // sp, s.head_dim)
    q, k, v, dout = (torch.randn(shape, generator=gen, dtype=s.dtype) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout


def _timed_call(attention, q, k, v, dout, group) -> dict:
    """One forward + backward: seconds of each, socket bytes written over both, peak RSS."""
    for t in (q, k, v):
        t.grad = None
    dist.barrier(group=group)
    _reset_peak_rss()
    wire = _wire_bytes()
    start = time.perf_counter()
    out = attention(q, k, v)
    forward = time.perf_counter()
    out.backward(dout)
    end = time.perf_counter()
    return {
        "forward": forward - start,
        "step": end - start,
        "wire": _wire_bytes() - wire,
        "peak": _peak_rss(),
    }


def _counted_call(attention, q, k, v, dout, sp: int) -> dict[str, int]:
    """Payload bytes handed to the collectives in one forward and one backward (a warm-up call: dispatch costs)."""
    for t in (q, k, v):
        t.grad = None
    with _CollectivePayload(sp) as counter:
        out = attention(q, k, v)
        forward = counter.sent
        out.backward(dout)
    return {"forward": forward, "backward": counter.sent - forward}


def _measure(s: Settings, seq: int, sp: int, rank: int, group: dist.ProcessGroup) -> dict:
    """Per method: this rank's timed calls (measured rounds only) and its collective payload (first round)."""
    q, k, v, dout = _inputs(s, seq, sp, rank)
    attention = {m: _attention(m, group) for m in METHODS}
    calls: dict[str, list[dict]] = {m: [] for m in METHODS}
    payload = {m: _counted_call(attention[m], q, k, v, dout, sp) for m in METHODS}  # warm-up round 0
    for i in range(1, s.warmup + s.iters):
        for m in METHODS if i % 2 == 0 else METHODS[::-1]:
            call = _timed_call(attention[m], q, k, v, dout, group)
            if i >= s.warmup:
                calls[m].append(call)
    return {m: {"calls": calls[m], "payload": payload[m]} for m in METHODS}


def _rank_main(rank: int, world: int, s: Settings, port: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    topology = tidal.init({"device": "cpu", "parallel": {"sp": world}, "logging": {"progress": False}}).topology
    group = topology.group("sp")
    queue.put((rank, {seq: _measure(s, seq, world, rank, group) for seq in s.seqs}))
    tidal.shutdown()


def _run(s: Settings, sp: int) -> list[dict]:
    """Every rank's results, by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_rank_main, args=(r, sp, s, port, queue), daemon=True) for r in range(sp)]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    while len(results) < sp:
        try:
            rank, value = queue.get(timeout=1.0)
            results[rank] = value
        except queue_module.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                codes = {r: p.exitcode for r, p in enumerate(procs)}
                raise RuntimeError(
                    f"a rank of sp={sp} failed (exit codes by rank {codes}); its error is above"
                ) from None
    for p in procs:
        p.join()
    return [results[r] for r in range(sp)]


def _summary(s: Settings, sp: int, seq: int, method: str, ranks: list[dict]) -> dict:
    """One table row: medians over rounds of the slowest rank, bytes of the busiest rank, prediction checks."""
    per_rank = [r[seq][method] for r in ranks]
    rounds = list(zip(*(r["calls"] for r in per_rank), strict=True))
    predicted = communication_bytes(method, s.batch, s.heads, seq, s.head_dim, sp, s.dtype)
    payloads = [r["payload"] for r in per_rank]
    return {
        "step": statistics.median(max(c["step"] for c in calls) for calls in rounds),
        "forward": statistics.median(max(c["forward"] for c in calls) for calls in rounds),
        "wire": max(c["wire"] for calls in rounds for c in calls),
        "calls": max(p["forward"] + p["backward"] for p in payloads),
        "predicted": predicted["forward"] + predicted["backward"],
        "mismatches": [(rank, p, predicted) for rank, p in enumerate(payloads) if p != predicted],
        "peak": max(c["peak"] for calls in rounds for c in calls),
    }


def _report(s: Settings, by_sp: dict[int, list[dict]]) -> None:
    print(
        f"causal attention, batch {s.batch}, {s.heads} heads x {s.head_dim}, {str(s.dtype).split('.')[-1]}, balanced "
        f"shards; gloo ranks x 1 thread on {os.cpu_count()} cores; {s.warmup} warmup + {s.iters} measured "
        f"round{'s' if s.iters != 1 else ''}"
    )
    print()
    header = (
        f"{'sp':>3}{'seq':>7}  {'method':<8}{'step ms':>10}{'fwd ms':>9}{'wire MB':>10}{'calls MB':>10}"
        f"{'pred MB':>10}{'wire-pred B':>13}{'peak GiB':>10}{'ring/uly':>10}"
    )
    print(header)
    print("-" * len(header))
    mismatches = []
    for sp, ranks in by_sp.items():
        for seq in s.seqs:
            rows = {m: _summary(s, sp, seq, m, ranks) for m in METHODS}
            for m, row in rows.items():
                ratio = f"{row['step'] / rows[BASELINE]['step']:>10.2f}" if m != BASELINE else ""
                print(
                    f"{sp:>3}{seq:>7}  {m:<8}{row['step'] * 1e3:>10.1f}{row['forward'] * 1e3:>9.1f}"
                    f"{row['wire'] / MB:>10.3f}{row['calls'] / MB:>10.3f}{row['predicted'] / MB:>10.3f}"
                    f"{row['wire'] - row['predicted']:>13}{row['peak'] / GIB:>10.2f}{ratio}"
                )
                mismatches += [(sp, seq, m, *x) for x in row["mismatches"]]
    print()
    print("step/fwd: median over rounds of the slowest rank's forward+backward / forward alone;")
    print("wire: bytes a rank wrote to its sockets in one timed forward+backward (the most of any rank and round);")
    print("calls: payload handed to the collectives; pred: communication_bytes(); wire-pred: gloo headers;")
    print("peak: highest resident set of any rank during the calls; ring/uly: step time ratio, ring / ulysses")
    for sp, seq, m, rank, measured, predicted in mismatches:
        print(f"MISMATCH sp={sp} seq={seq} {m} rank {rank}: collectives sent {measured}, predicted {predicted}")
    if not mismatches:
        print("calls == communication_bytes() exactly, forward and backward, on every rank")


def _tokens(text: str) -> int:
    """A sequence length: 2048, or 2k for 2048."""
    return int(text[:-1]) * 1024 if text.lower().endswith("k") else int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sp=2, 1k and 2k tokens, 1 warmup + 2 measured rounds")
    parser.add_argument("--sp", type=int, nargs="+", default=None, help="sequence parallel sizes (default 2 4)")
    parser.add_argument("--seqs", type=_tokens, nargs="+", default=None, help="sequence lengths (default 1k 2k 4k 8k)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (default 8; every sp must divide it)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds, >= 1 (the first counts bytes; default 1)"
    )
    parser.add_argument("--iters", type=int, default=None, help="measured rounds (default 3; --quick 2)")
    args = parser.parse_args(argv)
    sps = args.sp or ([2] if args.quick else [2, 4])
    seqs = tuple(args.seqs or ([1024, 2048] if args.quick else [1024, 2048, 4096, 8192]))
    if args.warmup < 1:
        parser.error(f"--warmup {args.warmup} must be >= 1: the first warm-up round is the one that counts bytes")
    for sp in sps:
        check_ulysses_degree(sp, args.heads)
        if bad := [seq for seq in seqs if seq % (2 * sp)]:
            parser.error(f"sequence lengths {bad} are not multiples of 2*sp={2 * sp} (balanced sharding)")
    s = Settings(args.heads, 64, seqs, args.warmup, args.iters or (2 if args.quick else 3))
    _report(s, {sp: _run(s, sp) for sp in sps})


if __name__ == "__main__":
    main()
