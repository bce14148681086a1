"""`tidal plan --chart`: the plan's per-rank memory as one PNG a person reads at a glance.

    require_matplotlib()                          # ChartError naming the extra to install, before planning
    figure = draw_plan(report, "plan.png")        # report = tidal.memory.planner.plan(...)

One panel per distinct rank (ranks with equal numbers share it, "ranks 0-3"); in it one stacked horizontal bar
per tier, split into params, grads, optimizer state (with the fp32 masters), activations and buffers, in
bytes. A vertical tick on each bar is the budget of that rank: the device's memory; for cpu and nvme the
node's budget divided by the ranks sharing the node. A dot marks the rank's predicted peak, which is below
the bar's end when the optimizer step's transient buffers and the activations are never alive together.
When the device is the host (no GPU budget), device and cpu are one bar "host", as they are one budget.
The title carries the verdict and, when the job does not fit, the smallest change that fits.
"""

from __future__ import annotations

import shlex
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from tidal.memory.estimate import TIERS, RankEstimate
from tidal.memory.planner import PlanReport, _limit
from tidal.memory.probe import format_bytes
from tidal.memory.report import _ranges

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SEGMENTS = {
    "params": ("params",),
    "grads": ("grads",),
    "optimizer state": ("optimizer", "masters"),
    "activations": ("activations",),
    "buffers": ("buffers",),
}
"""A bar's segments in drawing order, each the sum of these estimate categories."""
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")
_INCH_PER_PANEL = 1.5
_BUDGET_SCALE = 4
"""Budgets up to this many times the largest bar are drawn on the axis; larger ones are only named."""
_AXIS_ROOM = 1.35
"""The axis runs this far past the largest bar or budget drawn, leaving room for the labels."""


class ChartError(RuntimeError):
    """The chart cannot be drawn here; the message says what to install or change."""


def require_matplotlib() -> None:
    """Raise ChartError naming the extra to install when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ChartError(f"--chart needs matplotlib ({err}); install it with: pip install 'tidal[plot]'") from err


def bar_tiers(report: PlanReport) -> dict[str, tuple[str, ...]]:
    """Bar label -> the tiers it adds up: device, cpu, nvme; "host" for device + cpu without a GPU budget."""
    if report.budgets.device is None:
        return {"host": ("device", "cpu"), "nvme": ("nvme",)}
    return {t: (t,) for t in TIERS}


def segment_bytes(rank: RankEstimate, tiers: tuple[str, ...]) -> dict[str, int]:
    """The bytes of each segment of `rank`'s bar over `tiers`."""
    return {name: sum(rank.category(c)[t] for c in cats for t in tiers) for name, cats in SEGMENTS.items()}


def rank_budget(report: PlanReport, tiers: tuple[str, ...]) -> int:
    """One rank's budget for a bar: the device's memory; the node's host memory (the "host" bar too) or NVMe
    space divided by the ranks sharing the node."""
    if tiers == ("device",):
        return _limit(report.budgets, "device")
    per_node = min(report.budgets.ranks_per_node or report.world_size, report.world_size)
    return _limit(report.budgets, tiers[-1]) // per_node


def verdict_title(report: PlanReport) -> str:
    """The chart's title: the job, then the verdict and the change that fits (wrapped to lines)."""
    head = (
        f"tidal plan: {report.model}, world {report.world_size}, micro-batch {report.micro_batch} x "
        f"{report.seq_len} tokens, {report.config.precision.dtype}, zero.stage={report.config.zero.stage}"
    )
    if report.fits:
        verdict = "fits"
    elif report.change is None:
        verdict = f"does not fit ({', '.join(report.over)}); no change tried fits"
    else:
        flags = " ".join(f"--set {shlex.quote(o)}" for o in report.change.overrides)
        verdict = f"does not fit ({', '.join(report.over)}); fits with {flags}"
    return "\n".join([head, *textwrap.wrap(verdict, 110)])


