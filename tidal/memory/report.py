"""What `tidal plan` prints: the estimate's per-rank tables, the plan's usage against its budgets, the verdict,
and the same as plain data for ``--json``.

    print(format_plan(report))          # report = tidal.memory.planner.plan(...)
    print(format_estimate(estimate))    # one table per group of ranks with equal numbers
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from typing import Any

from tidal.memory.estimate import CATEGORIES, TIERS, MemoryEstimate
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
    lines.append("")
    if report.fits:
        lines.append("verdict: fits")
    elif report.change is None:
        lines.append(f"verdict: does not fit ({', '.join(report.over)}); no change tried fits")
    else:
        after = report.change.report
        peaks = ", ".join(f"{t} {format_bytes(after.usage[t])}" for t in TIERS)
        lines.append(f"verdict: does not fit ({', '.join(report.over)}); smallest change that fits ({peaks}):")
        lines += [f"  --set {shlex.quote(o)}" for o in report.change.overrides]
    lines.append("step time prediction, --chart and the parallel-size search are not implemented yet")
    return "\n".join(lines)


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
        "change": None if change is None else {"overrides": list(change.overrides), "usage": change.report.usage},
        "notes": list(report.notes),
        "config": report.runnable_config().to_dict(),
    }
