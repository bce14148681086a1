"""bf16 autocast and fp16 with dynamic loss scaling at dp=2, and fp16 with pipeline and tensor parallelism at
pp=2 and tp=2, against single-process torch.autocast runs; an overflow on one rank skips the step on all.

Tolerance: low-precision matmuls round differently for a half batch and a full batch, so per-step
losses agree to 2e-2 relative (fp32 agrees to 1e-5 in test_zero.py).
"""

import pytest
import torch
from models import batches, full_params, loop_step, make_optimizer, tiny_gpt2, train_step
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


def _model_parallel(rank: int, world: int, parallel: dict) -> dict:
    """fp16 at pp=2 or tp=2 for STEPS steps, twice: as is (key None), and with a non-finite gradient on rank
    0 alone in step 1 (key 1; a hook on one of its first block's weights)."""
    tidal.init({"parallel": parallel})
    out = {}
    for poison_step in (None, 1):
        model = tiny_gpt2()
        precision = {"dtype": "fp16", "hysteresis": 1}  # the scale halves at the first overflow
        config = {"parallel": parallel, "precision": precision, "logging": {"progress": False}}
        model, opt = tidal.wrap(model, make_optimizer(model), config)
        engine = tidal.engine(model)
        now = {"step": 0}
        if rank == 0 and poison_step is not None:
            weight = dict(model.named_parameters())["transformer.h.0.mlp.c_fc.weight"]
            weight.register_hook(_poison(now, poison_step))
        losses, moved = [], []
        for now["step"], ids in enumerate(batches(STEPS, GLOBAL_BATCH)):
            before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
            losses.append(loop_step(model, opt, ids).item())
            after = opt.param_groups[0]["params"]
            moved.append(any(not torch.equal(b, a) for b, a in zip(before, after, strict=True)))
        skipped = [r.skipped for r in engine.metrics.history]
        out[poison_step] = (losses, skipped, moved, engine.scaler.scale)
    tidal.shutdown()
    return out


def _poison(now: dict, step: int):
    """A gradient hook making the gradient infinite in step `step` (`now["step"]`: the step running)."""
    return lambda grad: grad * float("inf") if now["step"] == step else grad


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_run_all, 2, timeout=400)


@pytest.fixture(scope="module", params=["pp2", "tp2"])
def model_parallel(request):
    parallel = {"pp": 2} if request.param == "pp2" else {"tp": 2}
    return run_ranks(_model_parallel, 2, args=(parallel,), timeout=400)


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


def test_fp16_with_model_parallelism_matches_autocast_reference(model_parallel):
    reference = _reference(torch.float16, STEPS)
    for losses, skipped, _, _ in (r[None] for r in model_parallel):
        assert losses == pytest.approx(reference, rel=REL_TOL)
        assert not any(skipped)


def test_fp16_overflow_on_one_model_parallel_rank_skips_the_step_on_every_rank(model_parallel):
    """A stage or shard stepping while another skips would tear the model and set the loss scales apart."""
    results = [r[1] for r in model_parallel]
    for losses, skipped, moved, scale in results:
        assert skipped == [False, True, False, False], skipped
        assert moved == [True, False, True, True], "the skipped step must leave every rank's parameters as they were"
        assert scale == 2.0**15, "every rank halves its loss scale once"
        assert all(map(torch.isfinite, torch.tensor(losses)))
