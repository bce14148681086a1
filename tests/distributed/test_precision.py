"""bf16 autocast and fp16 with dynamic loss scaling at dp=2, against single-process torch.autocast runs.

Tolerance: low-precision matmuls round differently for a half batch and a full batch, so per-step
losses agree to 2e-2 relative (fp32 agrees to 1e-5 in test_zero.py).
"""

import pytest
import torch
from models import batches, full_params, make_optimizer, tiny_gpt2, train_step
from ranks import run_ranks

import tidal

STEPS = 4
GLOBAL_BATCH = 8
REL_TOL = 2e-2


def _train(rank: int, world: int, config: dict, steps: int) -> tuple:
    model = tiny_gpt2()
    initial = full_params(model)
    model, opt = tidal.wrap(model, make_optimizer(model), {**config, "logging": {"progress": False}})
    engine = tidal.engine(model)
    losses, after_first = [], None
    for ids in batches(steps, GLOBAL_BATCH):
        losses.append(train_step(model, opt, ids, rank, world))
        if after_first is None:
            after_first = full_params(model)
    skipped = [r.skipped for r in engine.metrics.history]
    unchanged = all(torch.equal(initial[n], after_first[n]) for n in initial)
    applied = {int(state["step"]) for state in opt.state.values()}
    return losses, skipped, unchanged, engine.scaler.scale, applied


def _run_all(rank: int, world: int) -> dict:
    tidal.init()
    out = {}
    for stage in (0, 2, 3):
        out[f"bf16-stage{stage}"] = _train(
            rank, world, {"zero": {"stage": stage}, "precision": {"dtype": "bf16"}}, STEPS
        )
        out[f"fp16-stage{stage}"] = _train(
            rank, world, {"zero": {"stage": stage}, "precision": {"dtype": "fp16"}}, STEPS
        )
    overflow = {"dtype": "fp16", "initial_scale_power": 40, "hysteresis": 1}
    out["overflow"] = _train(rank, world, {"zero": {"stage": 1}, "precision": overflow}, 30)
    tidal.shutdown()
    return out


def _reference(dtype: torch.dtype, steps: int) -> list[float]:
    model = tiny_gpt2()
    opt = make_optimizer(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000) if dtype == torch.float16 else None
    losses = []
    for ids in batches(steps, GLOBAL_BATCH):
        with torch.autocast("cpu", dtype=dtype):
            loss = model(input_ids=ids, labels=ids).loss
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_run_all, 2, timeout=400)


pytestmark = pytest.mark.timeout(450)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_low_precision_matches_autocast_reference(two_ranks, dtype, stage):
    reference = _reference(torch.bfloat16 if dtype == "bf16" else torch.float16, STEPS)
    for losses, skipped, _, _, _ in (r[f"{dtype}-stage{stage}"] for r in two_ranks):
        assert losses == pytest.approx(reference, rel=REL_TOL)
        assert not any(skipped)


def test_fp16_overflow_skips_steps_and_lowers_the_scale(two_ranks):
    for losses, skipped, unchanged, scale, applied in (r["overflow"] for r in two_ranks):
        assert skipped[0] and unchanged, "an overflowed step must leave the parameters as they were"
        assert sum(skipped) >= 2 and not any(skipped[-5:]), skipped
        assert scale < 2.0**40
        assert all(map(torch.isfinite, torch.tensor(losses)))
        assert applied == {len(skipped) - sum(skipped)}, "AdamW must count only the steps that were applied"
