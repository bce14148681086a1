"""Per-step metrics of the training engine: time, throughput, memory per tier, comm overlap, Chrome trace.

The engine owns one `StepMetrics` per process and calls it at fixed points of each step::

    metrics.begin_step()
    with metrics.span("forward"):
        loss = model(batch)
    record = metrics.comm_launched("grad bucket 0", nbytes)
    work.get_future().then(lambda _: record.completed())  # may run on another thread
    with record.blocked():
        work.wait()
    metrics.observe_batch(samples=8, tokens=8192)
    metrics.observe_loss(loss.item())
    step_record = metrics.end_step(step)

`end_step` returns a frozen `StepRecord`, keeps it in `history`, and on rank 0 prints one line every
`LoggingConfig.interval` steps. With `LoggingConfig.trace` set, spans and collectives become Chrome trace
events (chrome://tracing, ui.perfetto.dev) that `write_trace` saves.
"""

from __future__ import annotations

import contextlib
import datetime
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from tidal.config import LoggingConfig
from tidal.memory.probe import format_bytes
from tidal.runtime.device import Device, memory_stats
from tidal.runtime.trace import Event, chrome_trace, trace_path, track_id, write_json_atomically

DEFAULT_MAX_TRACE_EVENTS = 200_000
"""Trace events kept in memory, count; past it the oldest are dropped (~30 MB at the cap)."""
DEVICE_TIER = "device"
DEVICE_PEAK_TIER = "device peak"
RSS_TIER = "cpu (rss)"
_BUILTIN_TIERS = (DEVICE_TIER, DEVICE_PEAK_TIER, RSS_TIER)
_PRINTED_LEVELS = ("debug", "info")
_BAR_WIDTH = 20

Clock = Callable[[], int]
"""A monotonic clock in integer nanoseconds, like `time.perf_counter_ns`."""


@dataclass(frozen=True, slots=True)
class StepRecord:
    """What one optimizer step measured; rates and shares are None when their inputs were not observed."""

    step: int
    """The step number the engine passed to `end_step` (1-based)."""
    loss: float | None
    """Mean loss over the step's micro-batches."""
    step_time_s: float
    """Wall time to `end_step` from `begin_step`, else from the previous `end_step` (the first step: from
    construction), seconds."""
    samples_per_s: float | None
    tokens_per_s: float | None
    memory: Mapping[str, int]
    """Bytes per tier at the end of the step: "device" and "device peak" on CUDA, "cpu (rss)", and
    every tier registered with `add_memory_source`."""
    comm_s: float
    """Launch-to-completion time of the collectives that finished this step, summed, seconds."""
    comm_exposed_s: float
    """Time spent blocked waiting on those collectives, seconds."""
    comm_hidden_share: float | None
    """1 - exposed/total: the share of communication hidden behind compute, 0..1; None with no comm."""
    comm_hidden_by_kind: Mapping[str, float]
    """The same share per kind of collective (`comm_kind`: "tp", "moe", "dp"), for the kinds that ran."""
    grad_norm: float | None
    skipped: bool
    """The optimizer step was skipped (fp16 overflow)."""
    skipped_total: int
    """Skipped steps so far, this one included."""


class CommRecord:
    """One collective from launch to completion; made by `StepMetrics.comm_launched`.

    A collective counts as finished when `completed` is called or a `blocked` region around its wait
    ends, whichever is first; one still running at `end_step` is counted in the step in which it finishes.
    """

    def __init__(self, name: str, nbytes: int, clock: Clock) -> None:
        self.name = name
        self.nbytes = nbytes
        self.launched_ns = clock()
        self._clock = clock
        self._lock = threading.Lock()
        self._completed_ns: int | None = None
        self._waits: list[tuple[int, int]] = []

    def completed(self) -> None:
        """Mark the collective finished now; call it from the work's future callback (any thread).
        Calls after the first change nothing."""
        now = self._clock()
        with self._lock:
            if self._completed_ns is None:
                self._completed_ns = now

    @contextlib.contextmanager
    def blocked(self) -> Iterator[None]:
        """Time the caller spends blocked on this collective (wrap ``work.wait()``): its exposed time."""
        start = self._clock()
        try:
            yield
        finally:
            end = self._clock()
            with self._lock:
                self._waits.append((start, end))

    def finish(self) -> tuple[int, list[tuple[int, int]]] | None:
        """(completion time ns, blocked intervals ns) once finished; None while still running."""
        with self._lock:
            ends = [self._waits[-1][1]] if self._waits else []  # a wait that returned proves completion
            if self._completed_ns is not None:
                ends.append(self._completed_ns)
            return (min(ends), list(self._waits)) if ends else None


