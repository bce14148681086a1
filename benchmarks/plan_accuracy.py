"""The planner's predicted peak per rank against the peak measured on real CPU runs, beside DeepSpeed's and
accelerate's estimators, over six architectures x three configurations.

    python benchmarks/plan_accuracy.py            # 6 architectures x 3 configs, 1 and 2 gloo ranks: ~2 min
    python benchmarks/plan_accuracy.py --quick    # gpt2 and mlp only

Architectures (tiny, built from transformers configs, random weights): GPT-2 (dense decoder), BERT (encoder,
masked LM), T5 (encoder-decoder), Mixtral (MoE decoder), ViT (image classifier) and a plain nn.Module (an
MLP of Linear + GELU, loss = output sum). Configurations: 1 rank ZeRO 0 fp32; 2 ranks ZeRO 2 fp32; 2 ranks
ZeRO 3 bf16. AdamW everywhere.

Predicted: `tidal.memory.planner.plan` (the fake-tensor trace and the per-rank estimate, what `tidal plan`
prints), this rank's bytes over every tier (the device is host memory here). Measured: one training step
(the second: AdamW's state exists) through `tidal.wrap`, the peak of live bytes by storage
(`LiveTensorTracker`: parameters, gradients, optimizer state and the engine's gradient buckets tracked
from before the step, every storage an op makes during it), the largest of the ranks. error = predicted /
measured - 1. DeepSpeed's number is its ZeRO model-states estimator (`estimate_zero2_model_states_mem_needs`
/ `estimate_zero3_...`, per GPU, no CPU offload) and accelerate's is `estimate-memory`'s "training using
Adam" (total parameter bytes x 4); neither counts activations or buffers, and both ignore the precision
and ZeRO sharding choices here beyond what their arguments take. Mixtral's activations are planned on a
dense stand-in with balanced routing while the real run routes unevenly: its error includes that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import tempfile

import torch
import torch.multiprocessing as mp
from torch import nn

import tidal
from tidal.memory.planner import Budgets, plan
from tidal.memory.presets import ModelSpec, resolve_model
from tidal.memory.tracker import LiveTensorTracker

MICRO, SEQ, VOCAB = 2, 64, 512
CONFIGS = {
    "1 rank zero0 fp32": (1, {"zero": {"stage": 0}}),
    "2 ranks zero2 fp32": (2, {"zero": {"stage": 2}}),
    "2 ranks zero3 bf16": (2, {"zero": {"stage": 3}, "precision": {"dtype": "bf16"}}),
}
HF_CAUSAL = {
    "gpt2": {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": VOCAB, "n_positions": SEQ},
    "mixtral": {
        "model_type": "mixtral",
        "num_hidden_layers": 2,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": SEQ,
    },
}
ARCHS = ("gpt2", "bert", "t5", "mixtral", "vit", "mlp")
LOGGING = {"logging": {"progress": False, "interval": 1000}}


def build(arch: str) -> tuple[nn.Module, object]:
    """(model, example batch) on the current default device; the batch is what one rank trains on."""
    import transformers as tf

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (MICRO, SEQ), generator=gen)
    if arch in HF_CAUSAL:
        data = dict(HF_CAUSAL[arch])
        config = tf.AutoConfig.for_model(data.pop("model_type"), **data)
        return tf.AutoModelForCausalLM.from_config(config), {"input_ids": ids, "labels": ids}
    if arch == "bert":
        config = tf.BertConfig(
            vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256
        )
        return tf.BertForMaskedLM(config), {"input_ids": ids, "labels": ids}
    if arch == "t5":
        config = tf.T5Config(
            vocab_size=VOCAB,
            d_model=128,
            d_kv=32,
            d_ff=256,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
        return tf.T5ForConditionalGeneration(config), {"input_ids": ids, "labels": ids[:, : SEQ // 2].contiguous()}
    if arch == "vit":
        config = tf.ViTConfig(
            image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=256, num_labels=10,
        )  # fmt: skip
        pixels = torch.randn(MICRO, 3, 64, 64, generator=gen)
        return tf.ViTForImageClassification(config), {"pixel_values": pixels, "labels": torch.tensor([1, 2])}
    layers = [m for _ in range(4) for m in (nn.Linear(256, 256), nn.GELU())]
    return nn.Sequential(*layers), (torch.randn(MICRO * SEQ, 256, generator=gen),)


def _spec(arch: str, tmp: str) -> ModelSpec:
    if arch in HF_CAUSAL:
        path = os.path.join(tmp, f"{arch}.json")
        with open(path, "w") as f:
            json.dump(HF_CAUSAL[arch], f)
        return resolve_model(path)
    with torch.device("meta"):
        model, _ = build(arch)
    _, batch = build(arch)
    return ModelSpec(arch, model.train(), example_batch=batch)


def _loss(model: nn.Module, batch):
    out = model(**batch) if isinstance(batch, dict) else model(*batch)
    return out.loss if hasattr(out, "loss") else out.sum()


def _measure(arch: str, config: dict) -> int:
    model, batch = build(arch)
    model, opt = tidal.wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-3), {**config, **LOGGING})
    engine = tidal.engine(model)
    for step in range(2):
        tracker = LiveTensorTracker()
        if step == 1:
            buckets = [
                b.buffer
                for n in ("buckets", "expert_buckets")
                for b in getattr(getattr(engine.dp, n, None), "buckets", [])
            ]
            tracker.track(model, opt, *(b for b in buckets if b is not None))
        with tracker if step == 1 else contextlib.nullcontext():
            _loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
    return tracker.peak_bytes("cpu")


def _rank(rank: int, world: int, port: int, archs: list[str], queue) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    tidal.init(LOGGING)
    for name, (size, config) in CONFIGS.items():
        if size != world:
            continue
        for arch in archs:
            measured = torch.tensor([_measure(arch, config)], dtype=torch.float64)
            torch.distributed.all_reduce(measured, op=torch.distributed.ReduceOp.MAX)
            if rank == 0:
                queue.put((name, arch, int(measured.item())))
    tidal.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_all(archs: list[str]) -> dict[tuple[str, str], int]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    out = {}
    for world in sorted({size for size, _ in CONFIGS.values()}):
        mp.start_processes(_rank, args=(world, _free_port(), archs, queue), nprocs=world, start_method="spawn")
        count = sum(1 for size, _ in CONFIGS.values() if size == world) * len(archs)
        for _ in range(count):
            name, arch, measured = queue.get()
            out[name, arch] = measured
    return out


def predict(arch: str, name: str, tmp: str) -> int:
    world, config = CONFIGS[name]
    budgets = Budgets(device=None, cpu=1 << 50, nvme=0, ranks_per_node=None)
    report = plan(_spec(arch, tmp), config, world, budgets, micro_batch=MICRO, seq_len=SEQ, search=False)
    return max(r.peak("device") + r.peak("cpu") for r in report.estimate.ranks)


def others(arch: str, name: str) -> tuple[float | None, float | None]:
    """DeepSpeed's model-states estimate per GPU and accelerate's training estimate, bytes (None: missing)."""
    world, config = CONFIGS[name]
    with torch.device("meta"):
        model, _ = build(arch)
    total = sum(p.numel() for p in model.parameters())
    deepspeed = accelerate = None
    try:
        if config["zero"]["stage"] == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
            deepspeed = estimate_zero3_model_states_mem_needs(total, largest, world, 1, False, False)[1]
        else:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

            deepspeed = estimate_zero2_model_states_mem_needs(total, world, 1, False)[1]
    except ImportError:
        pass
    try:
        from accelerate.commands.estimate import calculate_maximum_sizes, estimate_training_usage

        size, _ = calculate_maximum_sizes(model)
        accelerate = max(estimate_training_usage(size, "float32").values())
    except ImportError:
        pass
    return deepspeed, accelerate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="gpt2 and mlp only")
    ns = parser.parse_args()
    archs = ["gpt2", "mlp"] if ns.quick else list(ARCHS)
    measured = measure_all(archs)
    errors = []
    missing: set[str] = set()
    mib = 2**20
    print(
        f"{'architecture':12} {'config':20} {'measured':>9} {'tidal':>9} {'error':>7} "
        f"{'deepspeed':>10} {'accelerate':>10}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for name in CONFIGS:
                predicted = predict(arch, name, tmp)
                real = measured[name, arch]
                error = predicted / real - 1
                errors.append(abs(error))
                ds, acc = others(arch, name)
                missing |= {tool for tool, value in (("deepspeed", ds), ("accelerate", acc)) if value is None}
                fmt = lambda v: "n/a" if v is None else f"{v / mib:.2f}M"  # noqa: E731
                print(
                    f"{arch:12} {name:20} {real / mib:>8.2f}M {predicted / mib:>8.2f}M {error:>+7.1%} "
                    f"{fmt(ds):>10} {fmt(acc):>10}"
                )
    print(f"\n|error| median {statistics.median(errors):.1%}, max {max(errors):.1%} (target: median <= 5%, max <= 10%)")
    if missing:
        print(f"n/a: {' and '.join(sorted(missing))} not installed (pip install {' '.join(sorted(missing))})")


if __name__ == "__main__":
    main()
