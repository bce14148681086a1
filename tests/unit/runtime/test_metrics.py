"""StepMetrics: comm overlap, throughput, the rank-0 line, the Chrome trace, memory tiers, thread safety."""

from __future__ import annotations

import json
import re
import threading
import time

import psutil
import pytest

from tidal.config import LoggingConfig
from tidal.runtime import metrics as metrics_module
from tidal.runtime.device import Device, memory_stats
from tidal.runtime.metrics import RSS_TIER, StepMetrics
from tidal.runtime.trace import TRACKS


class FakeClock:
    """A clock in nanoseconds that moves only when told to."""

    def __init__(self) -> None:
        self.now_ns = 1_000_000_000

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, seconds: float) -> None:
        self.now_ns += round(seconds * 1e9)


def make(
    clock: FakeClock | None = None, *, rank: int = 0, world: int = 1, total_steps: int | None = None, **logging
) -> StepMetrics:
    return StepMetrics(rank, world, LoggingConfig(**logging), total_steps, clock=clock or time.perf_counter_ns)


def test_hidden_share_is_exact_with_a_driven_clock() -> None:
    clock = FakeClock()
    metrics = make(clock)
    metrics.begin_step()
    hidden = metrics.comm_launched("hidden", 1024)
    exposed = metrics.comm_launched("exposed", 2048)
    clock.advance(0.3)  # compute while both run
    hidden.completed()
    with exposed.blocked():
        clock.advance(0.1)
    record = metrics.end_step(1)
    assert record.comm_s == pytest.approx(0.3 + 0.4)
    assert record.comm_exposed_s == pytest.approx(0.1)
    assert record.comm_hidden_share == pytest.approx(1 - 0.1 / 0.7)


def test_hidden_share_per_kind_of_collective() -> None:
    clock = FakeClock()
    metrics = make(clock)
    metrics.begin_step()
    tp = metrics.comm_launched("tp all-gather+matmul", 1024)
    grads = metrics.comm_launched("all_reduce 0", 1024)
    clock.advance(0.2)
    grads.completed()
    with tp.blocked():
        clock.advance(0.2)  # tp: half of its 0.4 s exposed; the gradient bucket fully hidden
    record = metrics.end_step(1)
    assert record.comm_hidden_by_kind == pytest.approx({"tp": 0.5, "dp": 1.0})
    assert record.comm_hidden_share == pytest.approx(1 - 0.2 / 0.6)
    assert "comm hidden 67% (tp 50%, dp 100%)" in metrics._line(record)


def test_hidden_share_with_threads_completing_and_a_blocked_wait() -> None:
    metrics = make()
    metrics.begin_step()
    first = metrics.comm_launched("bucket 0", 1 << 20)
    first_done = threading.Timer(0.1, first.completed)  # the future's callback, on another thread
    first_done.start()
    with metrics.span("backward"):
        time.sleep(0.2)  # compute hides all of the first collective
    second = metrics.comm_launched("bucket 1", 1 << 20)
    second_done = threading.Timer(0.1, second.completed)
    second_done.start()
    with second.blocked():
        time.sleep(0.1)  # nothing left to compute: the whole second collective is exposed
    first_done.join()
    second_done.join()
    record = metrics.end_step(1)
    assert record.comm_s == pytest.approx(0.2, abs=0.05)
    assert record.comm_exposed_s == pytest.approx(0.1, abs=0.02)
    assert record.comm_hidden_share == pytest.approx(0.5, abs=0.08)


def test_no_comm_means_no_hidden_share() -> None:
    metrics = make(FakeClock())
    with metrics.span("forward"):
        pass
    record = metrics.end_step(1)
    assert record.comm_hidden_share is None
    assert record.comm_s == 0.0
    assert "comm hidden" not in metrics.summary()


def test_collective_still_running_counts_in_the_step_it_finishes() -> None:
    clock = FakeClock()
    metrics = make(clock)
    record = metrics.comm_launched("prefetch", 64)
    clock.advance(1.0)
    assert metrics.end_step(1).comm_hidden_share is None
    clock.advance(1.0)
    record.completed()
    clock.advance(5.0)
    record.completed()  # a second call changes nothing
    second = metrics.end_step(2)
    assert second.comm_s == pytest.approx(2.0)
    assert second.comm_hidden_share == pytest.approx(1.0)
    assert metrics.end_step(3).comm_hidden_share is None