class StepMetrics:
    """Per-process step metrics: timings, throughput, memory tiers, comm overlap and a Chrome trace.

    Args:
        rank: this process's global rank; only rank 0 prints, and it is the trace's pid.
        world: number of ranks; with world > 1 each rank writes its own trace file.
        config: the `logging` section (interval, progress, trace path, level).
        total_steps: steps the run will take, for the progress bar and ETA; None when unknown.
        device: the rank's compute device; on CUDA the "device" memory tiers are reported.
        clock: monotonic clock in nanoseconds; tests pass a fake one.
        max_trace_events: trace events kept in memory; the oldest are dropped past it.
    Attributes:
        history: every step's record, oldest first.
        trace_path: where `write_trace` writes, the rank filled in; None when tracing is off.
    Raises:
        ValueError: rank outside 0..world-1, or total_steps / max_trace_events not positive.
    """

    def __init__(
        self,
        rank: int,
        world: int,
        config: LoggingConfig,
        total_steps: int | None = None,
        *,
        device: Device | None = None,
        clock: Clock = time.perf_counter_ns,
        max_trace_events: int = DEFAULT_MAX_TRACE_EVENTS,
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank={rank} is outside 0..{world - 1} for world={world}; pass the global rank")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be >= 1; pass None when the length is unknown")
        if max_trace_events < 1:
            raise ValueError(f"max_trace_events={max_trace_events} must be >= 1, e.g. {DEFAULT_MAX_TRACE_EVENTS}")
        self.rank = rank
        self.config = config
        self.total_steps = total_steps
        self.trace_path = trace_path(config.trace, rank, world) if config.trace else None
        self.history: list[StepRecord] = []
        self._device = device
        self._clock = clock
        self._max_trace_events = max_trace_events
        self._lock = threading.Lock()
        self._events: deque[Event] | None = deque(maxlen=max_trace_events) if config.trace else None
        self._dropped_events = 0
        self._pending_comm: list[CommRecord] = []
        self._memory_sources: dict[str, Callable[[], int]] = {}
        self._process = psutil.Process()
        self._skipped_total = 0
        self._reset_step(clock())

    def _reset_step(self, start_ns: int) -> None:
        self._step_start_ns = start_ns
        self._losses: list[float] = []
        self._samples: int | None = None
        self._tokens: int | None = None
        self._skipped = False
        self._grad_norm: float | None = None

    def begin_step(self) -> None:
        """Start the step's clock now; without it a step starts where the previous `end_step` ended."""
        self._step_start_ns = self._clock()

    @contextlib.contextmanager
    def span(self, name: str, track: str = "compute") -> Iterator[None]:
        """Record the enclosed region as a trace event named `name` on `track` (one of `TRACKS`).

        Raises:
            ValueError: `track` is not one of `TRACKS`.
        """
        tid = track_id(track)
        if self._events is None:
            yield
            return
        start = self._clock()
        try:
            yield
        finally:
            self._add_event(name, tid, start, self._clock())

    def comm_launched(self, name: str, nbytes: int) -> CommRecord:
        """Register a collective launched now, moving `nbytes` bytes; the engine then calls the
        record's `completed()` from the work's callback and waits on it inside `record.blocked()`."""
        record = CommRecord(name, nbytes, self._clock)
        with self._lock:
            self._pending_comm.append(record)
        return record

    def observe_batch(self, samples: int | None, tokens: int | None) -> None:
        """Count one micro-batch's samples and tokens (None: not known); rates come from their sums."""
        if samples is not None:
            self._samples = (self._samples or 0) + samples
        if tokens is not None:
            self._tokens = (self._tokens or 0) + tokens

    def observe_loss(self, value: float) -> None:
        """One micro-batch's loss, a Python float; the step reports the mean."""
        self._losses.append(float(value))

    def observe_skipped_step(self) -> None:
        """This step's optimizer update was skipped (fp16 overflow)."""
        self._skipped = True

    def observe_grad_norm(self, value: float) -> None:
        """The step's global gradient L2 norm (before clipping)."""
        self._grad_norm = float(value)

    def add_memory_source(self, name: str, read_bytes: Callable[[], int]) -> None:
        """Report tier `name` at each `end_step` as `read_bytes()` bytes (e.g. "nvme": bytes in swap files).

        Raises:
            ValueError: `name` is a built-in tier or already registered.
        """
        if name in _BUILTIN_TIERS or name in self._memory_sources:
            raise ValueError(f"memory tier {name!r} is already reported; register each tier once under a new name")
        self._memory_sources[name] = read_bytes

    def end_step(self, step: int) -> StepRecord:
        """Close the step numbered `step` (1-based), keep its record in `history`, print it when due."""
        now = self._clock()
        step_time_s = (now - self._step_start_ns) / 1e9
        by_kind = self._close_comm()
        comm_s, exposed_s = (sum(times[i] for times in by_kind.values()) for i in (0, 1))
        if self._skipped:
            self._skipped_total += 1
        record = StepRecord(
            step=step,
            loss=statistics.fmean(self._losses) if self._losses else None,
            step_time_s=step_time_s,
            samples_per_s=_rate(self._samples, step_time_s),
            tokens_per_s=_rate(self._tokens, step_time_s),
            memory=self._memory(),
            comm_s=comm_s,
            comm_exposed_s=exposed_s,
            comm_hidden_share=_hidden(comm_s, exposed_s),
            comm_hidden_by_kind={kind: _hidden(*times) for kind, times in by_kind.items() if times[0] > 0},
            grad_norm=self._grad_norm,
            skipped=self._skipped,
            skipped_total=self._skipped_total,
        )
        self._add_event(f"step {step}", track_id("compute"), self._step_start_ns, now)
        self.history.append(record)
        if self._due(step):
            print(self._line(record), flush=True)
        self._reset_step(now)
        return record

    def _close_comm(self) -> dict[str, tuple[float, float]]:
        """Take the finished collectives out of the pending list: kind -> (summed comm s, summed blocked s)."""
        with self._lock:
            records, self._pending_comm = self._pending_comm, []
        by_kind: dict[str, list[int]] = {}
        running = []
        for record in records:
            finished = record.finish()
            if finished is None:
                running.append(record)
                continue
            done_ns, waits = finished
            times = by_kind.setdefault(comm_kind(record.name), [0, 0])
            times[0] += max(0, done_ns - record.launched_ns)
            times[1] += sum(end - start for start, end in waits)
            self._add_event(record.name, track_id("comm"), record.launched_ns, done_ns, {"bytes": record.nbytes})
            for start, end in waits:
                self._add_event(f"wait {record.name}", track_id("compute"), start, end)
        with self._lock:
            self._pending_comm[:0] = running  # before any launched meanwhile, keeping launch order
        return {kind: (total / 1e9, exposed / 1e9) for kind, (total, exposed) in by_kind.items()}

    def _memory(self) -> dict[str, int]:
        tiers = {}
        stats = memory_stats(self._device) if self._device is not None else {}
        if stats:
            tiers[DEVICE_TIER] = stats["allocated"]
            tiers[DEVICE_PEAK_TIER] = stats["peak"]
        tiers[RSS_TIER] = self._process.memory_info().rss
        for name, read_bytes in self._memory_sources.items():
            tiers[name] = int(read_bytes())
        return tiers

    def _add_event(self, name: str, tid: int, start_ns: int, end_ns: int, args: dict[str, int] | None = None) -> None:
        if self._events is None:
            return
        with self._lock:
            if len(self._events) == self._max_trace_events:
                self._dropped_events += 1  # the deque drops its oldest on this append
            self._events.append((name, tid, start_ns, max(0, end_ns - start_ns), args))

    def _due(self, step: int) -> bool:
        if self.rank != 0 or self.config.level not in _PRINTED_LEVELS:
            return False
        return step % self.config.interval == 0 or step == self.total_steps

    def _line(self, record: StepRecord) -> str:
        """One step as a progress line; fields that were not observed are left out."""
        show_progress = self.total_steps is not None and self.config.progress
        head = f"step {record.step}" + (f"/{self.total_steps}" if self.total_steps is not None else "")
        if show_progress:
            head += " " + _bar(record.step / self.total_steps)
        if record.loss is not None:
            head += f" loss {record.loss:.4f}"
        parts = [head]
        if record.skipped:
            parts.append(f"skipped (fp16 overflow, {record.skipped_total} so far)")
        parts.append(f"{_seconds(record.step_time_s)} s/step")
        rates = [(record.tokens_per_s, "tok/s"), (record.samples_per_s, "samples/s")]
        if any(value is not None for value, _ in rates):
            parts.append(" ".join(f"{_per_second(value)} {unit}" for value, unit in rates if value is not None))
        parts.append("mem " + ", ".join(f"{tier} {format_bytes(size)}" for tier, size in record.memory.items()))
        if record.comm_hidden_share is not None:
            kinds = record.comm_hidden_by_kind
            detail = f" ({', '.join(f'{k} {v:.0%}' for k, v in kinds.items())})" if len(kinds) > 1 else ""
            parts.append(f"comm hidden {record.comm_hidden_share:.0%}{detail}")
        if record.grad_norm is not None:
            parts.append(f"grad norm {record.grad_norm:.3g}")
        if show_progress:
            eta_s = max(self.total_steps - record.step, 0) * self._steady_step_time_s()
            parts.append(f"eta {datetime.timedelta(seconds=round(eta_s))}")
        return " | ".join(parts)

    def _steady_step_time_s(self) -> float:
        """Mean step time in seconds, leaving out the first step (warm-up) once there are others."""
        times = [record.step_time_s for record in self.history]
        return statistics.fmean(times[1:] or times)

    def summary(self) -> str:
        """One line over all recorded steps: count, mean step time without the first, mean hidden share."""
        if not self.history:
            return "no steps recorded"
        parts = [f"{len(self.history)} steps", f"{_seconds(self._steady_step_time_s())} s/step mean"]
        if len(self.history) > 1:
            parts[-1] += " (first step excluded)"
        shares = [record.comm_hidden_share for record in self.history if record.comm_hidden_share is not None]
        if shares:
            parts.append(f"comm hidden {statistics.fmean(shares):.0%} mean")
        if self._skipped_total:
            parts.append(f"{self._skipped_total} skipped (fp16 overflow)")
        return " | ".join(parts)

    def write_trace(self) -> Path | None:
        """Write the trace events kept so far as Chrome trace JSON to `trace_path`, atomically.

        Returns:
            The path written, or None when tracing is off.
        """
        if self._events is None or self.trace_path is None:
            return None
        with self._lock:
            events, dropped = list(self._events), self._dropped_events
        trace = chrome_trace(events, self.rank, self._max_trace_events, dropped)
        write_json_atomically(self.trace_path, trace)
        return self.trace_path


def comm_kind(name: str) -> str:
    """The kind of a collective by its record's name: "tp ..." and "moe ..." name their own, the rest is "dp"
    (gradient buckets, ZeRO parameter gathers)."""
    first = name.split(" ", 1)[0]
    return first if first in ("tp", "moe") else "dp"


def _hidden(comm_s: float, exposed_s: float) -> float | None:
    return 1 - min(exposed_s / comm_s, 1.0) if comm_s > 0 else None


def _rate(count: int | None, seconds: float) -> float | None:
    return count / seconds if count is not None and seconds > 0 else None


def _seconds(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _per_second(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def _bar(fraction: float) -> str:
    filled = round(min(max(fraction, 0.0), 1.0) * _BAR_WIDTH)
    return "[" + "#" * filled + "-" * (_BAR_WIDTH - filled) + "]"
