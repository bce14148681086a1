"""Pipeline parallelism (GPipe, 1F1B, interleaved 1F1B) against a single-process PyTorch run of the same batch.

An 8-layer GPT-2 (tied LM head) and an 8-layer Llama train 3 AdamW steps on pp=2 (world 2), pp=4 and
pp=2 x dp=2 (world 4, the dp part a plain all-reduce of gradients). Losses per step, the gradients after
step 1 (gathered by parameter name from the ranks that hold them) and the parameters after step 3 are
compared with the reference. Tolerance: fp32 throughout; the only difference is the order of sums (micro-
batch means averaged instead of one batch mean), so losses and gradients agree to 1e-5 absolute and
parameters after 3 AdamW steps to 2e-5.
"""

import pytest
import torch
import torch.distributed as dist
from models import SEQ, VOCAB, batches, full_params, make_optimizer, tiny_llama
from ranks import run_ranks

import tidal
from tidal.parallel.pipeline import (
    PipelineError,
    PipelineRunner,
    build_stages,
    check_schedule,
    split_model,
    stage_bounds,
    theoretical_bubble,
)
from tidal.parallel.topology import Topology

STEPS = 3
GLOBAL_BATCH = 8
LAYERS = 8
LOSS_TOL = 1e-5
GRAD_TOL = 1e-5
PARAM_TOL = 2e-5


def gpt2(layers: int = LAYERS) -> torch.nn.Module:
    """A tiny GPT-2 (tied LM head), random init with a fixed seed, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=32,
        n_layer=layers,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def llama(layers: int = LAYERS) -> torch.nn.Module:
    """A tiny Llama (grouped-query attention, rotary), random init with a fixed seed."""
    return tiny_llama(seed=0, layers=layers)


MODELS = {"gpt2": gpt2, "llama": llama}
# schedule -> (microbatches, stages_per_rank, balance); microbatches None is the default (= pp)
SCHEDULES = {
    "gpipe": (None, 1, None),
    "1f1b": (4, 1, None),
    "interleaved": (4, 2, None),
}
BALANCED = {2: ("interleaved", [3, 1, 2, 2]), 4: ("1f1b", [3, 2, 2, 1])}  # pp -> schedule, layers per stage


def _config(pp: int, microbatches: int | None, stages_per_rank: int, schedule: str) -> tidal.Config:
    pipeline = {"schedule": schedule, "microbatches": microbatches, "stages_per_rank": stages_per_rank}
    return tidal.Config.from_dict({"parallel": {"pp": pp, "pipeline": pipeline}})


def _train(model_name: str, schedule: str, balance: list[int] | None = None, *, topology: Topology) -> dict:
    """3 steps; per-step losses, this rank's gradients after step 1 and parameters after step 3, bubbles."""
    microbatches, stages_per_rank, _ = SCHEDULES[schedule]
    model = MODELS[model_name]()
    config = _config(topology.size("pp"), microbatches, stages_per_rank, schedule)
    runner = PipelineRunner(model, topology, config, balance=balance)
    opt = make_optimizer(model)
    dp, dp_group = topology.size("dp"), topology.group("dp")
    losses, grads, bubbles = [], {}, []
    for step, ids in enumerate(batches(STEPS, GLOBAL_BATCH)):
        loss = runner.train_step(ids.chunk(dp)[topology.rank("dp")])
        if dp > 1:  # the data-parallel part by hand: mean of the replicas' gradients and losses
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=dp_group)
                    p.grad /= dp
            dist.all_reduce(loss, group=dp_group)
            loss /= dp
        losses.append(loss.item())
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            assert set(grads) == {n for n, _ in runner.named_parameters}, "gradients on this rank's stages only"
        opt.step()
        opt.zero_grad()
        bubbles.append(runner.measured_bubble())
    owned = {n for n in grads}
    params = {n: t for n, t in full_params(model).items() if n in owned}
    return {"losses": losses, "grads": grads, "params": params, "bubbles": bubbles}


