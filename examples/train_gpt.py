"""Train a small GPT (a transformers GPT-2 config, random init) on a generated corpus with tidal.

    tidal launch --nproc-per-node 2 examples/train_gpt.py --steps 120
    tidal launch --nproc-per-node 2 --set zero.stage=3 examples/train_gpt.py --steps 120
    tidal ray --workers 2 --max-failures 1 --set checkpoint.dir=ckpt --set checkpoint.interval=20 \
        examples/train_gpt.py --steps 120

This is an ordinary PyTorch training loop; tidal adds the `tidal.wrap` line (and `tidal.init` to
join the job). Characters are the tokens (bytes, vocabulary 256). Every global batch is drawn from a
generator seeded by the step, then split over the data-parallel ranks, so any number of ranks, and
a resumed run, see the same samples.
"""

import argparse
import json
import math
from pathlib import Path

import torch
from corpus import generate
from transformers import GPT2Config, GPT2LMHeadModel

import tidal

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=120)
parser.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step, all ranks")
parser.add_argument("--seq", type=int, default=128)
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--layers", type=int, default=4)
parser.add_argument("--width", type=int, default=128)
parser.add_argument("--save", help="checkpoint dir: saved at the end, resumed from (default checkpoint.dir)")
parser.add_argument("--losses-out", default=None, help="write the per-step losses (rank 0) as JSON here")
args = parser.parse_args()

torch.set_num_threads(1)
ctx = tidal.init({"train": {"steps": args.steps}})
torch.manual_seed(ctx.config.train.seed)
dp, dp_rank = ctx.topology.size("dp_sp"), ctx.topology.rank("dp_sp")
if args.global_batch % dp:
    raise SystemExit(f"--global-batch {args.global_batch} does not split over dp={dp} ranks; use a multiple of {dp}")

data = torch.frombuffer(bytearray(generate().encode()), dtype=torch.uint8).long()
config = GPT2Config(
    vocab_size=256,
    n_positions=args.seq,
    n_embd=args.width,
    n_layer=args.layers,
    n_head=4,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=10,
    eos_token_id=10,
)
model = GPT2LMHeadModel(config)
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
warmup = max(1, args.steps // 10)
scheduler = torch.optim.lr_scheduler.LambdaLR(
    optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
)
model, optimizer = tidal.wrap(model, optimizer, lr_scheduler=scheduler)
engine = tidal.engine(model)
save_dir = args.save or ctx.config.checkpoint.dir
start = engine.load(save_dir) if save_dir and (Path(save_dir) / "latest").exists() else 0


def global_batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1_000_003 * (ctx.config.train.seed + 1) + step)
    starts = torch.randint(0, len(data) - args.seq, (args.global_batch,), generator=gen)
    return torch.stack([data[s : s + args.seq] for s in starts])


losses = []
model.train()
for step in range(start, args.steps):
    ids = global_batch(step).chunk(dp)[dp_rank]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    losses.append(engine.metrics.history[-1].loss)

if save_dir:
    engine.save(save_dir)
if ctx.rank == 0:
    print(engine.metrics.summary(), flush=True)
    if args.losses_out:
        Path(args.losses_out).write_text(json.dumps({"start": start, "losses": losses}))
tidal.shutdown()
