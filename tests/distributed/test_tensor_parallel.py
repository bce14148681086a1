"""Tensor parallelism at tp=2 (with and without sequence parallel) against a single-process PyTorch run.

Every tp rank trains the same full batch; GPT-2 (Conv1D, fused qkv, tied embeddings), Llama (GQA) and
Mixtral (experts split over tp) take 3 AdamW steps. Tolerance, fp32 throughout: the only difference from
the reference is the order of floating-point sums (partial matmuls all-reduced, the softmax denominator
summed over vocabulary shards), so per-step losses agree to 1e-5 and step-1 gradients to 1e-6 absolute
(measured: 5e-7 and 5e-8). The vocabulary-parallel loss equals F.cross_entropy on full logits to 1e-6.
At 4 ranks, tp=2 x dp=2 (data parallel by hand: local gradient shards all-reduced over dp) matches too.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from models import MODELS, SEQ, VOCAB, batches, make_optimizer
from ranks import run_ranks
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

import tidal
from tidal.parallel.tensor import (
    TensorParallelError,
    apply_tensor_parallel,
    validate_tensor_parallel,
    vocab_parallel_cross_entropy,
)

STEPS = 3
BATCH = 4
LOSS_TOL = 1e-5
GRAD_TOL = 1e-6
SCENARIOS = [(name, sp) for name in ("gpt2", "llama", "mixtral") for sp in (False, True)]
MLP_PLAN = {"up": "colwise", "down": "rowwise"}


class TinyMLP(nn.Module):
    """A plain module (no transformers) for a user-written plan."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class LargestVocabTensor(TorchDispatchMode):
    """Records the largest plain (local) tensor any op produced with a dim of the vocabulary's size."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if type(t) is torch.Tensor and VOCAB in t.shape:
                self.largest = max(self.largest, t.numel())
        return out


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }


def _train(model: nn.Module, step, steps: int = STEPS):
    """Losses of `steps` AdamW steps and the first step's gradients; `step(model, i)` runs forward and backward."""
    opt = make_optimizer(model)
    losses, grads = [], None
    for i in range(steps):
        losses.append(step(model, i))
        grads = grads or _grads(model)
        opt.step()
        opt.zero_grad()
    return losses, grads


def _lm_step(model: nn.Module, i: int) -> float:
    ids = batches(STEPS, BATCH)[i]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item()


def _mlp_step(model: nn.Module, i: int) -> float:
    loss = model(torch.randn(BATCH, 8, generator=torch.Generator().manual_seed(i))).pow(2).mean()
    loss.backward()
    return loss.item()


def _run(rank: int, world: int) -> dict:
    ctx = tidal.init({"parallel": {"tp": world}, "logging": {"progress": False}})
    topo, out = ctx.topology, {}
    for name, sp in SCENARIOS:
        model = MODELS[name]()
        info = apply_tensor_parallel(model, topo, sequence_parallel=sp)
        ids = batches(1, BATCH)[0]
        with LargestVocabTensor() as watch:
            result = model(input_ids=ids, labels=ids)
            result.loss.backward()
        unlike = [
            n
            for n, p in model.named_parameters()
            if isinstance(p, DTensor)
            and (p.grad.placements != p.placements or p.grad.to_local().shape != p.to_local().shape)
        ]
        model.zero_grad()
        out[(name, sp)] = {
            "unlike": unlike,
            "train": _train(model, _lm_step),
            "logits": (type(result.logits).__name__, tuple(result.logits.to_local().shape)),
            "largest": watch.largest,
            "styles": info.styles,
            "sharded": info.sharded,
        }
        if name == "gpt2":
            out[(name, sp)]["tied"] = model.lm_head.weight is model.transformer.wte.weight
        if name == "llama" and sp:
            try:
                model(input_ids=ids[:, :-1])
            except ValueError as e:
                out["odd_sequence"] = str(e)
    gathered = MODELS["gpt2"]()
    apply_tensor_parallel(gathered, topo, loss_parallel=False)
    result = gathered(input_ids=ids, labels=ids)
    out["gathered"] = (type(result.logits).__name__, tuple(result.logits.shape), result.loss.item())
    mlp = TinyMLP()
    apply_tensor_parallel(mlp, topo, MLP_PLAN)
    out["mlp"] = _train(mlp, _mlp_step)
    out["ce"] = _vocab_ce(topo)
    tidal.shutdown()
    return out


