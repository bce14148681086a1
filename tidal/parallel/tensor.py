"""Tensor parallelism: a plan of module-name patterns -> styles, applied on the topology's tp mesh.

    info = apply_tensor_parallel(model, topology)                       # plan by family: gpt2, llama, mixtral
    info = apply_tensor_parallel(model, topology, {"up": "colwise", "down": "rowwise"}, sequence_parallel=True)
    out = model(input_ids=ids, labels=ids)       # same loop; out.loss from vocabulary-sharded logits

The model is changed in place: split parameters become DTensors on the tp mesh (`tensor_plans` lists the
styles). Every rank of a tp group must be fed the same batch; with ``sequence_parallel`` the sequence
length must divide by tp. No rank builds full-vocabulary logits: the output projection is column-parallel
over the vocabulary, ``out.logits`` is a DTensor sharded on its last dim, and a transformers model's
``loss_function`` (the hook its ``forward`` calls with the logits and labels) is replaced by
`vocab_parallel_cross_entropy` with the same label shift and reductions.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module

from tidal.comm.overlap import Overlap
from tidal.parallel.tensor_plans import PLANS, STYLE_NAMES, build_style, is_conv1d, sharded_dims
from tidal.parallel.topology import Topology

# config field -> (styles that need tp to divide it, why); checked when the plan uses any of those styles
_CONFIG_RULES = {
    "num_attention_heads": (("attention",), "each rank computes whole attention heads"),
    "num_key_value_heads": (("attention",), "each rank holds whole key/value heads"),
    "hidden_size": (("attention",), "attention columns are split by heads"),
    "intermediate_size": (("mlp", "experts"), "feed-forward columns are split over tp"),
    "vocab_size": (("vocab_embedding", "vocab_head"), "embedding and output rows are split by vocabulary"),
}
_MODULE_KINDS = {
    "colwise": (nn.Linear, nn.Embedding, "Conv1D"),
    "colwise_qkv": (nn.Linear, "Conv1D"),
    "rowwise": (nn.Linear, "Conv1D"),
    "vocab_embedding": (nn.Embedding,),
    "vocab_head": (nn.Linear,),
}


class TensorParallelError(ValueError):
    """A plan or size that tensor parallelism cannot apply; the message names the value and the fix."""


@dataclass(frozen=True)
class TensorParallelInfo:
    """What `apply_tensor_parallel` did: the tp mesh, the style applied per module, the parameters it split."""

    mesh: DeviceMesh | None
    size: int
    sequence_parallel: bool
    loss_parallel: bool
    styles: dict[str, str]
    """Module name -> style name, in the order applied."""
    sharded: tuple[str, ...]
    """Parameters split over tp (DTensors, Shard or _StridedShard); the others are replicated over tp."""

    @property
    def vocab_parallel_logits(self) -> bool:
        """Whether the output projection leaves logits split by vocabulary (a DTensor, Shard(-1)) for the loss."""
        return self.loss_parallel and "vocab_head" in self.styles.values()


def plan_for(model: nn.Module) -> dict[str, str]:
    """The built-in plan for a transformers causal LM, chosen by ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PLANS:
        raise TensorParallelError(
            f"no built-in tensor-parallel plan for {type(model).__name__} (model_type={model_type!r}); built-in "
            f"plans: {', '.join(PLANS)}; pass plan={{'module.name.pattern': style}} with styles from "
            f"{', '.join(STYLE_NAMES)}"
        )
    return dict(PLANS[model_type])


def moe_left_to_experts(model: nn.Module) -> dict[str, str]:
    """The built-in plan without its MoE styles, for tp x ep: expert parallel holds whole experts per rank,
    every rank of a tp group routes the same (replicated) tokens over its own ep group, and the router and
    experts are replicated over tp with equal gradients, like any parameter the plan leaves alone."""
    return {pattern: style for pattern, style in plan_for(model).items() if style not in ("moe", "experts")}


def _divisors(n: int) -> str:
    return "{" + ", ".join(str(d) for d in range(1, n + 1) if n % d == 0) + "}"


def _matches(pattern: str, name: str) -> bool:
    parts, want = name.split(".") if name else [], pattern.split(".") if pattern else []
    return len(parts) == len(want) and all(fnmatchcase(p, w) for p, w in zip(parts, want, strict=True))


def _kind_ok(style: str, module: nn.Module) -> bool:
    kinds = _MODULE_KINDS.get(style)
    if kinds is None:
        return True
    return any(is_conv1d(module) if k == "Conv1D" else isinstance(module, k) for k in kinds)


def _check_config(model: nn.Module, tp: int, styles: set[str]) -> None:
    config = getattr(model, "config", None)
    rules = {
        field: (getattr(config, field), why)
        for field, (needs, why) in _CONFIG_RULES.items()
        if styles.intersection(needs) and isinstance(getattr(config, field, None), int)
    }
    choices = _divisors(math.gcd(*(v for v, _ in rules.values()))) if rules else ""
    for field, (value, why) in rules.items():
        if value % tp == 0:
            continue
        if field == "vocab_size":
            raise TensorParallelError(
                f"tp={tp} does not divide vocab_size={value} ({why}); pad the vocabulary to a multiple of "
                f"{tp}, e.g. model.resize_token_embeddings({value}, pad_to_multiple_of={tp}), or choose tp in "
                f"{_divisors(value)}"
            )
        raise TensorParallelError(f"tp={tp} does not divide {field}={value} ({why}); choose tp in {choices}")