def _binary_unit(largest: float) -> tuple[int, str]:
    """The binary unit the axis is labelled in: the largest not above `largest`."""
    names = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    power = 0
    while power < len(names) - 1 and largest >= 1024 ** (power + 1):
        power += 1
    return 1024**power, names[power]


def draw_plan(report: PlanReport, path: str | Path) -> Figure:
    """Draw `report` (module doc) and write it as a PNG to `path`; return the figure (never registered with
    pyplot, so nothing stays open). Raises ChartError without matplotlib, OSError when `path` is unwritable."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    bars = bar_tiers(report)
    groups: dict[tuple, list[RankEstimate]] = {}
    for r in report.estimate.ranks:
        key = tuple((*segment_bytes(r, tiers).values(), sum(r.peak(t) for t in tiers)) for tiers in bars.values())
        groups.setdefault(key, []).append(r)
    used = max([1] + [max(sum(k[:-1]), k[-1]) for key in groups for k in key])
    budgets = {label: rank_budget(report, tiers) for label, tiers in bars.items()}
    # a budget far beyond every bar would squash them to slivers: it is named in the bar's label instead
    end = max([used] + [b for b in budgets.values() if b <= _BUDGET_SCALE * used])

    figure = Figure(figsize=(11, 1.6 + _INCH_PER_PANEL * len(groups)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    for ax, members in zip(axes, groups.values(), strict=True):
        for y, (label, tiers) in enumerate(bars.items()):
            _draw_bar(ax, y, label, members[0], tiers, budgets[label], end)
        ax.set_yticks(range(len(bars)), list(bars))
        ax.invert_yaxis()
        coords = members[0].coords
        ax.set_title(f"ranks {_ranges(r.rank for r in members)} (pp, dp, sp, tp = {coords})", fontsize=9, loc="left")
    unit, unit_name = _binary_unit(end)
    ticks = MaxNLocator(nbins=6).tick_values(0, end * _AXIS_ROOM / unit)
    axes[-1].set_xticks([t * unit for t in ticks], [f"{t:g}" for t in ticks])
    axes[-1].set_xlim(0, end * _AXIS_ROOM)
    axes[-1].set_xlabel(f"{unit_name} per rank (cpu and nvme budgets: the node's, divided by its ranks)")
    handles = [Patch(color=c, label=n) for n, c in zip(SEGMENTS, COLORS, strict=True)]
    handles += [
        Line2D([], [], color="black", linewidth=2, label="budget"),
        Line2D([], [], marker="o", color="black", linestyle="", markersize=4, label="predicted peak"),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    figure.suptitle(verdict_title(report), fontsize=10, color="black" if report.fits else "darkred")
    figure.savefig(Path(path), format="png", dpi=100)
    return figure


def _draw_bar(ax: Axes, y: int, label: str, rank: RankEstimate, tiers: tuple[str, ...], budget: int, end: int) -> None:
    """`rank`'s stacked bar over `tiers` at row `y`, its peak dot, its budget tick (when on the scale), a label."""
    left, peak = 0, sum(rank.peak(t) for t in tiers)
    for (name, nbytes), color in zip(segment_bytes(rank, tiers).items(), COLORS, strict=True):
        ax.barh(y, nbytes, left=left, height=0.6, color=color, gid=f"{label}/{name}")
        left += nbytes
    ax.plot([peak], [y], "o", color="black", markersize=4)
    over, shown = peak > budget, budget <= end
    if shown:
        ax.vlines(budget, y - 0.42, y + 0.42, colors="red" if over else "black", linewidth=2)
    limit = f"budget {format_bytes(budget)}" + ("" if shown else " (off the scale)")
    ax.text(
        max(left, peak, budget if shown else 0) + end * 0.01,
        y,
        f"peak {format_bytes(peak)} / {limit}" + ("  OVER" if over else ""),
        va="center",
        fontsize=8,
        color="red" if over else "black",
    )
