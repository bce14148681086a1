"""Parallel features combined through `tidal.wrap`, against a single-process PyTorch run of the same batches.

One table of scenarios (name -> world size, config); every rank of a data-parallel group is given its
dp share of the global batch (sequence-parallel ranks of one group get the same share and cut it by
sequence themselves). Tolerance: fp32; the differences are the order of floating-point sums across
ranks, so per-step losses agree to 2e-5 and parameters after the run to 5e-5 absolute. A scenario named
"...-resume" saves a checkpoint after RESUME_AT steps and goes on in a fresh model that loads it.
"""

import shutil
import tempfile

import pytest
import torch.distributed as dist
from models import MODELS, batches, full_params, loop_step, make_optimizer, reference_run
from ranks import run_ranks

import tidal
from tidal.runtime.context import current

STEPS = 3
RESUME_AT = 2
GLOBAL_BATCH = 4
MODEL = "llama4"  # 4 layers: 2 pipeline ranks x 2 stages each
LOSS_TOL = 2e-5
PARAM_TOL = 5e-5
CLIP = 0.5
QUIET = {"logging": {"progress": False, "interval": 1000}}

SCENARIOS = {
    "sp2-ulysses": (2, {"parallel": {"sp": 2, "sequence": {"method": "ulysses"}}}),
    "sp2-ring": (2, {"parallel": {"sp": 2, "sequence": {"method": "ring"}}}),
    "sp2-ring-zero3": (2, {"parallel": {"sp": 2, "sequence": {"method": "ring"}}, "zero": {"stage": 3}}),
    "sp2xdp2-ulysses-zero1": (4, {"parallel": {"sp": 2}, "zero": {"stage": 1}}),
    "sp2xdp2-ring-zero3": (4, {"parallel": {"sp": 2, "sequence": {"method": "ring"}}, "zero": {"stage": 3}}),
    "tp2": (2, {"parallel": {"tp": 2}}),
    "tp2-seqpar-zero3": (2, {"parallel": {"tp": 2, "tensor": {"sequence_parallel": True}}, "zero": {"stage": 3}}),
    # collective matmuls (comm.overlap.tp: on; the scenarios above run the default, auto)
    "tp2-overlap-on": (2, {"parallel": {"tp": 2}, "comm": {"overlap": {"tp": "on", "chunks": 3}}}),
    "tp2-seqpar-overlap-on": (
        2,
        {"parallel": {"tp": 2, "tensor": {"sequence_parallel": True}}, "comm": {"overlap": {"tp": "on"}}},
    ),
    "tp2-seqpar-recompute": (  # auto's first trial runs inside a checkpointed block
        2,
        {
            "parallel": {"tp": 2, "tensor": {"sequence_parallel": True}},
            "offload": {"activations": {"policy": {"model.layers.*": "recompute"}}},
        },
    ),
    "tp2-seqpar-overlap-on-clip-gpt2": (
        2,
        {
            "parallel": {"tp": 2, "tensor": {"sequence_parallel": True}},
            "comm": {"overlap": {"tp": "on", "chunks": 2}},
            "train": {"gradient_clipping": CLIP},
        },
    ),
    "tp2xdp2-clip": (4, {"parallel": {"tp": 2}, "train": {"gradient_clipping": CLIP}}),
    "tp2xdp2-zero1": (4, {"parallel": {"tp": 2}, "zero": {"stage": 1}}),
    "tp2xdp2-zero1-offload-cpu": (
        4,
        {"parallel": {"tp": 2}, "zero": {"stage": 1}, "offload": {"optimizer": {"device": "cpu", "chunk_mb": 0.05}}},
    ),
    "tp2xdp2-zero2-clip": (4, {"parallel": {"tp": 2}, "zero": {"stage": 2}, "train": {"gradient_clipping": CLIP}}),
    "tp2xpp2-seqpar-1f1b": (
        4,
        {"parallel": {"tp": 2, "pp": 2, "tensor": {"sequence_parallel": True}, "pipeline": {"schedule": "1f1b"}}},
    ),
    "tp2xpp2-interleaved-gathered-logits-resume": (
        4,
        {
            "parallel": {
                "tp": 2,
                "pp": 2,
                "tensor": {"loss_parallel": False},
                "pipeline": {"schedule": "interleaved", "stages_per_rank": 2, "microbatches": 2},
            }
        },
    ),
    "tp2xpp2xdp2-1f1b-clip": (
        8,
        {"parallel": {"tp": 2, "pp": 2, "pipeline": {"schedule": "1f1b"}}, "train": {"gradient_clipping": CLIP}},
    ),
    "ep2-mixtral": (2, {"parallel": {"ep": 2}}),
    # tp x ep: the MoE blocks left to expert parallel; collective matmuls off and on
    "tp2xep2-mixtral-clip": (
        4,
        {"parallel": {"tp": 2, "ep": 2}, "comm": {"overlap": {"tp": "off"}}, "train": {"gradient_clipping": CLIP}},
    ),
    "tp2xep2-overlap-on-mixtral-clip": (
        4,
        {
            "parallel": {"tp": 2, "ep": 2},
            "comm": {"overlap": {"tp": "on", "moe": "on"}},
            "train": {"gradient_clipping": CLIP},
        },
    ),
    "tp2xep2-mixtral-zero1-resume": (4, {"parallel": {"tp": 2, "ep": 2}, "zero": {"stage": 1}}),
    "ep2xedp2-mixtral-clip": (4, {"parallel": {"ep": 2}, "train": {"gradient_clipping": CLIP}}),
    "ep2xedp2-mixtral-zero1": (4, {"parallel": {"ep": 2}, "zero": {"stage": 1}}),
    "ep2xedp2-mixtral-zero1-resume": (4, {"parallel": {"ep": 2}, "zero": {"stage": 1}}),
    "ep2xedp2-mixtral-zero2-clip": (
        4,
        {"parallel": {"ep": 2}, "zero": {"stage": 2}, "train": {"gradient_clipping": CLIP}},
    ),
    "ep2xedp2-mixtral-zero3-resume": (4, {"parallel": {"ep": 2}, "zero": {"stage": 3}}),
    "pp2-1f1b": (2, {"parallel": {"pp": 2, "pipeline": {"schedule": "1f1b", "microbatches": 4}}}),
    "pp2-gpipe-clip-gpt2": (
        2,
        {"parallel": {"pp": 2, "pipeline": {"schedule": "gpipe"}}, "train": {"gradient_clipping": CLIP}},
    ),
    "pp2-gpipe-clip": (
        2,
        {"parallel": {"pp": 2, "pipeline": {"schedule": "gpipe"}}, "train": {"gradient_clipping": CLIP}},
    ),
    "pp2xdp2-interleaved": (
        4,
        {"parallel": {"pp": 2, "pipeline": {"schedule": "interleaved", "stages_per_rank": 2, "microbatches": 2}}},
    ),
    "pp2xdp2-1f1b-zero1": (4, {"parallel": {"pp": 2, "pipeline": {"schedule": "1f1b"}}, "zero": {"stage": 1}}),
    "pp2xdp2-1f1b-zero2-offload-cpu": (
        4,
        {
            "parallel": {"pp": 2, "pipeline": {"schedule": "1f1b"}},
            "zero": {"stage": 2},
            "offload": {"optimizer": {"device": "cpu", "chunk_mb": 0.05}},
        },
    ),
    "pp2xdp2-1f1b-zero1-resume": (4, {"parallel": {"pp": 2, "pipeline": {"schedule": "1f1b"}}, "zero": {"stage": 1}}),
    "pp2xdp2-gpipe-zero2-clip": (
        4,
        {
            "parallel": {"pp": 2, "pipeline": {"schedule": "gpipe"}},
            "zero": {"stage": 2},
            "train": {"gradient_clipping": CLIP},
        },
    ),
    "pp2xdp2-interleaved-zero3-clip": (
        4,
        {
            "parallel": {"pp": 2, "pipeline": {"schedule": "interleaved", "stages_per_rank": 2, "microbatches": 2}},
            "zero": {"stage": 3},
            "train": {"gradient_clipping": CLIP},
        },
    ),
}
SIZES = ("pp", "sp", "tp", "ep")