def test_throughput_loss_and_step_time_from_observations() -> None:
    clock = FakeClock()
    metrics = make(clock)
    clock.advance(7.0)  # before begin_step: not part of the step
    metrics.begin_step()
    for loss in (2.0, 4.0):
        metrics.observe_batch(samples=4, tokens=512)
        metrics.observe_loss(loss)
    metrics.observe_grad_norm(0.5)
    clock.advance(2.0)
    record = metrics.end_step(1)
    assert record.step_time_s == pytest.approx(2.0)
    assert record.samples_per_s == pytest.approx(4.0)
    assert record.tokens_per_s == pytest.approx(512.0)
    assert record.loss == pytest.approx(3.0)
    assert record.grad_norm == 0.5
    assert not record.skipped and record.skipped_total == 0

    metrics.observe_batch(samples=None, tokens=None)  # no begin_step: the step starts at the last end
    clock.advance(0.5)
    record = metrics.end_step(2)
    assert record.step_time_s == pytest.approx(0.5)
    assert record.samples_per_s is None and record.tokens_per_s is None
    assert record.loss is None and record.grad_norm is None
    assert [r.step for r in metrics.history] == [1, 2]


def run_steps(metrics: StepMetrics, clock: FakeClock, steps: range, seconds: float = 1.0) -> None:
    for step in steps:
        metrics.begin_step()
        metrics.observe_batch(samples=8, tokens=1024)
        metrics.observe_loss(3.4521)
        metrics.observe_grad_norm(1.0234)
        clock.advance(seconds)
        metrics.end_step(step)


def test_rank0_line_has_every_field(capsys) -> None:
    clock = FakeClock()
    metrics = make(clock, total_steps=4)
    run_steps(metrics, clock, range(1, 2), seconds=3.0)
    metrics.begin_step()
    metrics.observe_batch(samples=8, tokens=1024)
    metrics.observe_loss(3.4521)
    metrics.observe_grad_norm(1.0234)
    comm = metrics.comm_launched("bucket", 10)
    clock.advance(0.75)
    with comm.blocked():
        clock.advance(0.25)
    metrics.end_step(2)
    line = capsys.readouterr().out.splitlines()[-1]
    pattern = (
        r"step 2/4 \[#{10}-{10}\] loss 3\.4521 \| 1 s/step \| 1024 tok/s 8 samples/s \| "
        r"mem cpu \(rss\) \d+(\.\d)? [KMG]?i?B \| comm hidden 75% \| grad norm 1\.02 \| eta 0:00:02"
    )
    assert re.fullmatch(pattern, line), line


def test_only_rank0_prints_and_only_every_interval(capsys) -> None:
    clock = FakeClock()
    run_steps(make(clock, rank=1, world=2, total_steps=5), clock, range(1, 6))
    assert capsys.readouterr().out == ""
    run_steps(make(clock, total_steps=5, interval=2), clock, range(1, 6))
    printed = [line.split()[1] for line in capsys.readouterr().out.splitlines()]
    assert printed == ["2/5", "4/5", "5/5"]  # the last step is always shown
    run_steps(make(clock, level="warning"), clock, range(1, 3))
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(("total_steps", "progress"), [(None, True), (4, False)])
def test_no_bar_or_eta_without_total_steps_or_progress(capsys, total_steps: int | None, progress: bool) -> None:
    clock = FakeClock()
    run_steps(make(clock, total_steps=total_steps, progress=progress), clock, range(1, 3))
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("step 2/4 loss" if total_steps else "step 2 loss")
    assert all("[" not in line and "eta" not in line for line in lines)


def test_skipped_steps_are_counted_and_worded(capsys) -> None:
    clock = FakeClock()
    metrics = make(clock)
    for step in (1, 2, 3):
        if step != 2:
            metrics.observe_skipped_step()
        clock.advance(1.0)
        metrics.end_step(step)
    lines = capsys.readouterr().out.splitlines()
    assert "| skipped (fp16 overflow, 1 so far) |" in lines[0]
    assert "skipped" not in lines[1]
    assert "| skipped (fp16 overflow, 2 so far) |" in lines[2]
    assert [(r.skipped, r.skipped_total) for r in metrics.history] == [(True, 1), (False, 1), (True, 2)]
    assert metrics.summary().endswith("| 2 skipped (fp16 overflow)")


def test_summary_leaves_out_the_first_step() -> None:
    clock = FakeClock()
    metrics = make(clock)
    assert metrics.summary() == "no steps recorded"
    run_steps(metrics, clock, range(1, 2), seconds=10.0)
    assert metrics.summary() == "1 steps | 10 s/step mean"
    run_steps(metrics, clock, range(2, 4), seconds=0.5)
    comm = metrics.comm_launched("x", 1)
    clock.advance(1.0)
    comm.completed()
    metrics.end_step(4)
    assert metrics.summary() == "4 steps | 0.667 s/step mean (first step excluded) | comm hidden 100% mean"


