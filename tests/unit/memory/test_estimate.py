"""The memory estimate on small models whose bytes are worked out by hand in each test.

Most tests use `_two_linears`: Linear(4, 6) + Linear(6, 3) = weights 24 + 18, biases 6 + 3: 51 fp32
elements (204 bytes) in 4 tensors. AdamW keeps 2 parameter-shaped fp32 tensors and a 4-byte step each.
Split over 2 ranks by rows (torch.chunk): Linear(4, 6) gives 3 + 3 rows; Linear(6, 3) gives 2 + 1 rows,
so rank 0 updates 12 + 3 + 12 + 2 = 29 elements and rank 1 12 + 3 + 6 + 1 = 22.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tidal.config import Config
from tidal.memory.estimate import TIERS, Buffer, estimate, optimizer_state
from tidal.memory.report import format_estimate

ADAMW_STEPS = 4 * 4  # one 4-byte step tensor per parameter tensor


def _two_linears() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))


def _tiny_llama(layers: int = 2) -> nn.Module:
    """The distributed tests' tiny Llama on the meta device: vocab 96, hidden 32, MLP 64, 4 heads, 2 kv heads.

    Per layer q 32x32, k and v 16x32, o 32x32, gate/up 64x32, down 32x64, two norms of 32: 9280 elements;
    embedding and untied head 96x32 each, final norm 32: 24736 elements for 2 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def _est(model: nn.Module, world: int = 1, device_type: str = "cpu", **config):
    return estimate(model, Config.load(config), world, device_type=device_type)


def _bytes(rank, category: str, tier: str = "device") -> int:
    return rank.category(category)[tier]


def test_zero0_one_rank_holds_params_grads_and_adamw_state() -> None:
    (r,) = _est(_two_linears()).ranks
    assert (r.params.device, r.grads.device, r.optimizer.device) == (204, 204, 2 * 204 + ADAMW_STEPS)
    # one rank: no bucket is ever launched; AdamW one tensor at a time (the CPU's default) makes two
    # temporaries the size of the largest parameter (the 4x6 weight, 96 bytes) while it updates it
    assert r.buffer_list == (Buffer("optimizer update temporaries", "device", 2 * 96, False, phase="step"),)
    assert r.peak("device") == 204 + 204 + 424 + 2 * 96 and r.peak("cpu") == r.peak("nvme") == 0
    cuda = _est(_two_linears(), device_type="cuda").ranks[0].buffer_list  # foreach: one state-sized list
    assert cuda == (Buffer("optimizer update temporaries", "device", 204, False, phase="step"),)
    model = _two_linears()
    fused = estimate(model, Config.load({}), 1, optimizer=torch.optim.AdamW(model.parameters(), fused=True))
    assert fused.ranks[0].buffer_list == (Buffer("optimizer update temporaries", "device", 0, False, phase="step"),)


def test_zero0_two_ranks_add_the_all_reduce_buckets_kept_between_steps() -> None:
    for r in _est(_two_linears(), 2).ranks:
        assert (r.params.device, r.grads.device, r.optimizer.device) == (204, 204, 424)
        assert [(b.name, b.nbytes, b.persistent) for b in r.buffer_list] == [
            ("optimizer update temporaries", 2 * 96, False),
            ("gradient all-reduce buckets", 204, True),
        ]


@pytest.mark.parametrize("stage", [1, 2])
def test_zero1_and_2_shard_optimizer_state_by_rows_and_zero2_also_gradients(stage: int) -> None:
    r0, r1 = _est(_two_linears(), 2, zero={"stage": stage}).ranks
    assert (r0.params.device, r1.params.device) == (204, 204)
    assert (r0.optimizer.device, r1.optimizer.device) == (2 * 29 * 4 + ADAMW_STEPS, 2 * 22 * 4 + ADAMW_STEPS)
    assert (r0.grads.device, r1.grads.device) == ((204, 204) if stage == 1 else (29 * 4, 22 * 4))
    kept = [b.name for b in r0.buffer_list if b.persistent]
    assert kept == (["gradient all-reduce buckets"] if stage == 1 else [])
    gather = next(b for b in r0.buffer_list if b.name.startswith("ZeRO parameter all-gather"))
    assert not gather.persistent and gather.nbytes == 29 * 4 * 3  # one chunk: segment (the larger rank's) x (2 + 1)


