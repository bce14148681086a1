"""Activation offload: exact training against a run without it, what goes to the store, prefetch, cleanup, policy."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from tidal.config import ActivationOffloadConfig, NvmeConfig
from tidal.offload import OffloadError
from tidal.offload.activations import ActivationOffload, apply_activation_offload
from tidal.offload.nvme import OWNER_FILE
from tidal.offload.swap_file import SWAP_FILE

CPU = torch.device("cpu")
NVME = NvmeConfig(block_size=4096, queue_depth=2, threads=2)
MIN_BYTES = 1024
WIDTH = 64


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: other tests run beside these, and CPU reductions stay in one order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Block(nn.Module):
    """Saves a bool mask, int64 indices, transposed and broadcast tensors, views of parameters, a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)  # saves mean and rstd: 4 bytes per row, under MIN_BYTES
        self.up = nn.Linear(WIDTH, 2 * WIDTH)  # saves its input and weight.t(), a view of a parameter
        self.down = nn.Linear(2 * WIDTH, WIDTH)
        self.scale = nn.Parameter(torch.rand(2 * WIDTH) + 0.5)
        self.register_buffer("gain", torch.rand(16, 2 * WIDTH) + 0.5)  # saved by the mul: a buffer, 8 KiB

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.norm(x))
        h = torch.where(h > 0, h, 0.1 * h)  # the bool condition
        order = torch.argsort(h.detach(), dim=-1)
        h = torch.gather(h, -1, order)  # the int64 index
        t = h.transpose(0, 1)
        h = (t * t.sin()).transpose(0, 1)  # transposed (dense, permuted strides) operands; t is saved twice
        h = h * h.mean(-1, keepdim=True).expand_as(h)  # a broadcast operand (stride 0)
        return self.down(h * self.scale * self.gain)


class Stack(nn.Module):
    def __init__(self, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(WIDTH, WIDTH)
        self.layers = nn.ModuleList(Block() for _ in range(layers))
        self.head = nn.Linear(WIDTH, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x).square().mean()


def stack(seed: int = 0, layers: int = 4) -> Stack:
    torch.manual_seed(seed)
    return Stack(layers)


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 16, WIDTH, generator=torch.Generator().manual_seed(seed))


def tiny_gpt2(layers: int = 4) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=layers, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def offload_config(tmp_path, device: str = "cpu", **fields) -> ActivationOffloadConfig:
    return ActivationOffloadConfig(device=device, path=str(tmp_path), min_bytes=MIN_BYTES, **fields)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not different, f"gradients differ: {different}"


def step(model: nn.Module, x: torch.Tensor, offload: ActivationOffload | None) -> torch.Tensor:
    with offload.forward_context() if offload is not None else torch.enable_grad():
        loss = model(x)
    loss.backward()
    return loss.detach()


def record_writes(offload: ActivationOffload) -> list[torch.Tensor]:
    """Make the offload's store keep every tensor written to it, as given."""
    written: list[torch.Tensor] = []
    write = offload.store.write

    def recording(key: str, tensor: torch.Tensor):
        written.append(tensor)
        return write(key, tensor)

    offload.store.write = recording
    return written


POLICIES = {
    "offload": {},
    "recompute": {"transformer.h.*": "recompute"},
    "mixed": {"transformer.h.0": "keep", "transformer.h.1": "recompute", "*.mlp": "recompute"},
}


@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_gpt2_training_matches_a_run_without_offload(tmp_path, device, policy) -> None:
    ids = torch.randint(0, 64, (2, 3, 16), generator=torch.Generator().manual_seed(1))
    runs = {}
    for name in ("reference", "offload"):
        model = tiny_gpt2()
        keys = list(model.state_dict())
        offload = None
        if name == "offload":
            offload = apply_activation_offload(
                model, offload_config(tmp_path, device, policy=POLICIES[policy]), NVME, CPU
            )
            assert list(model.state_dict()) == keys
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        runs[name] = []
        for batch in ids:
            with offload.forward_context() if offload is not None else torch.enable_grad():
                loss = model(batch, labels=batch, use_cache=False).loss
            loss.backward()
            runs[name].append((loss.detach(), grads(model)))
            optimizer.step()
            optimizer.zero_grad()
        if offload is not None:
            assert offload.stats.offloaded_tensors > 0
            assert offload.stats.fetched_bytes == offload.stats.offloaded_bytes
            offload.close()
    for (loss, gradients), (expected_loss, expected) in zip(runs["offload"], runs["reference"], strict=True):
        assert torch.equal(loss, expected_loss)
        assert_same(gradients, expected)


@pytest.mark.parametrize("device", ["cpu", "nvme", "nvme-staged"])
def test_every_dtype_and_layout_comes_back_exactly(tmp_path, device) -> None:
    x = inputs()
    reference = stack()
    expected_loss = step(reference, x, None)
    model = stack()
    # "nvme-staged": told it computes on a GPU, the offload stages tensors in host buffers on their way to disk
    compute = torch.device("cuda") if device == "nvme-staged" else CPU
    offload = apply_activation_offload(model, offload_config(tmp_path, device.split("-")[0]), NVME, compute)
    written = record_writes(offload)
    assert torch.equal(step(model, x, offload), expected_loss)
    assert_same(grads(model), grads(reference))
    assert {torch.bool, torch.int64, torch.float32} <= {tensor.dtype for tensor in written}
    offload.close()


