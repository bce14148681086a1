"""Checkpoints through the engine: train 3 steps, save, start a new job at another dp size and ZeRO
stage, load, train 2 more; the losses equal an uninterrupted 5-step single-process run (fp32, 1e-5).
"""

import pytest
import torch
from models import batches, make_optimizer, tiny_gpt2, train_step
from ranks import run_ranks

import tidal

STEPS = 5
SPLIT = 3
GLOBAL_BATCH = 8


def _schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))


def _job(rank: int, world: int, stage: int, root: str, first: int, last: int) -> list[float]:
    """Steps [first, last) of the run; loads from `root` when first > 0, saves there at the end."""
    tidal.init()
    # A resumed job starts from other weights on purpose: everything must come from the checkpoint.
    model = tiny_gpt2(seed=0 if first == 0 else 123)
    opt = make_optimizer(model)
    sched = _schedule(opt)
    config = {"zero": {"stage": stage}, "logging": {"progress": False}, "checkpoint": {"dir": root}}
    model, opt = tidal.wrap(model, opt, config, lr_scheduler=sched)
    engine = tidal.engine(model)
    if first > 0:
        assert engine.load() == first
    losses = []
    for step, ids in enumerate(batches(STEPS, GLOBAL_BATCH)):
        if not first <= step < last:
            continue
        losses.append(train_step(model, opt, ids, rank, world, sched))
    engine.save()
    tidal.shutdown()
    return losses


def _uninterrupted() -> list[float]:
    model = tiny_gpt2()
    opt = make_optimizer(model)
    sched = _schedule(opt)
    losses = []
    for ids in batches(STEPS, GLOBAL_BATCH):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "before,after", [((2, 3), (1, 0)), ((1, 0), (2, 3)), ((2, 2), (2, 1)), ((2, 1), (1, 2))], ids=str
)
def test_resume_at_another_dp_size_and_stage(tmp_path, before, after):
    (world_a, stage_a), (world_b, stage_b) = before, after
    root = str(tmp_path / "ckpt")
    first = run_ranks(_job, world_a, args=(stage_a, root, 0, SPLIT), timeout=120)[0]
    second = run_ranks(_job, world_b, args=(stage_b, root, SPLIT, STEPS), timeout=120)[0]
    assert first + second == pytest.approx(_uninterrupted(), abs=1e-5)