def _ce_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, VOCAB, generator=gen) * 4
    labels = torch.randint(0, VOCAB, (2, 5), generator=gen)
    labels[0, :2] = -100
    return logits, labels


def _vocab_ce(topo) -> dict:
    logits, labels = _ce_inputs()
    mesh = topo.submesh("tp")
    out = {}
    for form in ("dtensor", "local"):
        leaf = distribute_tensor(logits, mesh, [Shard(-1)]).requires_grad_()
        given = leaf if form == "dtensor" else leaf.to_local()
        for reduction in ("mean", "sum", "none"):
            loss = vocab_parallel_cross_entropy(given, labels, topo, reduction=reduction)
            out[(form, reduction)] = loss.detach().clone()
        vocab_parallel_cross_entropy(given, labels, topo).backward()
        out[(form, "grad")] = leaf.grad.full_tensor()
    return out


def _dp_step(topo):
    """Llama step on this dp rank's half of the batch, gradients averaged over dp as a data-parallel engine would."""
    dp, dp_rank = topo.size("dp"), topo.rank("dp")

    def step(model: nn.Module, i: int) -> float:
        ids = batches(STEPS, BATCH)[i].chunk(dp)[dp_rank]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in model.parameters():
            # A DTensor gradient's local shard (Shard, or Partial over tp for sp norms) reduces like a plain one.
            local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            dist.all_reduce(local, group=topo.group("dp"))
            local /= dp
        total = loss.detach().clone()
        dist.all_reduce(total, group=topo.group("dp"))
        return total.item() / dp

    return step


def _run_tp_dp(rank: int, world: int) -> tuple:
    ctx = tidal.init({"parallel": {"tp": 2}, "logging": {"progress": False}})
    model = MODELS["llama"]()
    apply_tensor_parallel(model, ctx.topology, sequence_parallel=True)
    out = (ctx.topology.ranks("tp"), _train(model, _dp_step(ctx.topology)))
    tidal.shutdown()
    return out


@pytest.fixture(scope="module")
def two_ranks():
    """Every scenario on 2 ranks, tp=2 (one spawn: importing torch and transformers is the slow part)."""
    return run_ranks(_run, 2, timeout=400)


pytestmark = pytest.mark.timeout(450)