def place(tensor: torch.Tensor) -> tuple[object, ...]:
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride()


def test_small_tensors_parameters_and_buffers_stay_put_and_twice_saved_go_once(tmp_path) -> None:
    model = stack()
    params = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(inputs())
    sizes = [(t.numel() * t.element_size(), t.untyped_storage().data_ptr() in params) for t in saved]
    assert any(size >= MIN_BYTES and of_param for size, of_param in sizes)  # the rules have work to do
    assert any(size < MIN_BYTES and not of_param for size, of_param in sizes)
    assert any(isinstance(t._base, nn.Parameter) for t in saved) and any(t is model.layers[0].gain for t in saved)
    assert len({place(t) for t in saved}) < len(saved)

    offload = apply_activation_offload(model, offload_config(tmp_path), NVME, CPU)
    written = record_writes(offload)
    step(model, inputs(), offload)
    assert len(written) == offload.stats.offloaded_tensors > 0
    assert all(t.numel() * t.element_size() >= MIN_BYTES for t in written)
    assert not any(t.untyped_storage().data_ptr() in params for t in written)
    assert len({place(t) for t in written}) == len(written)
    offload.close()


def test_parameters_swapped_in_during_forward_stay_put(tmp_path) -> None:
    model = stack()
    offload = apply_activation_offload(model, offload_config(tmp_path), NVME, CPU)
    written = record_writes(offload)
    with offload.forward_context():
        for block in model.layers:  # as FSDP2 registers unsharded parameters in its pre-forward hook
            block.up.weight = nn.Parameter(block.up.weight.detach().clone())
        loss = model(inputs())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert written and not any(t.untyped_storage().data_ptr() in params for t in written)
    loss.backward()
    offload.close()


def test_prefetch_fetches_the_next_layer_ahead(tmp_path) -> None:
    model = stack(layers=4)
    ahead = apply_activation_offload(model, offload_config(tmp_path, prefetch_layers=1), NVME, CPU)
    for _ in range(2):
        step(model, inputs(), ahead)
    assert ahead.stats.prefetch_hits > 0
    assert ahead.stats.fetched_bytes == ahead.stats.offloaded_bytes > 0
    ahead.close()

    model = stack(layers=4)
    on_demand = apply_activation_offload(model, offload_config(tmp_path, prefetch_layers=0), NVME, CPU)
    step(model, inputs(), on_demand)
    assert on_demand.stats.prefetch_hits == 0
    assert on_demand.stats.blocking_waits == on_demand.stats.offloaded_tensors > 0
    on_demand.reset_stats()
    assert on_demand.stats.offloaded_bytes == on_demand.stats.blocking_waits == 0
    on_demand.close()


@pytest.mark.parametrize("prefetch_layers", [1, 2])
def test_each_block_fetches_the_blocks_below_before_backward_reaches_them(tmp_path, prefetch_layers: int) -> None:
    model = stack(layers=6)
    offload = apply_activation_offload(model, offload_config(tmp_path, prefetch_layers=prefetch_layers), NVME, CPU)
    events: list[tuple[str, str]] = []
    fetch, unpack = offload._fetch, offload.unpack_hook

    def logged_fetch(saved):
        events.append(("fetch", saved.key.split("-")[2]))
        return fetch(saved)

    def logged_unpack(packed):
        if not isinstance(packed, torch.Tensor):
            events.append(("unpack", packed.key.split("-")[2]))
        return unpack(packed)

    offload._fetch, offload.unpack_hook = logged_fetch, logged_unpack
    step(model, inputs(), offload)
    first_unpack = {layer: events.index(("unpack", layer)) for kind, layer in events if kind == "unpack"}
    first_fetch = {layer: events.index(("fetch", layer)) for kind, layer in events if kind == "fetch"}
    blocks = [f"l{index}" for index in range(6)]
    assert set(blocks) <= first_unpack.keys() and first_unpack.keys() == first_fetch.keys()
    for index in range(len(blocks) - prefetch_layers):  # block i is fetched when block i + prefetch_layers starts
        above = blocks[index + prefetch_layers - 1]
        assert first_fetch[blocks[index]] < first_unpack[above], f"{blocks[index]} was fetched too late"
    offload.close()


