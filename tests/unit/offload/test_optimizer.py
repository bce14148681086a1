"""The offloaded optimizer against the same torch optimizer with its state in memory.

The host chunks run the fused CPU kernel where the class has one, so the reference does too (the
fused and per-tensor kernels round differently, and Adam's division by sqrt(v) + eps magnifies that
to 3e-5 in 4 steps); with the same kernel the results are bit-identical.
"""

import errno
import shutil

import pytest
import torch

from tidal.config import Config
from tidal.offload import OffloadError
from tidal.offload.optimizer import OffloadedOptimizer, fused_on_cpu, offload_optimizer

STEPS = 4
TOL = 0.0
OPTIONS = {
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "sgd": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
    "adagrad": (torch.optim.Adagrad, {"lr": 1e-2}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-3, "momentum": 0.5}),
}


def _optimizer(name: str):
    cls, options = OPTIONS[name]
    kernel = {"fused": True} if fused_on_cpu(cls) else {}
    return lambda params: cls(params, **options, **kernel)


OPTIMIZERS = {name: _optimizer(name) for name in OPTIONS}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 32), torch.nn.LayerNorm(32)
    )


def _data() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(16, 32, generator=gen) for _ in range(STEPS)]


def _offload(opt: torch.optim.Optimizer, tier: str, path, ratio: float = 0.0) -> OffloadedOptimizer:
    section = {"device": tier, "path": str(path), "chunk_mb": 0.02, "ratio": ratio}
    offload = offload_optimizer(opt, Config.load({"offload": {"optimizer": section}}).offload)
    assert offload is not None
    return offload


def _train(
    make_opt,
    offload_tier: str | None,
    path,
    ratio: float = 0.0,
    lr_decay: bool = False,
    in_backward: bool = False,
    peek: bool = False,
):
    model = _model()
    opt = make_opt(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)) if lr_decay else None
    offload = _offload(opt, offload_tier, path, ratio) if offload_tier else None
    if in_backward:
        offload.update_in_backward()
    losses = []
    for x in _data():
        if in_backward:
            offload.arm(True)
        loss = model(x).pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        if peek:  # a checkpoint read between backward and step must not undo or repeat updates made in backward
            list(offload.state_by_param())
        if offload is not None:
            offload.step()
            opt.zero_grad()  # the user's own step then finds nothing to do
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    return losses, [p.detach().clone() for p in model.parameters()], offload


def _assert_same(result, reference) -> None:
    assert result[0] == pytest.approx(reference[0], abs=TOL)
    for got, want in zip(result[1], reference[1], strict=True):
        assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_matches_the_in_memory_optimizer(tmp_path, name, tier) -> None:
    reference = _train(OPTIMIZERS[name], None, tmp_path)
    result = _train(OPTIMIZERS[name], tier, tmp_path)
    _assert_same(result, reference)
    offload = result[2]
    assert len(offload.chunks) >= 3, "the test must cover several chunks"
    assert not any(offload.optimizer.state.values()), "the user's optimizer must not have stepped on its own"
    if tier == "nvme":
        assert offload.store.nbytes() > 0
        held = sum(t.numel() for _, entry in offload.state_by_param() for t in entry.values() if t.dim() > 0)
        params = sum(p.numel() for p in result[1])
        assert held >= params, "every parameter's state lives in the store"
        assert all(not chunk.optimizer.state for chunk in offload.chunks), "no state left in memory between steps"
    offload.close()


def test_ratio_keeps_a_share_of_chunks_on_the_device_and_follows_the_lr_schedule(tmp_path) -> None:
    reference = _train(OPTIMIZERS["adamw"], None, tmp_path, lr_decay=True)
    result = _train(OPTIMIZERS["adamw"], "nvme", tmp_path, ratio=0.5, lr_decay=True)
    _assert_same(result, reference)
    tiers = [chunk.tier for chunk in result[2].chunks]
    assert tiers.count("device") == round(len(tiers) * 0.5) and "nvme" in tiers
    result[2].close()


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
@pytest.mark.parametrize("peek", [False, True], ids=["plain", "state-read-before-step"])
def test_updates_during_backward_match_the_in_memory_optimizer(tmp_path, tier, peek) -> None:
    reference = _train(OPTIMIZERS["adamw"], None, tmp_path, lr_decay=True)
    result = _train(OPTIMIZERS["adamw"], tier, tmp_path, lr_decay=True, in_backward=True, peek=peek)
    _assert_same(result, reference)
    offload = result[2]
    # every chunk's parameters get their gradients in one backward: each chunk updates there, none at the step
    assert offload.updated_in_backward == STEPS * len(offload.order)
    assert [c.index for c in offload.order] == list(range(len(offload.chunks)))[::-1], "last parameters first"
    offload.close()


