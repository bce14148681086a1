"""Expert parallelism (`tidal.parallel.expert`) against single-process PyTorch and transformers references.

Spawns: 2 ranks (ep=2, edp=1) and 4 ranks (dp=4, ep=2, edp=2); each rank feeds its own dp shard of the
global batch. Gradients are reduced by hand as the engine will: non-expert ones summed over dp_sp, expert
ones summed over edp, both divided by the dp_sp size for a mean loss (not divided for the layer tests'
sum loss). Tolerance, fp32 throughout, the only difference being the order of floating-point sums: layer
outputs and gradients 1e-5 (absolute and relative; measured 1e-6); a converted Mixtral's per-step
losses 1e-5 (measured 5e-7), first-step gradients 1e-6 and parameters after 3 AdamW steps 2e-5 absolute
(measured 2e-6); ep=1 against a dense loop or the transformers block 1e-6.
"""

import copy
import math

import pytest
import torch
import torch.distributed as dist
from models import SEQ, VOCAB, batches, make_optimizer, reference_run, tiny_mixtral
from ranks import run_ranks
from torch import nn

import tidal
from tidal.parallel.expert import (
    ExpertParallelError,
    MoELayer,
    apply_expert_parallel,
    convert_mixtral_moe,
    expert_parameters,
    moe_aux_loss,
)

HIDDEN, FFN, EXPERTS, TOP_K = 16, 24, 8, 2
STEPS, GLOBAL_BATCH = 3, 8
TOL = {"atol": 1e-5, "rtol": 1e-5}
EXACT = {"atol": 1e-6, "rtol": 1e-6}
LOSS_TOL = 1e-5
PARAM_TOL = 2e-5
CAPACITY = 0.5
EXPERT_WEIGHTS = ("w1", "w3", "w2")
# name -> (router forced onto experts 0 and 1, capacity factor, reference: "full" batch or "shards" one by one)
LAYER_CASES = {"layer": (False, None, "full"), "skewed": (True, None, "full"), "capacity": (False, CAPACITY, "shards")}


def _dense_layer(skewed: bool = False, capacity_factor: float | None = None, seed: int = 0) -> MoELayer:
    """Every expert on one rank; `skewed`: the router sends every (positive) token to experts 0 and 1."""
    torch.manual_seed(seed)
    layer = MoELayer(HIDDEN, FFN, EXPERTS, TOP_K, capacity_factor=capacity_factor)
    if skewed:
        with torch.no_grad():
            layer.gate.weight.fill_(-1.0)
            layer.gate.weight[0] = 1.0
            layer.gate.weight[1] = 0.5
    return layer


