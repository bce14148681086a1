"""Models nobody wrote for tidal (transformers Llama and a Mixtral-style MoE) under tidal.wrap at dp=2.

Each trains a few AdamW steps through an unchanged loop and must match a single-process run of the
same global batch: losses to 1e-5, parameters to 2e-5 (fp32). In the MoE, experts that receive no
tokens on a rank have no gradient there; the reduction must neither hang nor lose them.
"""

import pytest
from models import MODELS, batches, full_params, make_optimizer, reference_run, train_step
from ranks import run_ranks

import tidal

STEPS = 3
GLOBAL_BATCH = 8
CASES = [("llama", 0), ("llama", 2), ("llama", 3), ("mixtral", 0), ("mixtral", 1), ("mixtral", 3)]


def _run_all(rank: int, world: int) -> dict:
    tidal.init()
    out = {}
    for name, stage in CASES:
        model = MODELS[name]()
        model, opt = tidal.wrap(
            model, make_optimizer(model), {"zero": {"stage": stage}, "logging": {"progress": False}}
        )
        losses = [train_step(model, opt, ids, rank, world) for ids in batches(STEPS, GLOBAL_BATCH)]
        out[(name, stage)] = (losses, full_params(model))
    tidal.shutdown()
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_run_all, 2, timeout=400)


@pytest.mark.timeout(450)
@pytest.mark.parametrize("name,stage", CASES)
def test_transformers_model_matches_single_process(two_ranks, name, stage):
    ref_losses, ref_params = reference_run(STEPS, GLOBAL_BATCH, model_name=name)
    for rank, results in enumerate(two_ranks):
        losses, params = results[(name, stage)]
        assert losses == pytest.approx(ref_losses, abs=1e-5), f"rank {rank}"
        for key, ref in ref_params.items():
            diff = (params[key] - ref).abs().max().item()
            assert diff < 2e-5, f"rank {rank} {key}: max |diff| {diff:.2e}"
