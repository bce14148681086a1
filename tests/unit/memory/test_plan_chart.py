"""`tidal plan --chart`: the PNG is written, its bars are the report's numbers, and without matplotlib the
command stops before planning with the extra to install.

The model is a tiny GPT-2 (2 layers, width 64) on two pipeline stages, so the chart has two panels (the
stages' ranks differ); the optimizer state is offloaded so the cpu bar is not empty.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from tidal.launch.cli import main
from tidal.memory import planner
from tidal.memory.estimate import TIERS
from tidal.memory.planner import Budgets, PlanReport, plan

TINY_GPT2 = {"model_type": "gpt2", "vocab_size": 512, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4}
CONFIG = {"device": "cpu", "parallel": {"pp": 2}, "offload": {"optimizer": {"device": "cpu"}}}


@pytest.fixture
def tiny_gpt2(tmp_path: Path) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_GPT2))
    return str(path)


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _plan(tiny_gpt2: str, device_budget: int) -> PlanReport:
    budgets = Budgets(device=device_budget, cpu=2**34, nvme=0, ranks_per_node=2)
    return plan(tiny_gpt2, CONFIG, 2, budgets, micro_batch=4, seq_len=64)


def test_chart_bars_are_the_reports_numbers(tiny_gpt2: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from tidal.memory.chart import draw_plan

    report = _plan(tiny_gpt2, device_budget=16 * 2**20)
    path = tmp_path / "plan.png"
    figure = draw_plan(report, path)
    width, height = _png_size(path)
    assert 800 <= width <= 2000 and 300 <= height <= 2000 and path.stat().st_size > 10_000
    axes = figure.axes
    assert len(axes) == 2  # two pipeline stages: two distinct ranks
    assert axes[1].get_title(loc="left").startswith("ranks 1 (pp, dp, sp, tp = (1, 0, 0, 0))")
    rank = report.estimate.ranks[0]
    expected = {
        "params": rank.params,
        "grads": rank.grads,
        "optimizer state": rank.optimizer + rank.masters,
        "activations": rank.activations,
        "buffers": rank.buffers(),
    }
    bars = {patch.get_gid(): patch for patch in axes[0].patches}
    for tier in TIERS:
        left = 0
        for name, nbytes in expected.items():
            bar = bars[f"{tier}/{name}"]
            assert (bar.get_x(), bar.get_width()) == (left, nbytes[tier]), f"{tier}/{name}"
            left += nbytes[tier]
    assert rank.optimizer.cpu > 0 and rank.masters.cpu > 0  # offloaded: the cpu bar holds both, in one segment
    budget_ticks = [seg[0][0] for c in axes[0].collections for seg in c.get_segments()]
    assert report.budgets.device in budget_ticks
    assert figure.get_suptitle().splitlines()[1] == "fits"


def test_chart_title_gives_the_change_and_the_host_bar_joins_device_and_cpu(tiny_gpt2: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from tidal.memory.chart import draw_plan

    fitting = _plan(tiny_gpt2, device_budget=16 * 2**20)
    tight = _plan(tiny_gpt2, device_budget=int(fitting.usage["device"] * 0.8))
    assert not tight.fits and tight.change is not None
    title = draw_plan(tight, tmp_path / "tight.png").get_suptitle()
    assert "does not fit (device)" in title and tight.change.overrides[0] in title.replace("\n", " ")

    host = plan(tiny_gpt2, CONFIG, 2, Budgets(None, 2**34, 0, None), micro_batch=4, seq_len=64)
    axes = draw_plan(host, tmp_path / "host.png").axes
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["host", "nvme"]
    rank = host.estimate.ranks[0]
    bars = {patch.get_gid(): patch.get_width() for patch in axes[0].patches}
    assert bars["host/params"] == rank.params.device + rank.params.cpu
    assert bars["host/optimizer state"] == (rank.optimizer + rank.masters).device + (rank.optimizer + rank.masters).cpu


def test_cli_chart_writes_the_png(tiny_gpt2: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "cli.png"
    flags = ["plan", tiny_gpt2, "--micro-batch", "4", "--seq", "64", "--cpu-mem", "1TiB", "--chart", str(path)]
    assert main(flags) == 0
    assert _png_size(path)[0] > 0 and f"chart written to {path}" in capsys.readouterr().err


def test_cli_chart_without_matplotlib_stops_before_planning(
    tiny_gpt2: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError

    def no_planning(*args, **kwargs) -> None:
        raise AssertionError("planned although the chart cannot be drawn")

    monkeypatch.setattr(planner, "plan", no_planning)
    assert main(["plan", tiny_gpt2, "--chart", str(tmp_path / "x.png")]) == 2
    assert "pip install 'tidal[plot]'" in capsys.readouterr().err
    assert main(["plan", tiny_gpt2, "--chart", str(tmp_path / "x.pdf")]) == 2
    assert "name the file FILE.png" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.*"))
