"""Capacity: the largest GPT-style model that trains two AdamW steps on this machine, plain PyTorch
against tidal with the optimizer state and the parameters offloaded to NVMe.

    python benchmarks/offload_capacity.py --dir /path/on/nvme   # plain at 20 and 24 layers, tidal at 78: ~20 min
    python benchmarks/offload_capacity.py --quick               # tiny sizes: a smoke run of every path

Every size runs in a fresh subprocess that builds a GPT-2 from a transformers config (random init,
fp32, width `--width`, `--seq` positions, GPT-2's 50257-token vocabulary, tied embeddings), makes
`torch.optim.AdamW(fused=True)` and trains two steps on one random sequence of `--seq` tokens:

- plain: the model, its gradients and AdamW's two state tensors in memory (16 bytes per parameter
  before activations): the loop a user writes without tidal;
- tidal: the same loop after `tidal.wrap` with zero.stage=3, `offload.params.device=nvme` and
  `offload.optimizer.device=nvme` in `--dir`: between steps only the model's skeleton is in memory;
  in backward each optimizer chunk is updated (and its gradients freed) as soon as its gradients are
  in, so the peak is the model built in memory before it is wrapped (4 bytes per parameter, once).

A size "completes" when both steps finish with finite losses. A size that does not is reported with
how it failed: killed by the kernel's out-of-memory killer, or torch's allocation error. Printed per
size: parameters, peak resident memory (the child's ru_maxrss), wall time, and the bytes tidal's
files took on disk at their largest; then the ratio of the largest tidal model that completed to the
largest plain one (target >= 3). The plain sizes bracket plain PyTorch's limit: the larger one is
meant to fail, which shows the smaller one is (close to) the largest; tidal's largest completed size
is a lower bound of its own limit.

Needs free memory (run it alone on the machine) and, for the default tidal size, ~50 GB free in
`--dir`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

GB = 10**9
TARGET = 3.0
VOCAB = 50257
RESULT = "RESULT "


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="directory on the NVMe disk (default: a temp dir under /tmp)")
    parser.add_argument("--width", type=int, default=2048, help="hidden size (default 2048, 16 heads of 128)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per step and positions (default 128)")
    parser.add_argument("--plain", type=int, nargs="*", default=[20, 24], help="plain PyTorch layer counts")
    parser.add_argument("--tidal", type=int, nargs="*", default=[78], help="tidal layer counts")
    parser.add_argument("--chunk-mb", type=float, default=256.0, help="offload.optimizer.chunk_mb (default 256)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one size may take (default 1800)")
    parser.add_argument("--quick", action="store_true", help="width 256, 2-4 layers: checks every path in seconds")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.width, args.seq, args.plain, args.tidal = 256, 64, [2], [4]
    return args


def gpt2_params(width: int, layers: int, seq: int) -> int:
    """GPT-2's parameter count: tied embeddings, 12 w^2 + 13 w per block, a final LayerNorm."""
    return VOCAB * width + seq * width + layers * (12 * width * width + 13 * width) + 2 * width


# -- the child: one size, one mode ---------------------------------------------------------------------


def train(spec: dict) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import tidal

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=spec["seq"],
        n_embd=spec["width"],
        n_layer=spec["layers"],
        n_head=max(1, spec["width"] // 128),
        use_cache=False,
    )
    start = time.perf_counter()
    model = GPT2LMHeadModel(config)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    built = time.perf_counter()
    if spec["mode"] == "tidal":
        tidal.init({"logging": {"progress": False, "interval": 10**9}})
        path = spec["dir"]
        offload = {
            "params": {"device": "nvme", "path": path},
            "optimizer": {"device": "nvme", "path": path, "chunk_mb": spec["chunk_mb"]},
        }
        logging = {"progress": False, "interval": 10**9}
        model, optimizer = tidal.wrap(model, optimizer, {"zero": {"stage": 3}, "offload": offload, "logging": logging})
    ids = torch.randint(0, VOCAB, (1, spec["seq"]), generator=torch.Generator().manual_seed(1))
    losses, disk = [], 0
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        disk = max(disk, _disk_bytes(spec["dir"]))
    return {
        "params": params,
        "losses": losses,
        "build_s": built - start,
        "train_s": time.perf_counter() - built,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "disk": disk,
    }


