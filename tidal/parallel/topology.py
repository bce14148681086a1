"""One topology for every parallel dimension.

The world's ranks form a 4-D grid ``(pp, dp, sp, tp)``, pipeline outermost and tensor innermost (tensor
groups talk the most, so they get the closest, fastest-linked ranks). Experts use a second view of the
same ranks, ``(pp, edp, ep, tp)``, where the ``dp x sp`` block is re-read as ``edp x ep`` with ``ep``
inner: ``ep * edp == dp * sp``.

A rank's coordinates are its index in a row-major reshape of ``range(world)``::

    rank = ((pp_i * dp + dp_i) * sp + sp_i) * tp + tp_i

Worked example, 8 ranks, ``pp=2, dp=2, sp=1, tp=2, ep=2``::

    grid[pp][dp][sp][tp]               expert grid[pp][edp][ep][tp]  (edp = dp*sp/ep = 1)
    pp=0: dp=0 -> [0, 1]               pp=0: edp=0 -> ep=0 -> [0, 1]
          dp=1 -> [2, 3]                              ep=1 -> [2, 3]
    pp=1: dp=0 -> [4, 5]               pp=1: edp=0 -> ep=0 -> [4, 5]
          dp=1 -> [6, 7]                              ep=1 -> [6, 7]

    group("tp") of rank 5 = (4, 5)     tp_i varies, all else fixed
    group("dp") of rank 5 = (5, 7)     dp_i varies
    group("pp") of rank 5 = (1, 5)     pp_i varies: stage 0 sends to stage 1 along it
    group("ep") of rank 5 = (5, 7)     experts of one layer are spread over these ranks
    group("dp_sp") of rank 5 = (5, 7)  gradients of non-expert parameters are reduced over these

`RankGrid` holds the arithmetic and needs no process group, so it can be checked exhaustively; a
`Topology` adds the torch `DeviceMesh` objects and process groups on top of one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

DIMS = ("pp", "dp", "sp", "tp")
"""Dimensions of the main grid, outermost first."""
EXPERT_DIMS = ("pp", "edp", "ep", "tp")
"""Dimensions of the expert grid, outermost first."""
COMBINED = {"dp_sp": ("dp", "sp"), "world": DIMS}
"""Groups that span several dimensions of the main grid."""
GROUP_NAMES = DIMS + ("ep", "edp") + tuple(COMBINED)


class TopologyError(ValueError):
    """Parallel sizes that do not fit the world; the message names the sizes and the valid choices."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_divides(name: str, size: int, total: int, what: str) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise TopologyError(f"{name}={size!r} must be a positive integer")
    if total % size:
        choices = ", ".join(map(str, _divisors(total)))
        raise TopologyError(f"{name}={size} does not divide {what} {total}; choose {name} in {{{choices}}}")