def validate_tensor_parallel(
    model: nn.Module, tp: int, plan: dict[str, str] | None = None
) -> list[tuple[str, nn.Module, str]]:
    """Check `plan` (default: `plan_for(model)`) against `model` at tp ranks; return (name, module, style) to apply.

    Needs no process group, so a dry run can call it. Raises `TensorParallelError` for an unknown style, a
    pattern that matches no module, a style on a module it cannot split, or a size tp does not divide.
    """
    plan = plan_for(model) if plan is None else plan
    modules = dict(model.named_modules())
    found = []
    for pattern, style in plan.items():
        if style not in STYLE_NAMES:
            close = difflib.get_close_matches(str(style), STYLE_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; styles are {', '.join(STYLE_NAMES)}"
            raise TensorParallelError(f"unknown tensor-parallel style {style!r} for {pattern!r}{hint}")
        names = [name for name in modules if _matches(pattern, name)]
        if not names:
            sample = ", ".join(repr(n) for n in list(modules)[1:6])
            raise TensorParallelError(
                f"plan pattern {pattern!r} matches no module of {type(model).__name__}; names look like {sample}"
            )
        for name in names:
            module = modules[name]
            if not _kind_ok(style, module):
                raise TensorParallelError(
                    f"style {style!r} cannot split {name!r} ({type(module).__name__}); it splits "
                    f"{', '.join(k if isinstance(k, str) else k.__name__ for k in _MODULE_KINDS[style])}"
                )
            found.append((name, module, style))
    _check_config(model, tp, {style for _, _, style in found})
    for name, module, style in found:
        for p_name, (dim, pieces) in sharded_dims(style, module).items():
            param = getattr(module, p_name, None)
            if not isinstance(param, torch.Tensor):
                continue
            size = param.shape[dim] // pieces
            if param.shape[dim] % pieces or size % tp:
                what = f"each of its {pieces} packed parts ({size})" if pieces > 1 else f"its size {size}"
                raise TensorParallelError(
                    f"tp={tp} does not divide dim {dim} of {name}.{p_name} ({what}, style {style!r}); "
                    f"choose tp in {_divisors(size)}"
                )
    return found


def _tied_groups(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p_name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, p_name))
    return [group for group in owners.values() if len(group) > 1]


def _retie(groups: list[list[tuple[nn.Module, str]]]) -> None:
    """Point every owner of a shared (tied) parameter back at one parameter after the styles replaced them."""
    for group in groups:
        params = [getattr(module, p_name) for module, p_name in group]
        keep = next((p for p in params if isinstance(p, DTensor)), params[0])
        for (module, p_name), param in zip(group, params, strict=True):
            placements = getattr(param, "placements", None)
            if placements != getattr(keep, "placements", None):
                raise TensorParallelError(
                    f"tied parameter {type(module).__name__}.{p_name} is split as {placements} but its twin as "
                    f"{keep.placements}; give both modules styles that split the same dim, or untie them"
                )
            setattr(module, p_name, keep)


def _lay_out_grad_like_param(param: DTensor) -> None:
    """Give a gradient its parameter's placements: sp norms and biases see only their sequence shard, so
    their gradients arrive Partial over tp and are all-reduced here (as Megatron does for sp norms)."""
    if param.grad.placements != param.placements:
        param.grad = param.grad.redistribute(param.device_mesh, param.placements)


