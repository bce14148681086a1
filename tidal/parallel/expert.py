"""Expert parallelism: a mixture-of-experts FFN whose experts are sharded over the topology's ``ep`` group.

    layers = apply_expert_parallel(model, topology, optimizer)  # Mixtral blocks, dense MoELayers: this rank's experts
    loss = model(input_ids=ids, labels=ids).loss + moe_aux_loss(model)

One `MoELayer` forward on T local tokens of width H, E experts, top-k, ep ranks holding El = E/ep each:

1. route: router logits (T, E) -> softmax -> top-k -> the k weights renormalised to sum 1 (as Mixtral).
2. capacity (optional): each expert keeps at most ceil(capacity_factor * T * k / E) of this rank's
   assignments, every token's first choice before any token's second, then by token order. A dropped
   assignment adds nothing: the token keeps only its residual path. `dropped` counts them.
3. dispatch: the kept (token, expert) assignments sorted by expert, N rows (N, H); the per-expert counts
   (E,) are exchanged with one all-to-all, then the rows with a second one of uneven splits: rank r
   receives, from every source rank in turn, its rows for r's experts in expert order.
4. experts: the received rows regrouped by local expert; each expert is a SwiGLU FFN
   ``w2 @ (silu(w1 @ x) * (w3 @ x))`` with w1, w3: (El, F, H), w2: (El, H, F).
5. combine: the reverse all-to-all (splits swapped) brings the outputs back in the dispatch order; each
   is scaled by its router weight and summed into its token's row.

In pieces (``overlap``, config ``comm.overlap.moe``: on, or auto by a timed trial; every step is in
`tidal.parallel.expert_exchange`), C = ``overlap.chunks``:

a. cut: each expert's N_e rows into C near-equal runs, ``[N_e * j // C, N_e * (j + 1) // C)``; piece j
   takes run j of every expert (rows stay sorted by expert within a piece; capacity, decided before
   the cut, keeps the same assignments whatever C). The counts of every piece, (ep, C, El), cross in
   ONE all-to-all; the tokens are gathered straight into piece order, n_j rows (n_j, H) per piece.
b. forward: every piece's dispatch all-to-all (n_j, H) -> (m_j, H) is launched at once; piece j's
   experts run on its rows as they came, (source rank, local expert) blocks, once they arrived and while
   later pieces still travel; its combine (m_j, H) -> (n_j, H) travels while piece j + 1 computes.
c. backward, the same in reverse: every piece's combine-gradient all-to-all launched at once; piece j's
   experts' backward (dx_j (m_j, H); dW summed over pieces) once it arrived; its dispatch-gradient
   (m_j, H) -> (n_j, H) travels while piece j + 1's backward computes.
d. the outputs (N, H), in piece order, are weighted and summed into their tokens as in step 5.

Not hidden: the counts exchange (the host must know them), the first piece's dispatch and the last
piece's combine (and in backward the first combine-gradient and the last dispatch-gradient), the router,
the gathers and the weighted sum; and the exchange overlaps its own experts only, not other layers'
compute (autograd's thread waits inside it). With ``overlap`` set but one piece chosen (``off``, or auto
deciding against pieces) the same code runs with C = 1; either way every collective is reported to
``overlap.observe``. Experts sharded by ZeRO 3 (FSDP2) always take the plain path below.

Without ``overlap`` (None) the row all-to-alls are torch's differentiable functional collectives, so
backward runs them in reverse, each waited where autograd reaches it: nothing overlaps. Every path: all
ranks issue the same collectives in the same order; a rank that routes no tokens, or whose experts
receive none, still takes part with empty tensors, and every local expert runs (on zero rows if need
be), so each expert parameter gets a gradient tensor (zeros, never None) and a gradient reduction over
``edp`` never waits on a rank that skipped it.

Gradient reduction (the engine's job): a non-expert gradient is averaged over ``dp_sp`` as in plain data
parallel. An expert gradient already sums the contributions of all ep ranks' tokens (backward's
all-to-all brings them home), so it is summed over ``edp`` and divided by the ``dp_sp`` size:
``all_reduce(g, SUM, edp); g /= size(dp_sp)``. Expert parameters carry ``param._tidal_expert = True``;
`expert_parameters` lists them.

The load-balancing loss (`MoELayer.aux_loss`, Switch/Mixtral): ``E * sum_e f_e * P_e`` with f_e the
fraction of this rank's tokens that chose expert e (before capacity; sums to k) and P_e the mean router
probability of e, as transformers' ``load_balancing_loss_func`` for one layer.

Checkpoints (`tidal.parallel.expert_checkpoint`) hold every expert weight at its global shape under MoELayer's
names (``<block>.experts.w1``, ``w3``: (E, F, H); ``w2``: (E, H, F)), expert e at row e, whatever the
ep size: a checkpoint taken at ep=2 loads at ep=1, ep=4 or into an unconverted transformers model.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule

from tidal.comm.overlap import Overlap
from tidal.parallel.expert_exchange import exchange_in_pieces, plan_pieces
from tidal.parallel.topology import Topology

MIXTRAL_BLOCKS = ("MixtralSparseMoeBlock",)
"""transformers class names converted by `convert_mixtral_moe` (5.x layout: fused 3-D expert weights)."""


class ExpertParallelError(ValueError):
    """A size or model that expert parallelism cannot take; the message names the value and the fix."""


class TopKRouter(nn.Module):
    """Mixtral's router: logits (T, E), the renormalised top-k weights (T, k) in fp32 and their experts (T, k)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, device=device, dtype=dtype))
        nn.init.uniform_(self.weight, -(hidden**-0.5), hidden**-0.5)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(tokens, self.weight)
        top_weights, top_experts = torch.topk(logits.float().softmax(dim=-1), self.top_k, dim=-1)
        return logits, top_weights / top_weights.sum(dim=-1, keepdim=True), top_experts