def _close(got: dict, want: dict, tol: float, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key, ref in want.items():
        diff = (got[key] - ref).abs().max().item()
        assert diff < tol, f"{what} {key}: max |diff| {diff:.2e}"


@pytest.mark.parametrize("name,sp", SCENARIOS)
def test_losses_and_gradients_match_single_process(two_ranks, name, sp):
    ref_losses, ref_grads = _train(MODELS[name](), _lm_step)
    for rank, results in enumerate(two_ranks):
        losses, grads = results[(name, sp)]["train"]
        assert losses == pytest.approx(ref_losses, abs=LOSS_TOL), f"rank {rank}"
        _close(grads, ref_grads, GRAD_TOL, f"rank {rank} grad")


@pytest.mark.parametrize("name,sp", SCENARIOS)
def test_no_rank_builds_full_vocabulary_logits(two_ranks, name, sp):
    full_logits = BATCH * SEQ * VOCAB
    model, ids = MODELS[name](), batches(1, BATCH)[0]
    with LargestVocabTensor() as watch:
        model(input_ids=ids, labels=ids).loss.backward()
    assert watch.largest >= full_logits, "the watch must see the single-process model's full logits"
    for results in two_ranks:
        r = results[(name, sp)]
        assert r["logits"] == ("DTensor", (BATCH, SEQ, VOCAB // 2))
        assert r["largest"] < full_logits
        assert r["unlike"] == [], "a DTensor gradient must be laid out (and split) like its parameter"


def test_plans_split_what_they_name(two_ranks):
    r = two_ranks[0]
    assert r[("gpt2", False)]["styles"]["transformer.h.1.attn.c_attn"] == "colwise_qkv"
    assert "transformer.h.0.ln_1" not in r[("gpt2", False)]["styles"]  # sp-only styles are skipped without sp
    assert r[("gpt2", True)]["styles"]["transformer.h.0.ln_1"] == "sequence"
    assert r[("gpt2", False)]["tied"] and r[("gpt2", True)]["tied"], "GPT-2's lm_head must stay tied to wte"
    assert "model.layers.0.mlp.experts.gate_up_proj" in r[("mixtral", False)]["sharded"]
    assert "model.layers.0.mlp.gate.weight" not in r[("mixtral", False)]["sharded"]


def test_tensor_and_data_parallel_compose_at_four_ranks():
    ref_losses, ref_grads = _train(MODELS["llama"](), _lm_step)
    for rank, (tp_ranks, (losses, grads)) in enumerate(run_ranks(_run_tp_dp, 4, timeout=400)):
        assert tp_ranks == (rank // 2 * 2, rank // 2 * 2 + 1)
        assert losses == pytest.approx(ref_losses, abs=LOSS_TOL), f"rank {rank}"
        _close(grads, ref_grads, GRAD_TOL, f"rank {rank} grad")


def test_loss_parallel_off_gathers_full_logits(two_ranks):
    ids = batches(1, BATCH)[0]
    want = MODELS["gpt2"]()(input_ids=ids, labels=ids).loss.item()
    for results in two_ranks:
        kind, shape, loss = results["gathered"]
        assert (kind, shape) == ("Tensor", (BATCH, SEQ, VOCAB))
        assert loss == pytest.approx(want, abs=LOSS_TOL)


def test_user_plan_on_a_plain_module(two_ranks):
    ref_losses, ref_grads = _train(TinyMLP(), _mlp_step)
    for results in two_ranks:
        losses, grads = results["mlp"]
        assert losses == pytest.approx(ref_losses, abs=LOSS_TOL)
        _close(grads, ref_grads, GRAD_TOL, "grad")


def test_vocab_parallel_loss_equals_cross_entropy(two_ranks):
    logits, labels = _ce_inputs()
    full = logits.clone().requires_grad_()
    F.cross_entropy(full.view(-1, VOCAB), labels.view(-1)).backward()
    for results in two_ranks:
        for form in ("dtensor", "local"):
            for reduction in ("mean", "sum", "none"):
                want = F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1), reduction=reduction)
                got = results["ce"][(form, reduction)]
                torch.testing.assert_close(got.view(-1) if reduction == "none" else got, want, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(results["ce"][(form, "grad")], full.grad, atol=1e-6, rtol=1e-6)


def test_sequence_parallel_names_a_sequence_length_it_cannot_split(two_ranks):
    assert "sequence length 15 is not divisible by tp=2" in two_ranks[0]["odd_sequence"]


@pytest.mark.parametrize(
    "name,tp,message",
    [
        (
            "llama",
            4,
            "tp=4 does not divide num_key_value_heads=2 (each rank holds whole key/value heads); choose tp in {1, 2}",
        ),
        ("gpt2", 4, "tp=4 does not divide num_attention_heads=2"),
        ("llama", 3, "tp=3 does not divide num_attention_heads=4"),
        ("mixtral", 5, "tp=5 does not divide num_attention_heads=4"),
    ],
)
def test_bad_sizes_name_the_fix(name, tp, message):
    with pytest.raises(TensorParallelError) as err:
        validate_tensor_parallel(MODELS[name](), tp)
    assert message in str(err.value)


def test_vocab_not_divisible_suggests_padding():
    plan = {"model.embed_tokens": "vocab_embedding", "lm_head": "vocab_head"}
    with pytest.raises(TensorParallelError, match=r"vocab_size=96 .*pad_to_multiple_of=5"):
        validate_tensor_parallel(MODELS["llama"](), 5, plan)


def test_intermediate_and_user_plan_errors():
    with pytest.raises(TensorParallelError, match=r"tp=5 does not divide intermediate_size=64"):
        validate_tensor_parallel(MODELS["llama"](), 5, {"model.layers.*.mlp": "mlp"})
    with pytest.raises(TensorParallelError, match=r"dim 0 of up.weight \(its size 16.*choose tp in \{1, 2, 4, 8, 16\}"):
        validate_tensor_parallel(TinyMLP(), 3, MLP_PLAN)
    with pytest.raises(TensorParallelError, match=r"did you mean 'colwise'"):
        validate_tensor_parallel(TinyMLP(), 2, {"up": "colwse"})
    with pytest.raises(TensorParallelError, match=r"pattern 'layers\.\*\.up' matches no module"):
        validate_tensor_parallel(TinyMLP(), 2, {"layers.*.up": "colwise"})
    with pytest.raises(TensorParallelError, match=r"no built-in tensor-parallel plan for TinyMLP"):
        validate_tensor_parallel(TinyMLP(), 2)