def apply_tensor_parallel(
    model: nn.Module,
    topology: Topology,
    plan: dict[str, str] | None = None,
    *,
    sequence_parallel: bool = False,
    loss_parallel: bool = True,
    overlap: Overlap | None = None,
) -> TensorParallelInfo:
    """Split `model` in place over the topology's tp group by `plan` (default: the family's built-in plan).

    Args:
        plan: module-name pattern (``*`` = one name part) -> style name (see `tensor_plans`).
        sequence_parallel: keep activations between blocks sharded along the sequence (dim 1).
        loss_parallel: keep logits sharded by vocabulary and compute a transformers causal LM's loss on the
            shards; False gathers full logits (``out.logits`` a plain tensor) and leaves the loss alone.
        overlap: run the colwise/rowwise linears as collective matmuls (`tidal.comm.overlap`): the
            block input's all-gather (sp) or input-gradient all-reduce overlaps the colwise matmuls, the
            row-parallel reduction overlaps its matmul; None or mode "off" keeps torch's styles.
    After each backward every DTensor gradient has its parameter's placements (a post-accumulate-grad hook);
    parameters left plain are replicated over tp, with equal gradients on every tp rank. Call it once the
    model is on its device: ``nn.Module.to()`` swaps DTensor parameters, and hooks on swapped parameters
    (these and any data-parallel ones) no longer fire.
    Raises:
        TensorParallelError: see `validate_tensor_parallel`. tp=1 validates and changes nothing.
    """
    tp = topology.size("tp")
    found = validate_tensor_parallel(model, tp, plan)
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise TensorParallelError(
            "the model already has DTensor parameters; apply tensor parallelism once, before data parallel/ZeRO-3"
        )
    if tp == 1:
        return TensorParallelInfo(None, 1, sequence_parallel, loss_parallel, {}, ())
    mesh = topology.submesh("tp")
    tied = _tied_groups(model)
    styles = {}
    for name, module, style_name in found:
        style = build_style(style_name, module, sequence_parallel, loss_parallel, overlap)
        if style is not None:
            parallelize_module(module, mesh, style)
            styles[name] = style_name
    _retie(tied)
    for param in model.parameters():
        if isinstance(param, DTensor):
            param.register_post_accumulate_grad_hook(_lay_out_grad_like_param)
    sharded = tuple(
        n for n, p in model.named_parameters() if isinstance(p, DTensor) and not p.placements[0].is_replicate()
    )
    info = TensorParallelInfo(mesh, tp, sequence_parallel, loss_parallel, styles, sharded)
    loss_function = getattr(getattr(model, "loss_function", None), "__name__", "")
    if info.vocab_parallel_logits and loss_function == "ForCausalLMLoss":
        model.loss_function = VocabParallelCausalLMLoss(mesh)
    return info


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy from logits split by vocabulary over tp; no rank holds a full row.

    forward(logits [N, V/tp] float32, columns [start, start + V/tp) of the vocabulary; target [N] global ids)
        m   = all-reduce max over tp of each row's max                       [N]
        e   = exp(logits - m)                                                [N, V/tp]
        s,z = all-reduce sum of (e.sum(-1), logit - m at the target, 0 on ranks not owning it)  [2, N]
        loss = log(s) - z, 0 where target == ignore_index                    [N]
    Saves softmax e / s ([N, V/tp], the size of the logits shard) so backward, (softmax - one-hot) * grad,
    needs no communication.
    """

    @staticmethod
    def forward(ctx, logits, target, start, ignore_index, group):
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        exp = (logits - row_max[:, None]).exp()
        valid = target != ignore_index
        local = target - start
        owned = valid & (local >= 0) & (local < logits.shape[-1])
        index = local.clamp(0, logits.shape[-1] - 1)[:, None]
        target_logit = (logits.gather(1, index).squeeze(1) - row_max) * owned
        stats = torch.stack([exp.sum(-1), target_logit])
        dist.all_reduce(stats, group=group)
        ctx.save_for_backward(exp.div_(stats[0][:, None]), index, owned, valid)
        return (stats[0].log() - stats[1]) * valid

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, index, owned, valid = ctx.saved_tensors
        grad = softmax.scatter_add(1, index, -owned.to(softmax.dtype)[:, None])
        return grad * (grad_loss * valid)[:, None], None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    topology: Topology | DeviceMesh,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of vocabulary-split logits against `labels`, equal to F.cross_entropy on the full logits.

    Args:
        logits: ``[..., V]`` DTensor sharded on its last dim over tp, or this rank's local ``[..., V/tp]``
            (rank r holds vocabulary ids ``[r*V/tp, (r+1)*V/tp)``).
        labels: ``[...]`` global token ids, the same on every tp rank; `ignore_index` marks tokens to skip.
        reduction: "mean" (over tokens not ignored), "sum" or "none" (per token, shape of `labels`).
    """
    if isinstance(logits, DTensor):
        (place,) = logits.placements
        if not (place.is_shard() and place.dim in (-1, logits.ndim - 1)):
            raise TensorParallelError(f"logits must be sharded on the vocabulary (last) dim, not {place}")
        mesh, logits = logits.device_mesh, logits.to_local()
    else:
        mesh = topology.submesh("tp") if isinstance(topology, Topology) else topology
    shard = logits.shape[-1]
    start = mesh.get_local_rank() * shard
    flat = labels.reshape(-1).to(logits.device)
    losses = _VocabParallelCrossEntropy.apply(
        logits.reshape(-1, shard).float(), flat, start, ignore_index, mesh.get_group()
    )
    if reduction == "none":
        return losses.view(labels.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (flat != ignore_index).sum()


class VocabParallelCausalLMLoss:
    """Drop-in for transformers' ``ForCausalLMLoss`` (``model.loss_function``) on vocabulary-split logits.

    Same contract: labels shifted left by one (or `shift_labels` given), mean over tokens not ignored, or
    the sum divided by ``num_items_in_batch`` when the trainer passes it (gradient accumulation).
    """

    __name__ = "VocabParallelCausalLMLoss"

    def __init__(self, mesh: DeviceMesh) -> None:
        self.mesh = mesh

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        vocab_size: int | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        if num_items_in_batch is None:
            return vocab_parallel_cross_entropy(logits, shift_labels, self.mesh, ignore_index)
        loss = vocab_parallel_cross_entropy(logits, shift_labels, self.mesh, ignore_index, reduction="sum")
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch
