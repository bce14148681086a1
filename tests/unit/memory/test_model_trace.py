"""The fake-tensor trace against a real CPU step of the same model: parameter, gradient and saved-activation
bytes per module, and the live-byte peaks of forward and backward, all exact; a 70B Llama without memory."""

from __future__ import annotations

import weakref

import psutil
import pytest
import torch

from tidal.memory.trace import ModelTrace, trace_causal_lm, trace_model
from tidal.memory.tracker import LiveTensorTracker

VOCAB = 96
SEQ = 16
BATCH = 2
VIEWS = {"TBackward0", "ViewBackward0", "TransposeBackward0", "PermuteBackward0", "ExpandBackward0"}


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).train()  # dropout on: its masks are saved too


def _llama_config(layers: int = 2, **sizes: int):
    from transformers import LlamaConfig

    shape = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    shape.update(sizes)
    return LlamaConfig(
        vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=SEQ, tie_word_embeddings=False, **shape
    )


def _llama() -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(_llama_config())


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(24, 64),
        torch.nn.GELU(),
        torch.nn.LayerNorm(64),
        torch.nn.Linear(64, 64),
        torch.nn.Linear(64, 8),
    )


def _token_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def _is_param_cast(tensor: torch.Tensor) -> bool:
    """Whether autograd says `tensor` is (a view of) a dtype copy of a leaf parameter."""
    fn = tensor.grad_fn
    while fn is not None and fn.name() in VIEWS:
        fn = fn.next_functions[0][0]
    return (
        fn is not None and fn.name() == "ToCopyBackward0" and type(fn.next_functions[0][0]).__name__ == "AccumulateGrad"
    )