def _inputs(skewed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch (8, 5, HIDDEN) and the weights of the sum loss ``(out * g).sum()``."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 5, HIDDEN, generator=gen)
    return (x.abs() + 0.1 if skewed else x), torch.randn(8, 5, HIDDEN, generator=gen)


def _run_layer(layer: MoELayer, x: torch.Tensor, g: torch.Tensor) -> dict:
    x = x.clone().requires_grad_()
    out = layer(x)
    (out * g).sum().backward()
    return {"out": out.detach(), "x_grad": x.grad, "dropped": layer.dropped, "assignments": layer.assignments}


def _layer_reference(skewed: bool, capacity_factor: float | None, shards: int) -> dict:
    """The dense layer on the global batch, or on each of `shards` shards in turn (capacity is per rank)."""
    layer = _dense_layer(skewed, capacity_factor)
    x, g = _inputs(skewed)
    runs = [_run_layer(layer, xs, gs) for xs, gs in zip(x.chunk(shards), g.chunk(shards), strict=True)]
    return {
        "out": torch.cat([r["out"] for r in runs]),
        "x_grad": torch.cat([r["x_grad"] for r in runs]),
        "router": layer.gate.weight.grad,
        "experts": {n: getattr(layer.experts, n).grad for n in EXPERT_WEIGHTS},
        "dropped": [r["dropped"] for r in runs],
    }


def _gather_experts(tensors: dict[str, torch.Tensor], topology) -> dict[str, torch.Tensor]:
    """This rank's expert tensors (El, ...) -> every expert's (E, ...), gathered over ep."""
    out = {}
    for name, t in tensors.items():
        parts = [torch.empty_like(t) for _ in range(topology.size("ep"))]
        dist.all_gather(parts, t.contiguous(), group=topology.group("ep"))
        out[name] = torch.cat(parts)
    return out


def _reduce_grads(model: nn.Module, topology, mean: bool) -> None:
    """The engine's data-parallel reduction: non-expert grads over dp_sp, expert grads over edp (summed)."""
    experts = {id(p) for p in expert_parameters(model)}
    for p in model.parameters():
        dist.all_reduce(p.grad, group=topology.group("edp" if id(p) in experts else "dp_sp"))
        if mean:
            p.grad.div_(topology.size("dp_sp"))


def _layer_case(topology, skewed: bool, capacity_factor: float | None) -> dict:
    [layer] = apply_expert_parallel(nn.ModuleDict({"moe": _dense_layer(skewed, capacity_factor)}), topology)
    x, g = (t.chunk(topology.size("dp_sp"))[topology.rank("dp_sp")] for t in _inputs(skewed))
    result = _run_layer(layer, x, g)
    local = {n: getattr(layer.experts, n).grad for n in EXPERT_WEIGHTS}
    result["local_expert_grads"] = {n: None if t is None else t.clone() for n, t in local.items()}
    result["ep_rank"] = topology.rank("ep")
    _reduce_grads(layer, topology, mean=False)
    result["router"] = layer.gate.weight.grad
    result["experts"] = _gather_experts(local, topology)
    return result


def _as_transformers(model: nn.Module, topology, grads: bool = False) -> dict[str, torch.Tensor]:
    """Parameters (or their gradients) under the transformers names: gathered experts fused back."""
    out = {}
    for name, p in model.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        value = p.grad if grads else p.detach()
        if leaf not in EXPERT_WEIGHTS:
            out[name] = value.clone()
        elif leaf == "w1":
            module = model.get_submodule(prefix)
            local = {n: getattr(module, n).grad if grads else getattr(module, n).detach() for n in EXPERT_WEIGHTS}
            full = _gather_experts(local, topology)
            out[f"{prefix}.gate_up_proj"] = torch.cat([full["w1"], full["w3"]], dim=1)
            out[f"{prefix}.down_proj"] = full["w2"]
    return out


def _mixtral_case(topology) -> dict:
    model = tiny_mixtral()
    opt = make_optimizer(model)  # built before the conversion, as tidal.wrap receives it
    converted = len(apply_expert_parallel(model, topology, opt))
    groups = [{id(p) for p in g["params"]} for g in opt.param_groups]
    regrouped = groups == [{id(p) for p in model.parameters() if (p.dim() >= 2) == decay} for decay in (True, False)]
    dp, rank = topology.size("dp_sp"), topology.rank("dp_sp")
    losses, missing_grads, first_grads = [], [], None
    for ids in batches(STEPS, GLOBAL_BATCH):
        mine = ids.chunk(dp)[rank]
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        missing_grads += [n for n, p in model.named_parameters() if p.grad is None]
        _reduce_grads(model, topology, mean=True)
        first_grads = first_grads or _as_transformers(model, topology, grads=True)
        opt.step()
        opt.zero_grad()
        total = loss.detach().reshape(1)
        dist.all_reduce(total)
        losses.append(total.item() / dp)
    params = _as_transformers(model, topology)
    return {
        "losses": losses,
        "params": params,
        "grads": first_grads,
        "missing": missing_grads,
        "converted": converted,
        "regrouped": regrouped,
    }


def _error(build) -> str:
    try:
        build()
    except ExpertParallelError as e:
        return str(e)
    return "no error"


def _bad_sizes(topology) -> dict:
    from transformers import MixtralForCausalLM

    config = copy.deepcopy(tiny_mixtral().config)
    config.num_local_experts = 3
    return {
        "layer": _error(lambda: MoELayer(HIDDEN, FFN, 3, 1, group=topology.group("ep"))),
        "mixtral": _error(lambda: apply_expert_parallel(MixtralForCausalLM(config), topology)),
    }


def _run_scenarios(rank: int, world: int) -> dict:
    topology = tidal.init({"parallel": {"ep": 2}, "logging": {"progress": False}}).topology
    results = {name: _layer_case(topology, skewed, cf) for name, (skewed, cf, _) in LAYER_CASES.items()}
    results["mixtral"] = _mixtral_case(topology)
    results["bad_sizes"] = _bad_sizes(topology)
    results["sizes"] = {name: topology.size(name) for name in ("ep", "edp", "dp_sp")}
    tidal.shutdown()
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=["world2-ep2", "world4-ep2-edp2"])
def spawned(request):
    """Every scenario, run once per world size (one spawn: importing torch and transformers is the slow part)."""
    return request.param, run_ranks(_run_scenarios, request.param, timeout=400)


pytestmark = pytest.mark.timeout(450)


