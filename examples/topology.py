"""Join a job and show the parallel groups each rank belongs to.

tidal launch --nproc-per-node 4 --tp 2 examples/topology.py
"""

import torch
import torch.distributed as dist

import tidal

ctx = tidal.init()
topo = ctx.topology
groups = ", ".join(f"{name}={list(topo.ranks(name))}" for name in ("pp", "dp", "sp", "tp", "ep"))
# One all-reduce per group proves the groups carry traffic: each sums its members' ranks.
sums = {}
for name in ("dp", "tp"):
    t = torch.tensor([float(ctx.rank)])
    dist.all_reduce(t, group=topo.group(name))
    sums[name] = int(t.item())
print(f"{topo} rank {ctx.rank} on {ctx.device.type}: {groups}; rank sums {sums}", flush=True)
tidal.shutdown()
