"""MoE exchange in pieces (`MoELayer` with ``overlap``) equals the plain exchange, forward and backward.

One `MoELayer` per rank over all ranks (experts sharded), each rank its own tokens, uneven counts; the
same layer runs without ``overlap`` (torch's functional all-to-alls: the reference), then with
``Overlap("off")`` (the exchange code in one piece) and ``Overlap("on", C)`` for C in 1, 2, 3 and more
pieces than rows. Outputs, input gradients and every parameter gradient must agree to 1e-5 (fp32; the
pieces change the order of the weight-gradient sums: measured up to 2e-6). Cases: plain routing, routing
forced onto experts 0 and 1 (the other experts get no rows, so most pieces are empty), a capacity factor,
a rank without tokens, and bf16 autocast (three pieces, bf16 tolerance). Every collective is reported to
``observe`` in the order the module doc gives. A forward without grad gives the same output. auto: the
first call decides alike on every rank, and later calls keep it. 2 and 4 ranks.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from ranks import run_ranks

HIDDEN, FFN, EXPERTS, TOP_K = 16, 24, 8, 2
TOL = {"atol": 1e-5, "rtol": 1e-5}
BF16_TOL = {"atol": 5e-2, "rtol": 5e-2}
FORMS = (("off", 4), ("on", 1), ("on", 2), ("on", 3), ("on", 64))
# name -> (skewed routing, capacity factor, rank 1 has no tokens)
CASES = {"plain": (False, None, False), "skewed": (True, None, False), "capacity": (False, 0.5, False)}
CASES["rank without tokens"] = (False, None, True)


class _Recorder:
    """An `observe` that keeps every collective's name, and counts the waits it was told about."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.waits = 0

    def __call__(self, name: str, nbytes: int, work) -> _Recorder:
        assert nbytes >= 0 and work is not None
        self.names.append(name)
        return self

    @contextlib.contextmanager
    def blocked(self):
        self.waits += 1
        yield


def _expected_names(chunks: int) -> list[str]:
    forward = ["moe counts"] + ["moe dispatch"] * chunks + ["moe combine"] * chunks
    return forward + ["moe combine (grad)"] * chunks + ["moe dispatch (grad)"] * chunks


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
    (out.float() * g).sum().backward()
    grads = {f"grad {n}": p.grad.clone() for n, p in layer.named_parameters()}
    return {"out": out.detach(), "x grad": x.grad, **grads}


def _assert_close(got: dict, want: dict, what: str, tol: dict) -> None:
    for key, value in want.items():
        assert got[key].shape == value.shape, f"{what} {key}: shape {got[key].shape} != {value.shape}"
        diff = (got[key].float() - value.float()).abs().max().item() if value.numel() else 0.0
        assert torch.allclose(got[key].float(), value.float(), **tol), f"{what} {key}: max diff {diff:.2e}"


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
            for mode, chunks in FORMS:
                recorder = _Recorder()
                layer.overlap = Overlap(mode, chunks, observe=recorder)
                _assert_close(_run(layer, x, g), plain, f"{name} {mode} chunks={chunks}", TOL)
                pieces = chunks if mode == "on" else 1
                assert recorder.names == _expected_names(pieces), f"{name} {mode} {chunks}: {recorder.names}"
                assert recorder.waits == len(recorder.names)
                layer.overlap = None
            checked[name] = len(FORMS)
        layer = _layer(group, False, None)
        x, g = torch.randn(5 + rank, HIDDEN), torch.randn(5 + rank, HIDDEN)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = _run(layer, x, g)
            layer.overlap = Overlap("on", 3)
            _assert_close(_run(layer, x, g), plain, "bf16 autocast", BF16_TOL)
        want = _run(layer, x, g)["out"]
        with torch.no_grad():
            assert torch.allclose(layer(x), want, **TOL), "no-grad forward"
        checked["bf16, no grad"] = True
        # auto: the first call times both forms on detached copies (their backward must not reach the
        # parameters' gradients), every rank decides alike, and later calls do not try again
        want = _run(_layer(group, False, None), x, g)
        layer = _layer(group, False, None)
        layer.overlap = Overlap("auto", 2)
        _assert_close(_run(layer, x, g), want, "auto", TOL)
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
        assert {k: v for k, v in checked.items() if k in CASES} == dict.fromkeys(CASES, len(FORMS)), rank
        assert checked["bf16, no grad"], rank
    decisions = {tuple(r["auto"]) for r in results}
    assert len(decisions) == 1 and len(next(iter(decisions))) == 1, f"auto decided per rank differently: {decisions}"