def test_sizes_are_as_planned(spawned):
    world, results = spawned
    assert results[0]["sizes"] == {"ep": 2, "edp": world // 2, "dp_sp": world}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_matches_single_process(spawned, case):
    world, spawned_results = spawned
    results = [r[case] for r in spawned_results]
    skewed, capacity_factor, reference = LAYER_CASES[case]
    ref = _layer_reference(skewed, capacity_factor, world if reference == "shards" else 1)
    torch.testing.assert_close(torch.cat([r["out"] for r in results]), ref["out"], **TOL)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in results]), ref["x_grad"], **TOL)
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["router"], ref["router"], **TOL, msg=lambda m, rank=rank: f"rank {rank}: {m}")
        for name in EXPERT_WEIGHTS:
            torch.testing.assert_close(r["experts"][name], ref["experts"][name], **TOL)
    if reference == "shards":
        assert [r["dropped"] for r in results] == ref["dropped"]
        assert all(r["dropped"] > 0 for r in results), "the capacity factor must actually drop assignments"


def test_experts_without_tokens_get_zero_grads(spawned):
    """Every token goes to experts 0 and 1 (ep rank 0): the other ranks' experts see no row, no deadlock."""
    _, results = spawned
    x, _ = _inputs(skewed=True)
    _, _, chosen = _dense_layer(skewed=True).gate(x.reshape(-1, HIDDEN))
    assert set(chosen.unique().tolist()) == {0, 1}
    for r in results:
        grads = r["skewed"]["local_expert_grads"]
        assert all(g is not None for g in grads.values())
        if r["skewed"]["ep_rank"] == 1:
            assert all(torch.count_nonzero(g) == 0 for g in grads.values())
        else:
            assert all(g[:2].abs().sum() > 0 for g in grads.values())


@pytest.fixture(scope="module")
def mixtral_reference():
    """Per-step losses, final parameters and first-step gradients of the plain transformers model."""
    model = tiny_mixtral()
    ids = batches(1, GLOBAL_BATCH)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    return (*reference_run(STEPS, GLOBAL_BATCH, model_name="mixtral"), {n: p.grad for n, p in model.named_parameters()})


def test_mixtral_trains_like_single_process(spawned, mixtral_reference):
    _, results = spawned
    ref_losses, ref_params, ref_grads = mixtral_reference
    for rank, r in enumerate(results):
        m = r["mixtral"]
        assert m["converted"] == 2 and m["regrouped"], f"rank {rank}: the optimizer holds the new expert weights"
        assert m["missing"] == [], f"rank {rank}: parameters without a gradient"
        assert m["losses"] == pytest.approx(ref_losses, abs=LOSS_TOL), f"rank {rank}"
        assert m["grads"].keys() == ref_grads.keys()
        for name, ref in ref_grads.items():
            torch.testing.assert_close(
                m["grads"][name], ref, **EXACT, msg=lambda e, n=name, r=rank: f"rank {r} {n}: {e}"
            )
        assert m["params"].keys() == ref_params.keys()
        for name, ref in ref_params.items():
            diff = (m["params"][name] - ref).abs().max().item()
            assert diff < PARAM_TOL, f"rank {rank} {name}: max |diff| {diff:.2e}"


def test_ep_not_dividing_experts_names_the_fix(spawned):
    _, results = spawned
    for r in results:
        assert r["bad_sizes"] == {
            "layer": "ep=2 does not divide num_experts=3; choose ep in {1, 3}",
            "mixtral": "ep=2 does not divide num_experts=3; choose ep in {1, 3}",
        }


def _dense_loop(layer: MoELayer, x: torch.Tensor, keep=None) -> torch.Tensor:
    """Token by token: the renormalised top-k of the router's softmax, each chosen expert's SwiGLU, weighted."""
    e = layer.experts
    out = torch.zeros_like(x)
    for t, token in enumerate(x):
        weights, chosen = torch.topk(torch.softmax(layer.gate.weight @ token, dim=-1), layer.top_k)
        for slot, (w, i) in enumerate(zip(weights / weights.sum(), chosen.tolist(), strict=True)):
            if keep is None or keep[t][slot]:
                h = torch.nn.functional.silu(e.w1[i] @ token) * (e.w3[i] @ token)
                out[t] += w * (e.w2[i] @ h)
    return out


def test_layer_equals_dense_loop():
    layer = _dense_layer(seed=1)
    x = torch.randn(12, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _dense_loop(layer, x), **EXACT)
    assert layer.dropped == 0 and layer.assignments == 12 * TOP_K and layer.drop_fraction == 0.0


