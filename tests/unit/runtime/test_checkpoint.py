"""Checkpoints in one process, no process group: round trips, the `latest` pointer, pruning, crashes."""

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from tidal.runtime.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tidal.runtime.rng import capture_rng, restore_rng


def make_state(seed: int) -> dict:
    """A state shaped like the engine's: dotted fqns, optimizer state, python values in param_groups."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"layer.0.weight": torch.randn(5, 3, generator=g), "layer.0.bias": torch.randn(3, generator=g)},
        "optim": {
            "state": {
                "layer.0.weight": {
                    "exp_avg": torch.randn(5, 3, generator=g),
                    "exp_avg_sq": torch.rand(5, 3, generator=g),
                    "step": torch.tensor(float(seed)),
                }
            },
            "param_groups": [
                {
                    "lr": 1e-3 * seed,
                    "betas": (0.9, 0.95),
                    "weight_decay": 0.1,
                    "foreach": None,
                    "amsgrad": False,
                    "params": ["layer.0.weight", "layer.0.bias"],
                }
            ],
        },
    }


def blank_state() -> dict:
    """The same keys and shapes as `make_state`, with zeros and other python values."""
    state = make_state(0)
    for t in (state["model"]["layer.0.weight"], state["model"]["layer.0.bias"]):
        t.zero_()
    for t in state["optim"]["state"]["layer.0.weight"].values():
        t.zero_()
    state["optim"]["param_groups"] = [
        {"lr": 9.0, "betas": (0.0, 0.0), "weight_decay": 0.0, "foreach": True, "amsgrad": True, "params": ["x", "y"]}
    ]
    return state


def assert_same(actual, expected) -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e)
    else:
        assert actual == expected and type(actual) is type(expected)


def save(root: Path, step: int, seed: int | None = None, **kwargs) -> Path:
    return save_checkpoint(root, step, make_state(step if seed is None else seed), {"step": step}, **kwargs)


def test_round_trip_restores_tensors_python_values_and_extras_in_place(tmp_path):
    state = make_state(3)
    scheduler = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.zeros(1)], lr=0.1), step_size=2)
    extras = {"step": 3, "rng": capture_rng(), "scheduler": scheduler.state_dict(), "config": {"a": [1, "b"]}}
    path = save_checkpoint(tmp_path, 3, state, extras)
    assert path == tmp_path / "step-00000003" and latest_checkpoint(tmp_path) == path
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 3 and meta["world_size"] == 1 and meta["extras"] == ["extras-rank0.pt"]
    assert meta["tidal_version"] and meta["time"]

    fresh = blank_state()
    weight = fresh["model"]["layer.0.weight"]
    loaded = load_checkpoint(tmp_path, fresh)
    assert fresh["model"]["layer.0.weight"] is weight, "tensors load in place"
    assert_same(fresh, state)  # python values of param_groups come back too, tuples as tuples
    assert_same(loaded, extras)
    assert_same(torch.load(path / "extras-rank0.pt", weights_only=True), extras)
    assert_same(load_checkpoint(path, blank_state()), extras), "a checkpoint directory loads as well as its root"


def test_latest_names_the_newest_and_keep_prunes_the_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003", "step-00000004"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000004"
    state = blank_state()
    assert load_checkpoint(tmp_path, state) == {"step": 4}
    assert_same(state, make_state(4))


def test_keep_never_deletes_the_checkpoint_latest_names(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 5, keep=1)  # a rolled-back job: the newest save has the lower step
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000005"
    assert_same(load_checkpoint(tmp_path, blank_state()), {"step": 5})


@pytest.mark.parametrize("latest_names_it", [True, False])
def test_saving_the_same_step_twice_replaces_it(tmp_path, latest_names_it):
    save(tmp_path, 3, seed=1)
    if not latest_names_it:
        save(tmp_path, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # replacing leaves nothing behind for the next save to warn about
        save(tmp_path, 3, seed=2)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000003"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    state = blank_state()
    load_checkpoint(tmp_path / "step-00000003", state)
    assert_same(state, make_state(2))


def assert_previous_checkpoint_intact(root: Path) -> None:
    assert latest_checkpoint(root) == root / "step-00000001"
    state = blank_state()
    assert load_checkpoint(root, state) == {"step": 1}
    assert_same(state, make_state(1))


def test_a_full_disk_during_the_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", full_disk)
    with pytest.raises(CheckpointError, match=r"writing the state to .*\.tmp-step-00000002.*No space left") as err:
        save(tmp_path, 2)
    assert str(tmp_path) in str(err.value)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"], "the failed save is removed"
    assert_previous_checkpoint_intact(tmp_path)


def fail_renames(monkeypatch, refuse, error: OSError) -> None:
    """Make os.rename raise `error` for a source directory whose name `refuse` accepts."""
    real_rename = os.rename

    def rename(src, dst):
        if refuse(Path(src).name):
            raise error
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)


def test_a_failed_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1)
    denied = PermissionError(errno.EACCES, "Permission denied")
    fail_renames(monkeypatch, lambda name: name.startswith(".tmp-step-00000002"), denied)
    with pytest.raises(CheckpointError, match=r"publishing .*\.tmp-step-00000002.* failed: .*Permission denied"):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"], "the failed save is removed"
    assert_previous_checkpoint_intact(tmp_path)


def test_a_failed_replace_puts_the_old_checkpoint_of_that_step_back(tmp_path, monkeypatch):
    save(tmp_path, 1)
    new_one = re.compile(r"\.tmp-step-00000001-[0-9a-f]+")  # not the old one moved aside ("-replaced")
    fail_renames(monkeypatch, new_one.fullmatch, OSError(errno.EIO, "Input/output error"))
    with pytest.raises(CheckpointError, match="publishing .* failed: .*Input/output error"):
        save(tmp_path, 1, seed=2)
    monkeypatch.undo()
    state = blank_state()
    assert load_checkpoint(tmp_path / "step-00000001", state) == {"step": 1}
    assert_same(state, make_state(1))
    state = blank_state()
    load_checkpoint(tmp_path, state)  # `latest` names the hard-linked copy, which holds the same values
    assert_same(state, make_state(1))


CRASHING_SAVE = """
import os, signal, sys
import torch
import torch.distributed.checkpoint as dcp
sys.path.insert(0, {tests!r})
from test_checkpoint import save

