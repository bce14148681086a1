"""Tensor-parallel plans as data, and the styles their names stand for.

A plan maps module-name patterns (dotted names, ``*`` matching one name part) to style names::

    {"model.layers.*.self_attn.q_proj": "colwise", "model.layers.*.self_attn.o_proj": "rowwise"}

Styles, with ``tp`` ranks and ``sp`` = sequence parallel on (activations ``[batch, seq, hidden]``):

    colwise          output features split over tp; input replicated, output local ``[..., out/tp]``
    colwise_qkv      colwise for a fused ``[q | k | v]`` projection: each rank gets its heads of q, k and v
    rowwise          input features split; output all-reduced (sp: reduce-scattered along the sequence)
    vocab_embedding  embedding rows split by vocabulary; output all-reduced, full sequence
    vocab_head       output projection split by vocabulary; logits stay a DTensor sharded on the last dim
    attention, mlp   hand the block's hidden states to its colwise linears once (sp: one all-gather), so
                     their input gradients are reduced once; attention also divides its head counts by tp
    sequence         sp only: a norm runs on the local sequence shard, its weights replicated DTensors
    sequence_split   sp only: the first block's input is cut to this rank's sequence shard
    moe              a mixture-of-experts block: sp gathers its input; its partial output is reduced
    experts          each expert's FFN split over tp (fused 3-D weights, transformers 5.x layout)

torch's ColwiseParallel / RowwiseParallel / SequenceParallel serve nn.Linear and norms. Own styles serve
what they cannot: the vocabulary embedding (see `VocabEmbedding`), transformers' Conv1D (GPT-2; its
weight is ``[in, out]``, the transpose of nn.Linear's), fused projections whose pieces must be split
separately (a ``_StridedShard`` placement keeps the parameter's global layout, so checkpoints and
``full_tensor()`` stay unchanged), the block-level input hand-off (hidden states arrive positionally in
GPT-2 and by keyword in Llama), and fused expert weights, which transformers' experts code indexes per
expert.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from tidal.comm.overlap import (
    Overlap,
    all_gather_matmul,
    matmul_all_reduce,
    matmul_reduce_scatter,
    replicated_matmul,
)

_LLAMA_ATTENTION = {
    "model.embed_tokens": "vocab_embedding",
    "model.layers.0": "sequence_split",
    "model.layers.*.input_layernorm": "sequence",
    "model.layers.*.self_attn": "attention",
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.post_attention_layernorm": "sequence",
    "model.norm": "sequence",
    "lm_head": "vocab_head",
}
PLANS: dict[str, dict[str, str]] = {
    "gpt2": {
        "transformer.wte": "vocab_embedding",
        "transformer.h.0": "sequence_split",
        "transformer.h.*.ln_1": "sequence",
        "transformer.h.*.attn": "attention",
        "transformer.h.*.attn.c_attn": "colwise_qkv",
        "transformer.h.*.attn.c_proj": "rowwise",
        "transformer.h.*.ln_2": "sequence",
        "transformer.h.*.mlp": "mlp",
        "transformer.h.*.mlp.c_fc": "colwise",
        "transformer.h.*.mlp.c_proj": "rowwise",
        "transformer.ln_f": "sequence",
        "lm_head": "vocab_head",
    },
    "llama": {
        **_LLAMA_ATTENTION,
        "model.layers.*.mlp": "mlp",
        "model.layers.*.mlp.gate_proj": "colwise",
        "model.layers.*.mlp.up_proj": "colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
    },
    # Experts are split over tp (each expert's FFN), not replicated: memory per rank falls with tp.
    "mixtral": {**_LLAMA_ATTENTION, "model.layers.*.mlp": "moe", "model.layers.*.mlp.experts": "experts"},
}
"""Built-in plans by transformers ``config.model_type``, for the causal-LM classes (GPT2LMHeadModel, ...)."""

STYLE_NAMES = (
    "colwise",
    "colwise_qkv",
    "rowwise",
    "vocab_embedding",
    "vocab_head",
    "attention",
    "mlp",
    "sequence",
    "sequence_split",
    "moe",
    "experts",
)
LOCAL_HEAD_ATTRS = ("num_heads", "num_key_value_heads", "split_size")
"""Attention attributes counted in heads (or head-sized columns) that become per-rank under tp."""


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and tuple(module.weight.shape) == (module.nx, module.nf)


def _experts_dims(module: nn.Module) -> tuple[int, int]:
    """(output-feature dim of gate_up_proj, input-feature dim of down_proj) of fused 3-D expert weights."""
    return (2, 1) if getattr(module, "is_transposed", False) else (1, 2)


def sharded_dims(style: str, module: nn.Module) -> dict[str, tuple[int, int]]:
    """Parameter name -> (dim split over tp, packed pieces along it) for `style` on `module`."""
    if style == "experts":
        out_dim, in_dim = _experts_dims(module)
        return {
            "gate_up_proj": (out_dim, 2 if getattr(module, "is_concatenated", True) else 1),
            "down_proj": (in_dim, 1),
        }
    conv = is_conv1d(module)
    pieces = 3 if style == "colwise_qkv" else 1
    if style in ("colwise", "colwise_qkv", "vocab_head"):
        dim = 1 if conv or (isinstance(module, nn.Embedding) and style == "colwise") else 0
        return {"weight": (dim, pieces), "bias": (0, pieces)}
    if style in ("rowwise", "vocab_embedding"):
        return {"weight": (1 if isinstance(module, nn.Linear) else 0, 1)}
    return {}


def _placement(dim: int, pieces: int) -> Placement:
    # _StridedShard(dim, k): cut into k pieces, shard each, concatenate: rank r holds [q_r | k_r | v_r].
    return _StridedShard(dim, split_factor=pieces) if pieces > 1 else Shard(dim)


def _split_parameters(module: nn.Module, mesh: DeviceMesh, dims: dict[str, tuple[int, int]], src: int | None) -> None:
    """Replace `module`'s own parameters by DTensors on `mesh`: those in `dims` split, the others replicated."""
    for name, param in list(module.named_parameters(recurse=False)):
        place = _placement(*dims[name]) if name in dims else Replicate()
        split = distribute_tensor(param.detach(), mesh, [place], src_data_rank=src)
        module.register_parameter(name, nn.Parameter(split, requires_grad=param.requires_grad))


