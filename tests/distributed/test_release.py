"""A model and optimizer given to `tidal.wrap` are freed, with the engine and its offload files, once the
loop drops them: nothing tidal registers (gradient hooks held by torch's C++ side, stores, threads)
keeps them alive. 2 ranks; data parallel at ZeRO 0-3 with and without offload, tensor, pipeline and
expert parallel."""

import gc
import os
import tempfile
import weakref
from collections.abc import Callable

import pytest
import torch
from models import MODELS, batches, loop_step, make_optimizer
from ranks import run_ranks

import tidal

DATA_PARALLEL = {  # name -> the config, given a directory for offload files
    "zero0": lambda work: {"zero": {"stage": 0}},
    "zero1": lambda work: {"zero": {"stage": 1}},
    "zero2": lambda work: {"zero": {"stage": 2}},
    "zero3": lambda work: {"zero": {"stage": 3}},
    "optimizer-cpu": lambda work: {"zero": {"stage": 1}, "offload": {"optimizer": {"device": "cpu"}}},
    "optimizer-nvme": lambda work: {"zero": {"stage": 0}, "offload": {"optimizer": {"device": "nvme", "path": work}}},
    "activations-nvme": lambda work: {"offload": {"activations": {"device": "nvme", "path": work, "min_bytes": 1024}}},
}
MODEL_PARALLEL = {"tp2": ("gpt2", {"tp": 2}), "pp2": ("gpt2", {"pp": 2}), "ep2": ("mixtral", {"ep": 2})}


def _released(model_name: str, config: Callable[[str], dict]) -> tuple[list[bool], list[str]]:
    """Train 2 steps, drop everything, collect: (which of model, optimizer, engine still live, files left)."""
    with tempfile.TemporaryDirectory() as work:
        model = MODELS[model_name]()
        model, opt = tidal.wrap(model, make_optimizer(model), {**config(work), "logging": {"progress": False}})
        engine = tidal.engine(model)
        for ids in batches(2, 4):
            loop_step(model, opt, ids)
        refs = [weakref.ref(model), weakref.ref(opt), weakref.ref(engine)]
        del model, opt, engine
        gc.collect()
        left = [os.path.join(root, name) for root, _, names in os.walk(work) for name in names]
        return [ref() is not None for ref in refs], left


def _data_parallel(rank: int, world: int) -> dict:
    tidal.init({"logging": {"progress": False}})
    out = {name: _released("gpt2", config) for name, config in DATA_PARALLEL.items()}
    tidal.shutdown()
    return out


def _model_parallel(rank: int, world: int, model_name: str, parallel: dict) -> tuple:
    tidal.init({"parallel": parallel, "logging": {"progress": False}})
    out = _released(model_name, lambda work: {"parallel": parallel})
    tidal.shutdown()
    return out


pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def data_parallel():
    return run_ranks(_data_parallel, 2, timeout=240)


@pytest.mark.parametrize("name", list(DATA_PARALLEL))
def test_data_parallel_wrap_is_freed(data_parallel, name):
    for rank, result in enumerate(data_parallel):
        alive, left = result[name]
        assert alive == [False, False, False], f"rank {rank}: model, optimizer, engine still alive: {alive}"
        assert left == [], f"rank {rank}: offload files left after the engine was freed: {left}"


@pytest.mark.parametrize("name", list(MODEL_PARALLEL))
def test_model_parallel_wrap_is_freed(name):
    model_name, parallel = MODEL_PARALLEL[name]
    for rank, (alive, left) in enumerate(run_ranks(_model_parallel, 2, args=(model_name, parallel), timeout=120)):
        assert alive == [False, False, False], f"rank {rank}: model, optimizer, engine still alive: {alive}"
        assert left == []


def test_hooks_still_run_while_the_engine_lives():
    """Backward runs the weakly held hook while its owner lives, and the hook does not keep the owner."""
    from tidal.runtime.hooks import weak_hook

    calls = []

    class Owner:
        def on_grad(self, param: torch.Tensor) -> None:
            calls.append(param.grad.clone())

    owner = Owner()
    param = torch.nn.Parameter(torch.ones(3))
    param.register_post_accumulate_grad_hook(weak_hook(owner.on_grad))
    (param * 2).sum().backward()
    assert len(calls) == 1 and torch.equal(calls[0], torch.full((3,), 2.0))
    owner_ref = weakref.ref(owner)
    del owner
    assert owner_ref() is None, "the hook must not keep its owner alive"
    (param * 2).sum().backward()  # runs the stand-in, which now does nothing
    assert len(calls) == 1
