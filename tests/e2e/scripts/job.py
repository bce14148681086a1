"""A worker for the launch tests: joins the job, reports its groups, runs steps, can fail on purpose.

Each rank writes <out>/rank<R>.json with its groups and the pids of itself and a grandchild it spawns,
so the tests can check group members and that no process outlives the launcher.
"""

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist

import tidal

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--step-seconds", type=float, default=0.0)
parser.add_argument("--fail-rank", type=int, default=None)
parser.add_argument("--fail-step", type=int, default=2)
parser.add_argument("--fail-once", action="store_true", help="fail only while <out>/failed-once is absent")
args = parser.parse_args()

torch.set_num_threads(1)
ctx = tidal.init()
topo, rank = ctx.topology, ctx.rank
out = Path(args.out)
grandchild = subprocess.Popen(["sleep", "300"])
report = {
    "rank": rank,
    "world": ctx.world_size,
    "source": ctx.process.source,
    "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
    "pids": [os.getpid(), grandchild.pid],
    "groups": {name: list(topo.ranks(name)) for name in ("pp", "dp", "sp", "tp", "ep", "edp", "dp_sp")},
    "zero_stage": ctx.config.zero.stage,
    "tp": topo.size("tp"),
}
# The groups must carry traffic, not only exist: a sum over each group equals the sum of its members.
for name in ("tp", "dp"):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=topo.group(name))
    report[f"sum_{name}"] = t.item()
(out / f"rank{rank}.json").write_text(json.dumps(report))

for step in range(1, args.steps + 1):
    if rank == args.fail_rank and step == args.fail_step:
        marker = out / "failed-once"
        if not args.fail_once or not marker.exists():
            marker.touch()
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
    t = torch.ones(4)
    dist.all_reduce(t)
    time.sleep(args.step_seconds)
    print(f"step {step} sum {t[0].item():.0f}", flush=True)

grandchild.kill()
grandchild.wait()
tidal.shutdown()
