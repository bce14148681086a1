"""The `tidal` command: `tidal launch`, `tidal ray`, `tidal plan` and `tidal doctor`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tidal.config import Config, ConfigError
from tidal.launch.local import LaunchError, LaunchOptions, launch
from tidal.parallel.topology import TopologyError

if TYPE_CHECKING:
    from tidal.memory.planner import PlanReport

PARALLEL_FLAGS = ("tp", "pp", "sp", "ep", "dp")


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add a torchrun-style flag under both spellings (--nproc-per-node and --nproc_per_node)."""
    dashed = f"--{name}"
    under = dashed.replace("-", "_").replace("__", "--", 1)
    parser.add_argument(*dict.fromkeys([dashed, under]), **kwargs)


def _launch_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="start a job's ranks (torchrun-style)",
        description="Start SCRIPT (or -m MODULE) on every rank of the job; torchrun's flags work here.",
    )
    _flag(p, "nproc-per-node", type=int, default=1, help="ranks on this node (default 1)")
    _flag(p, "nnodes", default="1", help="nodes, or MIN:MAX for an elastic job (default 1)")
    _flag(p, "node-rank", type=int, default=0, help="this node's index with a static rendezvous (default 0)")
    _flag(p, "master-addr", default="127.0.0.1", help="rank 0's node for a static rendezvous")
    _flag(p, "master-port", type=int, default=None, help="its port (default: a free port on one node, else 29500)")
    _flag(p, "rdzv-endpoint", default=None, help="HOST:PORT of a c10d rendezvous (multi-node, elastic)")
    _flag(p, "rdzv-backend", default="c10d", help="rendezvous backend with --rdzv-endpoint (default c10d)")
    _flag(p, "rdzv-id", default=None, help="job id shared by the nodes of one job")
    _flag(p, "max-restarts", type=int, default=0, help="restart the whole group this many times on failure")
    _flag(p, "monitor-interval", type=float, default=0.1, help="seconds between health checks of the workers")
    _flag(p, "log-dir", default=None, help="directory for each rank's stdout/stderr files")
    _flag(p, "tee", default="3", help="copy to the console: 0 none, 1 stdout, 2 stderr, 3 both (default 3)")
    _flag(p, "redirects", default="0", help="send to log files only: 0 none, 1 stdout, 2 stderr, 3 both")
    _flag(p, "launcher", default="elastic", choices=("elastic", "mpi"), help="start ranks with elastic or mpiexec")
    _flag(p, "mpi-args", default="", help="extra mpiexec arguments, one string (with --launcher mpi)")
    p.add_argument("--standalone", action="store_true", help="accepted for torchrun compatibility (the default)")
    p.add_argument("-m", "--module", action="store_true", help="run TARGET as a module (python -m)")
    _config_flags(p)
    _plan_check_flags(p)
    p.add_argument("target", metavar="SCRIPT|MODULE")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")