def _runner_errors(topology: Topology) -> dict:
    """Errors that need a real topology: raised before any communication, so every rank raises alike."""
    found = {}
    try:
        split_model(gpt2(layers=1), topology)
    except PipelineError as exc:
        found["pp_above_layers"] = str(exc)
    runner = PipelineRunner(gpt2(layers=2), topology, _config(2, 4, 1, "1f1b"))
    ids = torch.zeros(6, SEQ, dtype=torch.long)
    for name, batch in {"batch": ids, "mask": {"input_ids": ids[:4], "attention_mask": ids[:4]}}.items():
        try:
            runner.train_step(batch)
        except PipelineError as exc:
            found[name] = str(exc)
    return found


def _accumulate(topology: Topology) -> dict:
    """Two train_step calls before the optimizer step: this rank's gradients after them."""
    model = gpt2()
    runner = PipelineRunner(model, topology, _config(2, 2, 1, "1f1b"))
    for half in batches(1, GLOBAL_BATCH)[0].chunk(2):
        runner.train_step(half)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(rank: int, world: int) -> dict:
    ctx = tidal.init({"parallel": {"pp": world}, "logging": {"progress": False}})
    pp = ctx.topology.size("pp")
    results = {}
    for model_name in MODELS:
        for schedule in SCHEDULES:
            results[f"pp{pp}-{model_name}-{schedule}"] = _train(model_name, schedule, topology=ctx.topology)
    results[f"pp{pp}-llama-balanced"] = _train("llama", *BALANCED[pp], topology=ctx.topology)
    if world == 2:
        results["errors"] = _runner_errors(ctx.topology)
        results["accumulate"] = _accumulate(ctx.topology)
    else:
        pp2_dp2 = Topology(pp=2)
        results["pp2xdp2-gpt2-1f1b"] = _train("gpt2", "1f1b", topology=pp2_dp2)
        results["pp2xdp2-llama-interleaved"] = _train("llama", "interleaved", topology=pp2_dp2)
    tidal.shutdown()
    return results


@pytest.fixture(scope="module")
def two_ranks():
    """Every world-2 scenario, trained once (one spawn: importing torch and transformers is the slow part)."""
    return run_ranks(_run, 2, timeout=300)


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(_run, 4, timeout=400)


def _reference(model_name: str) -> dict:
    """Plain single-process PyTorch on the full batch: losses, gradients after step 1, final parameters."""
    model = MODELS[model_name]()
    opt = make_optimizer(model)
    losses, grads = [], {}
    for step, ids in enumerate(batches(STEPS, GLOBAL_BATCH)):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    return {"losses": losses, "grads": grads, "params": full_params(model)}


@pytest.fixture(scope="module")
def reference():
    return {name: _reference(name) for name in MODELS}


def _compare(results: list[dict], ref: dict) -> None:
    covered = set()
    for rank, r in enumerate(results):
        assert r["losses"] == pytest.approx(ref["losses"], abs=LOSS_TOL), f"rank {rank} losses"
        for name, grad in r["grads"].items():
            diff = (grad - ref["grads"][name]).abs().max().item()
            assert diff < GRAD_TOL, f"rank {rank} grad {name}: max |diff| {diff:.2e}"
        for name, param in r["params"].items():
            diff = (param - ref["params"][name]).abs().max().item()
            assert diff < PARAM_TOL, f"rank {rank} param {name}: max |diff| {diff:.2e}"
        covered |= set(r["grads"])
    assert covered == set(ref["grads"]), f"no rank has gradients of {sorted(set(ref['grads']) - covered)}"


def _check_bubbles(results: list[dict], pp: int, schedule: str) -> None:
    microbatches, stages_per_rank, _ = SCHEDULES[schedule]
    for r in results:
        for bubble in r["bubbles"]:
            assert len(bubble.per_rank) == pp
            assert all(0.0 <= b < 1.0 for b in bubble.per_rank) and bubble.step_seconds > 0, bubble
            assert bubble.theoretical == theoretical_bubble(pp, microbatches or pp, stages_per_rank)


pytestmark = pytest.mark.timeout(600)
RANKS = {2: "two_ranks", 4: "four_ranks"}  # pp -> the fixture that trained it


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("pp", [2, 4])
def test_schedule_matches_single_process(request, reference, pp, model_name, schedule):
    results = [r[f"pp{pp}-{model_name}-{schedule}"] for r in request.getfixturevalue(RANKS[pp])]
    _compare(results, reference[model_name])
    _check_bubbles(results, pp, schedule)