def test_zero3_pads_parameter_and_gradient_shards_as_fsdp2() -> None:
    r0, r1 = _est(_two_linears(), 2, zero={"stage": 3}).ranks
    for r in (r0, r1):  # every rank holds ceil(rows / 2) rows: 3, 3, 2, 2 -> 12 + 3 + 12 + 2 elements
        assert (r.params.device, r.grads.device) == (29 * 4, 29 * 4)
    assert (r0.optimizer.device, r1.optimizer.device) == (2 * 29 * 4 + ADAMW_STEPS, 2 * 22 * 4 + ADAMW_STEPS)
    assert {b.name for b in r0.buffer_list} == {
        "FSDP2 unsharded root + gathered blocks",
        "FSDP2 gradient reduce-scatter (one block)",
        "optimizer update temporaries",
    }
    assert all(not b.persistent for b in r0.buffer_list)


def test_tensor_parallel_follows_the_llama_plan() -> None:
    # tp=2: q, k, v, gate, up split on outputs, o and down on inputs, embedding and head by vocabulary; norms whole
    per_layer = (1024 + 512 + 512 + 1024 + 3 * 2048) // 2 + 64
    local = 96 * 32 // 2 + 2 * per_layer + 32 + 96 * 32 // 2
    for r in _est(_tiny_llama(), 2, parallel={"tp": 2}).ranks:
        assert (r.params.device, r.grads.device) == (local * 4, local * 4)
        assert r.optimizer.device == 2 * local * 4 + 4 * (2 * 9 + 3)


def test_pipeline_stages_hold_and_train_their_own_layers_only() -> None:
    first, last = _est(_tiny_llama(), 2, parallel={"pp": 2}).ranks
    assert first.params.device == first.grads.device == (3072 + 9280) * 4  # embedding + layer 0
    assert last.params.device == last.grads.device == (9280 + 32 + 3072) * 4  # layer 1 + final norm + head
    assert first.optimizer.device == 2 * (3072 + 9280) * 4 + 4 * 10
    assert last.optimizer.device == 2 * (9280 + 32 + 3072) * 4 + 4 * 11


@pytest.mark.parametrize(("schedule", "first", "last"), [("1f1b", 2 * 500, 500), ("gpipe", 4 * 500, 4 * 500)])
def test_pipeline_activations_are_a_stage_share_times_micro_batches_in_flight(schedule, first, last) -> None:
    config = Config.load({"parallel": {"pp": 2, "pipeline": {"schedule": schedule, "microbatches": 4}}})
    r0, r1 = estimate(_tiny_llama(), config, 2, activations=1000, device_type="cpu").ranks
    assert (r0.activations.device, r1.activations.device) == (first, last)


def test_optimizer_offload_to_cpu_moves_fp32_state_and_frees_grads_updated_in_backward() -> None:
    (r,) = _est(_two_linears(), offload={"optimizer": {"device": "cpu"}}).ranks
    assert (r.optimizer.device, r.optimizer.cpu, r.masters.cpu) == (0, 424, 0)  # fp32 host parameters: no master
    assert r.grads.device == 0  # one rank at ZeRO 0: each chunk updates (and frees its grads) during backward
    (kept,) = _est(_two_linears(), offload={"optimizer": {"device": "cpu", "update_in_backward": False}}).ranks
    assert kept.grads.device == 204


