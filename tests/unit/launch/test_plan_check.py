"""`tidal launch --plan-check`: the job is planned before any worker starts; one that does not fit starts
nothing and prints the plan with its fix. The launcher is replaced by a recorder, so nothing is spawned.

The job: a tiny GPT-2 config.json (2 layers, width 64), micro-batch 4 x 64 tokens, 2 ranks on one node, a GPU
budget given by --gpu-mem (so the result does not depend on this machine's GPUs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tidal.launch import cli
from tidal.launch.local import LaunchOptions
from tidal.memory.planner import Budgets, plan

TINY_GPT2 = {"model_type": "gpt2", "vocab_size": 512, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4}


@pytest.fixture
def job(tmp_path: Path) -> tuple[str, str]:
    """(model config.json, script): the script is never run."""
    model = tmp_path / "config.json"
    model.write_text(json.dumps(TINY_GPT2))
    script = tmp_path / "train.py"
    script.write_text("raise SystemExit('the launcher was mocked; this must not run')\n")
    return str(model), str(script)


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[LaunchOptions]:
    """The options of every launch `tidal launch` asked for."""
    calls: list[LaunchOptions] = []

    def record(opts: LaunchOptions) -> int:
        calls.append(opts)
        return 0

    monkeypatch.setattr(cli, "launch", record)
    return calls


def _argv(model: str, script: str, gpu_mem: str) -> list[str]:
    flags = ["--nproc-per-node", "2", "--set", "train.micro_batch_size=4", "--seq", "64"]
    return ["launch", *flags, "--plan-check", "--plan-model", model, "--gpu-mem", gpu_mem, "--cpu-mem", "1TiB", script]


def test_a_job_that_fits_launches(job, launched, capsys: pytest.CaptureFixture) -> None:
    model, script = job
    assert cli.main(_argv(model, script, "1GiB")) == 0
    assert len(launched) == 1 and launched[0].target == script and launched[0].nproc_per_node == 2
    out = capsys.readouterr().out
    assert "plan fits" in out and "world 2" in out and len(out.strip().splitlines()) == 1


def test_a_job_that_does_not_fit_starts_nothing_and_prints_the_fix(job, launched, capsys) -> None:
    model, script = job
    budgets = Budgets(device=2**30, cpu=2**40, nvme=0, ranks_per_node=2)
    fitting = plan(model, {"train": {"micro_batch_size": 4}}, 2, budgets, seq_len=64)
    tight = str(int(fitting.usage["device"] * 0.8))
    assert cli.main(_argv(model, script, tight)) == 1
    assert launched == []
    captured = capsys.readouterr()
    assert "verdict: does not fit (device); smallest change that fits" in captured.out
    assert "  --set " in captured.out  # the fix, as flags this command takes
    assert "nothing was started" in captured.err


def test_plan_check_needs_a_model_and_the_plan_flags_need_plan_check(job, launched, capsys) -> None:
    model, script = job
    assert cli.main(["launch", "--plan-check", script]) == 2
    assert "add --plan-model MODEL" in capsys.readouterr().err
    assert cli.main(["launch", "--plan-model", model, "--gpu-mem", "80GiB", script]) == 2
    assert "--plan-model, --gpu-mem only matter with --plan-check" in capsys.readouterr().err
    assert launched == []
