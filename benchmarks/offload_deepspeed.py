"""Optimizer offload to NVMe against DeepSpeed ZeRO-3 (offload_optimizer: nvme, offload_param: cpu), in one run.

    pip install deepspeed==0.19.0 && apt-get install -y libaio-dev     # its aio and CPU Adam ops build on first use
    python benchmarks/offload_deepspeed.py --dir /path/on/nvme             # three cases, 3 rounds
    python benchmarks/offload_deepspeed.py --cases balanced=512 --rounds 1 --steps 2

Model: `--layers` x (Linear(`--width`) + GELU), default 8 x 2048 (33.5M parameters, 268 MB of AdamW
state), the loss the mean square of the output on one fixed batch; every side starts from the same
seed, trains on the same batch with AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay 0.01),
and the first losses of both are printed side by side. Cases differ in the batch (`--cases
name=rows,...`): balanced 512 (compute about equal to the state's I/O), compute-heavy 2048, I/O-heavy 64.

Runners, each in its own Python process (the two runtimes never share one), in an order that starts
one runner later every round; step times are medians over `--steps` steps after `--warmup` of each round:

- DeepSpeed (the baseline): ZeRO-3, `offload_optimizer: nvme` (fp32 master and AdamW state swapped
  per sub-group, its CPU Adam), `offload_param: cpu`, aio with the same block size, queue depth and
  parallelism as tidal's NVMe engine. On the CPU accelerator DeepSpeed 0.19 counts no tensor as
  pinned, so its NVMe swapper waits on an empty aio queue and aborts; the worker makes the
  accelerator remember the buffers DeepSpeed pins and count them as pinned, as on a GPU.
- tidal: `tidal.wrap`, zero.stage=3, `offload.optimizer.device=nvme`. Parameters are not offloaded
  (tidal has no `offload.params.device=cpu` yet); on the CPU device they already live in host memory.
- compute: tidal without offload (state in memory): the step with no I/O.
- I/O: tidal's chunk files read and written through an `NvmeStore`, no compute (as in
  `offload_overlap.py`): the state's pure I/O time.

Printed per case: DeepSpeed step / tidal step beside the ideal bound (compute + I/O) / max(compute,
I/O), what a step that overlaps all I/O gains over one that overlaps none. Targets: >= 1.5 in the
balanced case (ideal about 1.66), >= 1.0 (never slower than DeepSpeed) in the others.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from offload_overlap import LOGGING, LR, build_model, make_batch, time_io, time_training

import tidal
from tidal.config import NvmeConfig

TARGETS = {"balanced": 1.5}
"""DeepSpeed step / tidal step to reach per case; other cases: 1.0."""
RESULT = "RESULT "
"""Prefix of the JSON line a worker prints last."""
RUNNERS = ("tidal", "I/O", "DeepSpeed", "compute")
"""In round 1 tidal runs first: the I/O runner reads and writes its chunk sizes."""
SHOWN_LOSSES = 3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="directory on the NVMe disk (default: a temp dir under /tmp)")
    parser.add_argument("--cases", default="balanced=512,compute-heavy=2048,io-heavy=64", help="name=batch,...")
    parser.add_argument("--width", type=int, default=2048, help="Linear layer width (default 2048)")
    parser.add_argument("--layers", type=int, default=8, help="Linear + GELU layers (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per runner and round (default 2)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per runner and round (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the runners (default 3)")
    parser.add_argument("--worker", choices=RUNNERS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="", help=argparse.SUPPRESS)
    return parser.parse_args()


def deepspeed_config(rows: int, path: str) -> dict:
    nvme = NvmeConfig()
    return {
        "train_batch_size": rows,
        "train_micro_batch_size_per_gpu": rows,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}},
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "nvme", "nvme_path": path},
            "offload_param": {"device": "cpu"},
        },
        "aio": {"block_size": nvme.block_size, "queue_depth": nvme.queue_depth, "intra_op_parallelism": nvme.threads},
        "steps_per_print": 10**9,
    }


def count_pinned_buffers() -> None:
    """Make DeepSpeed's CPU accelerator count the buffers it was asked to pin (and views into them) as
    pinned: its NVMe swapper tells its own swap buffers from the optimizer's tensors that way."""
    from deepspeed.accelerator import get_accelerator

    accelerator = type(get_accelerator())
    spans: list[tuple[int, int]] = []

    def pin_memory(self: object, tensor: torch.Tensor, align_bytes: int = 1) -> torch.Tensor:
        if tensor.numel():
            spans.append((tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()))
        return tensor

    def is_pinned(self: object, tensor: torch.Tensor) -> bool:
        return tensor.numel() > 0 and any(start <= tensor.data_ptr() < end for start, end in spans)

    accelerator.pin_memory, accelerator.is_pinned = pin_memory, is_pinned


