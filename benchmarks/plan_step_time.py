"""The planner's predicted step time on this host against a measured training step, one process.

    python benchmarks/plan_step_time.py        # GPT-2 shapes, fp32, one thread: ~1 min

The model is a GPT-2 built from a transformers config with random weights; `tidal.memory.planner.plan` on
this host (no GPU: the device is this CPU, measured by `tidal.memory.hardware.measure_host`) predicts one
step, then the same model trains through `tidal.wrap` with AdamW and the median of 5 steps (after one
warm-up) is the measurement. error = predicted / measured - 1. Elementwise ops (softmax, GELU, norms) count
no FLOPs in the prediction, so it reads low where they weigh.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time

import torch

import tidal
from tidal.memory.planner import Budgets, plan

VOCAB = 8192
SHAPES = (  # (layers, width, micro-batch, sequence)
    (4, 512, 4, 256),
    (2, 1024, 2, 256),
)
LOGGING = {"logging": {"progress": False, "interval": 1000}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(config: dict, micro: int, seq: int) -> float:
    import transformers as tf

    model = tf.GPT2LMHeadModel(tf.GPT2Config(**config))
    model, optimizer = tidal.wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-4), LOGGING)
    ids = torch.randint(0, VOCAB, (micro, seq), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(6):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    tidal.init(LOGGING)
    host = Budgets(device=None, cpu=1 << 50, nvme=0, ranks_per_node=None)
    head = ("layers", 6), ("width", 6), ("batch", 9), ("predicted s", 12), ("compute s", 10), ("measured s", 11)
    print(" ".join(f"{name:>{width}}" for name, width in head), f"{'error':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for layers, width, micro, seq in SHAPES:
            config = {"n_layer": layers, "n_embd": width, "n_head": 8, "vocab_size": VOCAB, "n_positions": seq}
            path = os.path.join(tmp, "config.json")
            with open(path, "w") as f:
                json.dump({"model_type": "gpt2", **config}, f)
            report = plan(path, {"device": "cpu"}, 1, host, micro_batch=micro, seq_len=seq, search=False)
            real = measure(config, micro, seq)
            t = report.time
            print(
                f"{layers:>6} {width:>6} {f'{micro}x{seq}':>9} {t.seconds:>12.3f} {t.compute:>10.3f} {real:>11.3f} "
                f"{t.seconds / real - 1:>+7.1%}"
            )
    tidal.shutdown()


if __name__ == "__main__":
    main()
