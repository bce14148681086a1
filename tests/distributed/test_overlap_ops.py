"""Collective matmuls (tidal.comm.overlap) equal the plain computation in forward and backward.

Every rank builds the same full tensors from one seed; a single-process autograd run over all ranks'
pieces is the reference. Rows per rank do not divide by every chunk count (uneven pieces), one case
gathers along dim 1 of a [batch, seq, hidden] tensor, and 2 and 4 ranks run. Tolerance: fp32 1e-5
relative to the largest value, bf16 2e-2.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from ranks import run_ranks

CHUNKS = (1, 3, 4)
CASES = (
    # (lead shape with the sharded rows, dim, k, ns, dtype)
    ((10,), 0, 6, (5, 3), torch.float32),
    ((2, 14), 1, 8, (7,), torch.float32),
    ((3, 4), 0, 5, (4, 2), torch.bfloat16),
)


def _tensors(tp: int, lead: tuple, dim: int, k: int, ns: tuple, dtype):
    g = torch.Generator().manual_seed(7)
    rows = lead[dim] * tp

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    full_lead = list(lead)
    full_lead[dim] = rows
    return {
        "x": rand(*full_lead, k),  # the gathered input of all_gather_matmul
        "bs": [[rand(k, n) for n in ns] for _ in range(tp)],  # each rank's right operands
        "gy": [[rand(*full_lead, n) for n in ns] for _ in range(tp)],  # each rank's output grads
        "xr": [rand(*full_lead, k) for _ in range(tp)],  # each rank's input to matmul_reduce
        "full_lead": full_lead,
    }


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    tol = 2e-2 if want.dtype == torch.bfloat16 else 1e-5
    scale = want.abs().max().item() or 1.0
    err = (got.float() - want.float()).abs().max().item() / scale
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol}"


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _check_all_gather_matmul(rank, tp, t, dim, chunks, group):
    from tidal.comm.overlap import all_gather_matmul

    s_l = t["x"].shape[dim] // tp
    shard = _leaf(t["x"].narrow(dim, rank * s_l, s_l))
    bs = [_leaf(b) for b in t["bs"][rank]]
    ys = all_gather_matmul(shard, bs, group, dim=dim, chunks=chunks)
    sum((y * gy).sum() for y, gy in zip(ys, t["gy"][rank], strict=True)).backward()
    x_ref = _leaf(t["x"])
    b_ref = [[_leaf(b) for b in rank_bs] for rank_bs in t["bs"]]
    total = 0
    for r in range(tp):
        for b, gy in zip(b_ref[r], t["gy"][r], strict=True):
            total = total + ((x_ref @ b) * gy).sum()
    total.backward()
    for i, (y, b) in enumerate(zip(ys, b_ref[rank], strict=True)):
        _close(y, t["x"] @ b.detach(), f"all_gather_matmul y{i}")
        _close(bs[i].grad, b.grad, f"all_gather_matmul dB{i}")
    _close(shard.grad, x_ref.grad.narrow(dim, rank * s_l, s_l), "all_gather_matmul dx")


def _check_matmul_reduce_scatter(rank, tp, t, dim, chunks, group):
    from tidal.comm.overlap import matmul_reduce_scatter

    b0 = t["bs"][rank][0]
    s_l = t["xr"][0].shape[dim] // tp
    x, b = _leaf(t["xr"][rank]), _leaf(b0)
    gy = t["gy"][rank][0].narrow(dim, rank * s_l, s_l)
    y = matmul_reduce_scatter(x, b, group, dim=dim, chunks=chunks)
    (y * gy).sum().backward()
    xs = [_leaf(v) for v in t["xr"]]
    bref = [_leaf(t["bs"][r][0]) for r in range(tp)]
    whole = sum(xs[r] @ bref[r] for r in range(tp))
    total = sum((whole.narrow(dim, r * s_l, s_l) * t["gy"][r][0].narrow(dim, r * s_l, s_l)).sum() for r in range(tp))
    total.backward()
    _close(y, whole.detach().narrow(dim, rank * s_l, s_l), "matmul_reduce_scatter y")
    _close(x.grad, xs[rank].grad, "matmul_reduce_scatter dx")
    _close(b.grad, bref[rank].grad, "matmul_reduce_scatter dB")


def _check_all_reduce_forms(rank, tp, t, chunks, group):
    """matmul_all_reduce (row-parallel, no sp) and replicated_matmul (colwise input, no sp); the output
    gradient is the same on every rank, as tensor parallel guarantees for replicated activations."""
    from tidal.comm.overlap import matmul_all_reduce, replicated_matmul

    gy = t["gy"][0][0]
    x, b = _leaf(t["xr"][rank]), _leaf(t["bs"][rank][0])
    y = matmul_all_reduce(x, b, group, chunks=chunks)
    (y * gy).sum().backward()
    xs = [_leaf(v) for v in t["xr"]]
    bref = [_leaf(t["bs"][r][0]) for r in range(tp)]
    whole = sum(xs[r] @ bref[r] for r in range(tp))
    (whole * gy).sum().backward()
    _close(y, whole.detach(), "matmul_all_reduce y")
    _close(x.grad, xs[rank].grad, "matmul_all_reduce dx")
    _close(b.grad, bref[rank].grad, "matmul_all_reduce dB")

    x = _leaf(t["x"])
    bs = [_leaf(v) for v in t["bs"][rank]]
    ys = replicated_matmul(x, bs, group, chunks=chunks)
    sum((y * g).sum() for y, g in zip(ys, t["gy"][rank], strict=True)).backward()
    x_ref = _leaf(t["x"])
    total = sum(((x_ref @ v) * g).sum() for r in range(tp) for v, g in zip(t["bs"][r], t["gy"][r], strict=True))
    total.backward()
    _close(x.grad, x_ref.grad, "replicated_matmul dx")
    for i, (y, v, g) in enumerate(zip(ys, t["bs"][rank], t["gy"][rank], strict=True)):
        _close(y, t["x"] @ v, f"replicated_matmul y{i}")
        _close(bs[i].grad, t["x"].reshape(-1, t["x"].shape[-1]).t() @ g.reshape(-1, g.shape[-1]), f"replicated dB{i}")


def _auto_decision(group) -> bool:
    """auto times both forms (forward and backward) once per key, even from a no-grad forward, and keeps it."""
    from tidal.comm.overlap import Overlap, matmul_reduce_scatter

    def plain(x, b):
        return matmul_reduce_scatter(x, b, group, chunks=1)

    def overlapped(x, b):
        return matmul_reduce_scatter(x, b, group, chunks=2)

    overlap = Overlap("auto", 2)
    inputs = [torch.randn(64, 32), torch.randn(32, 16)]
    with torch.no_grad():
        chosen = overlap.choose(("mm+rs",), group, plain, overlapped, inputs)
    assert chosen in (plain, overlapped) and list(overlap.decisions) == [("mm+rs",)]
    assert overlap.choose(("mm+rs",), group, plain, overlapped, inputs) is chosen, "decided again"
    assert Overlap("on").choose((), group, plain, overlapped, inputs) is overlapped
    assert Overlap("off").choose((), group, plain, overlapped, inputs) is plain
    return chosen is overlapped


def _rank(rank: int, world: int) -> tuple[int, bool]:
    from tidal.runtime.device import fused_collective_matmul

    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD
    checked = 0
    try:
        assert not fused_collective_matmul(torch.zeros(1), group), "the fused CUDA path must not serve CPU tensors"
        for lead, dim, k, ns, dtype in CASES:
            t = _tensors(world, lead, dim, k, ns, dtype)
            for chunks in CHUNKS:
                _check_all_gather_matmul(rank, world, t, dim, chunks, group)
                _check_matmul_reduce_scatter(rank, world, t, dim, chunks, group)
                _check_all_reduce_forms(rank, world, t, chunks, group)
                checked += 1
        decision = _auto_decision(group)
    finally:
        dist.destroy_process_group()
    return checked, decision


@pytest.mark.parametrize("world", [2, 4])
def test_collective_matmuls_equal_plain(world: int) -> None:
    results = run_ranks(_rank, world, timeout=90)
    assert [checked for checked, _ in results] == [len(CASES) * len(CHUNKS)] * world
    assert len({decision for _, decision in results}) == 1, f"ranks decided differently in auto mode: {results}"


def test_pieces_cover_rows_unevenly() -> None:
    from tidal.comm.overlap import pieces

    assert pieces(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert pieces(2, 4) == [(0, 1), (1, 2)]
    assert pieces(5, 1) == [(0, 5)]
