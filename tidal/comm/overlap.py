"""Collective matmuls: tensor-parallel communication overlapped with the matmuls next to it.

    ys = all_gather_matmul(x_shard, [w_q.t(), w_k.t(), w_v.t()], group, dim=1)  # sp: gather the sequence
    y = matmul_reduce_scatter(h, w_o.t(), group, dim=1)                         # sp: scatter the partial sum
    y = matmul_all_reduce(h, w_o.t(), group)                                    # no sp: all-reduce it
    ys = replicated_matmul(x, [w_up.t()], group)                                # no sp: input grad all-reduced

Each op equals its plain form (gather, then matmul; matmul, then reduce) in forward and backward, and
cuts the collective into `chunks` pieces along `dim` (uneven pieces when the rows do not divide) so
that a piece's matmul runs while the next piece travels. Every rank issues the same collectives in
the same order. On CUDA with symmetric memory the first two run torch's fused kernels instead
(`device.fused_collective_matmul`); the decomposition below is the path everywhere else.

Shapes: tp ranks, ``s_l`` rows of `dim` per rank, ``s = tp * s_l``, ``...`` the other leading dims, ``k``
input features, ``B_i: [k, n_i]`` right operands (``weight.t()`` of an nn.Linear, a Conv1D's weight).

all_gather_matmul: shard ``[.., s_l, .., k]`` -> ``y_i [.., s, .., n_i]``
    forward   every piece's all-gather launched at once; the own shard's rows multiply at once (nothing
              to wait for); then piece by piece, as each arrives, the other ranks' rows multiply while
              later pieces still travel.
    saves     the gathered pieces (``[tp, s_p, .., k]`` each; together the full input, as plain
              colwise saves) and the B_i.
    backward  ``dy_i [.., s, .., n_i]`` -> per piece, partial ``dx`` rows of every rank
              ``[tp, s_p, .., k] = sum_i dy_i @ B_i^T`` and its reduce-scatter launched at once; the
              ``dB_i = x^T dy_i`` matmuls run while the reduce-scatters travel; ``dx [.., s_l, .., k]``.
matmul_reduce_scatter: x ``[.., s, .., k]`` -> y ``[.., s_l, .., n]`` summed over tp
    forward   per piece, the rows of every rank's piece ``[tp, s_p, .., n]`` multiply and their
              reduce-scatter is launched at once; the next piece multiplies while it travels.
    saves     x and B (as plain rowwise).
    backward  ``dy [.., s_l, .., n]`` all-gathered in one piece (it is small beside x); the own rows'
              ``dx = dy @ B^T`` and ``dB += x_rows^T dy`` run while it travels, then the other ranks'.
matmul_all_reduce / replicated_matmul: the same without sequence sharding: pieces of the output
(forward) or of the input gradient (backward) all-reduced while the next piece, or ``dB``, computes.

Under autocast the inputs are cast to the autocast dtype before the op (so bf16 travels, not fp32) and
the op runs with autocast off; gradients return in each input's own dtype.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from tidal.runtime.device import fused_collective_matmul

MODES = ("auto", "on", "off")
AUTO_MIN_GAIN = 0.05
"""auto turns overlap on for a shape only when its trial ran at least this much faster than plain, fraction."""
AUTO_TRIALS = 5
"""Timed runs of each form (plain, overlapped) in an auto trial; the fastest of each counts, count."""


class CommWatch(Protocol):
    def blocked(self) -> contextlib.AbstractContextManager: ...


Observe = Callable[[str, int, dist.Work], CommWatch]
"""``observe(name, nbytes, work)`` at launch -> a watch whose ``blocked()`` wraps the wait (metrics)."""


def pieces(rows: int, chunks: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges cutting `rows` into at most `chunks` non-empty pieces, sizes differing by <= 1."""
    cuts = [rows * i // chunks for i in range(chunks + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


@dataclass
class Overlap:
    """How one model's collective matmuls run: ``on``, ``off`` or ``auto``, cut into `chunks` pieces.

    ``auto`` decides per op and shape on the first call: it times the plain and the overlapped form
    (`AUTO_TRIALS` each, forward and backward on detached copies of the inputs), takes the slowest
    rank's times (one all-reduce, so every rank of the group decides alike) and keeps overlap only where
    it was at least `AUTO_MIN_GAIN` faster. `decisions` holds what it chose, by key; `observe` reports
    every launched collective to the step metrics.
    """

    mode: str = "auto"
    chunks: int = 4
    observe: Observe | None = None
    decisions: dict[tuple, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"comm.overlap mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.chunks < 1:
            raise ValueError(f"comm.overlap.chunks={self.chunks} must be at least 1")

    def choose(self, key: tuple, group: dist.ProcessGroup, plain: Callable, overlapped: Callable, inputs: Sequence):
        """`overlapped` or `plain` (two forms of one op, called with `inputs`) for the op `key`; in auto
        mode the first call per key times both, forward and backward, on detached copies of `inputs`."""
        if self.mode != "auto":
            return overlapped if self.mode == "on" else plain
        if key not in self.decisions:
            self.decisions[key] = self._trial(group, plain, overlapped, inputs)
        return overlapped if self.decisions[key] else plain

    @staticmethod
    def _trial(group: dist.ProcessGroup, plain: Callable, overlapped: Callable, inputs: Sequence) -> bool:
        best = [float("inf"), float("inf")]
        for _ in range(AUTO_TRIALS):
            for i, form in enumerate((plain, overlapped)):
                leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
                start = time.perf_counter()
                # grad on (the first call may come from a no-grad forward), and saved tensors kept as they are:
                # an enclosing checkpoint or offload's saved-tensor hooks must not see the trial's graph
                with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
                    out = form(*leaves)
                    outs = list(out) if isinstance(out, (list, tuple)) else [out]
                    grads = [torch.ones_like(o) for o in outs]
                    # into the copies only: a form's parameters (experts, say) must not collect gradients
                    torch.autograd.backward(outs, grads, inputs=[leaf for leaf in leaves if leaf.requires_grad])
                best[i] = min(best[i], time.perf_counter() - start)
        times = torch.tensor(best, dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
        return bool(times[1] < (1 - AUTO_MIN_GAIN) * times[0])


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _Launched:
    """One collective in flight: its work, the metrics watch that times the wait, and what to do after it."""

    def __init__(
        self, work: dist.Work, name: str, nbytes: int, observe: Observe | None, finish: Callable[[], Any] | None = None
    ) -> None:
        self.work, self.finish = work, finish
        self.watch = observe(name, nbytes, work) if observe is not None else None

    def wait(self) -> None:
        with self.watch.blocked() if self.watch is not None else contextlib.nullcontext():
            self.work.wait()
        if self.finish is not None:
            self.finish()


def _all_gather(out: torch.Tensor, send: torch.Tensor, group, name: str, observe: Observe | None) -> _Launched:
    work = dist.all_gather_into_tensor(out, send, group=group, async_op=True)
    return _Launched(work, name, out.numel() * out.element_size(), observe)


@functools.cache
def _scatter_by_all_to_all(group: dist.ProcessGroup) -> bool:
    """gloo's reduce-scatter measured 2-3x slower than its all-to-all of the same bytes plus a local sum
    (2 ranks, 1 MiB per rank: 6.3 ms against 1.9 ms), so on gloo that is how tidal reduce-scatters."""
    return dist.get_backend(group) == "gloo"


def reduce_scatter(
    out: torch.Tensor,
    partial: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    async_op: bool = False,
    name: str = "reduce-scatter",
    observe: Observe | None = None,
):
    """Sum `partial` ``[tp * rows, ..]`` over the group; this rank's rows of the sum into `out` ``[rows, ..]``.

    Returns a launched collective whose ``wait()`` leaves the result in `out` when `async_op`, else None
    (done). On gloo it runs as an all-to-all and a local sum (see `_scatter_by_all_to_all`).
    """
    nbytes = partial.numel() * partial.element_size()
    if _scatter_by_all_to_all(group):
        received = torch.empty_like(partial)
        work = dist.all_to_all_single(received, partial, group=group, async_op=True)
        pieces_by_rank = received.view(group.size(), *out.shape)
        launched = _Launched(work, name, nbytes, observe, finish=lambda: torch.sum(pieces_by_rank, dim=0, out=out))
    else:
        work = dist.reduce_scatter_tensor(out, partial, group=group, async_op=True)
        launched = _Launched(work, name, nbytes, observe)
    if async_op:
        return launched
    launched.wait()
    return None


def _reduce(out: torch.Tensor, partial: torch.Tensor, group, scatter: bool, name, observe) -> _Launched:
    """Sum `partial` over the group into `out`: reduce-scatter of ``[tp * rows, ..]``, or all-reduce in place."""
    if scatter:
        return reduce_scatter(out, partial, group, async_op=True, name=name, observe=observe)
    work = dist.all_reduce(out, group=group, async_op=True)
    return _Launched(work, name, partial.numel() * partial.element_size(), observe)


class _GatheredRows:
    """Every rank's rows of `rows` ``[s_l, ..]``, cut into pieces whose all-gathers are all launched at once.

    Iterating yields ``(rank, a, b, block)``, block = that rank's rows [a, b): this rank's whole shard
    first (nothing to wait for), then the others' rows piece by piece as each all-gather completes.
    `pieces` holds ``(a, b, [tp, b - a, ..])`` per piece, own rows included.
    """

    def __init__(self, rows: torch.Tensor, group, chunks: int, name: str, observe: Observe | None) -> None:
        self.rows, self.tp, self.me = rows, group.size(), group.rank()
        self.pieces, self._launched = [], []
        for a, b in pieces(rows.shape[0], chunks):
            buf = rows.new_empty((self.tp * (b - a), *rows.shape[1:]))
            self._launched.append(_all_gather(buf, rows[a:b].contiguous(), group, name, observe))
            self.pieces.append((a, b, buf.view(self.tp, b - a, *rows.shape[1:])))

    def __iter__(self):
        yield self.me, 0, self.rows.shape[0], self.rows
        for (a, b, buf), launched in zip(self.pieces, self._launched, strict=True):
            launched.wait()
            for r in range(self.tp):
                if r != self.me:
                    yield r, a, b, buf[r]


def _matmul_into(out: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> None:
    torch.matmul(x, b, out=out)


class _GatherMatmul(torch.autograd.Function):
    """y_i = gather(shard) @ B_i (``gather`` True: all-gather along rows; False: x already whole).
    Backward reduces the input gradient over the group piece by piece (reduce-scatter / all-reduce)."""

    @staticmethod
    def forward(ctx, x, group, gather, chunks, observe, *bs):
        # x: [s_l, .., k] (rows first)
        ctx.group, ctx.gather, ctx.chunks, ctx.observe = group, gather, chunks, observe
        tp = group.size() if gather else 1
        outs = [x.new_empty((tp, x.shape[0], *x.shape[1:-1], b.shape[1])) for b in bs]
        if gather:
            stream = _GatheredRows(x, group, chunks, "tp all-gather+matmul", observe)
            for r, a, b_, rows in stream:
                for out, b in zip(outs, bs, strict=True):
                    _matmul_into(out[r, a:b_], rows, b)
            ctx.ranges = [(a, b_) for a, b_, _ in stream.pieces]
            ctx.save_for_backward(*(buf for _, _, buf in stream.pieces), *bs)
        else:
            for out, b in zip(outs, bs, strict=True):
                _matmul_into(out[0], x, b)
            ctx.ranges = None
            ctx.save_for_backward(x, *bs)
        ctx.n_b = len(bs)
        return tuple(out.view(-1, *out.shape[2:]) for out in outs)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        bs = saved[-ctx.n_b :]
        group, tp = ctx.group, ctx.group.size()
        if ctx.gather:
            bufs = saved[: -ctx.n_b]
            s_l = sum(b - a for a, b in ctx.ranges)
            gs = [g.reshape(tp, s_l, *g.shape[1:]) for g in grads]
            x_shape = (s_l, *bufs[0].shape[2:])
            ranges = ctx.ranges
        else:
            (x,) = saved[: -ctx.n_b]
            gs = [g.unsqueeze(0) for g in grads]
            x_shape, s_l = x.shape, x.shape[0]
            bufs = None
            ranges = pieces(s_l, ctx.chunks)
        dx = None
        launched = []
        if ctx.needs_input_grad[0]:
            dx = grads[0].new_empty(x_shape)
            keep = []
            for a, b_ in ranges:
                part = sum(torch.matmul(g[:, a:b_], b.t()) for g, b in zip(gs, bs, strict=True))
                if ctx.gather:
                    part = part.reshape(-1, *part.shape[2:])
                    launched.append(
                        _reduce(dx[a:b_], part, group, True, "tp matmul+reduce-scatter (grad)", ctx.observe)
                    )
                else:
                    dx[a:b_].copy_(part[0])
                    launched.append(_reduce(dx[a:b_], part, group, False, "tp matmul+all-reduce (grad)", ctx.observe))
                keep.append(part)
        dbs = []
        for i, (g, b) in enumerate(zip(gs, bs, strict=True)):
            if not ctx.needs_input_grad[5 + i]:
                dbs.append(None)
                continue
            db = b.new_zeros(b.shape)
            if ctx.gather:
                for (a, b_), buf in zip(ranges, bufs, strict=True):
                    db.addmm_(buf.reshape(-1, buf.shape[-1]).t(), g[:, a:b_].reshape(-1, g.shape[-1]))
            else:
                db.addmm_(x.reshape(-1, x.shape[-1]).t(), g.reshape(-1, g.shape[-1]))
            dbs.append(db)
        for item in launched:
            item.wait()
        return (dx, None, None, None, None, *dbs)


class _MatmulReduce(torch.autograd.Function):
    """y = reduce(x @ B) over the group (``scatter``: reduce-scatter along rows; else all-reduce), piece by
    piece. Backward all-gathers dy piece by piece (``scatter``) and multiplies each piece as it arrives."""

    @staticmethod
    def forward(ctx, x, b, group, scatter, chunks, observe):
        # x: [s, .., k] rows first; scatter: s = tp * s_l
        ctx.group, ctx.scatter, ctx.chunks, ctx.observe = group, scatter, chunks, observe
        tp = group.size() if scatter else 1
        xs = x.view(tp, x.shape[0] // tp, *x.shape[1:])
        out = x.new_empty((xs.shape[1], *x.shape[1:-1], b.shape[1]))
        launched, keep = [], []
        for a, b_ in pieces(xs.shape[1], chunks):
            if scatter:
                part = torch.matmul(xs[:, a:b_], b)
                launched.append(
                    _reduce(
                        out[a:b_], part.reshape(-1, *part.shape[2:]), group, True, "tp matmul+reduce-scatter", observe
                    )
                )
                keep.append(part)
            else:
                _matmul_into(out[a:b_], xs[0, a:b_], b)
                launched.append(_reduce(out[a:b_], out[a:b_], group, False, "tp matmul+all-reduce", observe))
        for item in launched:
            item.wait()
        ctx.save_for_backward(x, b)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, b = ctx.saved_tensors
        if not ctx.scatter:
            dx = torch.matmul(grad, b.t()) if ctx.needs_input_grad[0] else None
            db = x.reshape(-1, x.shape[-1]).t() @ grad.reshape(-1, grad.shape[-1]) if ctx.needs_input_grad[1] else None
            return dx, db, None, None, None, None
        tp = ctx.group.size()
        xs = x.view(tp, x.shape[0] // tp, *x.shape[1:])
        dx = grad.new_empty(xs.shape) if ctx.needs_input_grad[0] else None
        db = b.new_zeros(b.shape) if ctx.needs_input_grad[1] else None
        grad = grad.contiguous()
        # One gather, not pieces: dy is small beside x (n outputs against k inputs per row), and the own
        # rows' two matmuls already cover its transfer; pieces would only add small matmuls.
        for r, a, b_, rows in _GatheredRows(grad, ctx.group, 1, "tp all-gather+matmul (grad)", ctx.observe):
            if dx is not None:
                _matmul_into(dx[r, a:b_], rows, b.t())
            if db is not None:
                db.addmm_(xs[r, a:b_].reshape(-1, x.shape[-1]).t(), rows.reshape(-1, rows.shape[-1]))
        return (None if dx is None else dx.view(x.shape)), db, None, None, None, None


def _autocast_inputs(x: torch.Tensor, bs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Cast to the autocast dtype where autocast is on for x's device (differentiable casts)."""
    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        return x, list(bs)
    dtype = torch.get_autocast_dtype(kind)
    return x.to(dtype), [b.to(dtype) for b in bs]


def _rows_first(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.movedim(dim, 0)


def _rows_back(y: torch.Tensor, dim: int) -> torch.Tensor:
    return y.movedim(0, dim).contiguous()


def _no_autocast(x: torch.Tensor):
    return torch.autocast(x.device.type, enabled=False)


def all_gather_matmul(
    shard: torch.Tensor,
    bs: Sequence[torch.Tensor],
    group: dist.ProcessGroup,
    *,
    dim: int = 0,
    chunks: int = 4,
    observe: Observe | None = None,
) -> list[torch.Tensor]:
    """``[all_gather(shard, dim) @ b for b in bs]``: the gather cut into `chunks` pieces overlapping the matmuls.

    Args:
        shard: ``[.., s_l, .., k]`` this rank's rows along `dim` (not the last dim); rank r holds rows
            ``[r * s_l, (r + 1) * s_l)`` of the whole.
        bs: right operands ``[k, n_i]``; their outputs share one gather.
    Returns ``[.., tp * s_l, .., n_i]`` per operand, contiguous.
    """
    dim = dim % shard.ndim
    shard, bs = _autocast_inputs(shard, bs)
    with _no_autocast(shard):
        if fused_collective_matmul(shard, group):
            return list(_FusedGatherMatmul.apply(shard.contiguous(), group, dim, *bs))
        outs = _GatherMatmul.apply(_rows_first(shard, dim), group, True, chunks, observe, *bs)
    return [_rows_back(y, dim) for y in outs]


def replicated_matmul(
    x: torch.Tensor,
    bs: Sequence[torch.Tensor],
    group: dist.ProcessGroup,
    *,
    chunks: int = 4,
    observe: Observe | None = None,
) -> list[torch.Tensor]:
    """``[x @ b for b in bs]`` for an `x` replicated over the group whose gradient is the sum of every rank's
    (colwise linears without sp): backward all-reduces ``dx`` piece by piece while ``dB`` computes."""
    x, bs = _autocast_inputs(x, bs)
    lead = x.shape[:-1]
    with _no_autocast(x):
        outs = _GatherMatmul.apply(x.reshape(-1, x.shape[-1]), group, False, chunks, observe, *bs)
    return [y.view(*lead, y.shape[-1]) for y in outs]


def matmul_reduce_scatter(
    x: torch.Tensor,
    b: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    dim: int = 0,
    chunks: int = 4,
    observe: Observe | None = None,
) -> torch.Tensor:
    """``reduce_scatter(x @ b, dim)`` summed over the group, each piece's reduce-scatter launched as it exists.

    Args:
        x: ``[.., s, .., k]`` with s divisible by the group size; b: ``[k, n]``.
    Returns ``[.., s / tp, .., n]``: this rank's rows ``[r * s_l, (r + 1) * s_l)`` of the sum, contiguous.
    """
    dim = dim % x.ndim
    tp = group.size()
    if x.shape[dim] % tp:
        raise ValueError(f"dim {dim} of x ({x.shape[dim]}) does not divide by the group size {tp}")
    x, (b,) = _autocast_inputs(x, [b])
    with _no_autocast(x):
        if fused_collective_matmul(x, group):
            return _FusedMatmulReduceScatter.apply(x, b, group, dim)
        y = _MatmulReduce.apply(_rows_first(x, dim), b, group, True, chunks, observe)
    return _rows_back(y, dim)


def matmul_all_reduce(
    x: torch.Tensor, b: torch.Tensor, group: dist.ProcessGroup, *, chunks: int = 4, observe: Observe | None = None
) -> torch.Tensor:
    """``all_reduce(x @ b)``: rows in `chunks` pieces, each all-reduced while the next one multiplies."""
    x, (b,) = _autocast_inputs(x, [b])
    lead = x.shape[:-1]
    with _no_autocast(x):
        y = _MatmulReduce.apply(x.reshape(-1, x.shape[-1]), b, group, False, chunks, observe)
    return y.view(*lead, y.shape[-1])


# -- CUDA with symmetric memory: torch's fused kernels (not reachable on the CPU) -------------------------


class _FusedGatherMatmul(torch.autograd.Function):
    """torch.ops.symm_mem.fused_all_gather_matmul forward; fused_matmul_reduce_scatter for dx in backward."""

    @staticmethod
    def forward(ctx, shard, group, dim, *bs):
        gathered, outs = torch.ops.symm_mem.fused_all_gather_matmul(shard, list(bs), dim, group.group_name)
        ctx.group, ctx.dim = group, dim
        ctx.save_for_backward(gathered, *bs)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        gathered, *bs = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            grad_cat = torch.cat(grads, dim=-1)
            b_cat = torch.cat([b.t() for b in bs], dim=0)
            dx = torch.ops.symm_mem.fused_matmul_reduce_scatter(grad_cat, b_cat, "sum", ctx.dim, ctx.group.group_name)
        flat = gathered.reshape(-1, gathered.shape[-1])
        dbs = [
            flat.t() @ g.reshape(-1, g.shape[-1]) if ctx.needs_input_grad[3 + i] else None for i, g in enumerate(grads)
        ]
        return (dx, None, None, *dbs)


class _FusedMatmulReduceScatter(torch.autograd.Function):
    """torch.ops.symm_mem.fused_matmul_reduce_scatter forward; fused_all_gather_matmul for dx in backward."""

    @staticmethod
    def forward(ctx, x, b, group, dim):
        ctx.group, ctx.dim = group, dim
        ctx.save_for_backward(x, b)
        return torch.ops.symm_mem.fused_matmul_reduce_scatter(x, b, "sum", dim, group.group_name)

    @staticmethod
    def backward(ctx, grad):
        x, b = ctx.saved_tensors
        gathered, (dx,) = torch.ops.symm_mem.fused_all_gather_matmul(
            grad.contiguous(), [b.t()], ctx.dim, ctx.group.group_name
        )
        db = x.reshape(-1, x.shape[-1]).t() @ gathered.reshape(-1, gathered.shape[-1])
        return dx, db, None, None
