"""What `tidal plan` prints: the estimate's per-rank tables, the plan's usage against its budgets, the verdict,
and the same as plain data for ``--json``.

    print(format_plan(report))          # report = tidal.memory.planner.plan(...)
    print(format_estimate(estimate))    # one table per group of ranks with equal numbers
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Iterable
from typing import Any

from tidal.memory.cost import StepTime
from tidal.memory.estimate import CATEGORIES, TIERS, MemoryEstimate
from tidal.memory.hardware import Hardware
from tidal.memory.planner import PlanReport, _limit
from tidal.memory.probe import format_bytes


def format_estimate(est: MemoryEstimate) -> str:
    """One table per group of ranks with equal numbers: categories x tiers, then the steady and peak rows."""
    groups: dict[tuple, list[int]] = {}
    for r in est.ranks:
        key = tuple(tuple(r.category(n)[t] for t in TIERS) for n in CATEGORIES) + (r.buffer_list,)
        groups.setdefault(key, []).append(r.rank)
    sizes = " ".join(f"{k}={v}" for k, v in est.sizes.items())
    s = est.optimizer
    lines = [f"memory per rank: {sizes}, zero.stage={est.zero_stage}, {s.name} ({s.slots} state slots)"]
    for members in groups.values():
        r = est.ranks[members[0]]
        lines.append("")
        lines.append(f"ranks {_ranges(members)} (pp, dp, sp, tp = {r.coords})")
        lines.append(f"  {'':<13}" + "".join(f"{t:>12}" for t in TIERS))
        for name in CATEGORIES:
            lines.append(f"  {name:<13}" + "".join(f"{format_bytes(r.category(name)[t]):>12}" for t in TIERS))
        for label, fn in (("steady", r.steady), ("peak", r.peak)):
            lines.append(f"  {label:<13}" + "".join(f"{format_bytes(fn(t)):>12}" for t in TIERS))
        for b in r.buffer_list:
            kind = "kept" if b.persistent else "transient"
            lines.append(f"    {b.name}: {format_bytes(b.nbytes)} on {b.tier} ({kind})")
    lines.append("")
    lines.append("peak over ranks: " + ", ".join(f"{t} {format_bytes(est.peak(t))}" for t in TIERS))
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


def _ranges(ranks: Iterable[int]) -> str:
    ranks = sorted(ranks)
    parts, start = [], ranks[0]
    for a, b in zip(ranks, [*ranks[1:], None], strict=True):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(parts)


def format_plan(report: PlanReport) -> str:
    """The per-rank tables, usage against each budget, the verdict and the change (as --set lines)."""
    b = report.budgets
    lines = [
        f"tidal plan: {report.model}, world {report.world_size}, micro-batch {report.micro_batch} x {report.seq_len} "
        f"tokens, {report.config.precision.dtype}, zero.stage={report.config.zero.stage}",
        "",
        format_estimate(report.estimate),
        "",
        *_activation_lines(report),
        "",
        f"{'tier':<8}{'predicted':>12}{'budget':>12}  unit",
    ]
    per_node = min(b.ranks_per_node or report.world_size, report.world_size)
    units = {"device": "per rank", "cpu": f"per node ({per_node} ranks)", "nvme": "per node"}
    if b.device is None:
        units["cpu"] += ", device included (the device is the host)"
    for tier in TIERS:
        limit = "host" if tier == "device" and b.device is None else format_bytes(_limit(b, tier))
        mark = "  OVER" if tier in report.over else ""
        lines.append(f"{tier:<8}{format_bytes(report.usage[tier]):>12}{limit:>12}  {units[tier]}{mark}")
    lines += [f"budget {s}" for s in b.source]
    lines += [f"note: {n}" for n in report.notes]
    if report.time is not None:
        lines += ["", *format_step_time(report.time, report.hardware)]
    lines.append("")
    change = report.change
    if change is not None:
        after = change.report
        peaks = ", ".join(f"{t} {format_bytes(after.usage[t])}" for t in TIERS)
        step = f", step {_seconds(after.time.seconds)}" if after.time is not None else ""
    if report.fits and change is None:
        lines.append("verdict: fits")
    elif report.fits:
        lines.append(f"verdict: fits; a faster plan that fits ({peaks}{step}):")
    elif change is None:
        lines.append(f"verdict: does not fit ({', '.join(report.over)}); no change tried fits")
    else:
        lines.append(
            f"verdict: does not fit ({', '.join(report.over)}); smallest change that fits with the fastest "
            f"predicted step ({peaks}{step}):"
        )
    if change is not None:
        lines += [f"  --set {shlex.quote(o)}" for o in change.overrides]
    return "\n".join(lines)


def format_step_time(time: StepTime, hardware: Hardware | None = None) -> list[str]:
    """The predicted step split into compute and transfers: one line per transfer kind with its bytes, its
    time on its link and the part compute did not hide."""
    device = f" on {hardware.name}" if hardware is not None else ""
    lines = [
        f"step time predicted{device}: {_seconds(time.seconds)} = compute {_seconds(time.compute)} "
        f"(recompute {_seconds(time.recompute)}) + dispatch {_seconds(time.overhead)} + pipeline bubble "
        f"{_seconds(time.bubble)} + optimizer update {_seconds(time.update)} + exposed transfers "
        f"{_seconds(time.exposed)}",
        f"  per rank of pp stage {time.pp_rank} (the slowest), {time.micro_batches} micro-batch(es) per step",
    ]
    if time.transfers:
        lines.append(f"  {'transfer':<34}{'bytes':>10}{'time':>11}{'exposed':>11}  overlaps")
    for t in time.transfers:
        lines.append(
            f"  {t.kind:<34}{format_bytes(t.nbytes):>10}{_seconds(t.seconds):>11}{_seconds(t.exposed):>11}  "
            f"{t.overlaps}"
        )
    if hardware is not None:
        lines.append(
            f"  device: {hardware.flops / 1e12:g} TFLOP/s 16-bit, {hardware.fp32_flops / 1e12:g} fp32, x "
            f"{hardware.efficiency:g} efficiency; links {hardware.intra_bw / 1e9:g} GB/s in a node, "
            f"{hardware.inter_bw / 1e9:g} across, {hardware.pcie_bw / 1e9:g} to the host ({hardware.source})"
        )
    return lines


def _seconds(value: float) -> str:
    if value >= 1 or value == 0:
        return f"{value:.2f} s"
    return f"{value * 1e3:.1f} ms" if value >= 1e-3 else f"{value * 1e6:.0f} us"


def _activation_lines(report: PlanReport) -> list[str]:
    """The activations' parts, once per distinct rank (the pipeline stages differ)."""
    lines, seen = [], set()
    for r, parts in zip(report.estimate.ranks, report.activation_parts, strict=True):
        key = tuple(parts.values())
        if key in seen:
            continue
        seen.add(key)
        shown = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items() if v)
        lines.append(f"activations of rank {r.rank} (pp stage {r.coords[0]}): {shown}")
    return lines


