"""The MoE exchange in pieces: dispatch all-to-all, experts, combine all-to-all, with each piece's
transfers travelling while another piece's experts compute, in forward and in backward.

    plan = plan_pieces(counts, chunks, local_experts, group, observe)   # one all-to-all of every piece's counts
    rows = tokens[token_of_row[plan.order]]                            # (N, H) in piece order (order None: as is)
    out = exchange_in_pieces(rows, plan, swiglu_experts, weights)      # (N, H): expert outputs, same order

Shapes: ep ranks, El experts per rank (E = ep * El), C pieces, H hidden. This rank sends N rows sorted by
global expert, ``counts`` (E,) per expert; piece j sends n_j of them and receives m_j.

plan_pieces
    each expert's ``counts[e]`` rows are cut into C near-equal runs (run j: rows
    ``[counts[e] * j // C, counts[e] * (j + 1) // C)`` of that expert) and piece j takes run j of every
    expert, so a piece's rows stay sorted by expert and an expert's rows are the same whatever C. The
    counts of every piece, (ep, C, El), cross in ONE all-to-all, waited at once (the host needs them to
    size the row all-to-alls). ``order`` (N,): the rows' indices in piece order, for the caller's gather;
    None for one piece.
forward   rows (N, H) in piece order, split into pieces (n_j, H) (views, no copy)
    every piece's dispatch all-to-all is launched at once: (n_j, H) -> (m_j, H), received in (source
    rank, local expert) blocks. For j in order: wait for dispatch j; the experts run on its blocks as
    they came (no regrouping copy) -> (m_j, H); launch combine j (m_j, H) -> (n_j, H), which travels
    while piece j + 1's experts compute. Wait for every combine; (N, H) in piece order.
saves     per piece, the experts' own graph (its output's gradient edge), built on the received rows (a
    leaf (m_j, H), which the experts' matmuls save anyway) and on detached weights (the same storage):
    what autograd saves for the experts, no more.
backward  dy (N, H) in piece order
    every piece's combine-gradient all-to-all launched at once: (n_j, H) -> (m_j, H). For j in order:
    wait for it; the experts' backward of piece j (a nested ``torch.autograd.grad`` on its graph) gives
    dx_j (m_j, H) and dW_j (summed over pieces); launch dispatch-gradient j (m_j, H) -> (n_j, H), which
    travels while piece j + 1's backward computes. Wait for all; dx (N, H) in piece order.

One piece (C = 1) is the plain exchange: dispatch, wait, experts, combine, wait; the same code, so the
auto trial times like against like. Every rank issues the same collectives in the same order (counts;
dispatch 0..C-1; combine 0..C-1; in backward combine-gradient 0..C-1, dispatch-gradient 0..C-1), pieces
with zero rows included. Each is reported to `observe` ("moe counts", "moe dispatch", "moe combine",
"moe combine (grad)", "moe dispatch (grad)") when given. Experts whose module hooks must run (FSDP2's
gathers) cannot go through here: the experts run as a function of explicit weights, and their backward
in a nested autograd call. A double backward through the exchange is not supported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable
from torch.autograd.graph import get_gradient_edge

from tidal.comm.overlap import Observe, _Launched

Experts = Callable[..., torch.Tensor]
"""``experts(rows, blocks, *weights)``: rows (m, H) in blocks of ``blocks[b]`` rows, block b for local
expert ``b % El`` -> outputs (m, H) in the same order (`tidal.parallel.expert.swiglu_experts`)."""


@dataclass
class PiecePlan:
    """Where every piece's rows go, from `plan_pieces`; lists indexed by piece."""

    group: dist.ProcessGroup
    observe: Observe | None
    order: torch.Tensor | None
    """(N,): row indices of the sent rows in piece order; None for one piece (already in order)."""
    sent: list[int]
    """n_j: rows this rank sends in piece j."""
    send_splits: list[list[int]]
    """Piece j's rows to each rank (ep,)."""
    receive_splits: list[list[int]]
    """Piece j's rows from each rank (ep,)."""
    received: list[int]
    """m_j: rows this rank receives in piece j."""
    received_counts: list[torch.Tensor]
    """Piece j's rows from source rank s for local expert l, (ep, El)."""

    def launch(self, j: int, out: torch.Tensor, send: torch.Tensor, to_experts: bool, name: str) -> _Launched:
        """Start piece j's all-to-all of `send` rows into `out`, toward the experts (n_j -> m_j rows) or back
        (m_j -> n_j); its ``wait()`` reports the wait to `observe`."""
        splits = (self.receive_splits[j], self.send_splits[j])
        out_splits, send_splits = splits if to_experts else splits[::-1]
        work = dist.all_to_all_single(out, send, out_splits, send_splits, group=self.group, async_op=True)
        return _Launched(work, name, send.numel() * send.element_size(), self.observe)

    def pipeline(self, rows: torch.Tensor, compute: Callable, names: tuple[str, str]) -> torch.Tensor | None:
        """Every piece of `rows` (N, H) in piece order sent toward the experts at once; for each piece in
        order, once it arrived, ``compute(j, received (m_j, H))`` and its result (m_j, H) sent back while
        the next piece computes. Returns what came back, (N, H) in piece order; None when every
        `compute` returned None (nothing to send back)."""
        hidden = rows.shape[1]
        _, received = _buffer(self.received, hidden, rows)
        sent = rows.contiguous().split(self.sent)
        arriving = [self.launch(j, received[j], sent[j], True, names[0]) for j in range(len(sent))]
        back, pieces, returning, held = None, None, [], []
        for j, launched in enumerate(arriving):
            launched.wait()
            out = compute(j, received[j])
            if out is None:
                continue
            if back is None:  # the result's dtype (the experts' under autocast) is known now
                back, pieces = _buffer(self.sent, hidden, out)
            returning.append(self.launch(j, pieces[j], out, False, names[1]))
            held.append(out)  # alive until its all-to-all is done
        for launched in returning:
            launched.wait()
        return back


