"""Ring attention over a sequence-parallel group, and the sequence layouts both sequence-parallel methods share.

Layout. A sequence of ``S`` tokens is split over the ``sp`` ranks of a group; rank ``r`` holds ``S/sp``
of them. Plain sharding gives rank ``r`` the ``r``-th contiguous run. Balanced sharding (for causal
attention) cuts the sequence into ``2*sp`` chunks and gives rank ``r`` chunks ``r`` and ``2*sp-1-r``, so
every rank holds as many early (cheap) as late (expensive) queries::

    S=8, sp=2   plain:    rank 0 -> [0 1 2 3]   rank 1 -> [4 5 6 7]
                balanced: rank 0 -> [0 1 6 7]   rank 1 -> [2 3 4 5]

Inputs, labels, position ids, key-padding masks and segment ids are all sharded the same way
(`shard_sequence`), and causal masks are built from the tokens' global indices (`shard_positions`).

Ring attention. Every rank keeps its queries; the key/value shards travel once around the ring
(rank ``r`` sends to ``r+1`` and receives from ``r-1``) while the current shard is computed on. Each
block yields a partial output and its log-sum-exp; partials are merged exactly. With causal
attention a (query chunk, key chunk) pair whose keys all come after its queries is skipped.

Backward is a second ring inside the same autograd Function: the key/value shards travel again,
each with a float32 accumulator of its dK/dV that gathers every rank's contribution and arrives back
at its owner after ``sp`` hops. Only q, k, v, the output and the log-sum-exp are saved (``O(S/sp)``
per rank); autograd through point-to-point ops would need every block's probabilities kept alive
(``O(S/sp * S)``), and torch has no differentiable send/recv. torch's own context parallel
(``torch.distributed.tensor.experimental``) needs CUDA flash/efficient kernels and takes no attention
mask, hence this module.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

Block = tuple[slice, slice, torch.Tensor | None]
"""One unit of ring work: local query slice, local key slice, and the bool mask [B|1, 1, Sq, Sk] or None."""


def _check_length(seq_len: int, sp: int, balanced: bool) -> int:
    parts = 2 * sp if balanced else sp
    if seq_len % parts:
        what = f"2*sp={parts} (balanced causal sharding)" if balanced else f"sp={parts}"
        raise ValueError(
            f"sequence length {seq_len} is not divisible by {what}; pad the sequence to a multiple of {parts}"
        )
    return seq_len // parts


def shard_positions(
    seq_len: int, rank: int, sp: int, balanced: bool, device: torch.device | None = None
) -> torch.Tensor:
    """Global token indices (int64 [seq_len/sp]) that `rank` of `sp` holds of a `seq_len`-token sequence."""
    chunk = _check_length(seq_len, sp, balanced)
    if not balanced:
        return torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    late = 2 * sp - 1 - rank
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in (rank, late)])


def shard_sequence(x: torch.Tensor, rank: int, sp: int, dim: int = 1, balanced: bool = False) -> torch.Tensor:
    """This rank's share of `x` along `dim` (the sequence), plain or balanced (see the module docstring)."""
    _check_length(x.shape[dim], sp, balanced)
    if not balanced:
        return x.chunk(sp, dim)[rank]
    chunks = x.chunk(2 * sp, dim)
    return torch.cat([chunks[rank], chunks[2 * sp - 1 - rank]], dim)


def unshard_sequence(shards: list[torch.Tensor], dim: int = 1, balanced: bool = False) -> torch.Tensor:
    """Inverse of `shard_sequence`: the full tensor from every rank's share, listed by rank."""
    if not balanced:
        return torch.cat(shards, dim)
    halves = [s.chunk(2, dim) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


def pair_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    key_padding: torch.Tensor | None = None,
    q_segments: torch.Tensor | None = None,
    k_segments: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Bool [B|1, 1, Sq, Sk], True where a query may attend a key; None when every pair may.

    `q_pos`/`k_pos` are global token indices [Sq]/[Sk]; `key_padding` is [B, Sk] (True = real token);
    segment ids [B, Sq]/[B, Sk] let a token attend only keys of its own packed sequence.
    """
    mask = (q_pos[:, None] >= k_pos[None, :])[None, None] if causal else None
    if q_segments is not None:
        same = (q_segments[:, :, None] == k_segments[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    if key_padding is not None:
        real = key_padding[:, None, None, :].bool()
        mask = real if mask is None else mask & real
    return mask


def gather_sequence(x: torch.Tensor | None, group: dist.ProcessGroup) -> list[torch.Tensor] | None:
    """Every rank's [B, S/sp] shard of a per-token mask or segment ids, listed by rank (not differentiable)."""
    if x is None:
        return None
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x, group=group)
    return out