@dataclass(frozen=True)
class RankGrid:
    """The rank arithmetic of a topology: sizes, coordinates and group members, with no process group.

    Build it with `RankGrid.create`, which checks the sizes; ``dp=None`` fills the ranks left over.
    """

    world_size: int
    pp: int
    dp: int
    sp: int
    tp: int
    ep: int

    @classmethod
    def create(
        cls, world_size: int, *, pp: int = 1, dp: int | None = None, sp: int = 1, tp: int = 1, ep: int = 1
    ) -> RankGrid:
        """Check the sizes against the world and return the grid.

        Raises:
            TopologyError: a size is not a positive integer, does not divide what is left of the world,
                or the sizes multiply to another number than the world size. The message lists the
                values that would work.
        """
        if not isinstance(world_size, int) or world_size < 1:
            raise TopologyError(f"world size {world_size!r} must be a positive integer")
        _check_divides("tp", tp, world_size, "world size")
        _check_divides("sp", sp, world_size // tp, "world size / tp =")
        _check_divides("pp", pp, world_size // (tp * sp), "world size / (tp*sp) =")
        rest = world_size // (pp * sp * tp)
        if dp is None:
            dp = rest
        elif not isinstance(dp, int) or isinstance(dp, bool) or dp < 1:
            raise TopologyError(f"dp={dp!r} must be a positive integer, or left unset to fill the world")
        elif dp != rest:
            raise TopologyError(
                f"pp={pp} x dp={dp} x sp={sp} x tp={tp} = {pp * dp * sp * tp} ranks, but the world size is "
                f"{world_size}; choose dp={rest} or leave dp unset to fill the world"
            )
        _check_divides("ep", ep, dp * sp, "dp*sp =")
        return cls(world_size, pp, dp, sp, tp, ep)

    @property
    def edp(self) -> int:
        """Expert data parallel size: replicas of each expert, dp*sp/ep."""
        return self.dp * self.sp // self.ep

    def shape(self, expert: bool = False) -> tuple[int, ...]:
        """Sizes of the main grid's dimensions (or the expert grid's), outermost first."""
        if expert:
            return (self.pp, self.edp, self.ep, self.tp)
        return (self.pp, self.dp, self.sp, self.tp)

    def size(self, name: str) -> int:
        """Number of ranks in one group called `name` (see `GROUP_NAMES`)."""
        return math.prod(self.shape(name in EXPERT_DIMS[1:3])[i] for i in self._axes(name))

    def coords(self, rank: int, expert: bool = False) -> tuple[int, ...]:
        """The rank's index along each dimension of the main (or expert) grid."""
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank {rank} is outside the world of {self.world_size} ranks")
        out = []
        for size in reversed(self.shape(expert)):
            out.append(rank % size)
            rank //= size
        return tuple(reversed(out))

    def rank_at(self, coords: tuple[int, ...], expert: bool = False) -> int:
        """Inverse of `coords`: the global rank at these grid coordinates."""
        rank = 0
        for c, size in zip(coords, self.shape(expert), strict=True):
            rank = rank * size + c
        return rank

    def group_ranks(self, name: str, rank: int) -> tuple[int, ...]:
        """Global ranks, ascending, of the group called `name` that holds `rank`."""
        expert = name in EXPERT_DIMS[1:3]
        axes = self._axes(name)
        shape = self.shape(expert)
        base = list(self.coords(rank, expert))
        members = []
        for flat in range(math.prod(shape[a] for a in axes)):
            for a in reversed(axes):
                base[a] = flat % shape[a]
                flat //= shape[a]
            members.append(self.rank_at(tuple(base), expert))
        return tuple(sorted(members))

    def all_groups(self, name: str) -> list[tuple[int, ...]]:
        """Every group called `name`, each as ascending global ranks, ordered by their first rank."""
        return sorted({self.group_ranks(name, r) for r in range(self.world_size)})

    @staticmethod
    def _axes(name: str) -> tuple[int, ...]:
        if name in COMBINED:
            return tuple(DIMS.index(d) for d in COMBINED[name])
        if name in DIMS:
            return (DIMS.index(name),)
        if name in ("ep", "edp"):
            return (EXPERT_DIMS.index(name),)
        raise KeyError(f"no group called {name!r}; groups are {', '.join(GROUP_NAMES)}")


class Topology:
    """The immutable parallel layout of a job: a `RankGrid` plus its DeviceMeshes and process groups.

    Needs an initialised default process group (``tidal.init()`` makes one). Every rank must build the
    same Topology at the same time, since creating groups is collective.

    Args:
        pp, dp, sp, tp, ep: parallel sizes; ``dp=None`` fills the ranks left after pp*sp*tp.
        device_type: "cpu" or "cuda", the device type of the meshes.
    Raises:
        TopologyError: sizes that do not fit the world (see `RankGrid.create`).
    """

    __slots__ = ("grid", "device_type", "global_rank", "mesh", "expert_mesh", "_dp_sp_mesh")

    def __init__(
        self,
        *,
        pp: int = 1,
        dp: int | None = None,
        sp: int = 1,
        tp: int = 1,
        ep: int = 1,
        device_type: str = "cpu",
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("Topology needs a process group; call tidal.init() first")
        grid = RankGrid.create(dist.get_world_size(), pp=pp, dp=dp, sp=sp, tp=tp, ep=ep)
        setattr_ = object.__setattr__
        setattr_(self, "grid", grid)
        setattr_(self, "device_type", device_type)
        setattr_(self, "global_rank", dist.get_rank())
        mesh = DeviceMesh(device_type, _arange(grid.shape()), mesh_dim_names=DIMS)
        setattr_(self, "mesh", mesh)
        setattr_(
            self,
            "expert_mesh",
            DeviceMesh(device_type, _arange(grid.shape(True)), mesh_dim_names=EXPERT_DIMS),
        )
        # Built now, not on first use: creating a group is collective, and only some ranks may ask.
        setattr_(self, "_dp_sp_mesh", mesh["dp", "sp"]._flatten("dp_sp"))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Topology is immutable; build a new one instead of setting {name!r}")

    def __repr__(self) -> str:
        g = self.grid
        return f"Topology(world={g.world_size}, pp={g.pp}, dp={g.dp}, sp={g.sp}, tp={g.tp}, ep={g.ep})"

    def submesh(self, name: str) -> DeviceMesh:
        """The 1-D DeviceMesh of the group called `name` that holds this rank (for DTensor/FSDP2)."""
        if name == "dp_sp":
            return self._dp_sp_mesh
        if name == "world":
            raise KeyError("the world has no 1-D submesh; use topology.mesh")
        RankGrid._axes(name)
        return self.expert_mesh[name] if name in ("ep", "edp") else self.mesh[name]

    def group(self, name: str) -> dist.ProcessGroup:
        """The process group called `name` that holds this rank; names are in `GROUP_NAMES`."""
        if name == "world":
            return dist.group.WORLD
        return self.submesh(name).get_group()

    def size(self, name: str) -> int:
        """Number of ranks in the group called `name`."""
        return self.grid.size(name)

    def rank(self, name: str) -> int:
        """This rank's index inside its group called `name`."""
        return self.ranks(name).index(self.global_rank)

    def ranks(self, name: str) -> tuple[int, ...]:
        """Global ranks, ascending, of this rank's group called `name`."""
        return self.grid.group_ranks(name, self.global_rank)

    @property
    def pp_prev_rank(self) -> int:
        """Global rank of the previous pipeline stage (the last stage wraps to the first: interleaving)."""
        stages = self.ranks("pp")
        return stages[(self.rank("pp") - 1) % len(stages)]

    @property
    def pp_next_rank(self) -> int:
        """Global rank of the next pipeline stage (the last stage wraps to the first: interleaving)."""
        stages = self.ranks("pp")
        return stages[(self.rank("pp") + 1) % len(stages)]

    @property
    def is_first_stage(self) -> bool:
        return self.rank("pp") == 0

    @property
    def is_last_stage(self) -> bool:
        return self.rank("pp") == self.grid.pp - 1


def _arange(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.arange(math.prod(shape)).reshape(shape)
