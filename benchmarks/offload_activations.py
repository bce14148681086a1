"""Activation offload: peak activation bytes in compute memory and step time, against keep-all and full
recompute, side by side in one run.

    python benchmarks/offload_activations.py --dir /path/on/nvme        # GPT-2 8 x 512, seq 512: 2-4 min
    python benchmarks/offload_activations.py --quick                    # a smoke run, seconds
    python benchmarks/offload_activations.py --min-bytes 4194304 --keep-last 1 --prefetch-layers 2
    python benchmarks/offload_activations.py --nvme-engine threads     # the thread pool instead of kernel AIO

Model: a GPT-2 (or `--model llama`) from a transformers config, random init from one seed: `--layers`
blocks of `--width` (64 per head), vocabulary `--vocab`, causal-LM loss on one fixed batch of
`--batch` x `--seq` random tokens, AdamW, on the CPU. Every mode is wrapped by `tidal.wrap`
(zero.stage=0) and trains the same steps on the same batch (the losses printed must agree):

- keep (the baseline): no activation offload, autograd keeps every saved tensor;
- nvme: `offload.activations.device=nvme` in a temporary directory under `--dir` (default: the
  system temp dir), with `--min-bytes`, `--prefetch-layers`, `--nvme-threads` and `--keep-last`
  (policy "keep" on the last blocks: backward needs their tensors first);
- cpu: the same with `device=cpu`. On this CPU-only machine "the device" is host memory itself, so a
  CPU store moves bytes from one place in RAM to another and frees nothing: its row shows what the
  hooks and copies cost and what a GPU would gain. The meaningful row here is nvme;
- hooks: nvme's hooks and bookkeeping with a store that moves nothing (`_HooksOnly`: a "write" keeps
  the tensor where it is, a "read" hands it back), so its row is what the saved-tensor hooks cost
  before any transfer: the part of nvme's slowdown no I/O engine can remove;
- recompute: policy "recompute" on every block (non-reentrant checkpointing, nothing offloaded).

"Activation bytes in compute memory" are the storages alive that exist for the step's activations,
counted by tidal's dispatch-level `LiveTensorTracker` (by storage identity, until the storage dies) in
separate, untimed memory steps after the timed ones:

- every storage an op makes during the forward: saved tensors autograd keeps (the inputs a
  checkpointed block saves included), sources of offload writes not finished yet (the store holds
  them until written), forward temporaries while they live;
- in backward: the buffers the offload reads stored tensors back into (prefetched or on demand),
  counted from their allocation (the store's read and allocation are wrapped for that step), and
  every storage a recomputed block makes while it runs its forward again.

Not counted: parameters, gradients and optimizer state, backward's own temporaries, the CPU store's
buffers and the NVMe engine's bounce buffers (host memory on a GPU machine). Printed per mode: the
peak of that sum over forward + backward ("peak act"), the bytes alive when the forward returned
("after fwd": what the graph holds for backward), and the share moved off the device,
1 - peak(mode) / peak(keep). NVMe's peak grows when the disk falls behind the forward: a tensor stays
until written. The tracker costs a Python call per op, hence the separate steps (their time relative
to the timed steps is printed).

Timing: the five models stay built; every round runs one step of each, starting one mode later than
the round before, so drift in the machine's load hits all alike. Step times (forward + backward + AdamW
step) are medians over `--rounds` after `--warmup` untimed steps each; "CPU time" is the process's
CPU seconds per step (compute and I/O threads), which shows what the offload costs the cores even when
other jobs blur the wall clock. Also printed: the offload's counters per step, and an I/O-only line:
the same bytes in as many tensors written to, read back from and deleted in a `SwapFileStore`, no compute.

Target: nvme moves >= 50% of keep's peak activation bytes off the device at <= 1.05 x keep's step time.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from offload_overlap import LOGGING, LR

import tidal
from tidal.config import NvmeConfig
from tidal.memory.probe import format_bytes
from tidal.memory.tracker import LiveTensorTracker
from tidal.offload.activations import ActivationOffload
from tidal.offload.policy import _RecomputedForward
from tidal.offload.swap_file import SwapFileStore
from tidal.parallel.data import repeated_blocks
from tidal.runtime.device import Handle

T = TypeVar("T")

SHARE_TARGET = 0.50
SLOWDOWN_TARGET = 1.05
MODES = ("keep", "nvme", "cpu", "hooks", "recompute")
LABELS = {
    "keep": "(a) keep all",
    "nvme": "(b) offload to NVMe",
    "cpu": "(b2) offload to CPU *",
    "hooks": "(b3) hooks, no I/O",
    "recompute": "(c) full recompute",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="directory on the NVMe disk (default: a temp dir under /tmp)")
    parser.add_argument("--model", choices=("gpt2", "llama"), default="gpt2", help="model family (default gpt2)")
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks (default 8)")
    parser.add_argument("--width", type=int, default=512, help="hidden size, 64 per head (default 512)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per batch (default 1)")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default 8192)")
    parser.add_argument("--min-bytes", type=int, default=1 << 20, help="offload.activations.min_bytes (1 MiB)")
    parser.add_argument("--prefetch-layers", type=int, default=1, help="offload.activations.prefetch_layers (1)")
    parser.add_argument("--keep-last", type=int, default=0, help="last blocks with policy keep (default 0)")
    parser.add_argument("--nvme-threads", type=int, default=4, help="offload.nvme.threads (default 4)")
    parser.add_argument("--nvme-engine", choices=("auto", "aio", "threads"), default="auto", help="offload.nvme.engine")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first (default 2)")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds, one step per mode each (default 12)")
    parser.add_argument("--memory-steps", type=int, default=2, help="tracked steps per mode (default 2)")
    parser.add_argument("--io-repeats", type=int, default=3, help="I/O-only repeats (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 x 256, seq 256, 2 rounds, 64 KiB")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.width, args.seq, args.vocab, args.min_bytes = 4, 256, 256, 2048, 1 << 16
        args.warmup, args.rounds, args.memory_steps, args.io_repeats = 1, 2, 1, 1
    return args


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """A randomly initialized causal LM, the same weights for every mode (seed 0), dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, args.width // 64)
    if args.model == "gpt2":
        config = GPT2Config(
            vocab_size=args.vocab, n_positions=args.seq, n_embd=args.width, n_layer=args.layers, n_head=heads,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.width, intermediate_size=8 * args.width // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=args.seq, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def mode_config(mode: str, args: argparse.Namespace, blocks: list[str], work: str) -> dict:
    """The `tidal.wrap` config of one mode; `blocks`: the qualified names of the transformer blocks."""
    config: dict[str, Any] = {"zero": {"stage": 0}, "logging": LOGGING}
    if mode == "recompute":
        config["offload"] = {"activations": {"policy": dict.fromkeys(blocks, "recompute")}}
    elif mode in ("nvme", "cpu", "hooks"):
        kept = blocks[len(blocks) - args.keep_last :] if args.keep_last > 0 else []
        activations = {
            "device": "nvme" if mode == "hooks" else mode,
            "min_bytes": args.min_bytes,
            "prefetch_layers": args.prefetch_layers,
            "policy": dict.fromkeys(kept, "keep"),
        }
        nvme = {"threads": args.nvme_threads, "engine": args.nvme_engine}
        config["offload"] = {"activations": activations, "nvme": nvme}
        if mode != "cpu":
            activations["path"] = work
    return config


class _HooksOnly(SwapFileStore):
    """A store that moves nothing: "written" tensors stay where they are and "reads" hand them back, so the
    offload's hooks run as they do with a real store but no byte moves and no memory is freed."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self._kept: dict[str, torch.Tensor] = {}

    def write(self, key: str, tensor: torch.Tensor) -> Handle[None]:
        self._kept[key] = tensor
        return _Ready(None)

    def read(self, key: str, out: torch.Tensor | None = None) -> Handle[torch.Tensor]:
        return _Ready(self._kept[key])

    def delete(self, key: str) -> None:
        del self._kept[key]

    def __contains__(self, key: str) -> bool:
        return key in self._kept


@dataclass
class _Ready(Generic[T]):
    """A handle that is done from the start."""

    value: T

    def done(self) -> bool:
        return True

    def wait(self) -> T:
        return self.value


@dataclass
class Runner:
    """One wrapped model and what it measured."""

    mode: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    times: list[tuple[float, float, float]] = field(default_factory=list)
    """Per timed step: forward, backward and optimizer step, seconds."""
    cpu: list[float] = field(default_factory=list)
    """Per timed step: CPU time of the whole process (compute and I/O threads), seconds."""
    memory: list[tuple[int, int, float]] = field(default_factory=list)
    """Per memory step: peak activation bytes, bytes alive when the forward returned, step time (s)."""
    moved: list[tuple[int, int, int, int]] = field(default_factory=list)
    """Per timed step: offloaded bytes, offloaded tensors, prefetch hits, blocking waits."""
    losses: list[float] = field(default_factory=list)

    @property
    def offload(self) -> ActivationOffload | None:
        return tidal.engine(self.model).activation_offload

    def step(self, ids: torch.Tensor, tracker: ActivationTracker | None = None) -> None:
        """One training step on `ids`; a tracker counts its activation bytes, else its times are kept."""
        offload = self.offload
        if offload is not None:
            offload.reset_stats()
        cpu_start = time.process_time()
        start = time.perf_counter()
        with tracker.forward() if tracker is not None else contextlib.nullcontext():
            loss = self.model(ids, labels=ids).loss
        forward_end = time.perf_counter()
        loss.backward()
        backward_end = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad()
        end = time.perf_counter()
        cpu = time.process_time() - cpu_start
        self.losses.append(loss.item())
        if tracker is not None:
            self.memory.append((tracker.live.peak_bytes("cpu"), tracker.after_forward, end - start))
        else:
            self.times.append((forward_end - start, backward_end - forward_end, end - backward_end))
            self.cpu.append(cpu)
            if offload is not None and offload.store is not None:
                stats = offload.stats
                self.moved.append(
                    (stats.offloaded_bytes, stats.offloaded_tensors, stats.prefetch_hits, stats.blocking_waits)
                )

    def measure_memory(self, ids: torch.Tensor) -> None:
        """One step with its activation bytes counted (not timed)."""
        with ActivationTracker(self) as tracker:
            self.step(ids, tracker)

    @property
    def peak(self) -> int:
        """Peak activation bytes, the highest of the memory steps."""
        return max(memory[0] for memory in self.memory)

    @property
    def after_forward(self) -> int:
        """Activation bytes alive when the forward returned, the highest of the memory steps."""
        return max(memory[1] for memory in self.memory)

    def median(self, part: int | None = None) -> float:
        """Median step time (`part` 0, 1, 2: forward, backward, optimizer step), seconds."""
        return statistics.median(sum(t) if part is None else t[part] for t in self.times)

    def moved_median(self, part: int) -> float:
        """Median of one of the offload's counters per timed step (see `moved`); 0 without a store."""
        return statistics.median(moved[part] for moved in self.moved) if self.moved else 0

    def close(self) -> None:
        if self.offload is not None:
            self.offload.close()


class ActivationTracker:
    """Counts one step's activation bytes in compute memory (see the module doc): a `LiveTensorTracker`
    active in the forward and in every recomputation, told of the offload's read buffers as they are
    made. Use around one step; `forward()` around its forward."""

    def __init__(self, runner: Runner) -> None:
        self.live = LiveTensorTracker()
        self.after_forward = 0
        """Bytes counted and alive when the forward returned."""
        self._runner = runner
        self._in_forward = False
        self._undo: list[Callable[[], None]] = []

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        self._in_forward = True
        try:
            with self.live:
                yield
        finally:
            self._in_forward = False
        self.after_forward = self.live.current_bytes("cpu")

    def __enter__(self) -> ActivationTracker:
        offload = self._runner.offload
        store = offload.store if offload is not None else None
        if store is not None:
            read = store.read

            def counted_read(key: str, out: torch.Tensor | None = None) -> Any:
                if out is not None:  # a CpuStore fetch: torch.empty in backward, outside the tracker
                    self.live.track(out)
                return read(key, out)

            self._patch(store, "read", counted_read)
        if isinstance(store, SwapFileStore):
            allocate = store._allocate

            def counted_allocate(entry: Any) -> torch.Tensor:
                tensor = allocate(entry)  # in backward, where the tracker does not watch ops
                self.live.track(tensor)
                return tensor

            self._patch(store, "_allocate", counted_allocate)
        for module in self._runner.model.modules():
            recomputed = module.__dict__.get("forward")
            if isinstance(recomputed, _RecomputedForward):
                self._patch(recomputed, "forward", self._counted_recompute(recomputed.forward))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def _patch(self, owner: object, name: str, replacement: Callable[..., Any]) -> None:
        """Set `owner.name` for this step; the previous instance attribute (or none) comes back at exit."""
        missing = object()
        previous = owner.__dict__.get(name, missing)
        setattr(owner, name, replacement)
        self._undo.append(lambda: delattr(owner, name) if previous is missing else setattr(owner, name, previous))

    def _counted_recompute(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._in_forward:
                return forward(*args, **kwargs)
            with self.live:  # checkpointing runs the block again in backward
                return forward(*args, **kwargs)

        return counted


def time_io(
    directory: str, nbytes: int, tensors: int, repeats: int, threads: int, engine: str
) -> dict[str, list[tuple[float, float, float, float]]]:
    """Seconds to write, read back and delete `tensors` float32 tensors of `nbytes` bytes in all through an
    `SwapFileStore` (every transfer issued, then every handle waited on), and the CPU time the process spent
    on the three, per repeat after one uncounted, in two ways: "new keys" (fresh keys each time, deleted
    after the read, as the activation offload does) and "overwrite" (the same keys each time, not deleted)."""
    numel = max(1, nbytes // tensors // 4)
    sources = [torch.full((numel,), float(i)) for i in range(tensors)]  # torch.empty-like: not page-aligned
    results: dict[str, list[tuple[float, float, float, float]]] = {"new keys": [], "overwrite": []}
    with SwapFileStore(directory, NvmeConfig(threads=threads, engine=engine)) as store:
        for i, source in enumerate(sources):
            store.write(f"same{i}", source).wait()
        for repeat in range(-1, repeats):  # the first cycle is not counted: new mappings start slow on some hosts
            for way, prefix in (("new keys", f"new{repeat}-"), ("overwrite", "same")):
                keys = [f"{prefix}{i}" for i in range(tensors)]
                cpu = time.process_time()
                start = time.perf_counter()
                for handle in [store.write(key, source) for key, source in zip(keys, sources, strict=True)]:
                    handle.wait()
                written = time.perf_counter()
                for handle in [store.read(key) for key in keys]:
                    handle.wait()
                read = time.perf_counter()
                for key in keys if way == "new keys" else ():
                    store.delete(key)
                deleted = time.perf_counter()
                if repeat >= 0:
                    results[way].append((written - start, read - written, deleted - read, time.process_time() - cpu))
    return results


def main() -> None:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tidal.init({"logging": LOGGING})
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory(prefix="tidal-activations-", dir=args.dir) as work:
        runners: dict[str, Runner] = {}
        for mode in MODES:
            model = build_model(args)
            names = {module: name for name, module in model.named_modules()}
            blocks = [names[block] for block in repeated_blocks(model)]
            optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
            model, optimizer = tidal.wrap(model, optimizer, mode_config(mode, args, blocks, work))
            if mode == "hooks":
                offload = tidal.engine(model).activation_offload
                offload.store.close()
                offload.store = _HooksOnly(work)
            runners[mode] = runner = Runner(mode, model, optimizer)
            for _ in range(args.warmup):
                runner.step(ids)
            for warm in (runner.times, runner.cpu, runner.moved):
                warm.clear()
        for round_index in range(args.rounds):
            shift = round_index % len(MODES)
            for mode in MODES[shift:] + MODES[:shift]:
                runners[mode].step(ids)
            steps = ", ".join(f"{mode} {sum(runners[mode].times[-1]):.2f} s" for mode in MODES)
            print(f"round {round_index + 1}: {steps}", flush=True)
        for _ in range(args.memory_steps):
            for mode in MODES:
                runners[mode].measure_memory(ids)
        args.engine_used = runners["nvme"].offload.store.engine_kind
        offloaded, tensors = (int(runners["nvme"].moved_median(part)) for part in (0, 1))
        io = time_io(work, offloaded, tensors, args.io_repeats, args.nvme_threads, args.nvme_engine) if tensors else {}
        for runner in runners.values():
            runner.close()
    report(args, runners, io)


def report(
    args: argparse.Namespace, runners: dict[str, Runner], io: dict[str, list[tuple[float, float, float, float]]]
) -> None:
    keep, nvme, recompute = runners["keep"], runners["nvme"], runners["recompute"]
    spread = max(abs(a - b) for r in runners.values() for a, b in zip(r.losses, keep.losses, strict=True))
    tracked = statistics.median(r.memory[-1][2] / r.median() for r in runners.values())
    print(
        f"\nActivation offload: {args.model} {args.layers} x {args.width} (vocab {args.vocab}), batch "
        f"{args.batch} x seq {args.seq}, AdamW, zero.stage=0, {torch.get_num_threads()} torch threads\n"
        f"nvme and cpu: min_bytes {args.min_bytes}, prefetch_layers {args.prefetch_layers}, last {args.keep_last} "
        f"block(s) kept, NVMe engine {args.engine_used} ({args.nvme_threads} threads); "
        f"NVMe dir {args.dir or tempfile.gettempdir()}\n"
        f"times: medians of {args.rounds} interleaved rounds after {args.warmup} warmup steps; memory: max of "
        f"{args.memory_steps} tracked step(s) (which take {tracked:.2f} x as long); every mode's losses within "
        f"{spread:.1e} of keep's\n"
    )
    header = ("peak act", "after fwd", "off dev", "step", "fwd", "bwd", "vs keep", "CPU time")
    print(f"{'':<23}" + "".join(f"{name:>10}" for name in header))
    for mode in MODES:
        runner = runners[mode]
        memory = (
            (format_bytes(runner.peak), format_bytes(runner.after_forward), f"{1 - runner.peak / keep.peak:.0%}")
            if mode != "hooks"
            else ("-", "-", "-")  # nothing leaves: its store keeps what it is given (not necessarily as autograd did)
        )
        print(
            f"{LABELS[mode]:<23}" + "".join(f"{column:>10}" for column in memory) + f"{runner.median():>9.3f}s"
            f"{runner.median(0):>9.3f}s"
            f"{runner.median(1):>9.3f}s{runner.median() / keep.median():>10.3f}{statistics.median(runner.cpu):>9.3f}s"
        )
    print("* the CPU store is the same memory as the compute here (no GPU): the bytes it takes leave nothing")
    for mode in ("nvme", "cpu", "hooks"):
        runner = runners[mode]
        print(
            f"{mode} per step: {format_bytes(int(runner.moved_median(0)))} in {runner.moved_median(1):.0f} tensors "
            f"offloaded, prefetch hits {runner.moved_median(2):.0f}, blocking waits {runner.moved_median(3):.0f}"
        )
    offloaded, tensors = nvme.moved_median(0), nvme.moved_median(1)
    if io:
        print(
            f"\nnvme writes {offloaded / keep.median(0) / 1e9:.2f} GB/s over keep's forward "
            f"({format_bytes(int(offloaded))} in {keep.median(0):.3f} s) and reads "
            f"{offloaded / keep.median(1) / 1e9:.2f} GB/s over its backward"
        )
        for way, times in io.items():
            write, read, delete, cpu = (statistics.median(t[part] for t in times) for part in range(4))
            print(
                f"I/O only, {tensors:.0f} tensors, {way + ':':<10} write {write:.3f} s "
                f"({offloaded / write / 1e9:.2f} GB/s), read {read:.3f} s ({offloaded / read / 1e9:.2f} GB/s), "
                f"delete {delete:.3f} s; CPU time {cpu:.3f} s"
            )
    share, slowdown = 1 - nvme.peak / keep.peak, nvme.median() / keep.median()
    met = share >= SHARE_TARGET and slowdown <= SLOWDOWN_TARGET
    print(
        f"\ntarget: nvme >= {SHARE_TARGET:.0%} of activation bytes off the device at <= {SLOWDOWN_TARGET:.2f} x "
        f"keep's step: {share:.0%} at {slowdown:.3f} x: {'met' if met else 'missed'}\n"
        f"hooks alone (no I/O): {runners['hooks'].median() / keep.median():.3f} x; "
        f"full recompute: {1 - recompute.peak / keep.peak:.0%} at {recompute.median() / keep.median():.3f} x"
    )


if __name__ == "__main__":
    main()