def test_optimizer_offload_on_cuda_adds_fp32_masters_and_gradient_staging() -> None:
    config = {"offload": {"optimizer": {"device": "cpu", "update_in_backward": False}}}
    (r,) = _est(_two_linears(), device_type="cuda", **config).ranks
    assert (r.optimizer.cpu, r.masters.cpu) == (424, 204)
    staging = [b for b in r.buffer_list if "staging" in b.name]
    assert [(b.name, b.nbytes) for b in staging] == [("offload gradient staging 0", 204)]


def test_offload_ratio_keeps_the_first_chunks_state_on_the_device() -> None:
    # a tiny chunk size cuts after every parameter: 4 chunks, the first 2 (24 + 6 elements) stay on the device
    config = {"offload": {"optimizer": {"device": "cpu", "chunk_mb": 1e-6, "ratio": 0.5}}}
    (r,) = _est(_two_linears(), **config).ranks
    assert (r.optimizer.device, r.optimizer.cpu) == (2 * 30 * 4 + 8, 2 * 21 * 4 + 8)


def test_nvme_offload_files_hold_aligned_state_step_and_master_padded_to_4k() -> None:
    config = {"offload": {"optimizer": {"device": "nvme", "path": "/unused", "update_in_backward": False}}}
    (r,) = _est(_two_linears(), device_type="cuda", **config).ranks
    # per parameter: 2 state tensors and a master, each rounded up to 64 bytes, plus a 64-byte step slot:
    # 24 elements 2*128+64+128 = 448; 6 elements 2*64+64+64 = 256; 18 -> 448; 3 -> 256: 1408 bytes, one 4 KiB file
    assert (r.optimizer.nvme, r.optimizer.cpu, r.masters.cpu) == (4096, 0, 0)
    by_name = {b.name: b for b in r.buffer_list}
    assert by_name["offload staging buffer 0"].nbytes == 1408
    assert by_name["offload gradient staging 0"].nbytes == 204
    bounce = by_name["NVMe bounce buffers (optimizer store)"]
    assert bounce.nbytes == 2**20 * 8 * 4 and not bounce.exact  # block_size x queue_depth x threads, lazily
    assert r.peak("nvme") == 4096 + 4096  # the file and, at most, a spare copy kept for the next write


@pytest.mark.parametrize(
    ("cls", "options", "slots", "scalar"),
    [
        (torch.optim.AdamW, {}, 2, 4),
        (torch.optim.Adam, {"amsgrad": True}, 3, 4),
        (torch.optim.SGD, {"momentum": 0.9}, 1, 0),
        (torch.optim.SGD, {}, 0, 0),
        (torch.optim.Adagrad, {}, 1, 4),
        (torch.optim.RMSprop, {}, 1, 4),
    ],
)
def test_optimizer_state_is_probed_from_the_class(cls, options, slots, scalar) -> None:
    state = optimizer_state(cls, **options)
    assert (state.slots, state.scalar_bytes) == (slots, scalar)


def test_an_optimizer_instance_sets_the_options_and_the_chunk_order() -> None:
    model = _two_linears()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    (r,) = estimate(model, Config(), 1, optimizer=sgd, device_type="cpu").ranks
    assert r.optimizer.device == 204
    with pytest.raises(ValueError, match="holds none of the model's parameters"):
        estimate(model, Config(), 1, optimizer=torch.optim.SGD(_two_linears().parameters(), lr=0.1))


def test_world_size_is_needed_when_dp_is_auto() -> None:
    with pytest.raises(ValueError, match="needs world_size"):
        estimate(_two_linears(), Config())
    assert estimate(_two_linears(), Config.load({"parallel": {"dp": 2}}), device_type="cpu").sizes["world"] == 2


def test_table_groups_equal_ranks_and_names_every_tier() -> None:
    text = format_estimate(_est(_tiny_llama(), 4, parallel={"pp": 2}))
    assert "ranks 0-1 " in text and "ranks 2-3 " in text
    assert all(t in text for t in TIERS) and "peak over ranks" in text
