"""Chrome trace files (chrome://tracing, ui.perfetto.dev): one per rank, tracks for compute, comm and copies."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

TRACKS = ("compute", "comm", "copy")
"""Trace tracks, in display order; a track's index is its trace thread id (tid)."""

Event = tuple[str, int, int, int, dict[str, int] | None]
"""(name, tid, start ns, duration ns, args or None): a trace event, kept compact until written."""


def track_id(track: str) -> int:
    """The thread id of `track`; ValueError naming the tracks when it is not one of `TRACKS`."""
    if track not in TRACKS:
        raise ValueError(f"trace track {track!r} is not one of {', '.join(TRACKS)}; pick one of them")
    return TRACKS.index(track)


def trace_path(template: str, rank: int, world: int) -> Path:
    """`template` with "{rank}" replaced by the rank; else ".rank{r}" before the suffix when world > 1."""
    if "{rank}" in template:
        return Path(template.replace("{rank}", str(rank)))
    path = Path(template)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}") if world > 1 else path


def chrome_trace(events: Iterable[Event], rank: int, max_events: int, dropped: int) -> dict:
    """The Chrome trace JSON object of one rank's events (ts and dur in microseconds)."""
    tracks = [
        {"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": track}}
        for tid, track in enumerate(TRACKS)
    ]
    # perf_counter is one clock per host, so the ranks of one host line up
    spans = [
        dict(name=name, cat=TRACKS[tid], ph="X", pid=rank, tid=tid, ts=start / 1000, dur=dur / 1000, args=args or {})
        for name, tid, start, dur, args in events
    ]
    return {
        "traceEvents": [
            {"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}},
            *tracks,
            *spans,
        ],
        "displayTimeUnit": "ms",
        "otherData": {"rank": rank, "max_events": max_events, "dropped_oldest_events": dropped},
    }


def write_json_atomically(path: Path, obj: object) -> None:
    """Write `obj` as JSON to a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(obj, file)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
