"""The memory estimate against real CPU runs through `tidal.wrap`: ZeRO 0-3 x dp 1-2 x optimizer offload.

One spawn of 2 ranks. First the 2-rank job (dp=2, tiny GPT-2, tied embeddings); then each process leaves it
and opens a 1-rank job of its own (dp=1, tiny Llama), the two processes sharing the dp=1 cases. Each case
trains one step and measures, by storage (`LiveTensorTracker.track`: views and tied weights count once):
parameters after the step, gradients when the step starts (after backward), optimizer state after the step
(the offloaded optimizer's chunk state in host memory, and its NVMe files' sizes on disk), fp32 master
copies, and the persistent buffers (gradient buckets, offload staging).

Tolerance: model states (params, grads, optimizer, masters, NVMe files) exact, to the byte. Persistent
buffers exact as well, apart from NVMe bounce buffers (allocated per I/O thread only for unaligned
transfers; the estimate gives the bound) which are not measured. Transient buffers (FSDP2's gathered blocks,
reduce-scatter sends, ZeRO's post-step all-gather) and activations are not compared here: the first are
upper bounds by construction, the second come from the trace.
"""

from __future__ import annotations

import os

import pytest
import torch
from models import batches, make_optimizer, shard, tiny_gpt2, tiny_llama
from ranks import run_ranks

import tidal
from tidal.config import Config
from tidal.memory.estimate import estimate
from tidal.memory.tracker import LiveTensorTracker

LOGGING = {"logging": {"progress": False, "interval": 1000}}
OFFLOADS = {
    "none": {},
    "cpu": {"offload": {"optimizer": {"device": "cpu"}}},
    "cpu-ratio": {"offload": {"optimizer": {"device": "cpu", "chunk_mb": 0.05, "ratio": 0.5}}},
}
TWO_RANK_CASES = {f"zero{s}-{o}": ({"zero": {"stage": s}, **OFFLOADS[o]}) for s in range(4) for o in ("none", "cpu")}
TWO_RANK_CASES["zero2-cpu-ratio"] = {"zero": {"stage": 2}, **OFFLOADS["cpu-ratio"]}
TWO_RANK_CASES["zero0-nvme"] = {"offload": {"optimizer": {"device": "nvme", "chunk_mb": 0.05}}}
ONE_RANK_CASES = {f"zero{s}-{o}": ({"zero": {"stage": s}, **OFFLOADS[o]}) for s in range(4) for o in ("none", "cpu")}
ONE_RANK_CASES["zero3-nvme"] = {"zero": {"stage": 3}, "offload": {"optimizer": {"device": "nvme", "chunk_mb": 0.05}}}
KEYS = ("params", "grads", "optimizer", "masters", "nvme")


def _bytes(tensors) -> int:
    return LiveTensorTracker().track(*[t for t in tensors if t is not None]).current_bytes("cpu")


def _measure(model, opt, ids: torch.Tensor) -> dict[str, int]:
    engine = tidal.engine(model)
    model(input_ids=ids, labels=ids).loss.backward()
    params_of_optimizer = [p for g in opt.param_groups for p in g["params"]]
    grads = _bytes([p.grad for p in model.parameters()] + [p.grad for p in params_of_optimizer])
    opt.step()
    measured = {"params": _bytes(model.parameters()), "grads": grads, "nvme": 0, "masters": 0}
    buffers = [
        b.buffer
        for name in ("buckets", "expert_buckets")
        for b in getattr(getattr(engine.dp, name, None), "buckets", [])
    ]
    offload = engine.optimizer_offload
    if offload is None:
        measured["optimizer"] = _bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    else:
        state = [v for c in offload.chunks if c.optimizer for s in c.optimizer.state.values() for v in s.values()]
        measured["optimizer"] = _bytes(v for v in state if torch.is_tensor(v))
        measured["masters"] = _bytes(m for c in offload.chunks for m in c.masters)
        buffers += [t for s in offload.staging for t in (s.buffer, s.grad_buffer)]
        if offload.store is not None:
            files = [e for e in os.scandir(offload.store.directory) if e.name.endswith(".swap")]
            measured["nvme"] = sum(e.stat().st_size for e in files)
    measured["buffers"] = _bytes(buffers)
    opt.zero_grad()
    return measured


def _predicted(build, config: Config, world: int, rank: int) -> dict[str, int]:
    with torch.device("meta"):
        model = build()
    est = estimate(model, config, world, optimizer=make_optimizer(model), device_type="cpu").ranks[rank]
    host = {k: est.category(k).device + est.category(k).cpu for k in ("params", "grads", "optimizer", "masters")}
    kept = [b for b in est.buffer_list if b.persistent and b.tier != "nvme"]
    exact = sum(b.nbytes for b in kept if b.exact)
    bounds = sum(b.nbytes for b in kept if not b.exact and not b.name.startswith("NVMe bounce"))
    return {**host, "nvme": est.optimizer.nvme, "buffers": exact, "buffer_bounds": bounds}


def _run_cases(build, cases: dict, rank: int, world: int, tmp: str) -> dict:
    out = {}
    for name, raw in cases.items():
        raw = {**raw, **LOGGING}
        if "nvme" in name:
            raw["offload"]["optimizer"]["path"] = os.path.join(tmp, f"{name}-{rank}")
        config = Config.load(raw)
        model = build()
        model, opt = tidal.wrap(model, make_optimizer(model), config)
        measured = _measure(model, opt, shard(batches(1, 4)[0], rank, world))
        out[name] = (measured, _predicted(build, config, world, rank))
        engine = tidal.engine(model)
        if engine.optimizer_offload is not None:
            engine.optimizer_offload.close()
    return out


def _both_jobs(rank: int, world: int, tmp: str) -> dict:
    tidal.init(LOGGING)
    results = {f"dp2/{k}": v for k, v in _run_cases(tiny_gpt2, TWO_RANK_CASES, rank, world, tmp).items()}
    tidal.shutdown()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    tidal.init(LOGGING)  # a 1-rank job of this process alone
    mine = {k: v for i, (k, v) in enumerate(ONE_RANK_CASES.items()) if i % world == rank}
    results |= {f"dp1/{k}": v for k, v in _run_cases(tiny_llama, mine, 0, 1, tmp).items()}
    tidal.shutdown()
    return results


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> list[dict]:
    tmp = str(tmp_path_factory.mktemp("estimate"))
    return run_ranks(_both_jobs, 2, args=(tmp,), timeout=240)


@pytest.mark.timeout(300)
def test_model_states_and_kept_buffers_match_the_estimate_exactly(measured: list[dict]) -> None:
    cases = [(rank, name, m, p) for rank, res in enumerate(measured) for name, (m, p) in res.items()]
    assert len(cases) == 2 * len(TWO_RANK_CASES) + len(ONE_RANK_CASES)
    wrong = [
        f"rank {rank} {name} {key}: measured {m[key]} predicted {p[key]}"
        for rank, name, m, p in cases
        for key in KEYS
        if m[key] != p[key]
    ]
    wrong += [
        f"rank {rank} {name} buffers: measured {m['buffers']} predicted {p['buffers']} + at most {p['buffer_bounds']}"
        for rank, name, m, p in cases
        if not p["buffers"] <= m["buffers"] <= p["buffers"] + p["buffer_bounds"]
    ]
    assert not wrong, "\n".join(wrong)
