"""Checkpoint placeholders: tensors read one at a time as DCP writes them, and written back as it loads them."""

import gc
import weakref

import torch

from tidal.runtime.checkpoint import load_checkpoint, save_checkpoint
from tidal.runtime.deferred import DeferredTensors

SHAPES = [(64, 32), (128,), (16, 8, 4), ()]


def _values() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(shape, generator=gen) for i, shape in enumerate(SHAPES)}


def test_save_reads_one_tensor_at_a_time_and_load_writes_each_back(tmp_path) -> None:
    values = _values()
    alive: list[weakref.ref] = []
    most_alive = 0

    def read(name: str) -> torch.Tensor:
        nonlocal most_alive
        gc.collect()
        most_alive = max(most_alive, 1 + sum(ref() is not None for ref in alive))
        out = values[name].clone()
        alive.append(weakref.ref(out))
        return out

    deferred = DeferredTensors()
    state = {"opt": {n: deferred.placeholder(v.shape, v.dtype, lambda n=n: read(n), None) for n, v in values.items()}}
    assert all(t.untyped_storage().nbytes() == 4 for t in state["opt"].values()), "a placeholder holds one element"
    save_checkpoint(tmp_path, 1, state, {"step": 1}, deferred=deferred)
    assert len(alive) == len(values), "each tensor is read once"
    assert most_alive <= 2, f"{most_alive} deferred tensors were in memory at once"

    written: dict[str, torch.Tensor] = {}
    fresh = DeferredTensors()
    target = {
        "opt": {
            n: fresh.placeholder(
                v.shape, v.dtype, lambda v=v: torch.zeros_like(v), lambda t, n=n: written.update({n: t})
            )
            for n, v in values.items()
        }
    }
    load_checkpoint(tmp_path, target, deferred=fresh)
    assert written.keys() == values.keys()
    for name, value in values.items():
        assert torch.equal(written[name], value), name


def test_plain_tensors_beside_placeholders_load_in_place(tmp_path) -> None:
    deferred = DeferredTensors()
    plain = torch.arange(10.0)
    state = {"plain": plain, "lazy": deferred.placeholder(torch.Size([3]), torch.float32, lambda: torch.ones(3), None)}
    save_checkpoint(tmp_path, 2, state, {}, deferred=deferred)
    into = {"plain": torch.zeros(10), "lazy": torch.zeros(3)}
    load_checkpoint(tmp_path, into)
    assert torch.equal(into["plain"], plain) and torch.equal(into["lazy"], torch.ones(3))