def test_converted_mixtral_equals_transformers():
    model = tiny_mixtral()
    ref = copy.deepcopy(model)
    assert convert_mixtral_moe(model, None) == 2
    block, ref_block = model.model.layers[0].mlp, ref.model.layers[0].mlp
    assert isinstance(block, MoELayer) and block.gate is not ref_block.gate
    x = torch.randn(2, SEQ, 32)
    outs = []
    for b in (block, ref_block):
        xi = x.clone().requires_grad_()
        out = b(xi)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        outs.append((out, xi.grad, b.gate.weight.grad))
    for mine, theirs in zip(*outs, strict=True):
        torch.testing.assert_close(mine, theirs, **EXACT)
    gate_up, down = ref_block.experts.gate_up_proj.grad, ref_block.experts.down_proj.grad
    torch.testing.assert_close(torch.cat([block.experts.w1.grad, block.experts.w3.grad], 1), gate_up, **EXACT)
    torch.testing.assert_close(block.experts.w2.grad, down, **EXACT)

    ids = torch.randint(0, VOCAB, (2, SEQ))
    mine, theirs = (m(input_ids=ids, labels=ids, output_router_logits=True) for m in (model, ref))
    torch.testing.assert_close(mine.logits, theirs.logits, **EXACT)
    torch.testing.assert_close(mine.aux_loss, theirs.aux_loss, **EXACT)  # router logits still recorded


def _routes(layer: MoELayer, x: torch.Tensor) -> list[list[int]]:
    return layer.gate(x)[2].tolist()


def test_capacity_drops_by_hand():
    """All 8 tokens pick expert 0 then 1; capacity ceil(0.5 * 8 * 2 / 4) = 2 keeps tokens 0 and 1 only."""
    torch.manual_seed(0)
    layer = MoELayer(HIDDEN, FFN, 4, 2, capacity_factor=0.5)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.tensor([1.0, 0.5, -1.0, -1.0])[:, None].expand(4, HIDDEN))
    x = torch.rand(8, HIDDEN) + 0.1
    assert _routes(layer, x) == [[0, 1]] * 8
    with torch.no_grad():
        out = layer(x)
        unlimited = _dense_loop(layer, x)
    assert (layer.dropped, layer.assignments, layer.drop_fraction) == (12, 16, 0.75)
    torch.testing.assert_close(out[:2], unlimited[:2], **EXACT)
    assert torch.count_nonzero(out[2:]) == 0, "a token with every assignment dropped keeps only its residual"


def test_capacity_keeps_first_choices_first():
    """Random routing: the kept assignments are those of a literal walk, all first choices before seconds."""
    layer = _dense_layer(capacity_factor=0.6, seed=2)
    x = torch.randn(20, HIDDEN)
    capacity = math.ceil(0.6 * 20 * TOP_K / EXPERTS)
    routes, used = _routes(layer, x), [0] * EXPERTS
    keep = [[False] * TOP_K for _ in routes]
    for slot in range(TOP_K):
        for t, chosen in enumerate(routes):
            if used[chosen[slot]] < capacity:
                used[chosen[slot]] += 1
                keep[t][slot] = True
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _dense_loop(layer, x, keep), **EXACT)
    assert layer.dropped == sum(not k for row in keep for k in row) > 0


def test_aux_loss_equals_the_formula():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    layer = _dense_layer(seed=3)
    x = torch.randn(30, HIDDEN)
    layer(x)
    probs = torch.softmax(x @ layer.gate.weight.T, dim=-1)
    chosen = torch.topk(probs, TOP_K).indices
    f = torch.tensor([(chosen == e).sum().item() / 30 for e in range(EXPERTS)])
    torch.testing.assert_close(layer.aux_loss, EXPERTS * (f * probs.mean(0)).sum(), **EXACT)
    torch.testing.assert_close(layer.aux_loss, load_balancing_loss_func((x @ layer.gate.weight.T,), EXPERTS, TOP_K))
    model = nn.Sequential(layer, _dense_layer(seed=4))
    model(x)
    expected = 0.01 * (model[0].aux_loss + model[1].aux_loss)
    torch.testing.assert_close(moe_aux_loss(model), expected)
    moe_aux_loss(model).backward()
    assert layer.gate.weight.grad.abs().sum() > 0, "the aux loss trains the router"


def test_expert_parameters_are_marked():
    model = tiny_mixtral()
    layers = apply_expert_parallel(model, None)
    assert len(layers) == 2 and all(layer.ep == 1 for layer in layers)
    names = {n for n, p in model.named_parameters() if any(p is q for q in expert_parameters(model))}
    assert names == {f"model.layers.{i}.mlp.experts.{w}" for i in range(2) for w in EXPERT_WEIGHTS}


def test_bad_sizes_name_the_fix():
    with pytest.raises(ExpertParallelError, match=r"top_k=9 is not in 1..num_experts=8"):
        MoELayer(HIDDEN, FFN, EXPERTS, 9)
    with pytest.raises(ExpertParallelError, match=r"capacity_factor=0 must be positive, or None"):
        MoELayer(HIDDEN, FFN, EXPERTS, TOP_K, capacity_factor=0)
    model = tiny_mixtral()
    model.model.layers[0].mlp.jitter_noise = 0.1
    with pytest.raises(ExpertParallelError, match=r"router_jitter_noise=0.1 .* set router_jitter_noise=0"):
        convert_mixtral_moe(model, None)