def _job(config: dict) -> tuple[int, tuple[int, ...]]:
    """The spawn a scenario runs in: its world size and model-parallel sizes (one tidal.init per spawn)."""
    world = next(w for w, c in SCENARIOS.values() if c is config)
    return world, tuple(config["parallel"].get(n, 1) for n in SIZES)


JOBS = sorted({_job(config) for _, config in SCENARIOS.values()})


def _model_name(name: str) -> str:
    if name.endswith("gpt2"):  # tied embedding and LM head: held by the first and the last pipeline stage
        return "gpt2"
    return "mixtral" if name.endswith("mixtral") or "mixtral-" in name else MODEL


def _wrapped(name: str, config: dict, seed: int = 0):
    model = MODELS[_model_name(name)](seed)
    model, opt = tidal.wrap(model, make_optimizer(model), {**config, **QUIET})
    return model, opt, tidal.engine(model)


def _resumed(name: str, config: dict, engine):
    """A new model and optimizer (other initial weights on purpose) loaded from a checkpoint `engine` saves now."""
    root = [tempfile.mkdtemp(prefix="tidal-composition-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(root)
    engine.save(root[0])
    model, opt, resumed = _wrapped(name, config, seed=123)
    assert resumed.load(root[0]) == RESUME_AT
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(root[0])
    return model, opt, resumed


def _train(name: str, config: dict):
    ctx = current()
    model, opt, engine = _wrapped(name, config)
    if "overlap-on" in name:
        assert any(getattr(m, "_tidal_overlap_colwise", False) for m in model.modules()), "no collective matmul"
        moe = [m for m in model.modules() if hasattr(m, "_exchange_chunked")]
        assert all(m.overlap.mode == "on" for m in moe), "an MoE layer without its overlap setting"
    dp, dp_rank = ctx.topology.size("dp"), ctx.topology.rank("dp")
    losses = []
    for step, ids in enumerate(batches(STEPS, GLOBAL_BATCH)):
        if name.endswith("-resume") and step == RESUME_AT:
            model, opt, engine = _resumed(name, config, engine)
        mine = ids.chunk(dp)[dp_rank]
        loss = loop_step(model, opt, mine)
        total = loss.detach().reshape(1)
        dist.all_reduce(total, group=ctx.topology.group("dp"))
        losses.append(total.item() / dp)
    params = full_params(model)
    if engine.pipeline is not None:  # a stage's parameters exist only on the ranks holding it
        held = {name for name, _ in engine.pipeline.named_parameters}
        placeholders = {name for name, value in params.items() if value.is_meta}
        assert placeholders == params.keys() - held, f"other stages' parameters kept: {params.keys() - held}"
        params = {name: value for name, value in params.items() if name in held}
    return losses, params


def _run(rank: int, world: int, sizes: tuple[int, ...]) -> dict:
    tidal.init({"parallel": dict(zip(SIZES, sizes, strict=True)), **QUIET})
    results = {name: _train(name, config) for name, (_, config) in SCENARIOS.items() if _job(config) == (world, sizes)}
    if (world, sizes) == JOBS[0]:
        model = MODELS[MODEL]()
        try:
            tidal.wrap(model, make_optimizer(model), {"parallel": {"sp": 3}, **QUIET})
        except ValueError as exc:
            results["refused"] = str(exc)
    tidal.shutdown()
    return results


@pytest.fixture(scope="module")
def runs():
    """Every scenario, one spawn per world size."""
    return {job: run_ranks(_run, job[0], args=(job[1],), timeout=400) for job in JOBS}


@pytest.fixture(scope="module")
def reference():
    """Single-process runs, by clipping threshold."""
    runs = {
        (model, clip): reference_run(STEPS, GLOBAL_BATCH, model_name=model, clip=clip)
        for model in (MODEL, "mixtral")
        for clip in (None, CLIP)
    }
    runs["gpt2", CLIP] = reference_run(STEPS, GLOBAL_BATCH, model_name="gpt2", clip=CLIP)
    return runs


pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("name", SCENARIOS)
def test_matches_single_process(runs, reference, name) -> None:
    config = SCENARIOS[name][1]
    ref_losses, ref_params = reference[_model_name(name), config.get("train", {}).get("gradient_clipping")]
    for rank, results in enumerate(runs[_job(config)]):
        losses, params = results[name]
        assert losses == pytest.approx(ref_losses, abs=LOSS_TOL), f"{name} rank {rank}"
        assert params, f"{name} rank {rank} holds no parameters"
        for key, value in params.items():
            if key not in ref_params:  # expert weights converted to this rank's experts (losses check them)
                continue
            diff = (value - ref_params[key]).abs().max().item()
            assert diff < PARAM_TOL, f"{name} rank {rank} {key}: max |diff| {diff:.2e}"


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n.startswith("ep2xedp2") and n.endswith("-resume")])
def test_resumed_experts_match(runs, name) -> None:
    """Expert weights (left out above) after a resume equal those of the same job's uninterrupted ZeRO-1 run,
    so every expert's weights and optimizer state came back from the checkpoint."""
    for rank, results in enumerate(runs[_job(SCENARIOS[name][1])]):
        resumed, uninterrupted = results[name][1], results["ep2xedp2-mixtral-zero1"][1]
        for key in [k for k in resumed if ".experts." in k]:
            diff = (resumed[key] - uninterrupted[key]).abs().max().item()
            assert diff < PARAM_TOL, f"{name} rank {rank} {key}: max |diff| {diff:.2e}"


def test_wrap_refuses_sizes_other_than_the_topology(runs) -> None:
    for results in runs[JOBS[0]]:
        assert "tidal.wrap() got parallel sizes" in results["refused"] and "'sp': 3" in results["refused"]