def plan_pieces(
    counts: torch.Tensor, chunks: int, local_experts: int, group: dist.ProcessGroup, observe: Observe | None = None
) -> PiecePlan:
    """Cut this rank's rows, `counts` (E,) per global expert, into `chunks` pieces and exchange every
    piece's counts with the group in one all-to-all (see the module doc)."""
    ep = group.size()
    cut = torch.stack([counts * j // chunks for j in range(chunks + 1)])  # (C + 1, E)
    part = cut.diff(dim=0)  # (C, E)
    sent_counts = part.view(chunks, ep, local_experts).transpose(0, 1).contiguous()  # (ep, C, El) by destination
    received = torch.empty_like(sent_counts)
    work = dist.all_to_all_single(received, sent_counts, group=group, async_op=True)
    _Launched(work, "moe counts", sent_counts.numel() * sent_counts.element_size(), observe).wait()
    order = None
    if chunks > 1:  # block (j, e): rows start_e + cut[j, e] .. of expert e, blocks in piece-major order
        start = counts.cumsum(0) - counts
        order = _runs_of_rows((start + cut[:-1]).reshape(-1), part.reshape(-1))
    return PiecePlan(
        group,
        observe,
        order,
        part.sum(1).tolist(),
        part.view(chunks, ep, local_experts).sum(2).tolist(),
        received.sum(2).t().tolist(),
        received.sum((0, 2)).tolist(),
        list(received.unbind(1)),
    )


def _runs_of_rows(first: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Row indices ``first[i], .., first[i] + lengths[i] - 1`` for every run i, runs in order."""
    starts = (lengths.cumsum(0) - lengths).repeat_interleave(lengths)
    return first.repeat_interleave(lengths) + torch.arange(len(starts), device=lengths.device) - starts


def exchange_in_pieces(
    rows: torch.Tensor, plan: PiecePlan, experts: Experts, weights: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Dispatch `rows` (N, H), in piece order (``rows[plan.order]`` of rows sorted by global expert), as
    `plan` says, run `experts` on `weights` where each piece lands, and combine: (N, H) outputs in the
    same order, differentiable in rows and weights."""
    build_graph = torch.is_grad_enabled() and (rows.requires_grad or any(w.requires_grad for w in weights))
    return _ExchangeInPieces.apply(plan, experts, build_graph, rows, *weights)


@dataclass
class _PieceGraph:
    """One piece's experts as recorded in forward: what its backward needs."""

    outputs: torch.autograd.graph.GradientEdge
    received: torch.Tensor
    """The leaf the experts ran on: the piece's received rows (m_j, H)."""
    weights: list[torch.Tensor]
    """Leaves sharing the weights' storage."""


def _run_piece(received, counts, experts, weights, build_graph) -> tuple[torch.Tensor, _PieceGraph | None]:
    """Experts on one piece's received rows (m_j, H), `counts` (ep, El) per source rank and local expert ->
    outputs (m_j, H) in the same order, and the graph for backward when `build_graph`."""
    blocks = counts.reshape(-1).tolist()  # (source, local expert) blocks: block b runs on expert b % El
    if not build_graph:
        return experts(received, blocks, *weights), None
    received.requires_grad_()
    leaves = [w.detach().requires_grad_(w.requires_grad) for w in weights]
    with torch.enable_grad():
        out = experts(received, blocks, *leaves)
    return out.detach(), _PieceGraph(get_gradient_edge(out), received, leaves)


def _buffer(sizes: list[int], hidden: int, like: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A new (sum(sizes), H) tensor of `like`'s dtype and device, and its pieces of `sizes` rows (views)."""
    buffer = like.new_empty((sum(sizes), hidden))
    return buffer, list(buffer.split(sizes))


class _ExchangeInPieces(torch.autograd.Function):
    """rows (N, H) in piece order -> expert outputs (N, H), same order; backward: dx (N, H) and every
    weight's gradient. Buffers are one tensor per direction, each piece's all-to-all writing its slice."""

    @staticmethod
    def forward(ctx, plan: PiecePlan, experts: Experts, build_graph: bool, rows: torch.Tensor, *weights):
        graphs = []

        def run(j: int, received: torch.Tensor) -> torch.Tensor:
            out, graph = _run_piece(received, plan.received_counts[j], experts, weights, build_graph)
            graphs.append(graph)
            return out

        done = plan.pipeline(rows, run, ("moe dispatch", "moe combine"))
        ctx.plan, ctx.graphs = plan, graphs
        return done

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        plan, graphs = ctx.plan, ctx.graphs
        ctx.graphs = None
        needs_rows, needs_weights = ctx.needs_input_grad[3], ctx.needs_input_grad[4:]
        weight_grads: list[torch.Tensor | None] = [None] * len(needs_weights)

        def run(j: int, received: torch.Tensor) -> torch.Tensor | None:
            graph = graphs[j]
            wanted = [w for w, needed in zip(graph.weights, needs_weights, strict=True) if needed]
            inputs = ([graph.received] if needs_rows else []) + wanted
            found = list(torch.autograd.grad([graph.outputs], inputs, [received]))
            dx = found.pop(0) if needs_rows else None
            for i, needed in enumerate(needs_weights):
                if needed:
                    dw = found.pop(0)
                    weight_grads[i] = dw if weight_grads[i] is None else weight_grads[i].add_(dw)
            return dx

        drows = plan.pipeline(grad, run, ("moe combine (grad)", "moe dispatch (grad)"))
        return None, None, None, drows, *weight_grads