def _config_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that give every rank its config: --config, --set and the parallel sizes."""
    parser.add_argument("--config", default=None, help="tidal YAML or DeepSpeed JSON config passed to every rank")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. zero.stage=3"
    )
    for name in PARALLEL_FLAGS:
        parser.add_argument(
            f"--{name}", type=int, default=None, help=f"parallel.{name} (same as --set parallel.{name}=N)"
        )


def _overrides(ns: argparse.Namespace) -> list[str]:
    """--set overrides, then the parallel-size flags as overrides."""
    return [*ns.set, *(f"parallel.{n}={getattr(ns, n)}" for n in PARALLEL_FLAGS if getattr(ns, n) is not None)]


# -- tidal ray (begin) ------------------------------------------------------------------------------


def _ray_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ray",
        help="run a job on a Ray cluster (a local Ray by default)",
        description="Run SCRIPT on --workers Ray Train workers, one rank each; without --address on a Ray "
        "started for this job on this machine. Flags go before SCRIPT; what follows it is the script's.",
    )
    p.add_argument("--workers", type=int, required=True, help="ranks of the job, one Ray worker each")
    p.add_argument("--address", default=None, help="auto, HOST:PORT or ray://HOST:PORT (default: a local Ray)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs Ray reserves per worker (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs Ray reserves per worker (default 0)")
    p.add_argument(
        "--max-failures", type=int, default=0, help="restart all workers this many times on failure (-1: no limit)"
    )
    p.add_argument("--storage", default=None, help="root of Ray Train's run directories (default ~/ray_results)")
    p.add_argument("--name", default=None, help="run directory name (default: chosen by Ray Train)")
    _config_flags(p)
    p.add_argument("target", metavar="SCRIPT")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")


def _run_ray(ns: argparse.Namespace) -> int:
    """Run `tidal ray`: 0 when the job finished, 1 when it failed beyond --max-failures."""
    from tidal.launch import ray as ray_jobs  # importing Ray takes seconds; only this command pays it

    try:
        ray_jobs.run(
            ray_jobs.Script(ns.target, tuple(ns.args)),
            workers=ns.workers,
            config=ns.config,
            overrides=_overrides(ns),
            address=ns.address,
            cpus_per_worker=ns.cpus_per_worker,
            gpus_per_worker=ns.gpus_per_worker,
            max_failures=ns.max_failures,
            storage=ns.storage,
            name=ns.name,
        )
    except ray_jobs.RayJobError as failure:
        print(f"tidal ray: {failure}", file=sys.stderr, flush=True)
        return 1
    return 0


# -- tidal ray (end) --------------------------------------------------------------------------------


# -- tidal plan (begin) -----------------------------------------------------------------------------


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    from tidal.memory.presets import PRESETS

    p = sub.add_parser(
        "plan",
        help="will a job fit: per-rank memory per tier, verdict, and the smallest change that fits",
        description="Dry run of one training step of MODEL under fake tensors (no memory, no GPU needed): "
        f"MODEL is a preset ({', '.join(PRESETS)}), a Hugging Face config.json, or module:function returning "
        "(model, example_batch). Exits 0 when it fits, 1 when it does not.",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--world", type=int, default=None, help="ranks in the job (default: product of the sizes)")
    _config_flags(p)
    p.add_argument("--zero", type=int, default=None, choices=range(4), help="zero.stage")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch (train.micro_batch_size)")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"), help="precision.dtype")
    _plan_budget_flags(p, ranks_per_node="GPUs here")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--yaml", action="store_true", help="print the config to run (tidal YAML) only")
    out.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.add_argument("--chart", default=None, metavar="FILE.png", help="also draw the per-rank breakdown as a PNG")


def _plan_budget_flags(parser: argparse._ActionsContainer, ranks_per_node: str) -> None:
    """The flags `tidal plan` and `tidal launch --plan-check` share: the sequence length and the budgets."""
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048, at most the model's)")
    parser.add_argument("--gpu-mem", default=None, help="memory per GPU, e.g. 80GiB (default: probed; none: host)")
    parser.add_argument("--cpu-mem", default=None, help="host memory per node, e.g. 512GiB (default: available here)")
    parser.add_argument("--nvme", default=None, metavar="PATH", help="NVMe directory: its free space is the budget")
    parser.add_argument(
        "--nvme-space", default=None, help="NVMe space per node instead of --nvme's free space, e.g. 4TiB"
    )
    parser.add_argument(
        "--ranks-per-node", type=int, default=None, help=f"ranks sharing a node (default: {ranks_per_node})"
    )
    parser.add_argument(
        "--gpu", default=None, metavar="NAME", help="GPU model the step time is predicted for, e.g. H100, A100"
    )
    parser.add_argument("--nvme-bw", default=None, metavar="RATE", help="NVMe bandwidth per node, e.g. 3GB/s")
    parser.add_argument("--inter-bw", default=None, metavar="RATE", help="network per GPU across nodes, e.g. 25GB/s")
    parser.add_argument("--intra-bw", default=None, metavar="RATE", help="GPU to GPU in a node, e.g. 450GB/s")


def _plan_check_flags(parser: argparse.ArgumentParser) -> None:
    """`tidal launch`'s flags that plan the job before starting it, in a group of their own in --help."""
    group = parser.add_argument_group("plan check", "plan the job as tidal plan does before starting any rank")
    group.add_argument(
        "--plan-check",
        action="store_true",
        help="start nothing when the plan does not fit (the plan and its fix are printed); needs --plan-model",
    )
    group.add_argument(
        "--plan-model", default=None, metavar="MODEL", help="the job's model for --plan-check, as tidal plan's MODEL"
    )
    _plan_budget_flags(group, ranks_per_node="--nproc-per-node")


