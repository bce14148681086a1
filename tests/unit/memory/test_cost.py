"""The step-time model (`tidal.memory.cost`) and the planner's use of it: monotone in every bandwidth and in
FLOP/s, the pipeline bubble's formula, overlap never slower than none, the dp reduce exposed only by its last
bucket, the parallel-size search, and the largest optimizer ratio that fits. Numbers are predictions from a
traced tiny Llama (4 layers, width 128) and Mixtral (2 layers, 4 experts); no test times anything."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tidal.config import Config
from tidal.memory.activations import trace_profile
from tidal.memory.cost import StepTime, step_time
from tidal.memory.hardware import GPUS, Hardware, match_gpu, parse_rate
from tidal.memory.planner import Budgets, plan
from tidal.memory.presets import resolve_model
from tidal.memory.report import format_plan, plan_summary
from tidal.memory.search import ratio_levels
from tidal.memory.shape import model_shape
from tidal.memory.trace import trace_model

MICRO, SEQ = 2, 128
LLAMA = {
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": SEQ,
    "tie_word_embeddings": False,
}
MIXTRAL = {
    **LLAMA,
    "model_type": "mixtral",
    "num_hidden_layers": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
}
HW = dataclasses.replace(GPUS["H100"], op_overhead=1e-6)
"""H100 figures, dispatch small enough that these tiny models are not launch-bound."""
CONFIGS = [
    {"parallel": {"dp": 8}},
    {"parallel": {"dp": 8}, "zero": {"stage": 2}},
    {"parallel": {"dp": 8}, "zero": {"stage": 3}, "train": {"gradient_accumulation_steps": 2}},
    {"parallel": {"dp": 8}, "zero": {"stage": 3}, "offload": {"params": {"device": "cpu"}}},
    {"parallel": {"dp": 2, "tp": 4}},
    {"parallel": {"dp": 2, "tp": 4, "tensor": {"sequence_parallel": True}}, "comm": {"overlap": {"tp": "off"}}},
    {"parallel": {"dp": 2, "tp": 2, "pp": 2, "pipeline": {"microbatches": 4}}},
    {"parallel": {"dp": 1, "pp": 2, "sp": 4, "pipeline": {"microbatches": 2}}},
    {"parallel": {"dp": 4, "sp": 2, "sequence": {"method": "ring"}}},
    {"parallel": {"dp": 8}, "offload": {"optimizer": {"device": "cpu", "ratio": 0.25}}},
    {"parallel": {"dp": 8}, "zero": {"stage": 1}, "offload": {"optimizer": {"device": "nvme", "path": "/nvme"}}},
    {"parallel": {"dp": 1}, "offload": {"optimizer": {"device": "cpu"}}},  # one rank: updated in backward
    {"parallel": {"dp": 8}, "offload": {"activations": {"device": "cpu"}}},
    {"parallel": {"dp": 8}, "offload": {"activations": {"device": "nvme", "path": "/nvme", "prefetch_layers": 0}}},
]
"""Eight ranks each (two nodes of four), the features the model prices, bf16."""


def _write(tmp: Path, name: str, fields: dict) -> str:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(fields))
    return str(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _write(tmp_path_factory.mktemp("cost"), "llama", LLAMA)


@pytest.fixture(scope="module")
def traced(llama: str):
    spec = resolve_model(llama)
    return spec, trace_profile(spec, MICRO, SEQ, "bf16").work


def _time(traced, raw: dict, hardware: Hardware = HW, choices: str = "keep") -> StepTime:
    spec, work = traced
    config = Config.load({"precision": {"dtype": "bf16"}, **raw})
    par = config.parallel
    world = par.pp * par.dp * par.sp * par.tp
    shape = model_shape(spec.model, par.tp, par.ep)
    return step_time(work, shape, config, world, hardware, ranks_per_node=4, choices=[choices] * len(work.block_flops))


def _parts(t: StepTime) -> float:
    return t.compute + t.overhead + t.bubble + t.update + t.exposed


def _global_batch(report) -> int:
    c = report.config
    per_step = c.parallel.pipeline.microbatches if c.parallel.pp > 1 else c.train.gradient_accumulation_steps
    return report.estimate.sizes["dp"] * c.train.micro_batch_size * per_step


def test_trace_counts_matmul_flops_and_ops() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(24, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    trace = trace_model(model, torch.zeros(32, 24))
    assert trace.forward_flops == 2 * 32 * (24 * 64 + 64 * 8)
    # backward: both weight gradients, and the input gradient of the second layer only (the batch needs none)
    assert trace.backward_flops == 2 * 32 * (24 * 64 + 2 * 64 * 8)
    assert trace.block_forward_flops == (2 * 32 * 24 * 64, 2 * 32 * 64 * 8)  # the Linear layers repeat
    assert trace.forward_ops > 0 and trace.backward_ops > 0


def test_llama_flops_from_the_trace_match_the_formula(traced) -> None:
    _, work = traced
    h, f, layers, vocab, tokens = 128, 256, 4, 512, MICRO * SEQ
    kv = h // 2  # 4 of 8 heads
    per_layer = 2 * tokens * (2 * h * h + 2 * h * kv + 3 * h * f) + 4 * tokens * SEQ * h  # + scores and values
    assert work.forward_flops == layers * per_layer + 2 * tokens * h * vocab
    assert work.block_flops == (per_layer,) * layers
    assert 1.9 < work.backward_flops / work.forward_flops < 2.2


@pytest.mark.parametrize("raw", CONFIGS, ids=lambda r: json.dumps(r, separators=(",", ":"))[:60])
def test_more_bandwidth_or_flops_never_predicts_slower(traced, raw: dict) -> None:
    for hardware in (HW, dataclasses.replace(HW, async_ops=False, op_overhead=2e-5)):
        for choices in ("keep", "recompute"):
            base = _time(traced, raw, hardware, choices)
            assert base.seconds == pytest.approx(_parts(base), rel=1e-9)
            faster = {
                "flops": 2.0,
                "fp32_flops": 2.0,
                "intra_bw": 2.0,
                "inter_bw": 2.0,
                "pcie_bw": 2.0,
                "memory_bw": 2.0,
                "nvme_bw": 2.0,
                "host_bw": 2.0,
                "efficiency": 1.5,
                "op_overhead": 0.5,
            }
            for name, factor in faster.items():
                better = dataclasses.replace(hardware, **{name: getattr(hardware, name) * factor})
                assert _time(traced, raw, better, choices).seconds <= base.seconds * (1 + 1e-12), name


def test_a_slower_link_shows_in_its_transfer(traced) -> None:
    raw = {"parallel": {"dp": 8}, "zero": {"stage": 3}}
    fast, slow = _time(traced, raw), _time(traced, raw, dataclasses.replace(HW, inter_bw=HW.inter_bw / 1000))
    gather = {t.kind: t for t in slow.transfers}["zero3 parameter gather"]
    assert gather.exposed > 0 and slow.seconds > fast.seconds


@pytest.mark.parametrize(("pp", "micro", "chunks"), [(2, 4, 1), (4, 4, 1), (4, 8, 1), (2, 4, 2)])
def test_pipeline_bubble_is_p_minus_1_over_m_plus_p_minus_1(traced, pp: int, micro: int, chunks: int) -> None:
    ideal = dataclasses.replace(HW, op_overhead=0.0, memory_bw=None, intra_bw=1e30, inter_bw=1e30)
    schedule = "interleaved" if chunks > 1 else "1f1b"
    pipeline = {"microbatches": micro, "schedule": schedule, "stages_per_rank": chunks}
    t = _time(traced, {"parallel": {"pp": pp, "dp": 8 // pp, "pipeline": pipeline}}, ideal)
    assert t.micro_batches == micro and t.pp_rank == pp - 1  # the last stage carries the head: the slowest
    assert t.bubble / (t.compute + t.bubble) == pytest.approx((pp - 1) / (chunks * micro + pp - 1), rel=1e-9)


@pytest.mark.parametrize(
    "raw",
    [
        {"parallel": {"dp": 2, "tp": 4}},
        {"parallel": {"dp": 2, "tp": 4, "tensor": {"sequence_parallel": True}}},
        {"parallel": {"dp": 1, "tp": 4, "pp": 2}},
    ],
)
def test_tp_overlap_on_never_predicts_slower_than_off(traced, raw: dict) -> None:
    for hardware in (HW, dataclasses.replace(HW, intra_bw=HW.intra_bw / 50)):
        times = {}
        for mode in ("off", "on", "auto"):
            t = _time(traced, {**raw, "comm": {"overlap": {"tp": mode}}}, hardware)
            times[mode] = t
        tp = {m: {x.kind: x for x in t.transfers}["tp collectives"] for m, t in times.items()}
        assert tp["off"].exposed == pytest.approx(tp["off"].seconds)
        assert tp["on"].exposed < tp["off"].exposed and tp["on"].seconds == tp["off"].seconds
        assert times["on"].seconds <= times["off"].seconds and times["auto"].seconds == times["on"].seconds


def test_moe_overlap_hides_the_expert_all_to_all(tmp_path: Path) -> None:
    spec = resolve_model(_write(tmp_path, "mixtral", MIXTRAL))
    work = trace_profile(spec, MICRO, SEQ, "bf16").work
    slow = dataclasses.replace(HW, intra_bw=HW.intra_bw / 20, op_overhead=0.0)  # not dispatch-bound
    times = {}
    for mode in ("off", "on"):
        config = Config.load({"parallel": {"dp": 8, "ep": 4}, "comm": {"overlap": {"moe": mode}}})
        times[mode] = step_time(work, model_shape(spec.model, 1, 4), config, 8, slow, ranks_per_node=4)
    a2a = {m: {x.kind: x for x in t.transfers}["ep all-to-all"] for m, t in times.items()}
    assert a2a["off"].exposed == pytest.approx(a2a["off"].seconds) and a2a["off"].seconds > 0
    assert a2a["on"].exposed < a2a["off"].exposed and times["on"].seconds < times["off"].seconds


def test_dp_reduce_is_exposed_only_by_its_last_bucket(traced) -> None:
    spec, _ = traced
    shape = model_shape(spec.model)
    held = shape.root_params + sum(shape.block_params)
    raw = {"parallel": {"dp": 8}, "comm": {"bucket_mb": 0.5}}
    slow_compute = dataclasses.replace(HW, flops=HW.flops / 1e4)  # backward long enough to hide all but the last
    reduce = {t.kind: t for t in _time(traced, raw, slow_compute).transfers}["dp gradient reduce"]
    ring = 2 * 7 / 8  # all-reduce, 8 ranks over two nodes: the inter-node link
    last = max(0.5 * 2**20, shape.first_param)
    assert reduce.nbytes == pytest.approx(ring * held)
    assert reduce.seconds == pytest.approx(ring * held / HW.inter_bw)
    assert reduce.exposed == pytest.approx(ring * last / HW.inter_bw)
    not_overlapped = {**raw, "comm": {"bucket_mb": 0.5, "overlap_grad_reduce": False}}
    reduce = {t.kind: t for t in _time(traced, not_overlapped, slow_compute).transfers}["dp gradient reduce"]
    assert reduce.exposed == pytest.approx(reduce.seconds)


def test_parallel_size_search_returns_the_fastest_plan_that_fits(llama: str) -> None:
    raw = {"precision": {"dtype": "bf16"}}
    hw = dataclasses.replace(HW, op_overhead=0.0, flops=HW.flops / 1000)  # compute matters at this size
    free = Budgets(device=2**40, cpu=2**40, nvme=0, ranks_per_node=4)
    base = plan(llama, raw, 8, free, micro_batch=MICRO, seq_len=SEQ, hardware=hw, search=False)
    budgets = dataclasses.replace(free, device=int(base.usage["device"] * 0.6))
    report = plan(llama, raw, 8, budgets, micro_batch=MICRO, seq_len=SEQ, hardware=hw)
    assert not report.fits and report.change is not None
    after = report.change.report
    assert after.fits and "smallest change that fits with the fastest predicted step" in format_plan(report)
    config = Config.load(raw, overrides=report.change.overrides)
    again = plan(llama, config, 8, budgets, seq_len=SEQ, hardware=hw, search=False)  # the config's micro-batch
    assert again.fits and again.time == after.time and again.usage == after.usage
    assert _global_batch(again) == _global_batch(base) == 8 * MICRO
    summary = plan_summary(report)
    assert summary["change"]["step_seconds"] == after.time.seconds and summary["step_time"]["seconds"] > 0
    # no layout set by hand (same global batch) that fits is faster
    layouts = [({"tp": 4}, 1, 4), ({"pp": 2}, 2, 2), ({"tp": 2, "pp": 2}, 3, 4)]
    for sizes, stage, per_step in layouts:
        batch = {"train": {"gradient_accumulation_steps": per_step}}
        if sizes.get("pp", 1) > 1:
            batch = {"parallel": {**sizes, "pipeline": {"microbatches": per_step}}}
        by_hand = {**raw, "zero": {"stage": stage}, "parallel": sizes, **batch}
        other = plan(llama, by_hand, 8, budgets, micro_batch=MICRO, seq_len=SEQ, hardware=hw, search=False)
        assert _global_batch(other) == 8 * MICRO
        assert not other.fits or after.time.seconds <= other.time.seconds, sizes
    # with room to spare, the search may still find a faster plan than the one given, never a slower one
    roomy = plan(llama, raw, 8, free, micro_batch=MICRO, seq_len=SEQ, hardware=hw)
    assert roomy.fits
    if roomy.change is not None:
        assert roomy.change.report.time.seconds < roomy.time.seconds and "a faster plan" in format_plan(roomy)


def test_the_gpt2_preset_on_8_ranks() -> None:
    budgets = Budgets(device=3 * 2**30, cpu=2**40, nvme=0, ranks_per_node=8)
    report = plan("gpt2", {"precision": {"dtype": "bf16"}}, 8, budgets, micro_batch=1, seq_len=1024, hardware=HW)
    best = report.change.report if report.change is not None else report
    assert best.fits
    again = plan("gpt2", best.config, 8, budgets, seq_len=1024, hardware=HW, search=False)
    assert again.time == best.time


def test_optimizer_ratio_is_the_largest_that_fits(llama: str) -> None:
    raw = {
        "precision": {"dtype": "bf16"},
        "offload": {"activations": {"policy": {"model.layers.*": "keep"}}, "optimizer": {"chunk_mb": 0.25}},
    }
    free = Budgets(device=2**40, cpu=2**40, nvme=0, ranks_per_node=1)
    base = plan(llama, raw, 1, free, micro_batch=MICRO, seq_len=SEQ, hardware=HW, search=False)
    state = base.estimate.ranks[0].optimizer.device
    budgets = dataclasses.replace(free, device=base.usage["device"] - state // 2)
    report = plan(llama, raw, 1, budgets, micro_batch=MICRO, seq_len=SEQ, hardware=HW)
    assert report.change is not None and "offload.optimizer.device=cpu" in report.change.overrides
    chosen = report.change.report
    ratio = chosen.config.offload.optimizer.ratio
    assert 0 < ratio < 1 and chosen.fits
    at_zero = plan(llama, chosen.config.with_overrides(["offload.optimizer.ratio=0"]), 1, budgets, seq_len=SEQ,
                   hardware=HW, search=False)  # fmt: skip
    step = 1 / ratio_levels(at_zero)
    more = chosen.config.with_overrides([f"offload.optimizer.ratio={min(1.0, round(ratio + step, 6))}"])
    assert not plan(llama, more, 1, budgets, seq_len=SEQ, hardware=HW, search=False).fits


def test_hardware_table_and_names() -> None:
    assert match_gpu("NVIDIA H100 80GB HBM3") == "H100"
    assert match_gpu("NVIDIA H100 PCIe") == "H100-PCIE"
    assert match_gpu("NVIDIA A100-SXM4-80GB") == "A100"
    assert match_gpu("NVIDIA A10") == "A10" and match_gpu("NVIDIA L4") == "L4"
    assert match_gpu("Radeon") is None
    assert Hardware.named("h100", inter_bw=25e9).inter_bw == 25e9
    with pytest.raises(ValueError, match="H100"):
        Hardware.named("TPU")
    assert GPUS["H100"].rate("bf16") > GPUS["H100"].rate("fp32")
    assert parse_rate("3GB/s") == 3e9 and parse_rate("989TFLOP/s") == parse_rate("989T") == 989e12
    assert parse_rate("1GiB/s") == 2**30 and parse_rate(5e9) == 5e9
    with pytest.raises(ValueError, match="3GB/s"):
        parse_rate("fast")