@pytest.mark.parametrize("compute", [CPU, torch.device("cuda")], ids=["direct", "staged"])
def test_nvme_entries_are_freed_after_backward_and_files_at_close(tmp_path, compute) -> None:
    model = stack()
    offload = apply_activation_offload(model, offload_config(tmp_path, "nvme"), NVME, compute)
    directory = offload.store.directory
    with offload.forward_context():
        loss = model(inputs())
    assert offload.stats.offloaded_bytes > 0
    assert sorted(os.listdir(directory)) == sorted([OWNER_FILE, SWAP_FILE])
    file_bytes, unused = offload.store.file_bytes()
    if compute == CPU:  # a direct write takes its space at once; a staged one once its copy to the host is done
        assert unused < file_bytes
    loss.backward()
    assert offload.store.nbytes() == 0
    assert offload.store.file_bytes() == (file_bytes, file_bytes)  # every extent free, for the next step
    with offload.forward_context():  # the next step reuses the space: the file does not grow
        loss = model(inputs())
    loss.backward()
    assert offload.store.file_bytes() == (file_bytes, file_bytes)
    offload.close()
    offload.close()
    assert not os.path.exists(directory)
    with pytest.raises(OffloadError, match="closed"):
        offload.forward_context()


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_gradient_accumulation_with_forwards_before_backwards(tmp_path, device) -> None:
    first, second = inputs(1), inputs(2)
    reference = stack()
    for x in (first, second):
        step(reference, x, None)
    model = stack()
    offload = apply_activation_offload(model, offload_config(tmp_path, device), NVME, CPU)
    losses = []
    for x in (first, second):
        with offload.forward_context():
            losses.append(model(x))
    assert offload.stats.offloaded_bytes > 0
    for loss in reversed(losses):
        loss.backward()
    assert_same(grads(model), grads(reference))
    assert offload.stats.fetched_bytes == offload.stats.offloaded_bytes
    offload.close()


def test_retain_graph_fetches_again_for_a_second_backward(tmp_path) -> None:
    reference = stack()
    loss = reference(inputs())
    loss.backward(retain_graph=True)
    loss.backward()
    model = stack()
    offload = apply_activation_offload(model, offload_config(tmp_path), NVME, CPU)
    with offload.forward_context():
        loss = model(inputs())
    loss.backward(retain_graph=True)
    loss.backward()
    assert_same(grads(model), grads(reference))
    assert offload.stats.fetched_bytes == 2 * offload.stats.offloaded_bytes
    offload.close()


def test_no_grad_and_eval_forwards(tmp_path) -> None:
    model = stack()
    offload = apply_activation_offload(model, offload_config(tmp_path), NVME, CPU)
    with torch.no_grad():
        expected = model(inputs())
        with offload.forward_context():
            assert torch.equal(model(inputs()), expected)
    assert offload.stats.offloaded_tensors == 0
    model.eval()
    reference = stack().eval()
    assert torch.equal(step(model, inputs(), offload), step(reference, inputs(), None))
    assert_same(grads(model), grads(reference))
    assert offload.stats.offloaded_tensors > 0
    offload.close()


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_recompute_without_offload_runs_blocks_twice_and_keeps_the_model(tmp_path) -> None:
    none = ActivationOffloadConfig(device="none")
    assert apply_activation_offload(stack(), none, NVME, CPU) is None
    reference = stack()
    step(reference, inputs(), None)
    model = stack()
    keys = list(model.state_dict())
    calls = count_calls(model.layers[2].up)
    offload = apply_activation_offload(model, none.model_copy(update={"policy": {"layers.*": "recompute"}}), NVME, CPU)
    assert offload is not None and offload.store is None
    assert list(model.state_dict()) == keys and isinstance(model.layers[2], Block)
    step(model, inputs(), offload)
    assert calls == [2]  # forward, then again in backward
    assert_same(grads(model), grads(reference))
    offload.close()


def offloaded_tensors(tmp_path, policy: dict[str, str]) -> int:
    model = stack(layers=4)
    offload = apply_activation_offload(model, offload_config(tmp_path, policy=policy), NVME, CPU)
    step(model, inputs(), offload)
    offload.close()
    return offload.stats.offloaded_tensors


def test_policy_keeps_offloads_and_later_patterns_win(tmp_path) -> None:
    every_block = offloaded_tensors(tmp_path, {})
    assert every_block % 4 == 0 and every_block > 0
    assert offloaded_tensors(tmp_path, {"layers.0": "keep"}) == every_block // 4 * 3
    assert offloaded_tensors(tmp_path, {"layers.*": "keep", "layers.1": "offload"}) == every_block // 4
    assert offloaded_tensors(tmp_path, {"layers.1": "offload", "layers.*": "keep"}) == 0
    assert offloaded_tensors(tmp_path, {"embed": "offload"}) == every_block + 1  # its input; weight.t() stays


def test_policy_errors_name_the_fix(tmp_path) -> None:
    with pytest.raises(ValueError, match="'layers.9' matches no module"):
        apply_activation_offload(stack(), offload_config(tmp_path, policy={"layers.9": "keep"}), NVME, CPU)
    with pytest.raises(ValueError, match="set device to cpu or nvme"):
        apply_activation_offload(stack(), ActivationOffloadConfig(policy={"head": "offload"}), NVME, CPU)
    with pytest.raises(ValueError, match="needs offload.activations.path"):
        apply_activation_offload(stack(), ActivationOffloadConfig(device="nvme"), NVME, CPU)
