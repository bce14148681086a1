"""Data parallel and ZeRO 0-3 at dp=2 against a single-process PyTorch run of the same global batch.

Tolerance: fp32 throughout; the only difference from the reference is the order of floating-point
sums (two half-batch gradients averaged instead of one full-batch gradient), so losses agree to
1e-5 and parameters after AdamW steps to 2e-5 absolute.
"""

import contextlib

import pytest
import torch
import torch.distributed as dist
from models import batches, full_params, make_optimizer, reference_run, shard, tiny_gpt2
from ranks import run_ranks

import tidal

STEPS = 5
GLOBAL_BATCH = 8
LOSS_TOL = 1e-5
PARAM_TOL = 2e-5


def _train(model: torch.nn.Module, rank: int, world: int, config: dict, accumulation: int, loop: str):
    model, opt = tidal.wrap(model, make_optimizer(model), config)
    engine = tidal.engine(model)
    launched = []
    count_launch = engine.metrics.comm_launched
    engine.metrics.comm_launched = lambda name, nbytes: launched.append(name) or count_launch(name, nbytes)
    losses = []
    for ids in batches(STEPS, GLOBAL_BATCH):
        step_loss = torch.zeros(1)
        micros = shard(ids, rank, world).chunk(accumulation)
        for i, micro in enumerate(micros):
            last = i == len(micros) - 1
            with engine.no_sync() if loop == "no_sync" and not last else contextlib.nullcontext():
                out = model(input_ids=micro, labels=micro)
            if loop == "engine":
                engine.backward(out.loss)  # divides by the accumulation steps itself
                engine.step()
            else:
                (out.loss / accumulation).backward()
            step_loss += out.loss.detach() / accumulation
        if loop != "engine":
            opt.step()
            opt.zero_grad()
        dist.all_reduce(step_loss)
        losses.append(step_loss.item() / world)
    buckets = getattr(engine.dp, "buckets", None)  # FSDP2 (stage 3) reduces through its own hooks
    reductions = [n for n in launched if not n.startswith("all_gather")]
    expected = None if buckets is None else STEPS * len(buckets.buckets)
    return losses, full_params(model), (len(reductions), expected)


# name -> (config, micro-batches per step, loop: "plain" (loss.backward), "engine" (engine.backward/step)
# or "no_sync" (every micro-batch but the last inside engine.no_sync(), accumulation left at 1))
ACCUMULATE = {"train": {"gradient_accumulation_steps": 2}}
SCENARIOS = {
    **{f"stage{s}": ({"zero": {"stage": s}, "comm": {"bucket_mb": 0.05}}, 1, "plain") for s in range(4)},
    **{f"accum-stage{s}": ({"zero": {"stage": s}, **ACCUMULATE}, 2, "plain") for s in (0, 2, 3)},
    **{f"engine-stage{s}": ({"zero": {"stage": s}, **ACCUMULATE}, 2, "engine") for s in (1, 3)},
    **{f"no_sync-stage{s}": ({"zero": {"stage": s}}, 2, "no_sync") for s in (0, 1, 3)},
    **{f"clip-stage{s}": ({"zero": {"stage": s}, "train": {"gradient_clipping": 0.05}}, 1, "plain") for s in range(4)},
}


def _run_scenarios(rank: int, world: int) -> dict:
    tidal.init({"logging": {"progress": False, "interval": 1000}})
    results = {}
    for name, (config, accumulation, loop) in SCENARIOS.items():
        config = {**config, "logging": {"progress": False, "interval": 1000}}
        results[name] = _train(tiny_gpt2(), rank, world, config, accumulation, loop)
    tidal.shutdown()
    return results


@pytest.fixture(scope="module")
def two_ranks():
    """Every scenario, trained once on 2 ranks (one spawn: importing torch and transformers is the slow part)."""
    return run_ranks(_run_scenarios, 2, timeout=400)


def _compare(results: list, reference) -> None:
    ref_losses, ref_params = reference
    for rank, (losses, params, (reductions, expected)) in enumerate(results):
        if expected is not None:
            assert reductions == expected, f"rank {rank}: {reductions} bucket reductions, one per bucket per step"
        assert losses == pytest.approx(ref_losses, abs=LOSS_TOL), f"rank {rank}"
        for name, ref in ref_params.items():
            diff = (params[name] - ref).abs().max().item()
            assert diff < PARAM_TOL, f"rank {rank} {name}: max |diff| {diff:.2e}"


@pytest.fixture(scope="module")
def reference():
    return reference_run(STEPS, GLOBAL_BATCH)


pytestmark = pytest.mark.timeout(450)


@pytest.mark.parametrize("stage", range(4))
def test_zero_stage_matches_single_process(two_ranks, reference, stage):
    _compare([r[f"stage{stage}"] for r in two_ranks], reference)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_gradient_accumulation_equals_one_large_batch(two_ranks, reference, stage):
    _compare([r[f"accum-stage{stage}"] for r in two_ranks], reference)


@pytest.mark.parametrize("stage", [1, 3])
def test_engine_backward_and_step_match(two_ranks, reference, stage):
    _compare([r[f"engine-stage{stage}"] for r in two_ranks], reference)


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_no_sync_accumulates_like_one_large_batch(two_ranks, reference, stage):
    _compare([r[f"no_sync-stage{stage}"] for r in two_ranks], reference)


@pytest.mark.parametrize("stage", range(4))
def test_clipping_matches_clip_grad_norm(two_ranks, stage):
    clipped = reference_run(STEPS, GLOBAL_BATCH, clip=0.05)
    unclipped = reference_run(STEPS, GLOBAL_BATCH)
    assert clipped[0][-1] != pytest.approx(unclipped[0][-1], abs=1e-4), "0.05 must actually clip"
    _compare([r[f"clip-stage{stage}"] for r in two_ranks], clipped)