class _Layout:
    """Who holds which tokens: global positions per rank, chunk slices, and the gathered per-token masks."""

    def __init__(self, group, local_len, causal, balanced, key_padding, segments, device) -> None:
        self.sp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.causal = causal
        self.device = device
        # On the host: block-skipping decisions read them, and must not wait on the device.
        self.positions = [shard_positions(local_len * self.sp, r, self.sp, balanced) for r in range(self.sp)]
        half = local_len // 2
        self.chunks = [slice(0, half), slice(half, local_len)] if balanced else [slice(0, local_len)]
        self.key_padding = gather_sequence(key_padding, group)
        self.segments = gather_sequence(segments, group)

    def blocks(self, src: int) -> list[Block]:
        """The work of one ring step: this rank's queries against the key/value shard of rank `src`."""
        q_pos, k_pos = self.positions[self.rank], self.positions[src]
        out = []
        for qs in self.chunks:
            keep = [ks for ks in self.chunks if not (self.causal and k_pos[ks.start] > q_pos[qs.stop - 1])]
            if not keep:
                continue  # every key of this shard comes after every query of this chunk
            ks = slice(keep[0].start, keep[-1].stop)  # chunks are adjacent, so the kept ones are one slice
            causal = self.causal and bool(k_pos[ks.stop - 1] > q_pos[qs.start])
            pad = None if self.key_padding is None else self.key_padding[src][:, ks]
            q_seg = None if self.segments is None else self.segments[self.rank][:, qs]
            k_seg = None if self.segments is None else self.segments[src][:, ks]
            q_at, k_at = q_pos[qs].to(self.device), k_pos[ks].to(self.device)
            out.append((qs, ks, pair_mask(q_at, k_at, causal, pad, q_seg, k_seg)))
        return out


def _scores(q, k, mask, scale) -> torch.Tensor:
    """Float32 scores [B, Hkv, G, Sq, Sk] of q [B, Hkv*G, Sq, D] against k [B, Hkv, Sk, D], masked to -inf."""
    b, h, sq, d = q.shape
    hkv = k.shape[1]
    scores = q.reshape(b, hkv, h // hkv, sq, d).float() @ k.float().unsqueeze(2).transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    return scores


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """`lse` with -inf (fully masked rows) replaced by 0, so exp(scores - lse) is 0 there, not NaN."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _block_forward(q, k, v, mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's float32 output [B, H, Sq, D] and log-sum-exp [B, H, Sq] (-inf where a row sees no key)."""
    b, h, sq, _ = q.shape
    scores = _scores(q, k, mask, scale)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - _finite(lse).unsqueeze(-1))
    out = probs @ v.float().unsqueeze(2)
    return out.reshape(b, h, sq, -1), lse.reshape(b, h, sq)


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold one block's partial result into the running (out, lse), in place, exactly (log-sum-exp weights)."""
    new = torch.logaddexp(lse, block_lse)
    safe = _finite(new)
    out.mul_(torch.exp(lse - safe).unsqueeze(-1)).add_(block_out * torch.exp(block_lse - safe).unsqueeze(-1))
    lse.copy_(new)


