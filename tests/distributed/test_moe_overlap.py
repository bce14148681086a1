"""MoE exchange in pieces (`MoELayer` with ``overlap``) equals the one-piece exchange, forward and backward.

One `MoELayer` per rank over all ranks (experts sharded), each rank its own tokens; the same layer runs
with overlap off, then on with 1, 2, 3 and more pieces than rows, and the outputs, input gradients and
parameter gradients must agree to 1e-5 (fp32; the pieces change the order of the gradient sums: measured
up to 2e-6). Cases: plain
routing, routing forced onto experts 0 and 1 (the other experts get no rows), a capacity factor, and a
rank without tokens. 2 and 4 ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from ranks import run_ranks

HIDDEN, FFN, EXPERTS, TOP_K = 16, 24, 8, 2
TOL = {"atol": 1e-5, "rtol": 1e-5}
CHUNKS = (1, 2, 3, 64)
# name -> (skewed routing, capacity factor, rank 1 has no tokens)
CASES = {"plain": (False, None, False), "skewed": (True, None, False), "capacity": (False, 0.5, False)}
CASES["rank without tokens"] = (False, None, True)


def _layer(group, skewed: bool, capacity):
    from tidal.parallel.expert import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(HIDDEN, FFN, EXPERTS, TOP_K, capacity_factor=capacity, group=group)
    if skewed:
        with torch.no_grad():
            layer.gate.weight.fill_(-1.0)
            layer.gate.weight[0], layer.gate.weight[1] = 1.0, 0.5
    return layer


def _run(layer, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = layer(x)
    (out * g).sum().backward()
    grads = {f"grad {n}": p.grad.clone() for n, p in layer.named_parameters()}
    return {"out": out.detach(), "x grad": x.grad, **grads}


def _rank(rank: int, world: int) -> dict:
    from tidal.comm.overlap import Overlap

    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD
    checked = {}
    try:
        for name, (skewed, capacity, empty_rank) in CASES.items():
            layer = _layer(group, skewed, capacity)
            gen = torch.Generator().manual_seed(10 + rank)
            rows = 0 if empty_rank and rank == 1 else 6 + 3 * rank  # uneven token counts across ranks
            x = torch.randn(rows, HIDDEN, generator=gen)
            x = x.abs() + 0.1 if skewed else x
            g = torch.randn(rows, HIDDEN, generator=gen)
            plain = _run(layer, x, g)
            for chunks in CHUNKS:
                layer.overlap = Overlap("on", chunks)
                pieces = _run(layer, x, g)
                for key, want in plain.items():
                    got = pieces[key]
                    assert got.shape == want.shape, f"{name} chunks={chunks} {key}: shape {got.shape} != {want.shape}"
                    assert torch.allclose(got, want, **TOL), (
                        f"{name} chunks={chunks} {key}: max diff {(got - want).abs().max().item():.2e}"
                    )
                layer.overlap = None
            checked[name] = len(CHUNKS)
        # auto: the first call times both forms on detached copies (their backward must not reach the
        # parameters' gradients), every rank decides alike, and later calls do not try again
        x, g = torch.randn(4 + rank, HIDDEN), torch.randn(4 + rank, HIDDEN)
        want = _run(_layer(group, False, None), x, g)
        layer = _layer(group, False, None)
        layer.overlap = Overlap("auto", 2)
        got = _run(layer, x, g)
        for key, value in want.items():
            assert torch.allclose(got[key], value, **TOL), f"auto {key}: max diff {(got[key] - value).abs().max():.2e}"
        decided = dict(layer.overlap.decisions)
        _run(layer, x, g)
        assert layer.overlap.decisions == decided
        checked["auto"] = [bool(v) for v in decided.values()]
    finally:
        dist.destroy_process_group()
    return checked


@pytest.mark.parametrize("world", [2, 4])
def test_pieces_equal_one_piece(world: int) -> None:
    results = run_ranks(_rank, world, timeout=120)
    for rank, checked in enumerate(results):
        assert {k: v for k, v in checked.items() if k != "auto"} == dict.fromkeys(CASES, len(CHUNKS)), rank
    decisions = {tuple(r["auto"]) for r in results}
    assert len(decisions) == 1 and len(next(iter(decisions))) == 1, f"auto decided per rank differently: {decisions}"
