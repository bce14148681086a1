"""Small models and data shared by the distributed tests, built the same way on every rank."""

from __future__ import annotations

import torch

VOCAB = 96
SEQ = 16


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """A 2-layer GPT-2 from a transformers config, random init, no dropout (ranks must agree exactly)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def tiny_llama(seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A Llama of `layers` layers (default 2) from a transformers config, random init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def tiny_mixtral(seed: int = 0) -> torch.nn.Module:
    """A 2-layer Mixtral-style MoE (8 experts, top-2) from a transformers config: some experts get no tokens."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=SEQ,
        router_aux_loss_coef=0.0,
    )
    return MixtralForCausalLM(config)


MODELS = {
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "llama4": lambda seed=0: tiny_llama(seed, layers=4),
    "mixtral": tiny_mixtral,
}


def batches(steps: int, global_batch: int, seed: int = 1) -> list[torch.Tensor]:
    """`steps` global batches of token ids, shape (global_batch, SEQ)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (global_batch, SEQ), generator=gen) for _ in range(steps)]


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch."""
    return batch.chunk(world)[rank]


def train_step(model, opt, ids: torch.Tensor, rank: int, world: int, scheduler=None) -> float:
    """One step of the plain loop on this rank's share of `ids`; returns the job's mean loss."""
    import torch.distributed as dist

    mine = shard(ids, rank, world)
    loss = model(input_ids=mine, labels=mine).loss
    loss.backward()
    opt.step()
    if scheduler is not None:
        scheduler.step()
    opt.zero_grad()
    total = loss.detach().float().reshape(1)
    dist.all_reduce(total)
    return total.item() / world


def loop_step(model, opt, ids: torch.Tensor) -> torch.Tensor:
    """One training step on `ids` as a user's loop runs it: `engine.train_step` with pipeline parallelism,
    else forward, backward, `opt.step()` and `zero_grad()`; returns this rank's loss."""
    import tidal

    engine = tidal.engine(model)
    if engine.pipeline is not None:
        return engine.train_step(ids)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def make_optimizer(model: torch.nn.Module, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW with two param groups (decay / no decay), as real training scripts build it."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-3, fused=fused
    )


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full plain tensor (gathering FSDP2's DTensor shards)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()  # never a view of a shard
    return out


def reference_run(
    steps: int,
    global_batch: int,
    accumulation: int = 1,
    clip: float | None = None,
    model_name: str = "gpt2",
    fused: bool | None = None,
):
    """Plain single-process PyTorch: losses per step and final parameters (`fused`: AdamW's fused kernel)."""
    model = MODELS[model_name]()
    opt = make_optimizer(model, fused)
    losses = []
    for ids in batches(steps, global_batch):
        step_loss = 0.0
        for micro in ids.chunk(accumulation):
            loss = model(input_ids=micro, labels=micro).loss / accumulation
            loss.backward()
            step_loss += loss.item()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(step_loss)
    return losses, full_params(model)