def plan_summary(report: PlanReport) -> dict[str, Any]:
    """The report as plain data (for --json): verdict, usage, budgets, change and the config to run."""
    change = report.change
    return {
        "model": report.model,
        "world_size": report.world_size,
        "micro_batch": report.micro_batch,
        "seq_len": report.seq_len,
        "fits": report.fits,
        "over": list(report.over),
        "usage": report.usage,
        "budgets": {
            t: (None if t == "device" and report.budgets.device is None else _limit(report.budgets, t)) for t in TIERS
        },
        "ranks_per_node": report.budgets.ranks_per_node,
        "per_rank": [
            {
                "rank": r.rank,
                **{name: dict(zip(TIERS, (r.category(name)[t] for t in TIERS), strict=True)) for name in CATEGORIES},
                "peak": {t: r.peak(t) for t in TIERS},
                "activation_parts": parts,
            }
            for r, parts in zip(report.estimate.ranks, report.activation_parts, strict=True)
        ],
        "change": None
        if change is None
        else {
            "overrides": list(change.overrides),
            "usage": change.report.usage,
            "step_seconds": None if change.report.time is None else change.report.time.seconds,
        },
        "step_time": None if report.time is None else report.time.as_dict(),
        "hardware": None if report.hardware is None else dataclasses.asdict(report.hardware),
        "notes": list(report.notes),
        "config": report.runnable_config().to_dict(),
    }