root, mode = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
save(root, 1)

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def die_on_rename(prefix):
    real = os.rename
    os.rename = lambda src, dst: die() if os.path.basename(src).startswith(prefix) else real(src, dst)

if mode == "after_state":  # DCP wrote the state; no extras, no meta.json yet
    real = dcp.save
    dcp.save = lambda *a, **k: (real(*a, **k), die())
elif mode == "at_rename":  # the directory is complete, not yet renamed into place
    die_on_rename(".tmp-step-00000002")
elif mode == "at_latest":  # step-2 is in place, `latest` not yet replaced
    os.replace = die
elif mode == "mid_swap":  # re-saving step 1: the old directory moved away, the new one not yet in
    die_on_rename(".tmp-step-00000001")
save(root, 2 if mode != "mid_swap" else 1, seed=2)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["after_state", "at_rename", "at_latest", "mid_swap"])
def test_a_killed_save_leaves_latest_at_a_complete_checkpoint(tmp_path, mode):
    script = CRASHING_SAVE.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), mode], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr

    found = latest_checkpoint(tmp_path)
    assert found is not None and (found / "meta.json").is_file()
    state = blank_state()
    assert load_checkpoint(tmp_path, state) == {"step": 1}
    assert_same(state, make_state(1))

    stale = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-"))
    assert bool(stale) == (mode != "at_latest")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save(tmp_path, 3)
    reports = [str(w.message) for w in caught if "interrupted saves" in str(w.message)]
    if stale:
        assert len(reports) == 1 and all(name in reports[0] for name in stale), reports
    else:
        assert not reports
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000003"


def test_a_root_that_cannot_be_created_names_the_path(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    root = tmp_path / "file" / "checkpoints"
    with pytest.raises(CheckpointError, match=rf"{root}.*make {root} a writable directory"):
        save(root, 1)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_root_names_the_path(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match=rf"{tmp_path}.*Permission denied"):
            save(tmp_path, 1)
    finally:
        tmp_path.chmod(0o700)


def test_a_missing_root_is_created_by_save_and_rejected_by_load(tmp_path):
    root = tmp_path / "a" / "b"
    assert latest_checkpoint(root) is None
    with pytest.raises(CheckpointError, match=rf"{root} does not exist"):
        load_checkpoint(root, blank_state())
    save(root, 1)
    assert latest_checkpoint(root) == root / "step-00000001"


def test_latest_that_names_a_missing_or_partial_checkpoint_is_an_error(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        load_checkpoint(tmp_path, blank_state())
    save(tmp_path, 1)
    save(tmp_path, 2)
    (tmp_path / "step-00000002" / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"names .*step-00000002, which has no meta.json"):
        latest_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("step-00000009\n")
    with pytest.raises(CheckpointError, match=r"names .*step-00000009, which does not exist"):
        load_checkpoint(tmp_path, blank_state())


def test_a_key_the_checkpoint_lacks_names_the_checkpoint(tmp_path):
    path = save(tmp_path, 1)
    state = blank_state()
    state["model"]["extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=rf"loading the state from {path} failed: .*extra.weight"):
        load_checkpoint(tmp_path, state)


def test_extras_that_weights_only_loading_cannot_read_are_refused_before_writing(tmp_path):
    save(tmp_path, 1)
    with pytest.raises(CheckpointError, match=r"extras\['rng'\]\['numpy'\] cannot be read back .*numpy"):
        save_checkpoint(tmp_path, 2, make_state(2), {"rng": {"numpy": np.random.get_state()}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]


def test_a_python_value_that_weights_only_loading_refuses_is_not_unpickled(tmp_path):
    state = make_state(1)
    state["fraction"] = Fraction(1, 3)  # DCP pickles it; loading it would need weights_only=False
    path = save_checkpoint(tmp_path, 1, state, {})
    blank = blank_state()
    blank["fraction"] = None
    with pytest.raises(CheckpointError, match=rf"loading the state from {path} failed: .*fractions.Fraction"):
        load_checkpoint(tmp_path, blank)


@pytest.mark.parametrize(("step", "keep"), [(-1, None), (1.5, None), (1, 0)])
def test_bad_step_or_keep_is_refused(tmp_path, step, keep):
    with pytest.raises(ValueError, match="step=|keep="):
        save_checkpoint(tmp_path, step, make_state(1), {}, keep=keep)


def draw() -> tuple:
    return torch.rand(4), [random.random() for _ in range(4)], np.random.rand(4)


def test_rng_capture_and_restore_reproduce_the_sequences(tmp_path):
    states = capture_rng()
    first = draw()
    restore_rng(states)
    again = draw()
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and np.array_equal(first[2], again[2])

    save_checkpoint(tmp_path, 1, make_state(1), {"rng": states})
    draw()
    restore_rng(load_checkpoint(tmp_path, blank_state())["rng"])
    loaded = draw()
    assert torch.equal(first[0], loaded[0]) and first[1] == loaded[1] and np.array_equal(first[2], loaded[2])
