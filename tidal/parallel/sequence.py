"""Sequence (context) parallel attention: all-to-all over heads (Ulysses) or ring attention, on sequence shards.

Every rank of the topology's ``sp`` group holds ``S/sp`` tokens of each sequence, in the plain or
balanced layout of `tidal.parallel.ring` (balanced, the default, evens out causal work). Everything
per-token outside attention (embeddings, MLPs, norms, the loss) runs on the shard unchanged; only
attention needs the other shards:

- **Ulysses** (`ulysses_attention`): one all-to-all turns q/k/v from [B, H, S/sp, D] (all heads, a
  shard of the tokens) into [B, H/sp, S, D] (a share of the heads, every token); attention runs
  locally with ``scaled_dot_product_attention``; a second all-to-all turns the output back. The
  degree is bounded by the head count (``sp`` must divide H). GQA: key/value heads are split as they
  are when ``sp`` divides Hkv, otherwise each is repeated just enough (to ``lcm(Hkv, sp)`` heads).
- **Ring** (`ring_attention`): key/value shards travel around the ring; any ``sp`` works.

Using it with a transformers causal LM (Llama, GPT-2, and others that call ``AttentionInterface``)::

    apply_sequence_parallel(model, topology, method="ring")          # once, before the optimizer
    batch = shard_batch_for_sequence_parallel(ids, ids, topology)    # every step, same full batch on the sp group
    loss = model(**batch).loss          # the full-sequence mean loss, on every rank of the sp group
    loss.backward()                     # gradients are this shard's share: average them over dp_sp
                                        # (the engine's data parallel does), then optimizer.step()

Labels are shifted before the sequence is cut (the token after a shard's last token lives on another
rank), so the batch carries ``shift_labels``; `SequenceParallelLoss` turns each shard's summed loss
into ``sp * sum / (valid labels of the whole sequence)``, whose average over the group is exactly
the full-sequence mean, and reports the mean itself.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from tidal.parallel.ring import (
    gather_sequence,
    pair_mask,
    ring_attention,
    shard_positions,
    shard_sequence,
    unshard_sequence,
)
from tidal.parallel.topology import Topology

__all__ = [
    "ATTENTION_NAME",
    "SequenceParallelAttention",
    "SequenceParallelLoss",
    "apply_sequence_parallel",
    "check_ulysses_degree",
    "communication_bytes",
    "ring_attention",
    "shard_batch_for_sequence_parallel",
    "shard_sequence",
    "ulysses_attention",
    "unshard_sequence",
]

METHODS = ("ulysses", "ring")
ATTENTION_NAME = "tidal_sequence_parallel"
"""The name registered in transformers' ``AttentionInterface`` and ``AttentionMaskInterface``."""