class SwiGLUExperts(nn.Module):
    """This rank's experts as 3-D weights: w1, w3 (El, F, H) gate and up, w2 (El, H, F) down."""

    def __init__(self, local_experts: int, hidden: int, ffn_hidden: int, *, device=None, dtype=None) -> None:
        super().__init__()
        for name, shape, fan_in in (
            ("w1", (ffn_hidden, hidden), hidden),
            ("w3", (ffn_hidden, hidden), hidden),
            ("w2", (hidden, ffn_hidden), ffn_hidden),
        ):
            weight = nn.Parameter(torch.empty(local_experts, *shape, device=device, dtype=dtype))
            nn.init.uniform_(weight, -(fan_in**-0.5), fan_in**-0.5)
            weight._tidal_expert = True
            self.register_parameter(name, weight)

    def forward(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows (N, H) in blocks of `counts[b]` rows, block b for local expert ``b % El`` (one block per expert:
        grouped by expert) -> outputs (N, H), same order."""
        return swiglu_experts(rows, counts, self.w1, self.w3, self.w2)


def swiglu_experts(
    rows: torch.Tensor, counts: list[int], w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """`SwiGLUExperts` on explicit weights w1, w3 (El, F, H), w2 (El, H, F): rows (N, H) in blocks of
    `counts[b]` rows, block b for local expert ``b % El`` -> outputs (N, H), same order. Rows received
    from ep ranks, (source rank, local expert) blocks, run as they came, without a regrouping copy."""
    # Every expert runs, on zero rows too, so each weight gets a (zero) gradient and is never left None.
    outs = []
    for b, block in enumerate(rows.split(counts)):
        j = b % w1.shape[0]
        gated = F.silu(F.linear(block, w1[j])) * F.linear(block, w3[j])
        outs.append(F.linear(gated, w2[j]))
    return torch.cat(outs)


class MoELayer(nn.Module):
    """A top-k mixture of SwiGLU experts: input (..., hidden) -> output (..., hidden), no residual added.

    Args:
        hidden, ffn_hidden: model width and each expert's inner width.
        num_experts, top_k: experts in the layer (over all ep ranks) and experts per token.
        capacity_factor: at most ceil(capacity_factor * tokens * top_k / num_experts) assignments per
            expert from this rank's tokens; None keeps every assignment.
        aux_loss_coef: weight of this layer's `aux_loss` in `moe_aux_loss`.
        group: the expert-parallel process group (``topology.group("ep")``); None holds every expert.
    Raises:
        ExpertParallelError: the group's size does not divide num_experts, top_k is not in
            1..num_experts, or capacity_factor is not positive.
    After each forward: ``aux_loss`` (0-dim fp32, with grad), ``dropped`` and ``assignments`` (ints: this
    rank's dropped and total token-expert assignments) and ``drop_fraction``.
    """

    def __init__(
        self,
        hidden: int,
        ffn_hidden: int,
        num_experts: int,
        top_k: int,
        *,
        capacity_factor: float | None = None,
        aux_loss_coef: float = 0.01,
        group: dist.ProcessGroup | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.ep = 1 if group is None else dist.get_world_size(group)
        if num_experts % self.ep:
            choices = ", ".join(str(d) for d in range(1, num_experts + 1) if num_experts % d == 0)
            raise ExpertParallelError(
                f"ep={self.ep} does not divide num_experts={num_experts}; choose ep in {{{choices}}}"
            )
        if not 1 <= top_k <= num_experts:
            raise ExpertParallelError(
                f"top_k={top_k} is not in 1..num_experts={num_experts}; choose top_k in that range"
            )
        if capacity_factor is not None and not capacity_factor > 0:
            raise ExpertParallelError(f"capacity_factor={capacity_factor} must be positive, or None for no limit")
        self.hidden, self.ffn_hidden, self.num_experts, self.top_k = hidden, ffn_hidden, num_experts, top_k
        self.capacity_factor = capacity_factor
        self.aux_loss_coef = aux_loss_coef
        self.group = group
        self.local_experts = num_experts // self.ep
        self.first_expert = (0 if group is None else dist.get_rank(group)) * self.local_experts
        """Global index of this rank's first expert: it holds first_expert .. first_expert + local_experts - 1."""
        self.gate = TopKRouter(hidden, num_experts, top_k, device=device, dtype=dtype)
        self.experts = SwiGLUExperts(self.local_experts, hidden, ffn_hidden, device=device, dtype=dtype)
        self.aux_loss: torch.Tensor | None = None
        self.dropped = 0
        self.assignments = 0
        self.overlap: Overlap | None = None
        """Set by `apply_expert_parallel`: whether the exchange runs in pieces overlapping the experts, and
        where its collectives are reported; None: torch's functional all-to-alls in one piece, unreported."""

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, ffn_hidden={self.ffn_hidden}, experts={self.num_experts} "
            f"({self.local_experts} here, ep={self.ep}), top_k={self.top_k}, capacity_factor={self.capacity_factor}"
        )

    @property
    def drop_fraction(self) -> float:
        """Dropped over all token-expert assignments of the last forward on this rank."""
        return self.dropped / self.assignments if self.assignments else 0.0

    @torch.no_grad()
    def load_experts(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> None:
        """Copy this rank's experts out of full weights: w1, w3 (E, F, H), w2 (E, H, F)."""
        mine = slice(self.first_expert, self.first_expert + self.local_experts)
        for name, full in (("w1", w1), ("w3", w3), ("w2", w2)):
            getattr(self.experts, name).copy_(full[mine])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.reshape(-1, self.hidden)
        n_tokens = tokens.shape[0]
        logits, top_weights, top_experts = self.gate(tokens)
        # Slot-major: row i is slot i // T of token i % T, so every first choice outranks every second one.
        experts = top_experts.t().reshape(-1)
        counts = torch.bincount(experts, minlength=self.num_experts)
        self.aux_loss = self.num_experts * torch.sum(
            counts.float() / n_tokens * logits.float().softmax(dim=-1).mean(dim=0)
        )
        order = torch.argsort(experts, stable=True)
        token_of_row = order % n_tokens
        weight_of_row = top_weights.t().reshape(-1)[order]
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * n_tokens * self.top_k / self.num_experts)
            position = torch.arange(order.numel(), device=order.device) - (counts.cumsum(0) - counts)[experts[order]]
            keep = position < capacity
            token_of_row, weight_of_row = token_of_row[keep], weight_of_row[keep]
            counts = counts.clamp(max=capacity)
        self.assignments = order.numel()
        self.dropped = self.assignments - token_of_row.numel()
        return self._experts_sum(tokens, token_of_row, weight_of_row, counts).reshape(hidden_states.shape)

    def _experts_sum(
        self, tokens: torch.Tensor, token_of_row: torch.Tensor, weight_of_row: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """Tokens (T, H) and the kept assignments sorted by global expert (token (N,), router weight (N,),
        counts (E,) per expert) -> (T, H): every token's expert outputs, weighted and summed."""
        overlap = self.overlap
        # Experts sharded by FSDP2 (ZeRO 3) gather their weights per call and hook their backward: pieces
        # would gather them once per piece, and an auto trial's backward would leave FSDP's state half-done.
        if self.group is None or overlap is None or isinstance(self.experts, FSDPModule):
            rows = tokens[token_of_row]
            out = self.experts(rows, counts.tolist()) if self.group is None else self._exchange(rows, counts)
            return _weighted_sum(tokens, token_of_row, weight_of_row, out)
        weights = [self.experts.w1, self.experts.w3, self.experts.w2]
        one_piece = functools.partial(self._exchange_chunked, chunks=1)
        in_pieces = functools.partial(self._exchange_chunked, chunks=overlap.chunks)
        # The key leaves out the row count: it differs between ranks and steps, the decision must not.
        # The weights are inputs, so the auto trial's backward computes their gradients (into copies) too.
        key = ("moe", self.hidden, self.ffn_hidden, self.local_experts, tokens.dtype)
        inputs = [tokens, token_of_row, weight_of_row, counts, *weights]
        return overlap.choose(key, self.group, one_piece, in_pieces, inputs)(*inputs)

    def _exchange_chunked(
        self, tokens, token_of_row, weight_of_row, counts, *weights: torch.Tensor, chunks: int
    ) -> torch.Tensor:
        """`_experts_sum` with experts on `weights` (w1, w3, w2), the exchange in `chunks` pieces (module doc)."""
        observe = self.overlap.observe if self.overlap is not None else None
        plan = plan_pieces(counts, chunks, self.local_experts, self.group, observe)
        if plan.order is not None:  # rows gathered straight into piece order, and summed back from it
            token_of_row, weight_of_row = token_of_row[plan.order], weight_of_row[plan.order]
        out = exchange_in_pieces(tokens[token_of_row], plan, swiglu_experts, weights)
        return _weighted_sum(tokens, token_of_row, weight_of_row, out)

    def _local_experts(self, received: torch.Tensor, received_counts: torch.Tensor) -> torch.Tensor:
        """Rows received from every source rank (in source, then local-expert order; `received_counts` (ep, El))
        through this rank's experts -> outputs in the same order."""
        local_expert = torch.arange(self.local_experts, device=received.device).repeat(self.ep)
        by_expert = torch.argsort(local_expert.repeat_interleave(received_counts.reshape(-1)), stable=True)
        out = self.experts(received[by_expert], received_counts.sum(0).tolist())
        return torch.empty_like(out).index_copy(0, by_expert, out)  # back to (source rank, expert) order

    def _exchange(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Dispatch, experts, combine in one piece each by torch's functional collectives (no ``overlap``)."""
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts, group=self.group)
        # received_counts[s, j]: rows that source rank s sends to this rank's local expert j
        received_counts = received_counts.view(self.ep, self.local_experts)
        send_splits = counts.view(self.ep, self.local_experts).sum(1).tolist()
        receive_splits = received_counts.sum(1).tolist()
        received = funcol.all_to_all_single_autograd(rows, receive_splits, send_splits, self.group)
        out = self._local_experts(funcol.wait_tensor(received), received_counts)
        return funcol.wait_tensor(funcol.all_to_all_single_autograd(out, send_splits, receive_splits, self.group))


def _weighted_sum(
    tokens: torch.Tensor, token_of_row: torch.Tensor, weight_of_row: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Expert outputs (N, H), row i scaled by `weight_of_row[i]` and added into token `token_of_row[i]`: (T, H)."""
    weighted = (out * weight_of_row[:, None]).to(tokens.dtype)
    return torch.zeros_like(tokens).index_add(0, token_of_row, weighted)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Expert weights (of `SwiGLUExperts`, or marked ``_tidal_expert``): their gradients reduce over ``edp``.

    Found by module as well as by mark, since a copy of a parameter (``copy.deepcopy``) loses the mark.
    """
    held = {id(p) for m in model.modules() if isinstance(m, SwiGLUExperts) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) in held or getattr(p, "_tidal_expert", False)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum over the model's MoE layers of ``aux_loss_coef * aux_loss`` from their last forward (0-dim)."""
    losses = [
        m.aux_loss_coef * m.aux_loss for m in model.modules() if isinstance(m, MoELayer) and m.aux_loss is not None
    ]
    return torch.stack(losses).sum() if losses else torch.zeros(())


def _ep_group(topology: Topology | None) -> dist.ProcessGroup | None:
    return None if topology is None or topology.size("ep") == 1 else topology.group("ep")


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    if not name:
        raise ExpertParallelError(f"the model itself is a {type(model).__name__}; wrap it in a parent module")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, layer)


def _with_experts(gate: nn.Module, w1, w3, w2, group: dist.ProcessGroup | None, **options) -> MoELayer:
    """A `MoELayer` around an existing router, holding this rank's rows of full w1, w3 (E, F, H), w2 (E, H, F)."""
    num_experts, ffn_hidden, hidden = w1.shape
    layer = MoELayer(
        hidden, ffn_hidden, num_experts, gate.top_k, group=group, device=w1.device, dtype=w1.dtype, **options
    )
    layer.load_experts(w1, w3, w2)
    layer.gate = gate  # the same module: its parameter keeps its name, and transformers still records its logits
    return layer


def _from_mixtral_block(block: nn.Module, group: dist.ProcessGroup | None) -> MoELayer:
    experts = block.experts
    if block.jitter_noise > 0:
        raise ExpertParallelError(
            f"router_jitter_noise={block.jitter_noise} is not supported by MoELayer; set router_jitter_noise=0"
        )
    act = getattr(experts.config, "hidden_act", "silu")
    if act != "silu":
        raise ExpertParallelError(f"hidden_act={act!r}: MoELayer's experts are SwiGLU; only 'silu' converts")
    w1, w3 = experts.gate_up_proj.detach().chunk(2, dim=1)
    coef = experts.config.router_aux_loss_coef
    return _with_experts(block.gate, w1, w3, experts.down_proj.detach(), group, aux_loss_coef=coef)


def _repoint(optimizer: torch.optim.Optimizer, replaced: dict[nn.Parameter, list[nn.Parameter]]) -> None:
    """Put the new parameters in the optimizer's param groups where the ones they replace were."""
    if optimizer.state:
        raise ExpertParallelError("the optimizer has already stepped; convert the model before its first step")
    for group in optimizer.param_groups:
        group["params"] = [q for p in group["params"] for q in replaced.get(p, [p])]


def convert_mixtral_moe(
    model: nn.Module, topology: Topology | None, optimizer: torch.optim.Optimizer | None = None
) -> int:
    """Replace each transformers Mixtral sparse-MoE block by an equal `MoELayer` holding this rank's experts.

    The router module is kept as is (same parameter, and ``output_router_logits`` still works); the
    experts' fused gate_up_proj (E, 2F, H) splits into w1 and w3, down_proj (E, H, F) becomes w2, in
    `optimizer`'s param groups too when given. `topology` None (or ep=1) keeps every expert. Returns
    the number of blocks converted.
    """
    group = _ep_group(topology)
    blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__ in MIXTRAL_BLOCKS]
    replaced = {}
    for name, block in blocks:
        layer = _from_mixtral_block(block, group)
        replaced[block.experts.gate_up_proj] = [layer.experts.w1, layer.experts.w3]
        replaced[block.experts.down_proj] = [layer.experts.w2]
        _replace(model, name, layer)
    if optimizer is not None:
        _repoint(optimizer, replaced)
    return len(blocks)


def apply_expert_parallel(
    model: nn.Module,
    topology: Topology | None,
    optimizer: torch.optim.Optimizer | None = None,
    overlap: Overlap | None = None,
) -> list[MoELayer]:
    """Shard the model's experts over ``topology.group("ep")``; returns its `MoELayer`s, outermost first.

    Mixtral sparse-MoE blocks are converted (`convert_mixtral_moe`), and `MoELayer`s built with every
    expert (group None) keep only this rank's. Every rank must hold the same full weights beforehand.
    An `optimizer` not yet stepped gets the new expert parameters in the replaced ones' param groups.
    `overlap` (``comm.overlap.moe`` and ``chunks``) decides whether each layer's exchange runs in pieces.
    """
    convert_mixtral_moe(model, topology, optimizer)
    group = _ep_group(topology)
    dense = [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer) and m.group is None]
    replaced = {}
    for name, layer in dense if group is not None else []:
        weights = [getattr(layer.experts, w) for w in ("w1", "w3", "w2")]
        options = {"capacity_factor": layer.capacity_factor, "aux_loss_coef": layer.aux_loss_coef}
        sharded = _with_experts(layer.gate, *(w.detach() for w in weights), group, **options)
        replaced.update({w: [getattr(sharded.experts, n)] for w, n in zip(weights, ("w1", "w3", "w2"), strict=True)})
        _replace(model, name, sharded)
    if optimizer is not None:
        _repoint(optimizer, replaced)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        layer.overlap = overlap
    return layers
