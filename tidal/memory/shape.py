"""What the step-time model reads: one micro-batch's work from the trace (`StepWork`) and the model's
parameter layout under tp and ep (`ModelShape`: bytes per block, tp collective sites, experts), plus which
blocks and root parameters a pipeline rank holds.

    work = StepWork.from_trace(trace, tokens=4096, boundary_bytes=...)
    shape = model_shape(model, tp=8)                     # the tensor plan must accept tp
    blocks, first, last = rank_blocks(len(shape.block_params), pp=4, stages_per_rank=1, pp_rank=0)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from tidal.memory.estimate import _expert_ids, _tp_shapes
from tidal.parallel.data import repeated_blocks
from tidal.parallel.pipeline import stage_bounds

if TYPE_CHECKING:
    from tidal.memory.trace import ModelTrace


@dataclass(frozen=True)
class StepWork:
    """One micro-batch's work on one rank without model parallelism, from a trace."""

    forward_flops: int
    backward_flops: int
    block_flops: tuple[int, ...]
    """Forward FLOPs of each repeated block."""
    forward_ops: int
    backward_ops: int
    tokens: int
    """Tokens in the micro-batch (0: not a token model; tp/sp/ep bytes then count 0)."""
    boundary_bytes: int
    """The hidden state passed between blocks (what a pipeline stage sends), bytes."""
    block_saved: tuple[int, ...]
    """Saved activations of each block, autocast's weight copies included (what activation offload moves), bytes."""

    @classmethod
    def from_trace(cls, trace: ModelTrace, tokens: int, boundary_bytes: int) -> StepWork:
        saved = tuple(b.saved_bytes + b.saved_param_cast_bytes for b in trace.blocks())
        return cls(
            trace.forward_flops,
            trace.backward_flops,
            trace.block_forward_flops,
            trace.forward_ops,
            trace.backward_ops,
            tokens,
            boundary_bytes,
            saved,
        )

    def scaled(self, factor: float) -> StepWork:
        """The work of a micro-batch `factor` times as large (FLOPs and bytes scale; ops do not)."""

        def times(n: int) -> int:
            return int(n * factor)

        return replace(
            self,
            forward_flops=times(self.forward_flops),
            backward_flops=times(self.backward_flops),
            block_flops=tuple(map(times, self.block_flops)),
            tokens=times(self.tokens),
            boundary_bytes=times(self.boundary_bytes),
            block_saved=tuple(map(times, self.block_saved)),
        )


class Site(NamedTuple):
    """Where a tp collective meets a matmul: before column-parallel linears ("in"), after a row-parallel one."""

    side: str
    features: int
    """Width of the activation that travels."""
    weight: int
    """Elements of the matmul's weights next to it (all tp ranks together); 0: nothing to overlap."""


class Experts(NamedTuple):
    """A mixture-of-experts block: experts per token, model width, and elements of one expert's weights."""

    top_k: int
    hidden: int
    expert_weight: int


@dataclass(frozen=True)
class ModelShape:
    """The model's parameters as one tp rank holds them (experts divided over ep), bytes, unsharded by ZeRO."""

    block_params: tuple[int, ...]
    """Per repeated block, its dense parameters."""
    block_experts: tuple[int, ...]
    """Per repeated block, its experts' parameters on one ep rank."""
    root_params: int
    """Outside the blocks: embeddings, final norm, head."""
    first_param: int
    """The first parameter (the embedding): the last gradients backward finishes, held by pipeline stage 0."""
    itemsize: int
    hidden: int = 0
    """Model width (``hidden_size``/``n_embd``; 0 unknown), for sequence-parallel exchanges."""
    sites: tuple[tuple[Site, ...], ...] = ()
    """Per block, its tp sites (empty at tp=1)."""
    experts: tuple[Experts | None, ...] = ()
    """Per block, its mixture of experts (None: dense)."""


