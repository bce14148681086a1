"""Apply every parallelism and offload to a wrapped model, in one fixed order.

    parts = parallelize(model, optimizer, config, context)

The order (DESIGN.md's flow of one step): tensor parallel (after the model is on its device: moving
a model with DTensor parameters loses their gradient hooks), the pipeline split (this rank's stages, cut from
the tensor-parallel model; the optimizer keeps their parameters only), sequence parallel
attention (it changes how attention runs, before anything wraps the modules), expert parallel (MoE
blocks become layers holding this rank's experts), then data parallel / ZeRO
over ``dp_sp`` (FSDP2 for stage 3, with parameter offload streaming its shards), then optimizer offload
(it takes over the update of the parameters ZeRO left to this rank) and activation offload
(saved-tensor hooks around each forward).
Each step is one `apply_*`-style call of its own module; this driver only wires them together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tidal.comm.overlap import Overlap
from tidal.config import Config
from tidal.offload.activations import ActivationOffload, apply_activation_offload
from tidal.offload.optimizer import OffloadedOptimizer, offload_optimizer
from tidal.parallel.data import DataParallel, apply_data_parallel
from tidal.parallel.expert import MoELayer, apply_expert_parallel
from tidal.parallel.pipeline import PipelineRunner
from tidal.parallel.sequence import (
    SequenceParallelAttention,
    apply_sequence_parallel,
    shard_batch_for_sequence_parallel,
)
from tidal.parallel.shards import local
from tidal.parallel.tensor import (
    TensorParallelInfo,
    VocabParallelCausalLMLoss,
    apply_tensor_parallel,
    moe_left_to_experts,
)
from tidal.parallel.topology import Topology
from tidal.runtime.context import Context


@dataclass
class Parallelized:
    """What `parallelize` applied; None where a feature is off."""

    dp: DataParallel
    tensor: TensorParallelInfo | None
    pipeline: PipelineRunner | None
    sequence: SequenceParallelAttention | None
    experts: list[MoELayer] | None
    optimizer_offload: OffloadedOptimizer | None
    activation_offload: ActivationOffload | None


def parallelize(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Config,
    context: Context,
    on_comm: Callable[[str, int, dist.Work], object] | None = None,
) -> Parallelized:
    """Apply `config`'s parallel and offload settings to `model` and `optimizer` in place (see the module doc)."""
    topology = context.topology
    tp = config.parallel.tp > 1
    tensor = apply_tensor_sharding(model, optimizer, topology, config, on_comm) if tp else None
    pipeline = apply_pipeline(model, optimizer, topology, config, tensor) if config.parallel.pp > 1 else None
    sequence = apply_sequence_sharding(model, topology, config) if config.parallel.sp > 1 else None
    overlap = config.comm.overlap
    moe_overlap = Overlap(overlap.moe, overlap.chunks, observe=on_comm)
    experts = apply_expert_parallel(model, topology, optimizer, moe_overlap) if config.parallel.ep > 1 else None
    held, stages = (None, None) if pipeline is None else ([p for _, p in pipeline.named_parameters], pipeline.stages)
    dp = apply_data_parallel(
        model, optimizer, topology, config, context.device, on_comm=on_comm, params=held, stages=stages
    )
    optimizer_offload = offload_optimizer(optimizer, config.offload)
    param_offload = getattr(dp, "param_offload", None)
    if param_offload is not None and optimizer_offload is not None:
        optimizer_offload.stream_params(param_offload)  # chunk by chunk, beside the optimizer state
    elif param_offload is not None:
        param_offload.attach_optimizer(optimizer)  # every shard resident for the step, written back after
    activation_offload = apply_activation_offload(
        model, config.offload.activations, config.offload.nvme, context.device.torch_device
    )
    return Parallelized(dp, tensor, pipeline, sequence, experts, optimizer_offload, activation_offload)


