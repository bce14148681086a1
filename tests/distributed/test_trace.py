"""The engine's metrics on 2 ranks: the per-step line and a Chrome trace with compute and comm tracks."""

import json
from pathlib import Path

import pytest
from models import batches, make_optimizer, shard, tiny_gpt2
from ranks import run_ranks

import tidal


def _train_traced(rank: int, world: int, trace: str) -> dict:
    config = {"comm": {"bucket_mb": 0.05}, "logging": {"trace": trace, "progress": False}}
    tidal.init(config)
    model = tiny_gpt2()
    model, opt = tidal.wrap(model, make_optimizer(model))
    engine = tidal.engine(model)
    for ids in batches(3, 8):
        mine = shard(ids, rank, world)
        model(input_ids=mine, labels=mine).loss.backward()
        opt.step()
        opt.zero_grad()
    path = engine.metrics.write_trace()
    last = engine.metrics.history[-1]
    tidal.shutdown()
    return {"path": str(path), "tokens_per_s": last.tokens_per_s, "hidden": last.comm_hidden_share, "loss": last.loss}


@pytest.mark.timeout(180)
def test_trace_has_compute_and_comm_tracks(tmp_path):
    results = run_ranks(_train_traced, 2, args=(str(tmp_path / "trace.json"),), timeout=150)
    assert {Path(r["path"]).name for r in results} == {"trace.rank0.json", "trace.rank1.json"}
    assert results[0]["loss"] == pytest.approx(results[1]["loss"]), "the logged loss is the job's, on every rank"
    for r in results:
        assert r["tokens_per_s"] > 0 and 0.0 <= r["hidden"] <= 1.0
        events = json.loads(Path(r["path"]).read_text())["traceEvents"]
        tracks = {e["args"]["name"]: e["tid"] for e in events if e.get("name") == "thread_name"}
        names = {(e["tid"], e["name"].split()[0]) for e in events if e.get("ph") == "X"}
        for phase in ("forward", "backward", "step"):
            assert (tracks["compute"], phase) in names, phase
        assert any(tid == tracks["comm"] and name == "all_reduce" for tid, name in names)
