"""`tidal.wrap()`: put an existing model and optimizer under tidal without changing the training loop.

    model, optimizer = tidal.wrap(model, optimizer, config)
    for batch in loader:                     # the loop body stays as it was
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

The model and optimizer come back as the same objects, instrumented: the model's forward counts
micro-steps (gradients are reduced only on the backward of every `gradient_accumulation_steps`-th)
and runs under autocast; optimizer hooks finish the gradient reduction, unscale fp16 gradients and
skip overflowed steps, clip by the global norm across shards, and after the step bring the replicas
back together. The `Engine` behind them (`tidal.engine(model)`) also offers a DeepSpeed-style
`backward`/`step`, `no_sync`, `save`/`load` and `metrics`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd import Variable

from tidal.config import Config
from tidal.offload.chunks import updates_in_backward
from tidal.parallel.expert_checkpoint import ExpertCheckpointLayout
from tidal.runtime import checkpoint, rng
from tidal.runtime.context import Context, current, init, resolve_config
from tidal.runtime.deferred import DeferredTensors
from tidal.runtime.hooks import weak_hook
from tidal.runtime.metrics import CommRecord, StepMetrics
from tidal.runtime.parallelize import parallelize
from tidal.runtime.precision import LossScaler, autocast, global_grad_norm, scale_grads_

ENGINE_ATTR = "_tidal_engine"


class Engine:
    """Drives one wrapped model and optimizer; see the module docstring for what it instruments."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: Config,
        context: Context,
        lr_scheduler: Any | None = None,
    ) -> None:
        _check_supported(config, model, optimizer)
        self.model = model.to(context.device.torch_device)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.config = config
        self.context = context
        self.topology = context.topology
        self.accumulation = config.train.gradient_accumulation_steps
        self.scaler = LossScaler(config.precision)
        self.metrics = StepMetrics(
            rank=context.rank,
            world=context.world_size,
            config=config.logging,
            total_steps=config.train.steps,
            device=context.device,
        )
        if config.logging.trace:
            atexit.register(self.metrics.write_trace)
        # held weakly: the callback reaches autograd graphs (an MoE exchange's backward keeps it), which a
        # layer's last outputs keep (MoE's aux_loss), and a cycle through a graph is never collected
        parts = parallelize(model, optimizer, config, context, on_comm=weak_hook(self._observe_comm))
        self.dp = parts.dp
        self.tensor = parts.tensor
        self.pipeline = parts.pipeline
        self.sequence = parts.sequence
        self.optimizer_offload = parts.optimizer_offload
        self.activation_offload = parts.activation_offload
        if self.optimizer_offload is not None and self._updates_in_backward():
            self.optimizer_offload.update_in_backward()
        self.global_step = 0
        self.micro_step = 0
        self._no_sync = False
        self._bypass_hooks = False
        self._explicit_backward = False
        self._loss_scaled = False
        self._overflow = False
        self._save_due = False
        self._losses: list[torch.Tensor] = []
        self._step_span: contextlib.AbstractContextManager | None = None
        self._instrument()

    # -- instrumentation -----------------------------------------------------------------------------

    def _instrument(self) -> None:
        original_forward = self.model.forward

        @functools.wraps(original_forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            training = self.model.training and torch.is_grad_enabled()
            if training:
                self._begin_micro_step(args, kwargs)
            offload = self.activation_offload if training else None
            with (
                self.metrics.span("forward"),
                autocast(self.config.precision, self.context.device.type),
                offload.forward_context() if offload is not None else contextlib.nullcontext(),
            ):
                out = original_forward(*args, **kwargs)
            if training:
                self._observe_output(out)
            return out

        self.model.forward = forward
        original_zero_grad = self.optimizer.zero_grad

        @functools.wraps(original_zero_grad)
        def zero_grad(set_to_none: bool = True) -> None:
            original_zero_grad(set_to_none=set_to_none)
            self.dp.zero_grad(set_to_none)

        self.optimizer.zero_grad = zero_grad
        self.optimizer.register_step_pre_hook(self._before_step)
        self.optimizer.register_step_post_hook(self._after_step)
        setattr(self.model, ENGINE_ATTR, self)
        setattr(self.optimizer, ENGINE_ATTR, self)

    def _updates_in_backward(self) -> bool:
        """Whether offloaded chunks may update during backward (see `tidal.offload.chunks.updates_in_backward`)."""
        return updates_in_backward(
            self.config,
            zero_stage=self.dp.stage,
            dp_world=self.dp.world,
            model_parallel=self.dp.model_parallel,
            pipelined=self.pipeline is not None,
            device_type=self.context.device.type,
        )

    def _begin_micro_step(self, args: tuple, kwargs: dict) -> None:
        if self._save_due:
            self._save_due = False
            self.save()
        self.micro_step += 1
        boundary = not self._no_sync and self.micro_step % self.accumulation == 0
        self.dp.prepare_backward(boundary)
        if self.optimizer_offload is not None:
            # the norm is taken only to clip (never with updates in backward) or to log it
            self.optimizer_offload.arm(boundary, measure_norm=self._logging_step(self.global_step + 1))
        samples, tokens = _batch_size(args, kwargs)
        # ranks see equal micro-batches: the job's throughput is (data-parallel ranks) times this rank's; a
        # sequence-parallel rank holds 1/sp of its samples' tokens
        world = self.dp.world
        samples = samples and samples // self.topology.size("sp")
        self.metrics.observe_batch(samples and samples * world, tokens and tokens * world)

    def _observe_output(self, out: Any) -> None:
        loss = _find_loss(out)
        if loss is None:
            return
        self._losses.append(loss.detach())
        if loss.requires_grad:
            loss.register_hook(weak_hook(self._on_backward_start))

    def _on_backward_start(self, grad: torch.Tensor) -> torch.Tensor:
        """The loss's gradient hook: the first thing backward runs. Times backward; scales for fp16."""
        span = self.metrics.span("backward")
        span.__enter__()
        Variable._execution_engine.queue_callback(lambda: span.__exit__(None, None, None))
        if not self.scaler.enabled:
            return grad
        self._loss_scaled = True
        return grad if self._explicit_backward else grad * self.scaler.scale

    def _observe_comm(self, name: str, nbytes: int, work: dist.Work) -> CommWatch:
        return CommWatch(self.metrics.comm_launched(name, nbytes), work)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._bypass_hooks:
            return
        self._step_span = self.metrics.span("step")
        self._step_span.__enter__()
        if self.scaler.enabled and not self._loss_scaled:
            raise RuntimeError(
                "precision.dtype=fp16 needs the loss scaled before backward, and tidal found no loss in the "
                "model's output; call tidal.engine(model).backward(loss) instead of loss.backward()"
            )
        self.dp.finish_gradients()
        # every rank skips an overflowed step together, model-parallel ranks included: a stage or shard that
        # stepped while another skipped would leave the model torn and the loss scales apart
        group = self.dp.world_group if self.dp.model_parallel else self.dp.group if self.dp.world > 1 else None
        self._overflow = self.scaler.unscale_and_check(self.dp.optimizer_grads(), group)
        if self._overflow:
            self.dp.drop_grads()
            self.metrics.observe_skipped_step()
            return
        self._clip_gradients()
        if self.optimizer_offload is not None:
            with self.metrics.span("offloaded update"):
                self.optimizer_offload.step()
            self.dp.drop_grads()  # the user's optimizer.step() that follows finds nothing left to do

    def _clip_gradients(self) -> None:
        clip = self.config.train.gradient_clipping
        if clip is None and not self._logging_step(self.global_step + 1):
            return  # the norm costs a pass over every gradient and a collective: only when it is used
        sq_sum, norm_group = self.dp.grad_sq_sum()
        if self.optimizer_offload is not None:  # gradients already used and freed during backward
            sq_sum = sq_sum + self.optimizer_offload.take_released_sq_sum()
        norm = global_grad_norm(sq_sum, norm_group if self.dp.world > 1 or self.dp.model_parallel else None)
        if clip is not None and norm > clip:
            scale_grads_(self.dp.optimizer_grads(), clip / (norm + 1e-6))
        self.metrics.observe_grad_norm(norm)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._bypass_hooks:
            return
        if not self._overflow:
            self.dp.after_step()
        self.scaler.update(self._overflow)
        self._step_span.__exit__(None, None, None)
        self.global_step += 1
        self.micro_step = 0
        self._loss_scaled = False
        self._report_loss()
        self.metrics.end_step(self.global_step)
        interval = self.config.checkpoint.interval
        if interval and self.global_step % interval == 0:
            self._save_due = True  # at the next forward: after the user's scheduler.step(), not before

    def _logging_step(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) prints a metrics line: the same answer on every rank."""
        return step % self.config.logging.interval == 0 or step == self.config.train.steps

    def _report_loss(self) -> None:
        if not self._losses:
            return
        mean = torch.stack([x.float() for x in self._losses]).mean().reshape(1)
        self._losses.clear()
        if self.dp.world > 1 and self._logging_step(self.global_step):  # the job's loss, on the steps that print it
            dist.all_reduce(mean, group=self.dp.group)
            mean /= self.dp.world
        self.metrics.observe_loss(mean.item())

    # -- DeepSpeed-style API -------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` with the loss divided by the accumulation steps and fp16-scaled."""
        scaled = loss / self.accumulation
        if self.scaler.enabled:
            scaled = scaled * self.scaler.scale
            self._loss_scaled = True
        self._explicit_backward = True
        try:
            scaled.backward()
        finally:
            self._explicit_backward = False

    def step(self) -> bool:
        """At an accumulation boundary: optimizer step, zero_grad and scheduler step. Returns whether it stepped."""
        if self.micro_step % self.accumulation != 0:
            return False
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return True

    def train_step(self, batch: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step on `batch` through the pipeline (parallel.pp > 1): its micro-batches run on the
        configured schedule, gradients are reduced over the data-parallel ranks, the optimizer (and the
        scheduler) steps. Every rank of a pipeline calls it with the same batch: token ids [B, S], or a
        dict with ``input_ids`` and optional ``labels``. Returns the mean loss, on every rank."""
        if self.pipeline is None:
            raise RuntimeError(
                "engine.train_step(batch) runs pipeline parallelism (parallel.pp > 1); with pp=1 "
                "call the model in your loop"
            )
        if self.accumulation != 1:
            raise ValueError(
                f"train.gradient_accumulation_steps={self.accumulation} with pipeline parallelism: the pipeline's "
                "micro-batches are the accumulation; set it to 1 and parallel.pipeline.microbatches instead"
            )
        self.micro_step += 1
        self.dp.prepare_backward(False)  # the schedule runs many backwards: reduce once, before the step
        self.pipeline.loss_scale = self.scaler.scale if self.scaler.enabled else 1.0
        self._loss_scaled = True  # the last stage's loss function scales what backward starts from
        offload = self.activation_offload
        with (
            self.metrics.span("pipeline"),
            autocast(self.config.precision, self.context.device.type),
            offload.forward_context() if offload is not None else contextlib.nullcontext(),
        ):
            loss = self.pipeline.train_step(batch)
        ids = batch["input_ids"] if isinstance(batch, Mapping) else batch
        self.metrics.observe_batch(ids.shape[0] * self.dp.world, ids.numel() * self.dp.world)
        self._losses.append(loss.detach())
        self.step()
        return loss

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Forward passes inside accumulate gradients locally, with no communication in their backward."""
        previous, self._no_sync = self._no_sync, True
        try:
            yield
        finally:
            self._no_sync = previous

    # -- checkpoints ---------------------------------------------------------------------------------

    def _root(self, path: str | os.PathLike | None) -> Path:
        root = path or self.config.checkpoint.dir
        if root is None:
            raise ValueError("no checkpoint directory: pass one to save()/load() or set checkpoint.dir")
        return Path(root)

    def _tensor_state(self, offloaded: dict | None = None, deferred: DeferredTensors | None = None) -> dict:
        """Model and optimizer tensors by name at their global shapes; experts by global index, whatever the ep."""
        model = self.model.state_dict()
        if self.pipeline is not None:  # a stage holds its own parameters: the others are not this rank's to save
            held = {name for name, _ in self.pipeline.named_parameters}
            params = {name for name, _ in self.model.named_parameters()}
            model = {k: v for k, v in model.items() if k in held or k not in params}
        experts = ExpertCheckpointLayout(self.model, self.topology, deferred)
        optim = experts.optimizer_state(self.dp.optimizer_state(offloaded))
        return {"model": experts.model_state(model), "optim": {"state": optim}}

    def _offloaded_state(self, deferred: DeferredTensors) -> dict | None:
        """The offloaded optimizer's state by parameter (NVMe state as `deferred` placeholders), or None."""
        return None if self.optimizer_offload is None else dict(self.optimizer_offload.state_by_param(deferred))

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write a checkpoint of everything needed to resume (collective: every rank calls it)."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        extras = {
            "step": self.global_step,
            "rng": rng.capture_rng(),
            "param_groups": groups,
            "scaler": self.scaler.state_dict(),
            "scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "config": self.config.to_dict(),
        }
        deferred = DeferredTensors()
        return checkpoint.save_checkpoint(
            self._root(path),
            self.global_step,
            self._tensor_state(self._offloaded_state(deferred), deferred),
            extras,
            keep=self.config.checkpoint.keep,
            deferred=deferred,
        )

    def load(self, path: str | os.PathLike | None = None) -> int:
        """Resume from a checkpoint directory (or a root, meaning its latest); returns the step reached.

        The checkpoint may come from another data-parallel size, ZeRO stage or expert-parallel size."""
        self._create_optimizer_state()
        deferred = DeferredTensors()
        state = self._tensor_state(self._offloaded_state(deferred), deferred)
        extras = checkpoint.load_checkpoint(self._root(path), state, deferred=deferred)
        if self.optimizer_offload is not None:
            with self._params_resident():
                self.optimizer_offload.refresh_masters()
        self.global_step = int(extras["step"])
        rng.restore_rng(extras["rng"])
        for group, saved in zip(self.optimizer.param_groups, extras["param_groups"], strict=False):
            group.update(saved)
        self.scaler.load_state_dict(extras["scaler"])
        if self.lr_scheduler is not None and extras.get("scheduler") is not None:
            self.lr_scheduler.load_state_dict(extras["scheduler"])
        self.micro_step = 0
        return self.global_step

    def _params_resident(self) -> contextlib.AbstractContextManager:
        """Streamed (offloaded) parameters brought into memory, and written back after, for direct updates."""
        offload = getattr(self.dp, "param_offload", None)
        return contextlib.nullcontext() if offload is None else offload.resident_for_step()

    def _create_optimizer_state(self) -> None:
        """Make the optimizer allocate its state (a step at lr 0 on zero gradients) so there is something
        to load into; the parameters do not move."""
        if self.optimizer_offload is not None:
            if not self.optimizer_offload.has_state():
                with self._params_resident():
                    self.optimizer_offload.create_state()
            return
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if all(p in self.optimizer.state for p in params):
            return
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        grads = [p.grad for p in params]
        self._bypass_hooks = True
        try:
            for g in self.optimizer.param_groups:
                g["lr"] = 0.0
            for p in params:
                p.grad = torch.zeros_like(p)
            self.optimizer.step()
        finally:
            for g, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                g["lr"] = lr
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad
            self._bypass_hooks = False


class CommWatch:
    """Tells a collective's metrics record how long its wait blocked and when it was seen complete.

    Completion is observed at the wait, not through the work's future: a collective already done
    when its wait comes counts as hidden (its end time is then an upper bound). Future callbacks run
    Python on the backend's own threads, which gloo's reduce_scatter does not even offer. The work is
    dropped at the wait: it holds the collective's buffers (a ZeRO 2 bucket's send and receive ones),
    and the watch lives on with its bucket until the next step.
    """

    def __init__(self, record: CommRecord, work: dist.Work) -> None:
        self.record = record
        self.work = work

    @contextlib.contextmanager
    def blocked(self) -> Iterator[None]:
        work, self.work = self.work, None  # the work holds its tensors: none of them outlives the wait
        if work is None or work.is_completed():
            self.record.completed()
            yield
            return
        with self.record.blocked():
            yield
        self.record.completed()


def _check_supported(config: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    p = config.parallel
    if p.ep > 1 and p.pp > 1:
        raise NotImplementedError(f"parallel.ep={p.ep} runs with pp=1 so far; got pp={p.pp}")
    if p.ep > 1 and p.tp > 1 and p.tensor.sequence_parallel:
        raise NotImplementedError(
            f"parallel.ep={p.ep} with tp={p.tp} runs without sequence parallel so far; set "
            "parallel.tensor.sequence_parallel=false"
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"tidal.wrap() needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if hasattr(model, ENGINE_ATTR):
        raise RuntimeError("this model is already wrapped by tidal; wrap it once")


def _find_loss(out: Any) -> torch.Tensor | None:
    """The loss in a model's output: ``out.loss``, ``out["loss"]``, or a scalar tensor output."""
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None and isinstance(out, torch.Tensor) and out.numel() == 1:
        loss = out
    return loss if isinstance(loss, torch.Tensor) and loss.is_floating_point() else None


def _batch_size(args: tuple, kwargs: dict) -> tuple[int | None, int | None]:
    """(samples, tokens) of a forward's inputs: tokens when ``input_ids`` is given."""
    ids = kwargs.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
        return ids.shape[0], ids.numel()
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    if first is not None and first.dim() >= 1:
        return first.shape[0], None
    return None, None


def wrap(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Config | Mapping | str | os.PathLike | None = None,
    *,
    lr_scheduler: Any | None = None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Instrument `model` and `optimizer` for the job `tidal.init()` joined (joining it first if needed).

    Args:
        config: as for `tidal.init`; None uses the config init was given. Its parallel sizes must
            match the ones init built the topology with.
        lr_scheduler: the user's scheduler, saved and restored with checkpoints.
    Returns:
        ``(model, optimizer)``: the same objects, instrumented; ``tidal.engine(model)`` is the Engine.
    """
    context = current() or init(config)
    cfg = context.config if config is None else resolve_config(config)
    wanted = {n: getattr(cfg.parallel, n) for n in ("pp", "dp", "sp", "tp", "ep")}
    built = {n: getattr(context.config.parallel, n) for n in wanted}
    if any(wanted[n] != built[n] and "auto" not in (wanted[n], built[n]) for n in wanted):
        raise ValueError(
            f"tidal.wrap() got parallel sizes {wanted} but tidal.init() built the topology with {built}; "
            "pass the same sizes to both (schedules and methods may differ)"
        )
    engine_ = Engine(model, optimizer, cfg, context, lr_scheduler)
    return engine_.model, engine_.optimizer


def engine(obj: torch.nn.Module | torch.optim.Optimizer) -> Engine:
    """The Engine behind a model or optimizer returned by `tidal.wrap`."""
    found = getattr(obj, ENGINE_ATTR, None)
    if found is None:
        raise ValueError(f"this {type(obj).__name__} was not returned by tidal.wrap()")
    return found