def load_trace(path) -> dict:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def test_trace_has_named_tracks_and_events_on_them(tmp_path) -> None:
    metrics = make(trace=str(tmp_path / "trace.json"))
    metrics.begin_step()
    with metrics.span("forward"):
        comm = metrics.comm_launched("all-reduce", 4096)
    with metrics.span("h2d", track="copy"):
        pass
    with comm.blocked():
        comm.completed()
    metrics.end_step(1)
    assert metrics.write_trace() == tmp_path / "trace.json"
    assert [p.name for p in tmp_path.iterdir()] == ["trace.json"]  # the temporary file is gone
    trace = load_trace(tmp_path / "trace.json")
    assert trace["displayTimeUnit"] == "ms"
    assert trace["otherData"]["dropped_oldest_events"] == 0
    events = trace["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == dict(enumerate(TRACKS))
    spans = {e["name"]: e for e in events if e["ph"] == "X"}
    assert set(spans) == {"forward", "h2d", "all-reduce", "wait all-reduce", "step 1"}
    assert all(e["dur"] >= 0 and e["pid"] == 0 for e in spans.values())
    assert spans["all-reduce"]["tid"] == TRACKS.index("comm")
    assert spans["all-reduce"]["args"] == {"bytes": 4096}
    assert spans["h2d"]["tid"] == TRACKS.index("copy")
    assert spans["forward"]["tid"] == spans["wait all-reduce"]["tid"] == TRACKS.index("compute")
    assert spans["step 1"]["ts"] <= spans["forward"]["ts"]


@pytest.mark.parametrize(
    ("template", "rank", "world", "written"),
    [
        ("trace.json", 0, 1, "trace.json"),
        ("trace.json", 1, 2, "trace.rank1.json"),
        ("trace", 3, 4, "trace.rank3"),
        ("trace-{rank}.json", 1, 2, "trace-1.json"),
    ],
)
def test_trace_path_names_the_rank(tmp_path, template: str, rank: int, world: int, written: str) -> None:
    metrics = make(rank=rank, world=world, trace=str(tmp_path / "out" / template))
    with metrics.span("forward"):
        pass
    assert metrics.write_trace() == tmp_path / "out" / written
    trace = load_trace(tmp_path / "out" / written)
    assert {e["pid"] for e in trace["traceEvents"]} == {rank}


def test_trace_keeps_only_the_newest_events(tmp_path) -> None:
    metrics = StepMetrics(0, 1, LoggingConfig(trace=str(tmp_path / "t.json")), max_trace_events=5)
    for index in range(12):
        with metrics.span(f"op {index}"):
            pass
    trace = load_trace(metrics.write_trace())
    assert [e["name"] for e in trace["traceEvents"] if e["ph"] == "X"] == [f"op {i}" for i in range(7, 12)]
    assert trace["otherData"] == {"rank": 0, "max_events": 5, "dropped_oldest_events": 7}


def test_no_trace_when_not_configured() -> None:
    metrics = make()
    with metrics.span("forward", track="comm"):
        pass
    assert metrics.trace_path is None
    assert metrics.write_trace() is None


def test_memory_tiers_have_rss_and_registered_sources() -> None:
    metrics = StepMetrics(0, 1, LoggingConfig(), device=Device("cpu", None, "gloo"))
    metrics.add_memory_source("nvme", lambda: 3 << 30)
    with pytest.raises(ValueError, match="'nvme' is already reported"):
        metrics.add_memory_source("nvme", lambda: 0)
    with pytest.raises(ValueError, match="already reported"):
        metrics.add_memory_source(RSS_TIER, lambda: 0)
    memory = metrics.end_step(1).memory
    assert list(memory) == [RSS_TIER, "nvme"]  # no device tier on the CPU
    assert 0 < memory[RSS_TIER] <= psutil.virtual_memory().total
    assert memory["nvme"] == 3 << 30
    assert memory_stats(Device("cpu", None, "gloo")) == {}


def test_cuda_device_reports_allocated_and_peak(monkeypatch) -> None:
    monkeypatch.setattr(metrics_module, "memory_stats", lambda device: {"allocated": 10, "peak": 20})
    metrics = StepMetrics(0, 1, LoggingConfig(), device=Device("cuda", 0, "nccl"))
    memory = metrics.end_step(1).memory
    assert (memory["device"], memory["device peak"]) == (10, 20)
    assert memory[RSS_TIER] > 0


def test_threads_can_record_at_once(tmp_path) -> None:
    metrics = make(trace=str(tmp_path / "t.json"))

    def work() -> None:
        for _ in range(500):
            with metrics.span("copy", track="copy"):
                metrics.comm_launched("c", 1).completed()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    record = metrics.end_step(1)
    assert record.comm_hidden_share is not None
    events = [e for e in load_trace(metrics.write_trace())["traceEvents"] if e["ph"] == "X"]
    assert sum(e["tid"] == TRACKS.index("copy") for e in events) == 4000
    assert sum(e["tid"] == TRACKS.index("comm") for e in events) == 4000


def test_bad_arguments_name_the_fix() -> None:
    with pytest.raises(ValueError, match="rank=2 is outside 0..1"):
        StepMetrics(2, 2, LoggingConfig())
    with pytest.raises(ValueError, match="total_steps=0"):
        StepMetrics(0, 1, LoggingConfig(), total_steps=0)
    with pytest.raises(ValueError, match="'gpu' is not one of compute, comm, copy"), make().span("x", track="gpu"):
        pass