def _plan_job(
    ns: argparse.Namespace, model: str, world: int | None, overrides: list[str], ranks_per_node: int | None
) -> PlanReport:
    """Plan `model` under --config, `overrides` and the budget flags. Raises ValueError or OSError (a bad MODEL,
    size, config or flag: the message names the fix)."""
    from tidal.memory.hardware import hardware_for, parse_rate
    from tidal.memory.planner import Budgets, plan

    config = Config.load(ns.config, overrides=overrides)
    budgets = Budgets.probe(
        gpu_mem=ns.gpu_mem, cpu_mem=ns.cpu_mem, nvme=ns.nvme, nvme_space=ns.nvme_space, ranks_per_node=ranks_per_node
    )
    rates = {"nvme_bw": ns.nvme_bw, "inter_bw": ns.inter_bw, "intra_bw": ns.intra_bw}
    hardware = hardware_for(budgets, ns.gpu, **{k: parse_rate(v) for k, v in rates.items() if v is not None})
    return plan(model, config, world, budgets, seq_len=ns.seq, hardware=hardware)


def _run_plan(ns: argparse.Namespace) -> int:
    """Run `tidal plan`: 0 when the job fits, 1 when it does not, 2 for a bad MODEL or flag."""
    import json

    from tidal.memory.report import format_plan, plan_summary

    if ns.chart is not None:
        from tidal.memory.chart import ChartError, require_matplotlib

        try:
            if not ns.chart.lower().endswith(".png"):
                raise ChartError(f"--chart {ns.chart}: the chart is a PNG; name the file FILE.png")
            require_matplotlib()
        except ChartError as err:
            print(f"tidal plan: {err}", file=sys.stderr)
            return 2
    overrides = _overrides(ns)
    flags = (("zero.stage", ns.zero), ("precision.dtype", ns.precision), ("train.micro_batch_size", ns.micro_batch))
    overrides += [f"{key}={value}" for key, value in flags]
    overrides = [o for o in overrides if not o.endswith("=None")]
    try:
        report = _plan_job(ns, ns.model, ns.world, overrides, ns.ranks_per_node)
        if ns.chart is not None:
            from tidal.memory.chart import draw_plan

            draw_plan(report, ns.chart)
            print(f"tidal plan: chart written to {ns.chart}", file=sys.stderr)
    except (ValueError, OSError) as err:  # a bad MODEL, size, config, sizes or chart path: the message names the fix
        print(f"tidal plan: {err}", file=sys.stderr)
        return 2
    if ns.json:
        print(json.dumps(plan_summary(report), indent=2))
    elif ns.yaml:
        verdict = "fits" if report.fits else "does not fit"
        applied = f"; with {' '.join(report.change.overrides)} it fits" if report.change else ""
        print(f"# tidal plan {ns.model}: {verdict}{applied}")
        print(report.runnable_config().to_yaml(), end="")
    else:
        print(format_plan(report))
        if report.change is not None:
            print("the same flags with --yaml print the config with the change applied (for --config or tidal.wrap)")
    return 0 if report.fits else 1