def _disk_bytes(path: str | None) -> int:
    """Bytes the files under `path` take on disk (allocated blocks)."""
    if path is None:
        return 0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # a temporary file renamed meanwhile
                total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total


# -- the parent ----------------------------------------------------------------------------------------


def run_size(args: argparse.Namespace, mode: str, layers: int, work: str) -> dict:
    """Train one size in a fresh process; the result, or how it failed."""
    directory = tempfile.mkdtemp(prefix=f"{mode}-{layers}-", dir=work) if mode == "tidal" else None
    spec = {
        "mode": mode,
        "layers": layers,
        "width": args.width,
        "seq": args.seq,
        "dir": directory,
        "chunk_mb": args.chunk_mb,
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"failed": f"no result in {args.timeout:.0f} s"}
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
    wall = time.perf_counter() - start
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            result = json.loads(line[len(RESULT) :])
            if not all(math.isfinite(v) for v in result["losses"]):
                return {**result, "failed": f"non-finite loss {result['losses']}"}
            return {**result, "wall_s": wall}
    if done.returncode == -signal.SIGKILL:
        return {"failed": "killed (out of memory)", "wall_s": wall}
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    if "can't allocate memory" in tail or "MemoryError" in tail or "out of memory" in tail.lower():
        return {"failed": f"out of memory: {tail[:100]}", "wall_s": wall}
    return {"failed": f"exit {done.returncode}: {tail[:160]}", "wall_s": wall}


def main() -> None:
    args = parse_args()
    if args.child is not None:
        print(RESULT + json.dumps(train(json.loads(args.child))), flush=True)
        return
    from tidal.memory.probe import format_bytes

    total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(
        f"Capacity: GPT-2 width {args.width}, {args.seq} tokens, AdamW (fused), two steps; "
        f"{format_bytes(total_memory)} of memory, {os.cpu_count()} cores; NVMe dir {args.dir or tempfile.gettempdir()}"
    )
    print(f"{'mode':<7}{'layers':>7}{'params':>10}{'peak RSS':>12}{'disk':>12}{'wall':>9}  outcome")
    best = {"plain": 0, "tidal": 0}
    with tempfile.TemporaryDirectory(prefix="tidal-capacity-", dir=args.dir) as work:
        for mode, sizes in (("plain", args.plain), ("tidal", args.tidal)):
            for layers in sizes:
                result = run_size(args, mode, layers, work)
                params = result.get("params", gpt2_params(args.width, layers, args.seq))
                outcome = result.get("failed") or "completed, losses " + ", ".join(f"{v:.3f}" for v in result["losses"])
                if "failed" not in result:
                    best[mode] = max(best[mode], params)
                rss = format_bytes(result["peak_rss"]) if "peak_rss" in result else "-"
                disk = format_bytes(result["disk"]) if result.get("disk") else "-"
                wall = f"{result['wall_s']:.0f} s" if "wall_s" in result else "-"
                print(f"{mode:<7}{layers:>7}{params / 1e9:>9.2f}B{rss:>12}{disk:>12}{wall:>9}  {outcome}", flush=True)
    if best["plain"] and best["tidal"]:
        ratio = best["tidal"] / best["plain"]
        verdict = "met" if ratio >= TARGET else "missed"
        print(
            f"\nlargest completed: plain {best['plain'] / 1e9:.2f}B, tidal {best['tidal'] / 1e9:.2f}B parameters; "
            f"ratio {ratio:.2f} (target >= {TARGET}: {verdict})"
        )
    else:
        print(f"\nno ratio: a mode completed no size ({best})")


if __name__ == "__main__":
    main()