def _block_backward(q, k, v, lse, dout, delta, mask, scale) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 dq [B, H, Sq, D], dk and dv [B, Hkv, Sk, D] of one block, given the final lse and delta [B, H, Sq]."""
    b, h, sq, d = q.shape
    hkv = k.shape[1]
    grouped = (b, hkv, h // hkv, sq)
    probs = torch.exp(_scores(q, k, mask, scale) - _finite(lse).reshape(grouped).unsqueeze(-1))
    dout = dout.reshape(*grouped, d)
    dv = (probs.transpose(-1, -2) @ dout).sum(2)
    dprobs = dout @ v.float().unsqueeze(2).transpose(-1, -2)
    dscores = probs * (dprobs - delta.reshape(grouped).unsqueeze(-1)) * scale
    dq = (dscores @ k.float().unsqueeze(2)).reshape(b, h, sq, d)
    dk = (dscores.transpose(-1, -2) @ q.reshape(*grouped, d).float()).sum(2)
    return dq, dk, dv


def _ring_exchange(buffer: torch.Tensor, group: dist.ProcessGroup, tag: int) -> tuple[torch.Tensor, list]:
    """Send `buffer` to the next rank of the ring and receive the previous rank's into a new tensor (async)."""
    ranks = dist.get_process_group_ranks(group)
    me = dist.get_rank(group)
    received = torch.empty_like(buffer)
    ops = [
        dist.P2POp(dist.isend, buffer, ranks[(me + 1) % len(ranks)], group, tag),
        dist.P2POp(dist.irecv, received, ranks[(me - 1) % len(ranks)], group, tag),
    ]
    return received, dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    for work in works:
        work.wait()


class _RingAttention(torch.autograd.Function):
    """q [B, H, S/sp, D], k and v [B, Hkv, S/sp, D] (H a multiple of Hkv) -> output [B, H, S/sp, D].

    Saves q, k, v, the float32 output and log-sum-exp [B, H, S/sp]. Forward: ``sp-1`` hops of the
    stacked (k, v). Backward: ``sp-1`` hops of (k, v) and ``sp`` hops of the float32 (dk, dv).
    """

    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, balanced, key_padding, segments):
        layout = _Layout(group, q.shape[2], causal, balanced, key_padding, segments, q.device)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        for step in range(layout.sp):
            if step < layout.sp - 1:
                incoming, works = _ring_exchange(kv, group, tag=0)
            for qs, ks, mask in layout.blocks((layout.rank - step) % layout.sp):
                block_out, block_lse = _block_forward(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], mask, scale)
                _merge(out[:, :, qs], lse[:, :, qs], block_out, block_lse)
            if step < layout.sp - 1:
                _wait(works)
                kv = incoming
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.group, ctx.scale = layout, group, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        layout, group, scale = ctx.layout, ctx.group, ctx.scale
        dout = dout.float()
        delta = (dout * out).sum(-1)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        arriving = None  # (buffer, works): the dK/dV accumulated so far for the shard held this step
        for step in range(layout.sp):
            if step < layout.sp - 1:
                incoming, works = _ring_exchange(kv, group, tag=1)
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
            for qs, ks, mask in layout.blocks((layout.rank - step) % layout.sp):
                kq, kk, kvv = _block_backward(
                    q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], lse[:, :, qs], dout[:, :, qs],
                    delta[:, :, qs], mask, scale,
                )  # fmt: skip
                dq[:, :, qs] += kq
                dkv[0][:, :, ks] += kk
                dkv[1][:, :, ks] += kvv
            if arriving is not None:
                _wait(arriving[1])
                dkv += arriving[0]
            if layout.sp > 1:
                arriving = _ring_exchange(dkv, group, tag=2)
            if step < layout.sp - 1:
                _wait(works)
                kv = incoming
        if arriving is not None:
            _wait(arriving[1])
            dkv = arriving[0]  # after sp hops: every rank's contribution to this rank's own shard
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None, None


def ring_attention(
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
) -> torch.Tensor:
    """Exact attention over a sequence split across `group`: q [B, H, S/sp, D], k/v [B, Hkv, S/sp, D] -> like q.

    Every input is this rank's shard in the layout `balanced` names (see `shard_sequence`):
    `attention_mask` [B, S/sp] bool marks real keys (True) of padded batches, `segment_ids` [B, S/sp]
    restrict packed sequences to their own tokens. `scale` defaults to 1/sqrt(D). GQA: H must be a
    multiple of Hkv; key/value heads are shared by their H/Hkv query heads without being repeated.
    """
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of key/value heads {k.shape[1]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _RingAttention.apply(q, k, v, group, causal, scale, balanced, attention_mask, segment_ids)
