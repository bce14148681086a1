"""Topology: group members against a brute-force enumeration of the rank grid, for worlds of 1-8 ranks.

The mesh side runs on torch's fake process group (one process plays each rank in turn), so every
factorisation of every world size is checked against the real DeviceMesh groups without 8 processes.
"""

import itertools

import pytest
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from tidal.parallel.topology import GROUP_NAMES, RankGrid, Topology, TopologyError


def _layouts(world: int):
    """Every (pp, dp, sp, tp, ep) with pp*dp*sp*tp == world and ep dividing dp*sp."""
    divs = [d for d in range(1, world + 1) if world % d == 0]
    for pp, dp, sp in itertools.product(divs, repeat=3):
        if world % (pp * dp * sp):
            continue
        tp = world // (pp * dp * sp)
        for ep in range(1, dp * sp + 1):
            if (dp * sp) % ep == 0:
                yield pp, dp, sp, tp, ep


def _brute_force_groups(pp: int, dp: int, sp: int, tp: int, ep: int) -> dict[str, dict[int, tuple]]:
    """For each group name, rank -> members, found by listing the grid in rank order."""
    main = list(itertools.product(range(pp), range(dp), range(sp), range(tp)))
    edp = dp * sp // ep
    expert = list(itertools.product(range(pp), range(edp), range(ep), range(tp)))
    varying = {
        "pp": (main, {0}),
        "dp": (main, {1}),
        "sp": (main, {2}),
        "tp": (main, {3}),
        "dp_sp": (main, {1, 2}),
        "world": (main, {0, 1, 2, 3}),
        "edp": (expert, {1}),
        "ep": (expert, {2}),
    }
    out = {}
    for name, (coords, free) in varying.items():

        def fixed(c, free=free):
            return tuple(x for i, x in enumerate(c) if i not in free)

        out[name] = {
            r: tuple(s for s, c in enumerate(coords) if fixed(c) == fixed(coords[r])) for r in range(len(coords))
        }
    return out


ALL_LAYOUTS = [(w, *layout) for w in range(1, 9) for layout in _layouts(w)]


@pytest.mark.parametrize("world,pp,dp,sp,tp,ep", ALL_LAYOUTS)
def test_grid_matches_brute_force(world, pp, dp, sp, tp, ep):
    grid = RankGrid.create(world, pp=pp, dp=dp, sp=sp, tp=tp, ep=ep)
    expected = _brute_force_groups(pp, dp, sp, tp, ep)
    for name in GROUP_NAMES:
        for rank in range(world):
            assert grid.group_ranks(name, rank) == expected[name][rank], (name, rank)
        assert grid.size(name) == len(expected[name][0])
        assert sorted(r for g in grid.all_groups(name) for r in g) == list(range(world))


@pytest.mark.parametrize("world,pp,dp,sp,tp,ep", ALL_LAYOUTS)
def test_device_mesh_groups_match_brute_force(world, pp, dp, sp, tp, ep):
    expected = _brute_force_groups(pp, dp, sp, tp, ep)
    for rank in range(world):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            topo = Topology(pp=pp, dp=None, sp=sp, tp=tp, ep=ep)
            for name in GROUP_NAMES:
                members = tuple(dist.get_process_group_ranks(topo.group(name)))
                assert members == expected[name][rank], (name, rank)
                assert topo.ranks(name) == members
                assert topo.rank(name) == members.index(rank)
                assert topo.size(name) == len(members)
            stages = expected["pp"][rank]
            i = stages.index(rank)
            assert topo.pp_next_rank == stages[(i + 1) % pp]
            assert topo.pp_prev_rank == stages[(i - 1) % pp]
            assert topo.is_first_stage == (i == 0) and topo.is_last_stage == (i == pp - 1)
        finally:
            dist.destroy_process_group()


def test_dp_fills_the_world():
    assert RankGrid.create(8, tp=2, pp=2).dp == 2
    assert RankGrid.create(6, tp=3).dp == 2
    assert RankGrid.create(8, tp=2, ep=4).edp == 1


@pytest.mark.parametrize(
    "world,sizes,message",
    [
        (8, dict(tp=3), "tp=3 does not divide world size 8; choose tp in {1, 2, 4, 8}"),
        (8, dict(tp=2, sp=3), "sp=3 does not divide world size / tp = 4; choose sp in {1, 2, 4}"),
        (8, dict(tp=2, pp=8), "pp=8 does not divide world size / (tp*sp) = 4; choose pp in {1, 2, 4}"),
        (8, dict(tp=2, dp=3), "choose dp=4 or leave dp unset"),
        (8, dict(tp=2, ep=3), "ep=3 does not divide dp*sp = 4; choose ep in {1, 2, 4}"),
        (8, dict(tp=0), "tp=0 must be a positive integer"),
        (8, dict(dp=0), "dp=0 must be a positive integer"),
        (4, dict(pp=2.0), "pp=2.0 must be a positive integer"),
    ],
)
def test_invalid_sizes_name_the_fix(world, sizes, message):
    with pytest.raises(TopologyError) as err:
        RankGrid.create(world, **sizes)
    assert message in str(err.value)


def test_topology_is_immutable_and_needs_a_process_group():
    with pytest.raises(RuntimeError, match="tidal.init"):
        Topology(tp=1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        topo = Topology(tp=2)
        with pytest.raises(AttributeError, match="immutable"):
            topo.grid = None
        with pytest.raises(KeyError, match="no group called 'xp'"):
            topo.group("xp")
    finally:
        dist.destroy_process_group()