class _DeclaredBackwards(torch.nn.Module):
    """Parameters declared in the order backward finishes them (`last` is used last in forward)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.last = torch.nn.Linear(128, 32)
        self.first = torch.nn.Linear(32, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.nn.functional.gelu(self.first(x)))


def test_backward_order_is_learnt_on_the_first_step(tmp_path) -> None:
    model = _DeclaredBackwards()
    opt = OPTIMIZERS["adamw"](model.parameters())
    offload = _offload(opt, "nvme", tmp_path)
    offload.update_in_backward()
    declared_last = [c.index for c in offload.order]  # last declared first: `first`'s chunks lead
    for x in _data()[:2]:
        offload.arm(True)
        model(x).pow(2).mean().backward()
        offload.step()
    learnt = [c.index for c in offload.order]
    first_params = {id(p) for p in model.first.parameters()}
    assert any(id(p) in first_params for p in offload.chunks[declared_last[0]].params)
    assert any(id(p) in first_params for p in offload.chunks[learnt[-1]].params), "`first` finishes last"
    assert learnt != declared_last
    offload.close()


def test_a_second_backward_before_the_step_is_refused_when_updates_ran_in_backward(tmp_path) -> None:
    model = _model()
    opt = OPTIMIZERS["adamw"](model.parameters())
    offload = _offload(opt, "nvme", tmp_path)
    offload.update_in_backward()
    x = _data()[0]
    offload.arm(True)
    model(x).pow(2).mean().backward()
    assert offload.updated_in_backward > 0
    with pytest.raises(RuntimeError, match="gradient_accumulation_steps"):
        offload.arm(True)
    offload.close()


def test_state_round_trips_through_load_state(tmp_path) -> None:
    _, _, offload = _train(OPTIMIZERS["adamw"], "nvme", tmp_path)
    saved = {p: {k: v.clone() for k, v in entry.items()} for p, entry in offload.state_by_param()}
    zeroed = {p: {k: torch.zeros_like(v) for k, v in entry.items()} for p, entry in saved.items()}
    offload.load_state(zeroed)
    assert all(v.abs().sum() == 0 for _, entry in offload.state_by_param() for v in entry.values())
    offload.load_state(saved)
    for p, entry in offload.state_by_param():
        for k, v in entry.items():
            assert torch.equal(v, saved[p][k]), k
    offload.close()


def test_full_disk_during_a_step_raises_and_keeps_the_previous_state(tmp_path, fail_io, monkeypatch) -> None:
    model = _model()
    opt = OPTIMIZERS["adamw"](model.parameters())
    offload = _offload(opt, "nvme", tmp_path)
    for x in _data()[:2]:
        model(x).pow(2).mean().backward()
        offload.step()
        opt.zero_grad()
    before = {p: {k: v.clone() for k, v in entry.items()} for p, entry in offload.state_by_param()}

    fail_io(errno.ENOSPC)
    model(_data()[2]).pow(2).mean().backward()
    with pytest.raises(OffloadError, match="ENOSPC"):
        offload.step()
    monkeypatch.undo()
    after = dict(offload.state_by_param())
    for p, entry in before.items():
        for k, v in entry.items():
            assert torch.equal(after[p][k], v), f"{k} changed although its write failed"
    offload.close()


def test_too_little_free_space_is_refused_before_training(tmp_path, monkeypatch) -> None:
    opt = OPTIMIZERS["adamw"](_model().parameters())
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(1024))
    with pytest.raises(OffloadError, match=r"has 1.0 KiB free.*needs about .*offload.optimizer.device=cpu"):
        _offload(opt, "nvme", tmp_path)
    assert not list(tmp_path.iterdir()), "the refused store removed its directory"


class _Usage:
    def __init__(self, free: int) -> None:
        self.free = free


def test_close_removes_the_swap_files(tmp_path) -> None:
    _, _, offload = _train(OPTIMIZERS["sgd"], "nvme", tmp_path)
    assert any(tmp_path.rglob("*.swap"))
    offload.close()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_low_precision_parameters_are_updated_through_fp32_masters(tmp_path, tier) -> None:
    """bf16 parameters: gradients come to the host as fp32 and the update runs on fp32 master copies, as a
    hand-written master-weights loop does."""
    data = [x.bfloat16() for x in _data()]

    def loop(offloaded: bool):
        model = _model().bfloat16()
        if offloaded:
            opt = OPTIMIZERS["adamw"](model.parameters())
            offload = _offload(opt, tier, tmp_path)
        else:
            masters = [torch.nn.Parameter(p.detach().float()) for p in model.parameters()]
            opt = OPTIMIZERS["adamw"](masters)
        for x in data:
            model(x).float().pow(2).mean().backward()
            if offloaded:
                offload.step()
            else:
                for p, master in zip(model.parameters(), masters, strict=True):
                    master.grad = p.grad.float()
                opt.step()
                with torch.no_grad():
                    for p, master in zip(model.parameters(), masters, strict=True):
                        p.copy_(master)
            opt.zero_grad()
            model.zero_grad()
        if offloaded:
            offload.close()
        return [p.detach().clone() for p in model.parameters()]

    for got, want in zip(loop(True), loop(False), strict=True):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