def model_shape(model: nn.Module, tp: int = 1, ep: int = 1) -> ModelShape:
    """Read `model` (on the meta device) under tp and ep; the tensor plan must accept tp (else it raises)."""
    blocks = repeated_blocks(model)
    index = {id(p): i for i, b in enumerate(blocks) for p in b.parameters()}
    shapes = _tp_shapes(model, tp) if tp > 1 else {}
    expert_ids = _expert_ids(model)
    dense, experts = [0] * len(blocks), [0] * len(blocks)
    root = first = itemsize = 0
    for n, p in enumerate(model.parameters()):
        nbytes = int(torch.Size(shapes.get(id(p), p.shape)).numel()) * p.element_size()
        itemsize = max(itemsize, p.element_size())
        first = nbytes if n == 0 else first
        i = index.get(id(p))
        if i is None:
            root += nbytes
        elif id(p) in expert_ids:
            experts[i] += nbytes // ep
        else:
            dense[i] += nbytes
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 0
    return ModelShape(
        tuple(dense), tuple(experts), root, first, itemsize, hidden, _sites(model, blocks, tp), _moe(model, blocks)
    )


def _sites(model: nn.Module, blocks: list[nn.Module], tp: int) -> tuple[tuple[Site, ...], ...]:
    if tp == 1:
        return ()
    from tidal.parallel.tensor import validate_tensor_parallel
    from tidal.parallel.tensor_plans import is_conv1d

    names = {id(m): n for n, m in model.named_modules()}
    prefixes = [f"{names[id(b)]}." for b in blocks]
    found: list[dict[str, Site]] = [{} for _ in blocks]
    for name, module, style in validate_tensor_parallel(model, tp):
        i = next((k for k, p in enumerate(prefixes) if name.startswith(p)), None)
        if i is None or style not in ("colwise", "colwise_qkv", "rowwise", "moe"):
            continue
        if style == "moe":
            width = _experts(module).hidden
            found[i][f"{name}/in"], found[i][f"{name}/out"] = Site("in", width, 0), Site("out", width, 0)
            continue
        rows, cols = module.weight.shape  # [out, in]; Conv1D stores [in, out]
        out_f, in_f = (cols, rows) if is_conv1d(module) else (rows, cols)
        if style == "rowwise":
            found[i][name] = Site("out", out_f, module.weight.numel())
        else:  # the column-parallel linears of one parent share one gathered input
            key = name.rpartition(".")[0]
            weight = found[i][key].weight if key in found[i] else 0
            found[i][key] = Site("in", in_f, weight + module.weight.numel())
    return tuple(tuple(f.values()) for f in found)


def _experts(module: nn.Module) -> Experts:
    experts = module.experts
    count = getattr(experts, "num_experts", None) or module.num_experts
    hidden = getattr(experts, "hidden_dim", None) or module.hidden
    return Experts(module.top_k, hidden, sum(p.numel() for p in experts.parameters()) // count)


def _moe(model: nn.Module, blocks: list[nn.Module]) -> tuple[Experts | None, ...]:
    from tidal.parallel.expert import MIXTRAL_BLOCKS, MoELayer

    out = []
    for block in blocks:
        moe = [m for m in block.modules() if isinstance(m, MoELayer) or type(m).__name__ in MIXTRAL_BLOCKS]
        out.append(_experts(moe[0]) if moe else None)
    return tuple(out)


def rank_blocks(count: int, pp: int, stages_per_rank: int, pp_rank: int) -> tuple[list[int], bool, bool]:
    """The blocks a pipeline rank runs (`stage_bounds` over its stages), and whether it holds the first stage
    (embeddings) and the last (final norm, head, loss)."""
    v = stages_per_rank if pp > 1 else 1
    bounds = stage_bounds(count, pp * v) if pp > 1 else [(0, count)]
    stages = [pp_rank + k * pp for k in range(v)]
    return [i for st in stages for i in range(*bounds[st])], 0 in stages, pp * v - 1 in stages


def held_params(shape: ModelShape, blocks: list[int], first: bool, last: bool, pp: int) -> tuple[int, list[int]]:
    """(bytes outside the blocks, bytes of each block) a rank holds: with pp, the embedding (the first
    parameter) on the first stage and the other root parameters on the last."""
    root = shape.root_params
    if pp > 1:
        root = (shape.first_param if first else 0) + (shape.root_params - shape.first_param if last else 0)
    return root, [shape.block_params[i] + shape.block_experts[i] for i in blocks]
