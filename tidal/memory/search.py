"""The planner's search: which change to a job that does not fit (or, with `--world` and no sizes, which
parallel layout) gives the fastest predicted step that fits.

    layouts = parallel_layouts(spec, report, cache)     # tp x pp x ZeRO stage, the global batch kept
    change = search_change(spec, report, cache, layouts) # Change(overrides, re-planned report) or None

Candidates are every layout with every combination of the knobs' levels (ZeRO stage, activation recompute
or offload, optimizer offload, parameter offload, a smaller micro-batch), ranked by predicted step time
(`tidal.memory.cost`; ties: fewest knobs, then the cheapest levels) and checked for memory in that order, so
the first that fits is the fastest. Candidates whose model states alone exceed the device are skipped
unchecked. A change that offloads the optimizer gets the largest `offload.optimizer.ratio` that still fits.
For llama-70b on 64 H100s (bf16, micro-batch 1 x 4096) that is 438 candidates ranked and 5 memory checks,
about 3 s after the 16 s trace that every candidate reuses.
"""

from __future__ import annotations

import heapq
import itertools
import math

from tidal.config import Config
from tidal.memory.planner import Budgets, Change, PlanReport, _Cache, _evaluate, _limit, _predict, plan
from tidal.memory.presets import ModelSpec
from tidal.memory.shape import ModelShape, held_params, rank_blocks
from tidal.parallel.data import repeated_blocks

RATIO_LEVELS = 64
"""`offload.optimizer.ratio` is chosen among multiples of 1/min(chunks offloaded, this), count."""
Layouts = list[tuple[tuple[str, ...], Config]]
"""(overrides, the config with them) per parallel layout."""


_Knobs = list[list[tuple[tuple[str, ...], int]]]