def _as_dtensor(x: torch.Tensor, mesh: DeviceMesh, placement: Placement) -> DTensor:
    return x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, [placement], run_check=False)


def _seq(sequence_parallel: bool) -> Placement:
    """Where the residual stream lives between blocks: sequence-sharded with sp, else replicated."""
    return Shard(1) if sequence_parallel else Replicate()


def replicated_local(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """`x` (a DTensor, or a local tensor replicated over tp) as a full local tensor whose partial gradient is
    summed over tp in backward: all-reduced, or reduce-scattered back onto a sequence-sharded DTensor."""
    x = _as_dtensor(x, mesh, Replicate()).redistribute(mesh, [Replicate()])
    return x.to_local(grad_placements=[Partial()])


def reduce_partial(y: torch.Tensor, mesh: DeviceMesh, sequence_parallel: bool) -> torch.Tensor:
    """Sum a per-rank partial ``[b, s, ...]`` over tp: all-reduce, or reduce-scatter to ``[b, s/tp, ...]`` with sp."""
    y = DTensor.from_local(y, mesh, [Partial()], run_check=False)
    return y.redistribute(mesh, [_seq(sequence_parallel)]).to_local()


def _hidden_states_hook(convert, module, args, kwargs):
    """Apply `convert` to the hidden states, passed first positionally (GPT-2) or as a keyword (Llama)."""
    if args:
        return (convert(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": convert(kwargs["hidden_states"])}


class BlockInput(ParallelStyle):
    """Attention or MLP block: its hidden states become one replicated DTensor for all its colwise linears.

    With sp the (sequence-sharded) input is all-gathered once; the colwise linears' partial input
    gradients add up as a DTensor and are reduced once (reduce-scatter with sp, else all-reduce).
    `local_heads` divides the module's head counts (`LOCAL_HEAD_ATTRS`) by tp, for code that reshapes
    with them; code that reshapes with ``-1`` heads (transformers 5.x Llama) needs nothing.

    With `overlap` the block's colwise linears (styled with the same `overlap`) run as one collective
    matmul instead (`tidal.comm.overlap.all_gather_matmul`, or `replicated_matmul` without sp): the
    block receives a placeholder of the full hidden states' shape (zero strides, NaN values: any use
    other than feeding those linears turns the output into NaN rather than silently wrong numbers),
    and the first linear called computes every linear's output at once from the real input.
    """

    def __init__(self, sequence_parallel: bool, local_heads: bool = False, overlap: Overlap | None = None) -> None:
        self.sequence_parallel, self.local_heads, self.overlap = sequence_parallel, local_heads, overlap

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if self.local_heads:
            for name in LOCAL_HEAD_ATTRS:
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, getattr(module, name) // device_mesh.size())

        def convert(x: torch.Tensor) -> DTensor:
            return _as_dtensor(x, device_mesh, _seq(self.sequence_parallel)).redistribute(device_mesh, [Replicate()])

        def pending(x: torch.Tensor) -> torch.Tensor:
            consumers = [m for m in module.modules() if getattr(m, "_tidal_overlap_colwise", False)]
            if not consumers:
                return convert(x)
            return _PendingBlockInput(x, consumers, device_mesh, self.sequence_parallel, self.overlap).placeholder()

        hook = pending if self.overlap is not None and self.overlap.mode != "off" else convert
        module.register_forward_pre_hook(partial(_hidden_states_hook, hook), with_kwargs=True)
        return module


class _PendingBlockInput:
    """A block's real input, waiting for its colwise linears: the first one asking computes them all."""

    def __init__(self, x: torch.Tensor, consumers: list[nn.Module], mesh: DeviceMesh, sp: bool, overlap: Overlap):
        self.x, self.consumers, self.mesh, self.sp, self.overlap = x, consumers, mesh, sp, overlap
        self.outputs: dict[int, torch.Tensor] | None = None

    def placeholder(self) -> torch.Tensor:
        """The full hidden states' shape, zero strides, NaN; it alone refers to this object (no cycle)."""
        shape = list(self.x.shape)
        if self.sp and not isinstance(self.x, DTensor):
            shape[1] *= self.mesh.size()  # a local sequence shard; a DTensor reports its global shape already
        local = self.x.to_local() if isinstance(self.x, DTensor) else self.x
        placeholder = local.new_full((), math.nan).expand(shape)
        placeholder._tidal_block_input = self
        return placeholder

    def output(self, module: nn.Module) -> torch.Tensor:
        if self.outputs is None:
            self.outputs = dict(zip(map(id, self.consumers), self._compute(), strict=True))
            self.x = None
        return self.outputs[id(module)]

    def _compute(self) -> list[torch.Tensor]:
        bs = [_right_operand(m) for m in self.consumers]
        group = self.mesh.get_group()
        local = self.x.to_local() if isinstance(self.x, DTensor) else self.x
        overlap = self.overlap

        def plain(x: torch.Tensor, *bs: torch.Tensor) -> list[torch.Tensor]:
            full = replicated_local(_as_dtensor(x, self.mesh, _seq(self.sp)), self.mesh)
            return [full @ b for b in bs]

        def overlapped(x: torch.Tensor, *bs: torch.Tensor) -> list[torch.Tensor]:
            if self.sp:
                return all_gather_matmul(x, bs, group, dim=1, chunks=overlap.chunks, observe=overlap.observe)
            return replicated_matmul(x, bs, group, chunks=overlap.chunks, observe=overlap.observe)

        key = ("colwise", self.sp, tuple(local.shape), local.dtype, tuple(tuple(b.shape) for b in bs))
        if overlap.choose(key, group, plain, overlapped, [local, *bs]) is overlapped:
            return overlapped(local, *bs)
        return plain(self.x, *bs)  # the input as given: a DTensor keeps its own gradient placements


def _right_operand(module: nn.Module) -> torch.Tensor:
    """The local weight as the right operand of ``x @ w``: ``[in, out]`` (a Conv1D's own layout)."""
    weight = module.weight.to_local()
    return weight if is_conv1d(module) else weight.t()


class SequenceSplit(ParallelStyle):
    """First block under sp: keep this rank's sequence shard of the full hidden states (backward all-gathers)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp = device_mesh.size()

        def convert(x: torch.Tensor) -> torch.Tensor:
            if x.shape[1] % tp:
                raise ValueError(
                    f"sequence length {x.shape[1]} is not divisible by tp={tp} (sequence parallel splits the "
                    f"sequence over tp); pad batches to a multiple of {tp} tokens or set sequence_parallel=False"
                )
            return (
                DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
                .redistribute(device_mesh, [Shard(1)])
                .to_local()
            )

        module.register_forward_pre_hook(partial(_hidden_states_hook, convert), with_kwargs=True)
        return module


class LocalLinear(ParallelStyle):
    """Column- or row-parallel nn.Linear / Conv1D computed on local shards (own: Conv1D, fused pieces).

    colwise: weight split on its output features (packed in `pieces` equal parts, each split), bias likewise;
    input ``[..., in]`` replicated (or a DTensor), output local ``[..., out/tp]``.
    rowwise: weight split on its input features; input local ``[..., in/tp]``; the partial product is
    reduced (all-reduce, or reduce-scatter along the sequence with sp), then the replicated bias added.
    With `overlap` (not "off"): colwise takes its output from its block's collective matmul (see
    `BlockInput`) when fed the block's placeholder; rowwise reduces piece by piece as the matmul
    produces them (`matmul_reduce_scatter`, or `matmul_all_reduce` without sp).
    """

    def __init__(
        self, kind: str, pieces: int = 1, sequence_parallel: bool = False, overlap: Overlap | None = None
    ) -> None:
        self.kind, self.pieces, self.sequence_parallel = kind, pieces, sequence_parallel
        self.overlap = overlap if overlap is not None and overlap.mode != "off" else None

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        style = "colwise_qkv" if self.pieces == 3 else self.kind
        _split_parameters(module, device_mesh, sharded_dims(style, module), self.src_data_rank)
        module.forward = partial(self._forward, module, device_mesh)
        if self.kind == "colwise" and self.overlap is not None:
            module._tidal_overlap_colwise = True
        return module

    def _forward(self, module: nn.Module, mesh: DeviceMesh, x: torch.Tensor) -> torch.Tensor:
        weight = _right_operand(module)
        if self.kind == "colwise":
            block = getattr(x, "_tidal_block_input", None)
            y = block.output(module) if block is not None else replicated_local(x, mesh) @ weight
            return y if module.bias is None else y + module.bias.to_local()
        x = x.to_local() if isinstance(x, DTensor) else x
        sp = self.sequence_parallel
        y = self._reduced(x, weight, mesh) if self.overlap is not None else reduce_partial(x @ weight, mesh, sp)
        if module.bias is None:
            return y
        # With sp each rank adds the bias to its own tokens only: its gradient is partial over tp.
        return y + module.bias.to_local(grad_placements=[Partial()] if self.sequence_parallel else None)

    def _reduced(self, x: torch.Tensor, weight: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        """Row-parallel matmul whose reduction overlaps it (or not, as the overlap mode decides)."""
        overlap, group, sp = self.overlap, mesh.get_group(), self.sequence_parallel

        def plain(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return reduce_partial(x @ weight, mesh, sp)

        def overlapped(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            if sp:
                return matmul_reduce_scatter(x, weight, group, dim=1, chunks=overlap.chunks, observe=overlap.observe)
            return matmul_all_reduce(x, weight, group, chunks=overlap.chunks, observe=overlap.observe)

        key = ("rowwise", sp, tuple(x.shape), x.dtype, tuple(weight.shape))
        return overlap.choose(key, group, plain, overlapped, [x, weight])(x, weight)


class VocabEmbedding(ParallelStyle):
    """nn.Embedding split by vocabulary rows: rank r looks up ids in ``[r*V/tp, (r+1)*V/tp)``, zeros the rest,
    and the partial rows are all-reduced to full-sequence ``[b, s, h]`` (model code sizes masks from it).

    Own rather than RowwiseParallel: DTensor's embedding backward has no masked-shard rule, so torch's
    style builds the weight gradient at full ``[V, h]`` on every rank; here it stays ``[V/tp, h]``.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise ValueError("the vocab_embedding style supports no max_norm, scale_grad_by_freq or sparse")
        _split_parameters(module, device_mesh, sharded_dims("vocab_embedding", module), self.src_data_rank)
        module.forward = partial(self._forward, module, device_mesh)
        return module

    @staticmethod
    def _forward(module: nn.Module, mesh: DeviceMesh, ids: torch.Tensor) -> torch.Tensor:
        weight = module.weight.to_local()
        start = mesh.get_local_rank() * weight.shape[0]
        outside = (ids < start) | (ids >= start + weight.shape[0])
        pad = module.padding_idx
        pad = pad - start if pad is not None and start <= pad < start + weight.shape[0] else None
        rows = F.embedding((ids - start).masked_fill(outside, 0), weight, padding_idx=pad)
        return reduce_partial(rows.masked_fill(outside[..., None], 0), mesh, sequence_parallel=False)


class MoEBlock(ParallelStyle):
    """Mixture-of-experts block with tp-split experts: full tokens in (sp: all-gathered), partial sum out, reduced."""

    def __init__(self, sequence_parallel: bool) -> None:
        self.sequence_parallel = sequence_parallel

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        sp = self.sequence_parallel

        def gather(x: torch.Tensor) -> torch.Tensor:
            # Gradients reaching here are already whole: the experts reduce theirs at their own input.
            return _as_dtensor(x, device_mesh, _seq(sp)).redistribute(device_mesh, [Replicate()]).to_local()

        def reduce(mod: nn.Module, args: tuple, out):
            first = out[0] if isinstance(out, tuple) else out
            first = reduce_partial(first, device_mesh, sp)
            return (first, *out[1:]) if isinstance(out, tuple) else first

        module.register_forward_pre_hook(partial(_hidden_states_hook, gather), with_kwargs=True)
        module.register_forward_hook(reduce)
        return module


class ExpertsParallel(ParallelStyle):
    """Fused 3-D expert weights split over tp: ``gate_up_proj [E, 2I, H]`` by its gate and up halves, ``down_proj
    [E, H, I]`` on I. The experts' own forward runs on the local shards (shadowed in for the call), so each
    rank computes every routed token through its slice of every expert and returns a partial sum; float
    inputs (hidden states, routing weights) get their partial gradients summed over tp.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if getattr(module, "has_bias", False):
            raise ValueError(f"{type(module).__name__} has expert biases, which the tp experts style does not split")
        dims = sharded_dims("experts", module)
        _split_parameters(module, device_mesh, dims, self.src_data_rank)

        def enter(mod: nn.Module, args: tuple, kwargs: dict):
            def local(v):
                return replicated_local(v, device_mesh) if torch.is_tensor(v) and v.is_floating_point() else v

            # An instance attribute shadows the registered DTensor parameter for the forward only.
            for p_name in dims:
                mod.__dict__[p_name] = mod._parameters[p_name].to_local()
            return tuple(local(a) for a in args), {k: local(v) for k, v in kwargs.items()}

        def leave(mod: nn.Module, args: tuple, kwargs: dict, out):
            for p_name in dims:
                mod.__dict__.pop(p_name, None)

        module.register_forward_pre_hook(enter, with_kwargs=True)
        module.register_forward_hook(leave, with_kwargs=True, always_call=True)
        return module


def build_style(
    style: str, module: nn.Module, sequence_parallel: bool, loss_parallel: bool, overlap: Overlap | None = None
) -> ParallelStyle | None:
    """The ParallelStyle for `style` on `module`, or None where the style does nothing (sp-only styles without sp).

    `overlap` (mode not "off") makes linears of the colwise/rowwise styles and the attention/mlp block
    inputs collective matmuls (`tidal.comm.overlap`); torch's styles serve them otherwise.
    """
    sp = sequence_parallel
    overlap = overlap if overlap is not None and overlap.mode != "off" else None
    linear = isinstance(module, nn.Linear) and overlap is None
    if style == "colwise":
        if isinstance(module, nn.Embedding) or linear:
            return ColwiseParallel()
        return LocalLinear("colwise", overlap=overlap)
    if style == "colwise_qkv":
        return LocalLinear("colwise", pieces=3, overlap=overlap)
    if style == "rowwise":
        if linear:
            return RowwiseParallel(output_layouts=_seq(sp))
        return LocalLinear("rowwise", sequence_parallel=sp, overlap=overlap)
    if style == "vocab_embedding":
        return VocabEmbedding()
    if style == "vocab_head":
        out = Shard(-1) if loss_parallel else Replicate()
        return ColwiseParallel(input_layouts=_seq(sp), output_layouts=out, use_local_output=not loss_parallel)
    if style in ("attention", "mlp"):
        return BlockInput(sp, local_heads=style == "attention", overlap=overlap)
    if style == "moe":
        return MoEBlock(sp)
    if style == "experts":
        return ExpertsParallel()
    if style == "sequence":
        return SequenceParallel() if sp else None
    if style == "sequence_split":
        return SequenceSplit() if sp else None
    raise KeyError(style)