@pytest.mark.parametrize("pp", [2, 4])
def test_planner_balance_matches_single_process(request, reference, pp):
    _compare([r[f"pp{pp}-llama-balanced"] for r in request.getfixturevalue(RANKS[pp])], reference["llama"])


@pytest.mark.parametrize("scenario", ["gpt2-1f1b", "llama-interleaved"])
def test_pipeline_times_data_parallel_matches_single_process(four_ranks, reference, scenario):
    _compare([r[f"pp2xdp2-{scenario}"] for r in four_ranks], reference[scenario.split("-")[0]])


def test_train_steps_accumulate_gradients(two_ranks):
    model = gpt2()
    for half in batches(1, GLOBAL_BATCH)[0].chunk(2):
        model(input_ids=half, labels=half).loss.backward()
    merged = {}
    for r in two_ranks:
        merged |= r["accumulate"]
    assert set(merged) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():  # the tied embedding is held by both ranks: both must match
        for rank, r in enumerate(two_ranks):
            if name in r["accumulate"]:
                diff = (r["accumulate"][name] - p.grad).abs().max().item()
                assert diff < GRAD_TOL, f"rank {rank} grad {name}: max |diff| {diff:.2e}"


def test_stages_hold_the_model_layers_and_parameters():
    model = llama()
    stages = build_stages(model, 2, stages_per_rank=2, balance=[3, 1, 2, 2])
    assert [s.layers for s in stages] == [(0, 3), (3, 4), (4, 6), (6, 8)]
    assert stages[0].embed_tokens is model.model.embed_tokens and stages[-1].lm_head is model.lm_head
    held = {id(p) for s in stages for p in s.parameters()}
    assert held == {id(p) for p in model.parameters()}, "every parameter is in some stage, as itself"
    assert stage_bounds(8, 3) == [(0, 3), (3, 6), (6, 8)]


def test_stages_chained_give_the_model_logits():
    for make in MODELS.values():
        model = make()
        ids = batches(1, 2)[0]
        hidden = ids
        for stage in build_stages(model, 4):
            hidden = stage(hidden)
        assert torch.equal(hidden, model(input_ids=ids).logits)


def test_bad_sizes_name_the_fix(two_ranks):
    with pytest.raises(PipelineError, match=r"pp=8 exceeds the model's 4 layers; choose pp <= 4"):
        build_stages(gpt2(layers=4), 8)
    with pytest.raises(PipelineError, match=r"pp=2 x stages_per_rank=4 = 8 stages exceeds .* choose pp\*stages_per"):
        build_stages(gpt2(layers=4), 2, stages_per_rank=4)
    with pytest.raises(PipelineError, match=r"balance=\[4, 4, 0\] must give every stage at least one layer"):
        stage_bounds(8, 3, [4, 4, 0])
    with pytest.raises(PipelineError, match=r"balance=\[4, 4\] has 2 entries for 4 stages"):
        stage_bounds(8, 4, [4, 4])
    with pytest.raises(PipelineError, match=r"schedule=interleaved needs .*stages_per_rank > 1.*set parallel"):
        check_schedule("interleaved", 2, 4, 1)
    with pytest.raises(PipelineError, match=r"microbatches=3 is not a multiple of pp=2.*choose microbatches in"):
        check_schedule("interleaved", 2, 3, 2)
    with pytest.raises(PipelineError, match=r"microbatches=1 is below pp=2; .*choose microbatches >= 2"):
        check_schedule("1f1b", 2, 1, 1)
    with pytest.raises(PipelineError, match=r"cannot split Sequential .*GPT-2, Llama-style"):
        build_stages(torch.nn.Sequential(torch.nn.Linear(2, 2)), 2)
    errors = [r["errors"] for r in two_ranks]
    assert errors[0] == errors[1]
    assert errors[0]["pp_above_layers"] == "pp=2 exceeds the model's 1 layer; choose pp <= 1"
    assert "batch of 6 samples does not split into parallel.pipeline.microbatches=4" in errors[0]["batch"]
    assert "train_step got attention_mask; pipeline stages take input_ids and labels only" in errors[0]["mask"]