def apply_tensor_sharding(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    topology: Topology,
    config: Config,
    on_comm: Callable[[str, int, dist.Work], object] | None = None,
) -> TensorParallelInfo:
    """Tensor parallel over the tp group, with the optimizer pointed at the new (DTensor) parameters; its
    collective matmuls as ``comm.overlap.tp`` says, reporting their collectives to `on_comm`."""
    names = {id(p): n for n, p in model.named_parameters()}
    overlap = config.comm.overlap
    info = apply_tensor_parallel(
        model,
        topology,
        plan=moe_left_to_experts(model) if config.parallel.ep > 1 else None,
        sequence_parallel=config.parallel.tensor.sequence_parallel,
        loss_parallel=config.parallel.tensor.loss_parallel,
        overlap=Overlap(overlap.tp, overlap.chunks, observe=on_comm),
    )
    by_name = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [by_name[names[id(p)]] for p in group["params"]]
    return info


def apply_pipeline(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    topology: Topology,
    config: Config,
    tensor: TensorParallelInfo | None,
) -> PipelineRunner:
    """This rank's pipeline stages (of the model tensor parallel has already split when tp > 1), with the
    optimizer keeping only their parameters: it has no state for other ranks' stages to save or restore.

    The last stage computes the loss on vocabulary-split logits when tensor parallel leaves them so
    (``loss_parallel``)."""
    if tensor is not None and tensor.vocab_parallel_logits:
        pipeline = PipelineRunner(model, topology, config, loss_fn=VocabParallelCausalLMLoss(tensor.mesh))
    else:
        pipeline = PipelineRunner(model, topology, config)
    held = {id(p) for _, p in pipeline.named_parameters}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) in held]
    release_other_stages(model, held)
    return pipeline


def release_other_stages(model: torch.nn.Module, held: set[int]) -> int:
    """Replace the parameters of the stages other pp ranks run by meta tensors of their shape, so that a
    pipeline rank keeps only its own stages in memory; returns the bytes freed.

    The model's structure and parameter names stay (its state_dict lists the others' parameters as meta
    tensors; checkpoints save a rank's own only)."""
    placeholders: dict[int, torch.nn.Parameter] = {}
    freed = 0
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or id(p) in held or p.is_meta:
                continue
            if id(p) not in placeholders:  # a weight two modules share gets one placeholder
                meta = torch.empty(p.shape, dtype=p.dtype, device="meta")
                placeholders[id(p)] = torch.nn.Parameter(meta, requires_grad=p.requires_grad)
                freed += local(p).numel() * p.element_size()
            module._parameters[name] = placeholders[id(p)]
    return freed


def apply_sequence_sharding(model: torch.nn.Module, topology: Topology, config: Config) -> SequenceParallelAttention:
    """Attention over the sp group, and full batches cut into this rank's sequence shard before forward.

    Every rank of an sp group is given the same full batch (data is split by the ``dp`` rank); a forward
    called with ``input_ids=`` and ``labels=`` keywords is cut into this rank's shard (labels shifted
    first, so no boundary token is lost). A forward given ``shift_labels`` is taken as already sharded.
    """
    attention = apply_sequence_parallel(model, topology, config.parallel.sequence.method)

    def shard(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids, labels = kwargs.get("input_ids"), kwargs.get("labels")
        if args or ids is None or labels is None or "shift_labels" in kwargs:
            return args, kwargs  # not a full training batch given by keyword: the caller sharded it
        if ids.shape[1] != labels.shape[1]:
            raise ValueError(f"input_ids {tuple(ids.shape)} and labels {tuple(labels.shape)} differ in length")
        extra = {k: kwargs.pop(k) for k in ("attention_mask", "position_ids") if kwargs.get(k) is not None}
        del kwargs["input_ids"], kwargs["labels"]
        kwargs.update(shard_batch_for_sequence_parallel(ids, labels, topology, attention.balanced, **extra))
        return args, kwargs

    model.register_forward_pre_hook(shard, with_kwargs=True)
    return attention