def _check_plan(ns: argparse.Namespace, opts: LaunchOptions) -> int | None:
    """`tidal launch --plan-check`: plan the job about to start. None when it fits (after a one-line summary),
    else the exit code: 1 when it does not fit (the plan printed as `tidal plan` prints it), 2 for bad flags.
    An elastic job (--nnodes MIN:MAX) is planned at MIN nodes, where each rank holds the most."""
    from tidal.memory.report import format_plan

    planning = ("plan_model", "seq", "gpu_mem", "cpu_mem", "nvme", "nvme_space", "ranks_per_node", "gpu", "nvme_bw")
    planning += ("inter_bw", "intra_bw")
    given = [f"--{f.replace('_', '-')}" for f in planning if getattr(ns, f) is not None]
    if not ns.plan_check:
        if given:
            print(f"tidal launch: {', '.join(given)} only matter with --plan-check; add it", file=sys.stderr)
            return 2
        return None
    if ns.plan_model is None:
        print(
            "tidal launch: --plan-check needs the job's model; add --plan-model MODEL "
            "(a preset, a Hugging Face config.json, or module:function as for tidal plan)",
            file=sys.stderr,
        )
        return 2
    world = opts.node_range()[0] * opts.nproc_per_node
    try:
        report = _plan_job(ns, ns.plan_model, world, list(opts.overrides), ns.ranks_per_node or opts.nproc_per_node)
    except (ValueError, OSError) as err:
        print(f"tidal launch: --plan-check: {err}", file=sys.stderr)
        return 2
    if not report.fits:
        print(format_plan(report))
        fix = "add the --set lines above to this command" if report.change else "change the job"
        print(f"tidal launch: the planner says this job does not fit; nothing was started ({fix})", file=sys.stderr)
        return 1
    from tidal.memory.probe import format_bytes

    used = ", ".join(
        f"{t} {format_bytes(report.usage[t])}"
        + (" (the host's, in cpu)" if report.limit(t) is None else f" of {format_bytes(report.limit(t))}")
        for t in report.usage
    )
    print(f"tidal launch: plan fits: {report.model}, world {world}: {used}; starting", flush=True)
    return None


# -- tidal plan (end) -------------------------------------------------------------------------------


def _doctor_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="what this machine offers tidal", description="One screen on this machine.")
    p.add_argument("--dir", default=".", help="directory whose space and O_DIRECT bandwidth to measure")
    p.add_argument("--size-mb", type=int, default=64, help="MiB written and read for the bandwidth test")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidal", description="Distributed training and offloading for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _launch_parser(sub)
    _ray_parser(sub)
    _plan_parser(sub)
    _doctor_parser(sub)
    return parser


def launch_options(ns: argparse.Namespace) -> LaunchOptions:
    """Turn parsed `tidal launch` flags into LaunchOptions; the config is checked here, before any rank starts."""
    overrides = _overrides(ns)
    Config.load(ns.config, overrides=overrides)
    return LaunchOptions(
        target=ns.target,
        args=tuple(ns.args),
        module=ns.module,
        nproc_per_node=ns.nproc_per_node,
        nnodes=ns.nnodes,
        node_rank=ns.node_rank,
        master_addr=ns.master_addr,
        master_port=ns.master_port,
        rdzv_endpoint=ns.rdzv_endpoint,
        rdzv_backend=ns.rdzv_backend,
        rdzv_id=ns.rdzv_id,
        max_restarts=ns.max_restarts,
        monitor_interval=ns.monitor_interval,
        log_dir=ns.log_dir,
        tee=ns.tee,
        redirects=ns.redirects,
        config_file=ns.config,
        overrides=tuple(overrides),
        launcher=ns.launcher,
        mpi_args=tuple(ns.mpi_args.split()),
    )


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        if ns.command == "launch":
            opts = launch_options(ns)
            refused = _check_plan(ns, opts)
            return launch(opts) if refused is None else refused
        if ns.command == "ray":
            return _run_ray(ns)
        if ns.command == "plan":
            return _run_plan(ns)
        from tidal.launch import doctor

        return doctor.run(ns.dir, ns.size_mb << 20)
    except (ConfigError, LaunchError, TopologyError) as err:
        print(f"tidal {ns.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
