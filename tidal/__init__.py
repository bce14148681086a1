"""tidal: distributed training and offloading for PyTorch.

ctx = tidal.init()              # rank, world, device and Topology from the launcher's environment
ctx.topology.group("tp")        # process groups by name
tidal.shutdown()
tidal.ray.run(train, workers=4)  # a job on Ray (imported on first use: importing Ray takes seconds)
"""

from tidal.config import Config, ConfigError
from tidal.parallel.topology import Topology, TopologyError
from tidal.runtime.context import Context, init, shutdown
from tidal.runtime.engine import Engine, engine, wrap

__all__ = [
    "Config",
    "ConfigError",
    "Context",
    "Engine",
    "Topology",
    "TopologyError",
    "engine",
    "init",
    "shutdown",
    "wrap",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """`tidal.ray` (tidal.launch.ray) is imported on first access, so `import tidal` stays fast."""
    if name == "ray":
        from tidal.launch import ray

        return ray
    raise AttributeError(f"module 'tidal' has no attribute {name!r}")