def check_ulysses_degree(sp: int, num_heads: int) -> None:
    """Raise ValueError unless `sp` divides `num_heads` (Ulysses gives each rank H/sp whole heads)."""
    if num_heads % sp:
        choices = ", ".join(str(d) for d in range(1, num_heads + 1) if num_heads % d == 0)
        rule = "exceeds" if sp > num_heads else "does not divide"
        raise ValueError(
            f"sp={sp} {rule} num_attention_heads={num_heads} (Ulysses splits heads); "
            f"choose sp in {{{choices}}} or parallel.sequence.method=ring"
        )


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable all-to-all over dim 0 of [sp, ...]: slice i goes to rank i; slot i is what rank i sent."""
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(x.contiguous(), None, None, group))


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    scale: float | None = None,
    balanced: bool = False,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Exact attention by all-to-all over heads; q [B, H, S/sp, D], k/v [B, Hkv, S/sp, D] -> [B, H, S/sp, D].

    Inputs are shards in the layout `balanced` names; `attention_mask` [B, S/sp] (True = real key)
    and `segment_ids` [B, S/sp] as in `ring_attention`. Autograd flows through funcol's
    differentiable all-to-all. `dropout` is SDPA's attention dropout probability.
    """
    sp = dist.get_world_size(group)
    b, heads, local, d = q.shape
    kv_heads = k.shape[1]
    check_ulysses_degree(sp, heads)
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} are not a multiple of key/value heads {kv_heads}")
    repeat = math.lcm(kv_heads, sp) // kv_heads  # divides H/Hkv, since Hkv and sp both divide H
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
    # [B, H, S/sp, D] -> [sp, B, H/sp, S/sp, D]: head group j goes to rank j (q, k, v in one message).
    packed = torch.cat([t.reshape(b, sp, t.shape[1] // sp, local, d) for t in (q, k, v)], dim=2).transpose(0, 1)
    full = _all_to_all(packed, group)  # [sp (token shard), B, heads here, S/sp, D]
    full = full.permute(1, 2, 0, 3, 4).reshape(b, -1, sp * local, d)
    order = natural = None  # balanced: the global index of each gathered token, and its inverse
    if balanced:
        order = torch.cat([shard_positions(sp * local, r, sp, True, q.device) for r in range(sp)])
        natural = torch.argsort(order)
        full = full.index_select(2, natural)  # tokens back in sequence order
    hq, hkv = heads // sp, k.shape[1] // sp
    q, k, v = full.split([hq, hkv, hkv], dim=1)
    mask = None
    if attention_mask is not None or segment_ids is not None:
        pad, seg = (_whole_sequence(x, group, natural) for x in (attention_mask, segment_ids))
        positions = torch.arange(sp * local, device=q.device)
        mask = pair_mask(positions, positions, causal, pad, seg, seg)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None, scale=scale,
        enable_gqa=hq != hkv,
    )  # fmt: skip
    if order is not None:
        out = out.index_select(2, order)  # back to the order the shards were concatenated in
    # [B, H/sp, S, D] -> [sp, B, H/sp, S/sp, D]: token shard i goes back to rank i.
    out = _all_to_all(out.reshape(b, hq, sp, local, d).permute(2, 0, 1, 3, 4), group)
    return out.transpose(0, 1).reshape(b, heads, local, d)


def _whole_sequence(x: torch.Tensor | None, group: dist.ProcessGroup, natural: torch.Tensor | None):
    """The full [B, S] per-token tensor from every rank's [B, S/sp] shard, in sequence order; None stays None."""
    if x is None:
        return None
    x = torch.cat(gather_sequence(x, group), 1)
    return x if natural is None else x[:, natural]


def communication_bytes(
    method: str,
    batch: int,
    heads: int,
    seq: int,
    head_dim: int,
    sp: int,
    dtype: torch.dtype = torch.bfloat16,
    kv_heads: int | None = None,
) -> dict[str, int]:
    """Bytes one rank sends in one attention call: {"forward", "backward"}, for a `seq`-token sequence over `sp`.

    Ulysses: each all-to-all sends (sp-1)/sp of its input; forward moves q, k, v (k/v at
    lcm(Hkv, sp) heads) and the output, backward their gradients. Ring: forward sends k and v
    sp-1 times; backward sends them sp-1 times more plus float32 dK/dV sp times. Masks add
    (sp-1) * batch * seq/sp * itemsize per gathered mask (not counted).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a sequence-parallel method; choose one of {METHODS}")
    kv_heads = heads if kv_heads is None else kv_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_head = batch * (seq // sp) * head_dim  # elements of one head's local shard
    if method == "ulysses":
        kv = math.lcm(kv_heads, sp)
        moved = per_head * (2 * heads + 2 * kv) * itemsize * (sp - 1) // sp
        return {"forward": moved, "backward": moved}
    kv_shard = 2 * per_head * kv_heads
    hops = sp - 1
    return {
        "forward": hops * kv_shard * itemsize,
        "backward": hops * kv_shard * itemsize + (sp if sp > 1 else 0) * kv_shard * 4,
    }


class SequenceParallelAttention:
    """A transformers attention function that runs one attention module on sequence shards over `group`.

    Called as ``(module, query [B, H, S/sp, D], key, value, attention_mask [B, S/sp] | None, ...)``
    and returns ``(output [B, S/sp, H, D], None)``, as transformers' own attention functions do.
    """

    def __init__(self, group: dist.ProcessGroup, method: str = "ulysses", balanced: bool = True) -> None:
        if method not in METHODS:
            raise ValueError(f"parallel.sequence.method={method!r} is unknown; choose one of {METHODS}")
        self.group, self.method, self.balanced = group, method, balanced

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        segment_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"a {attention_mask.dim()}-D attention mask cannot be sharded by sequence parallelism; pass the "
                "[B, S] key-padding mask, and segment_ids for packed sequences"
            )
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        args = dict(causal=causal, attention_mask=attention_mask, segment_ids=segment_ids, scale=scaling)
        if self.method == "ulysses":
            out = ulysses_attention(query, key, value, self.group, balanced=self.balanced, dropout=dropout, **args)
        elif dropout:
            raise ValueError(f"ring attention has no attention dropout (got {dropout}); set the model's to 0")
        else:
            out = ring_attention(query, key, value, self.group, balanced=self.balanced, **args)
        return out.transpose(1, 2).contiguous(), None


class SequenceParallelLoss:
    """transformers causal-LM loss on a sequence shard: the value is the full-sequence mean on every rank of `group`.

    The gradient is that of ``sp * (this shard's summed loss) / (valid labels of the whole
    sequence)``, so averaging gradients over the group (as data parallel over dp_sp does) gives the
    gradient of the full-sequence mean. Needs ``shift_labels`` (see `shard_batch_for_sequence_parallel`).
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor | None,
        vocab_size: int,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if shift_labels is None:
            raise ValueError(
                "under sequence parallelism labels must be shifted before the sequence is sharded; build the "
                "batch with shard_batch_for_sequence_parallel (it passes shift_labels)"
            )
        targets = shift_labels.reshape(-1).to(logits.device)
        local = F.cross_entropy(
            logits.float().reshape(-1, vocab_size), targets, ignore_index=ignore_index, reduction="sum"
        )
        totals = torch.stack([local.detach(), (targets != ignore_index).sum().to(local.dtype)])
        dist.all_reduce(totals, group=self.group)
        # num_items_in_batch, when given, already counts the valid labels of the whole sequences.
        count = (totals[1] if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)).clamp(min=1)
        share = local * dist.get_world_size(self.group) / count
        return share + (totals[0] / count - share).detach()


def _key_padding_mask(
    batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **kwargs
):
    """transformers mask builder: hands the [B, S/sp] key-padding shard to the attention function unchanged."""
    return attention_mask


def _dispatch(module: torch.nn.Module, *args, **kwargs) -> tuple[torch.Tensor, None]:
    attention = getattr(module, "sequence_parallel_attention", None)
    if attention is None:
        raise RuntimeError(
            f"{type(module).__name__} has no sequence-parallel attention; apply_sequence_parallel(model, ...) "
            "sets one on every attention module of the model"
        )
    return attention(module, *args, **kwargs)


def apply_sequence_parallel(
    model: torch.nn.Module, topology: Topology, method: str = "ulysses", balanced: bool = True
) -> SequenceParallelAttention:
    """Run a transformers model's attention on sequence shards over ``topology.group("sp")``; in place.

    Registers `ATTENTION_NAME` with transformers, points the model's config at it, hands every
    attention module the returned `SequenceParallelAttention`, installs `SequenceParallelLoss`, and
    turns the KV cache off.
    Feed the model batches from `shard_batch_for_sequence_parallel` with the same `balanced`.

    Raises:
        ValueError: Ulysses with sp not dividing the head count, or an unknown method.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    attention = SequenceParallelAttention(topology.group("sp"), method, balanced)
    if method == "ulysses":
        check_ulysses_degree(topology.size("sp"), model.config.num_attention_heads)
    modules = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "is_causal")]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no transformers attention modules to run sequence-parallel")
    AttentionInterface.register(ATTENTION_NAME, _dispatch)
    AttentionMaskInterface.register(ATTENTION_NAME, _key_padding_mask)
    for m in modules:
        m.sequence_parallel_attention = attention
    model.set_attn_implementation(ATTENTION_NAME)
    model.config.use_cache = False  # a KV cache of one shard is meaningless; this is for training
    model.loss_function = SequenceParallelLoss(attention.group)
    return attention


def packed_segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Segment ids [B, S] of packed sequences: a new segment wherever a position does not follow the previous by 1."""
    starts = position_ids.diff(dim=-1) != 1
    return F.pad(starts.cumsum(-1), (1, 0))


def shard_batch_for_sequence_parallel(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    topology: Topology,
    balanced: bool = True,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """This rank's model kwargs from a full [B, S] batch (the same on every rank of the sp group).

    Labels are shifted first (position i predicts label i+1; the last predicts nothing), then
    input_ids, position_ids, shift_labels, the key-padding `attention_mask` (True/1 = real token) and,
    when `position_ids` restart inside a row (packed sequences), ``segment_ids`` are all sharded
    along the sequence. Pass the result as ``model(**batch)``.
    """
    sp, rank = topology.size("sp"), topology.rank("sp")
    shifted = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    full = {"input_ids": input_ids, "position_ids": position_ids, "labels": shifted, "shift_labels": shifted}
    if attention_mask is not None:
        full["attention_mask"] = attention_mask.bool()
    segments = packed_segments(position_ids)
    if bool((segments[:, -1] > 0).any()):
        full["segment_ids"] = segments
    return {name: shard_sequence(t, rank, sp, 1, balanced) for name, t in full.items()}
