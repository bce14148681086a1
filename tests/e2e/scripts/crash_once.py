"""Run a training script, but kill one rank's process at one step the first time through.

    crash_once.py --rank 1 --step 6 --marker DIR/killed SCRIPT [ARGS...]

Every `tidal.wrap` the script calls arms a hook after each optimizer step: on rank RANK, once the engine
reaches STEP and while MARKER does not exist, it creates MARKER and sends itself SIGKILL (a process death,
not a Python error). A restarted job finds MARKER and runs through. Each rank first prints one line
saying where tidal.init placed it, so a test can check discovery and the rank prefix of its output.
"""

import argparse
import os
import runpy
import signal
import sys
from pathlib import Path

import tidal

parser = argparse.ArgumentParser()
parser.add_argument("--rank", type=int, required=True)
parser.add_argument("--step", type=int, required=True)
parser.add_argument("--marker", type=Path, required=True)
parser.add_argument("script")
parser.add_argument("args", nargs=argparse.REMAINDER)
args = parser.parse_args()
wrap = tidal.wrap


def wrap_and_arm(*wrap_args, **wrap_kwargs):
    model, optimizer = wrap(*wrap_args, **wrap_kwargs)
    engine = tidal.engine(model)
    ctx = engine.context
    print(f"armed: rank {ctx.rank} of {ctx.world_size}, found by {ctx.process.source}", flush=True)

    def kill_once(*_):
        if ctx.rank == args.rank and engine.global_step == args.step and not args.marker.exists():
            args.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    optimizer.register_step_post_hook(kill_once)
    return model, optimizer


tidal.wrap = wrap_and_arm
sys.argv = [args.script, *args.args]
sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
runpy.run_path(args.script, run_name="__main__")