def _real_step(model: torch.nn.Module, batch, precision: str) -> dict:
    """One real CPU step of `model` measured independently of the trace: saved storages by address,
    attributed to the innermost running module; live bytes by `LiveTensorTracker`."""
    names = {module: name for name, module in model.named_modules()}
    stack: list[str] = []

    def leave(*_: object) -> None:
        stack.pop()

    hooks = []
    for module in names:
        hooks.append(module.register_forward_pre_hook(lambda m, _: stack.append(names[m])))
        hooks.append(module.register_forward_hook(leave, always_call=True))
    inputs = list(batch.values()) if isinstance(batch, dict) else [batch]
    kept = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *inputs]}
    seen: dict[int, weakref.ref] = {}
    saved: dict[str, list[int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in kept or (ptr in seen and seen[ptr]() is storage):
            return tensor
        seen[ptr] = weakref.ref(storage)
        counts = saved.setdefault(stack[-1] if stack else "", [0, 0])
        counts[1 if _is_param_cast(tensor) else 0] += storage.nbytes()
        return tensor

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    tracker = LiveTensorTracker().track(model, *inputs)
    with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            output = model(**batch) if isinstance(batch, dict) else model(batch)
            loss = output.loss if isinstance(batch, dict) else output.sum()
        del output
    forward_peak, after_forward = tracker.peak_bytes(), tracker.current_bytes()
    tracker.reset_peak()
    with tracker:
        loss.backward()
    del loss
    for hook in hooks:
        hook.remove()
    grads = {}
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        grads[owner] = grads.get(owner, 0) + (p.grad.numel() * p.grad.element_size() if p.grad is not None else 0)
    return {
        "saved": saved,
        "grads": grads,
        "forward_peak": forward_peak,
        "after_forward": after_forward,
        "backward_peak": tracker.peak_bytes(),
        "after_backward": tracker.current_bytes(),
    }


def _assert_matches(trace: ModelTrace, model: torch.nn.Module, real: dict, slack: dict[str, int] | None = None) -> None:
    """Exact agreement, but for `slack`: module name -> bytes its saved activations (and so the peaks) may
    be short of the real run by."""
    slack = slack or {}
    params = {name: p.numel() * p.element_size() for name, p in model.named_parameters()}
    for record in trace.modules:
        own = sum(n for name, n in params.items() if name.rpartition(".")[0] == record.name)
        assert record.param_bytes == own, record.name
        assert record.grad_bytes == real["grads"].get(record.name, 0), record.name
        activations, casts = real["saved"].get(record.name, (0, 0))
        assert activations - slack.get(record.name, 0) <= record.saved_bytes <= activations, record.name
        assert record.saved_param_cast_bytes == casts, record.name
    assert trace.total.param_bytes == sum(params.values())
    assert trace.total.saved_bytes > 0
    for key in ("forward_peak", "after_forward", "backward_peak", "after_backward"):
        assert real[key] - sum(slack.values()) <= getattr(trace, f"{key}_bytes") <= real[key], key


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_transformers_trace_matches_a_real_cpu_step(build, precision: str) -> None:
    batch = _token_batch()
    trace = trace_model(build(), batch, precision=precision)
    model = build()
    _assert_matches(trace, model, _real_step(model, batch, precision))
    assert trace.precision == precision
    assert trace.input_bytes == BATCH * SEQ * 8  # labels are input_ids: one tensor
    assert (trace.total.saved_param_cast_bytes == 0) == (precision == "fp32")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mlp_trace_matches_a_real_cpu_step(precision: str) -> None:
    batch = torch.randn(8, 24)
    trace = trace_model(_mlp(), batch, precision=precision)
    model = _mlp()
    # torch's meta kernel gives layer_norm's mean and rstd (one per row each) the bf16 input's dtype; the CPU
    # kernel, given an fp32 weight, keeps them fp32: the trace is 2 bytes short per statistic and row
    slack = {"2": 2 * 8 * 2} if precision == "bf16" else {}
    _assert_matches(trace, model, _real_step(model, batch, precision), slack)
    assert trace.block_names == ("0", "2", "3", "4")  # the Sequential's children with parameters
    for name in ("3", "4"):  # a Linear after one that needs grads saves its weight, cast to bf16
        weight = trace.module(name).param_bytes - trace.module(name).param_bytes // 65  # (n x 64) weight, bias
        assert trace.module(name).saved_param_cast_bytes == (weight // 2 if precision == "bf16" else 0)


def test_trace_leaves_the_model_untouched() -> None:
    model = _llama()
    before = {name: (p, p.clone()) for name, p in model.named_parameters()}
    trace_model(model, _token_batch(), precision="bf16")
    for name, p in model.named_parameters():
        assert p is before[name][0] and p.grad is None and torch.equal(p, before[name][1])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_totals_subtrees_and_blocks_sum_the_records() -> None:
    trace = trace_causal_lm(_llama_config(layers=3), micro_batch=BATCH, seq_len=SEQ)
    total = trace.total
    for field in ("param_bytes", "buffer_bytes", "grad_bytes", "saved_bytes", "saved_tensors"):
        assert getattr(total, field) == sum(getattr(r, field) for r in trace.modules), field
    assert total.buffer_bytes > 0  # the rotary embedding's inverse frequencies
    assert trace.block_names == ("model.layers.0", "model.layers.1", "model.layers.2")
    blocks = trace.blocks()
    layer0 = [r for r in trace.modules if r.name == "model.layers.0" or r.name.startswith("model.layers.0.")]
    assert blocks[0].param_bytes == sum(r.param_bytes for r in layer0)
    assert blocks[0].saved_bytes == sum(r.saved_bytes for r in layer0)
    assert len({b.saved_bytes for b in blocks[1:]}) == 1  # identical layers save the same bytes
    kept = total.param_bytes + total.buffer_bytes + trace.input_bytes
    assert trace.after_forward_bytes == kept + total.saved_bytes + 4  # and the fp32 loss
    assert trace.after_backward_bytes == kept + total.grad_bytes
    with pytest.raises(KeyError, match="model.layers.9"):
        trace.module("model.layers.9")


def test_unknown_precision_and_outputs_without_a_loss_are_refused() -> None:
    with pytest.raises(ValueError, match="precision='int8'"):
        trace_model(_mlp(), torch.randn(2, 24), precision="int8")
    with pytest.raises(TypeError, match="loss_fn="):
        trace_model(_TwoOutputs(), torch.randn(2, 2))


class _TwoOutputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(x), x


@pytest.mark.timeout(120)
def test_llama_70b_traces_without_allocating() -> None:
    """Llama-3 70B's shapes at full width, 8 of its 80 layers (the 80-layer trace takes ~10-25 s here)."""
    config = _llama_config(
        layers=8, hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8
    )
    config.vocab_size, config.max_position_embeddings = 128256, 8192
    process = psutil.Process()
    rss = process.memory_info().rss
    trace = trace_causal_lm(config, micro_batch=1, seq_len=2048, precision="bf16")
    assert process.memory_info().rss - rss < 2**30
    layer = 4 * 8192 * (2 * 8192 + 2 * 1024 + 3 * 28672 + 2)  # q, o; k, v (8 of 64 heads); mlp; 2 norms
    assert trace.blocks()[0].param_bytes == layer
    assert trace.total.param_bytes == 8 * layer + 2 * 128256 * 8192 * 4 + 8192 * 4
    linears = 4 * 8192 * (2 * 8192 + 2 * 1024 + 3 * 28672)
    assert trace.total.saved_param_cast_bytes == 8 * linears // 2 + 128256 * 8192 * 2  # bf16 weights and lm_head
    assert trace.forward_peak_bytes > trace.after_forward_bytes > trace.total.param_bytes + trace.total.saved_bytes