def time_deepspeed(args: argparse.Namespace) -> dict:
    """Train under DeepSpeed in this process (a world of one); per timed step (forward + backward s, step s)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    count_pinned_buffers()
    model = build_model(args.width, args.layers)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=deepspeed_config(args.batch, args.dir)
    )
    batch = make_batch(args.batch, args.width)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = engine(batch).pow(2).mean()
        engine.backward(loss)
        backward_end = time.perf_counter()
        engine.step()
        losses.append(loss.item())
        if step >= args.warmup:
            times.append((backward_end - start, time.perf_counter() - backward_end))
    return {"times": times, "losses": losses}


def work(args: argparse.Namespace) -> dict:
    """What `--worker` measures, as the JSON-ready dict its process prints."""
    if args.worker == "DeepSpeed":
        return time_deepspeed(args)
    if args.worker == "I/O":
        return {"times": time_io(args.dir, [int(size) for size in args.sizes.split(",")], args.steps)}
    tidal.init({"logging": LOGGING})
    offload = {"optimizer": {"device": "nvme", "path": args.dir}} if args.worker == "tidal" else None
    times, sizes, losses = time_training(args, args.layers, offload)
    return {"times": times, "sizes": sizes, "losses": losses}


def run_worker(args: argparse.Namespace, runner: str, rows: int, directory: str, sizes: list[int]) -> dict:
    """Run one runner in a fresh Python process; its JSON result."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", runner, "--batch", str(rows), "--dir", directory]
    for flag in ("width", "layers", "warmup", "steps"):
        command += [f"--{flag}", str(getattr(args, flag))]
    command += ["--sizes", ",".join(map(str, sizes))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    results = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not results:
        tail = (done.stdout + done.stderr)[-3000:]
        raise SystemExit(f"the {runner} worker (batch {rows}) exited with {done.returncode}; its output ends:\n{tail}")
    return json.loads(results[-1][len(RESULT) :])


def main() -> None:
    args = parse_args()
    if args.worker:
        print(RESULT + json.dumps(work(args)), flush=True)
        return
    cases = {name: int(rows) for name, rows in (case.split("=") for case in args.cases.split(","))}
    steps: dict[tuple[str, str], list] = {(case, runner): [] for case in cases for runner in RUNNERS}
    losses: dict[tuple[str, str], list[float]] = {}
    sizes: list[int] = []
    with tempfile.TemporaryDirectory(prefix="tidal-vs-deepspeed-", dir=args.dir) as directory:
        for round_index in range(args.rounds):
            for case, rows in cases.items():
                shift = round_index % len(RUNNERS)
                for runner in RUNNERS[shift:] + RUNNERS[:shift]:
                    result = run_worker(args, runner, rows, directory, sizes)
                    sizes = result.get("sizes") or sizes
                    steps[case, runner] += result["times"]
                    losses.setdefault((case, runner), result.get("losses", []))
                    done = ", ".join(f"{sum(t) if runner != 'I/O' else min(t):.2f}" for t in result["times"])
                    print(f"round {round_index + 1}, {case}, {runner}: {done} s", flush=True)

    def median(case: str, runner: str, part: int | None = None) -> float:
        if runner == "I/O":  # the faster order of the two, serial or pipelined
            return min(statistics.median(t[way] for t in steps[case, runner]) for way in (0, 1))
        return statistics.median(sum(t) if part is None else t[part] for t in steps[case, runner])

    params = args.layers * (args.width * args.width + args.width)
    print(
        f"\ntidal optimizer offload vs DeepSpeed ZeRO-3 (offload_optimizer nvme, offload_param cpu): "
        f"{args.layers} x (Linear({args.width}) + GELU), {params / 1e6:.1f}M params, AdamW state "
        f"{8 * params / 1e6:.0f} MB in {len(sizes)} chunks\nmedians of {args.rounds} rounds x {args.steps} steps "
        f"(after {args.warmup} warmup steps) per runner and case; NVMe dir {args.dir or tempfile.gettempdir()}\n"
    )
    print("first losses (compute = tidal without offload):")
    for case in cases:
        for runner in ("compute", "tidal", "DeepSpeed"):
            shown = " ".join(f"{loss:.6e}" for loss in losses[case, runner][:SHOWN_LOSSES])
            print(f"  {case:<16}{runner:<11}{shown}")
        pairs = zip(losses[case, "tidal"][:SHOWN_LOSSES], losses[case, "DeepSpeed"][:SHOWN_LOSSES], strict=True)
        difference = max(abs(a - b) / abs(b) for a, b in pairs)
        print(f"  {case:<16}max relative difference, tidal vs DeepSpeed: {difference:.1e}")
    header = ["case", "batch", "compute", "I/O", "tidal", "(fwd+bwd", "step)", "DeepSpeed", "(fwd+bwd", "step)"]
    print(f"\n{header[0]:<16}{header[1]:>6}" + "".join(f"{h:>10}" for h in header[2:]) + "   DS/tidal  ideal  target")
    for case, rows in cases.items():
        times = [median(case, "compute"), median(case, "I/O")]
        for runner in ("tidal", "DeepSpeed"):
            times += [median(case, runner), median(case, runner, 0), median(case, runner, 1)]
        ratio = median(case, "DeepSpeed") / median(case, "tidal")
        ideal = sum(times[:2]) / max(times[:2])
        target = TARGETS.get(case, 1.0)
        verdict = "met" if ratio >= target else "missed"
        cells = "".join(f"{t:>9.2f}s" for t in times)
        print(f"{case:<16}{rows:>6}{cells}{ratio:>11.2f}{ideal:>7.2f}   >= {target} {verdict}")


if __name__ == "__main__":
    main()