def _knobs(
    spec: ModelSpec, config: Config, budgets: Budgets, dp_sp: int, pattern: str | None, zero: bool = True
) -> _Knobs:
    """The changes tried, per knob: its levels as (overrides, cost rank); a knob already used is left out, and
    the ZeRO stage when `zero` is False (the parallel-size search sets it). `pattern`: `_blocks_pattern`."""
    c, b = config, budgets
    nvme = b.nvme_path
    knobs: _Knobs = []
    if dp_sp > 1 and zero:
        knobs.append([((f"zero.stage={s}",), s) for s in range(c.zero.stage + 1, 4)])
    a = c.offload.activations
    if a.device == "none" and not a.policy and pattern:
        levels = [((f'offload.activations.policy={{"{pattern}": recompute}}',), 3)]
        if b.device is not None:
            levels.append((("offload.activations.device=cpu",), 5))
        if nvme:
            levels.append((("offload.activations.device=nvme", f"offload.activations.path={nvme}/activations"), 7))
        knobs.append(levels)
    if c.offload.optimizer.device == "none":
        levels = [(("offload.optimizer.device=cpu",), 4)]
        if nvme:
            levels.append((("offload.optimizer.device=nvme", f"offload.optimizer.path={nvme}/optimizer"), 6))
        knobs.append(levels)
    if c.offload.params.device == "none" and b.device is not None and (zero or c.zero.stage == 3):
        zero3 = ("zero.stage=3",) if c.zero.stage < 3 else ()
        levels = [((*zero3, "offload.params.device=cpu"), 8)]
        if nvme:
            levels.append(((*zero3, "offload.params.device=nvme", f"offload.params.path={nvme}/params"), 9))
        knobs.append(levels)
    micro, steps = c.train.micro_batch_size, c.train.gradient_accumulation_steps
    smaller = [micro // 2**k for k in range(1, micro.bit_length()) if micro % 2**k == 0]
    if smaller and spec.example_batch is None:
        pipeline = c.parallel.pipeline
        levels = []
        for i, m in enumerate(smaller):
            if c.parallel.pp > 1:  # the pipeline's micro-batches are its accumulation
                more = (f"parallel.pipeline.microbatches={(pipeline.microbatches or c.parallel.pp) * micro // m}",)
            else:
                more = () if c.train.global_batch_size else (f"train.gradient_accumulation_steps={steps * micro // m}",)
            levels.append(((f"train.micro_batch_size={m}", *more), 10 + i))
        knobs.append(levels)
    return knobs


def _blocks_pattern(spec: ModelSpec) -> str | None:
    """A policy glob matching the repeated blocks: "model.layers.*" for "model.layers.0", ...; None: no blocks."""
    blocks = repeated_blocks(spec.model)
    if not blocks:
        return None
    names = {id(m): n for n, m in spec.model.named_modules()}
    return f"{names[id(blocks[0])].rpartition('.')[0]}.*"


def _changes(knobs: _Knobs) -> list[tuple[int, int, tuple[str, ...]]]:
    """Every combination of knob levels, none included, as (knobs used, cost rank, overrides)."""
    out = [(0, 0, ())]
    for count in range(1, len(knobs) + 1):
        for chosen in itertools.combinations(knobs, count):
            for levels in itertools.product(*chosen):
                overrides = [o for settings, _ in levels for o in settings]
                keys = [o.partition("=")[0] for o in dict.fromkeys(overrides)]
                if len(keys) == len(set(keys)):  # two knobs setting one key differently: the other combination
                    out.append((count, sum(cost for _, cost in levels), tuple(dict.fromkeys(overrides))))
    return out


def parallel_layouts(spec: ModelSpec, report: PlanReport, cache: _Cache) -> Layouts:
    """Parallel sizes to try, as (overrides, config): tp dividing the world, at most a node's ranks, that the
    tensor plan accepts; pp dividing the layer count; dp the rest; every ZeRO stage when dp*sp > 1. The global
    batch stays the config's: the micro-batches per step (accumulation, or the pipeline's) make it up."""
    from tidal.parallel.tensor import TensorParallelError

    c, world = report.config, report.world_size
    par, micro = c.parallel, c.train.micro_batch_size
    per_node = min(report.budgets.ranks_per_node or world, world)
    replicas = world // (par.sp * par.tp * par.pp)
    steps = (par.pipeline.microbatches or par.pp) if par.pp > 1 else c.train.gradient_accumulation_steps
    samples = c.train.global_batch_size or replicas * micro * steps
    layers = len(repeated_blocks(spec.model))
    out = []
    for tp in (d for d in range(1, min(per_node, world // par.sp) + 1) if world // par.sp % d == 0):
        try:
            cache.shape(spec, tp, par.ep)
        except (TensorParallelError, ValueError):
            continue
        rest = world // (par.sp * tp)
        for pp in (d for d in range(1, layers + 1) if layers % d == 0 and rest % d == 0):
            dp = rest // pp
            per_step, extra = divmod(samples, dp * micro)
            if extra or not per_step or (dp * par.sp) % par.ep:
                continue
            if pp > 1 and (per_step < pp or par.pipeline.schedule == "interleaved" and per_step % pp):
                continue
            if pp > 1:
                batch = [f"parallel.pipeline.microbatches={per_step}", "train.gradient_accumulation_steps=1"]
            else:
                batch = [f"train.gradient_accumulation_steps={per_step}"]
            for stage in range(4) if dp * par.sp > 1 else (c.zero.stage,):
                wanted = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"zero.stage={stage}", *batch]
                changed = tuple(o for o in wanted if c.with_overrides([o]) != c)
                out.append((changed, c.with_overrides(changed)))
    return out


def _device_floor(shape: ModelShape, config: Config, world: int, slots: int) -> int:
    """A lower bound of the device bytes of the fullest rank: its parameters, gradients and optimizer state
    alone (as `estimate` lays them out; offloaded ones left out), to skip candidates that cannot fit."""
    par, z = config.parallel, config.zero.stage
    n = world // (par.pp * par.tp * par.sp) * par.sp
    offloaded = config.offload.optimizer.device != "none"
    floor = 0.0
    for pp_rank in range(par.pp):
        blocks, first, last = rank_blocks(len(shape.block_params), par.pp, par.pipeline.stages_per_rank, pp_rank)
        root, held_blocks = held_params(shape, blocks, first, last, par.pp)
        held = root + sum(held_blocks)
        params = 0 if z == 3 and config.offload.params.device != "none" else held / (n if z == 3 else 1)
        grads = 0 if offloaded else held / (n if z >= 2 else 1)
        state = 0 if offloaded else held * slots / (n if z >= 1 else 1)
        floor = max(floor, params + grads + state)
    return int(floor)


def _fits_floor(report: PlanReport, shape: ModelShape, config: Config) -> bool:
    b, slots = report.budgets, report.estimate.optimizer.slots
    floor = _device_floor(shape, config, report.world_size, slots)
    if b.device is not None:
        return floor <= b.device
    return floor * min(b.ranks_per_node or report.world_size, report.world_size) <= b.cpu


def search_change(
    spec: ModelSpec, report: PlanReport, cache: _Cache, layouts: Layouts, sized: bool = False
) -> Change | None:
    """The fastest change that fits: every layout with every combination of knob levels, taken best first by
    predicted step time (ties: fewest knobs, then the cheapest levels), memory checked in that order; the
    first that fits, re-planned from scratch, wins. A change offloading the optimizer is ranked by a bound
    (all chunks on the device, without their update) and, when it fits, gets the largest
    `offload.optimizer.ratio` that still fits, then is ranked again by its own time. `sized`: the layouts
    set the ZeRO stage (`parallel_layouts`), so it is no knob."""
    hardware, budgets, world, seq = report.hardware, report.budgets, report.world_size, report.seq_len
    slots = report.estimate.optimizer.slots
    heap: list[tuple[float, int, int, int, tuple[str, ...], PlanReport | None]] = []
    order, pattern = itertools.count(), _blocks_pattern(spec)
    args = (world, budgets, seq, cache, hardware, slots)
    for layout, base in layouts:
        dp_sp = world // (base.parallel.pp * base.parallel.tp)
        shape = cache.shape(spec, base.parallel.tp, base.parallel.ep)
        for count, cost, overrides in _changes(_knobs(spec, base, budgets, dp_sp, pattern, zero=not sized)):
            config = base.with_overrides(overrides)
            if not _fits_floor(report, shape, config):
                continue
            if _ratio_chosen(overrides):  # any ratio takes at least this: all on the device, less its update
                bound = _predict(spec, config.with_overrides(["offload.optimizer.ratio=1"]), *args)
                seconds = bound.seconds - bound.update
            else:
                seconds = _predict(spec, config, *args).seconds
            merged = tuple({o.partition("=")[0]: o for o in (*layout, *overrides)}.values())  # a knob's last
            heapq.heappush(heap, (seconds, count, cost, next(order), merged, None))
    while heap:
        _, count, cost, _, overrides, final = heapq.heappop(heap)
        if final is not None:
            return Change(overrides, final)
        config = report.config.with_overrides(overrides)
        try:
            evaluated = _evaluate(spec, config, world, budgets, seq, cache, hardware)
        except ValueError:  # sizes the model's pipeline or tensor plan cannot take
            continue
        if _ratio_chosen(overrides):  # the host may be short at ratio 0 and not at the ratio chosen
            ratio = _largest_ratio(spec, evaluated, cache)
            if ratio:
                overrides = (*overrides, f"offload.optimizer.ratio={ratio}")
                config = report.config.with_overrides(overrides)
                evaluated = _evaluate(spec, config, world, budgets, seq, cache, hardware)
        if not evaluated.fits:
            continue
        fresh = _Cache()
        fresh.profiles, fresh.shapes = cache.profiles, cache.shapes  # traces are deterministic; estimates anew
        again = plan(spec, config, world, budgets, seq_len=seq, search=False, hardware=hardware, _cache=fresh)
        if again.fits:
            heapq.heappush(heap, (again.time.seconds, count, cost, next(order), overrides, again))
    return None


def _ratio_chosen(overrides: tuple[str, ...]) -> bool:
    return any(o.startswith("offload.optimizer.device=") for o in overrides)


def ratio_levels(report: PlanReport) -> int:
    """Steps `offload.optimizer.ratio` is chosen in: the most optimizer chunks a rank of `report` (planned at
    ratio 0) offloads, at most `RATIO_LEVELS`."""
    o = report.config.offload.optimizer
    offloaded = max(r.optimizer[o.device] + r.masters[o.device] for r in report.estimate.ranks)
    return min(RATIO_LEVELS, math.ceil(offloaded / (o.chunk_mb * 2**20)))


def _largest_ratio(spec: ModelSpec, fitting: PlanReport, cache: _Cache) -> float:
    """The largest `offload.optimizer.ratio` (a multiple of 1/n, n the most chunks a rank offloads, at most
    `RATIO_LEVELS`) at which the device still holds `fitting` (planned at ratio 0): the least PCIe/NVMe
    traffic and host work, and the least host memory (so a job short of host memory at ratio 0 may fit
    there). 0 when the device is short at ratio 0 already. Interpolated from the device use at 0 and 1,
    then bisected."""
    c, b, n = fitting.config, fitting.budgets, ratio_levels(fitting)
    at = {0: fitting}
    tier = "device" if b.device is not None else "cpu"

    def fits(k: int) -> bool:
        if k not in at:
            config = c.with_overrides([f"offload.optimizer.ratio={round(k / n, 6)}"])
            at[k] = _evaluate(spec, config, fitting.world_size, b, fitting.seq_len, cache, fitting.hardware)
        return at[k].usage[tier] <= _limit(b, tier)

    if n == 0 or not fits(0):
        return 0.0
    if fits(n):
        return 1.0
    start, end = at[0].usage[tier], at[n].usage[tier]
    guess = min(n - 1, max(1, int(n * (_limit(b, tier) - start) / max(1, end - start))))
    low, high = 0, n  # fits at low, not at high
    tries = [guess, guess + 1] if fits(guess) else [guess, guess - 1]  # the interpolation is usually right
    while high - low > 1:
        k = tries.pop() if tries and low < tries[-1] < high else (low + high) // 2
        low, high = (k, high) if fits(k) else (low, k)
    return round(low / n, 6)
