"""The main job: examples/train_gpt.py, an ordinary loop plus `tidal.wrap`, under `tidal launch`."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[2] / "examples" / "train_gpt.py"
TIDAL = shutil.which("tidal")
SMALL = ["--steps", "12", "--layers", "2", "--width", "64", "--seq", "64"]
pytestmark = [
    pytest.mark.skipif(TIDAL is None, reason="the tidal command is not installed (pip install -e .)"),
    pytest.mark.timeout(240),
]


def _train(tmp_path: Path, name: str, *launch_args: str) -> list[float]:
    out = tmp_path / f"{name}.json"
    cmd = [TIDAL, "launch", *launch_args, str(EXAMPLE), *SMALL, "--losses-out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[rank0]: step 12/12" in res.stdout
    return json.loads(out.read_text())["losses"]


def test_two_ranks_train_like_one(tmp_path):
    one = _train(tmp_path, "one", "--nproc-per-node", "1")
    two = _train(tmp_path, "two", "--nproc-per-node", "2", "--set", "zero.stage=2")
    assert len(one) == len(two) == 12
    assert one[-1] < one[0] - 1.0, f"the loss must fall: {one}"
    assert two == pytest.approx(one, abs=1e-4)
