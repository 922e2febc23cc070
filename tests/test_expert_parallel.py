"""Expert parallelism (expert_parallel.py) on the CPU with gloo, 2 and 4 processes, against one process.

Each rank calls the sharded block or model on its own tokens; the single-process reference is the unsharded FusedMoE
(PyTorch reference backend) on the same tokens. Checked per rank:
- outputs: normwise relative error <= 1e-5 in fp32 (the sum over a token's experts is added in another order),
  1.5e-2 in bf16;
- gradients of the input, the router and the shared experts (replicated: the rank's own loss) and of the rank's
  experts (the sum of every rank's loss, as the exchange carries the other ranks' tokens to them): 1e-5 in fp32;
- uneven loads (a router bias sends most pairs to rank 0's experts), a rank with no tokens, one token;
- router forms that route differently: softmax top-k with a shared gated expert, ReLU (a variable number per token),
  grouped sigmoid with a correction bias, weights on the input (Llama 4), a capacity from the token count;
- a tiny Qwen3-MoE through optimize(expert_parallel=...), eager, under torch.compile (with and without
  capture_scalar_outputs) and with FSDP2's fully_shard
  on the replicated parameters; E not divisible by the ranks refused before anything changes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_harness import spawn

import moecompile
from moecompile.spec import MoEWeights

sys.path.insert(0, str(Path(__file__).parent / "kernels"))
from cases import make_spec, make_weights  # noqa: E402

RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}
TOKENS = (37, 0, 5, 1)  # per rank: uneven, none, few, one
BLOCK_CASES = (("softmax_topk_renorm", "shared_gated", 2), ("relu_bias", "swiglu", None),
               ("sigmoid_grouped_corr", "swiglu", 3), ("sigmoid_topk_bias", "weight_on_input", 1),
               ("capacity_factor", "gelu_bias", 2))


def _spawn(world: int, scenario: str, tmp_path: Path) -> None:
    spawn(world, "test_expert_parallel", scenario, tmp_path)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Normwise relative error; the reference's norm is floored at 1e-2 (the outputs and gradients here are of
    order 1), so that a gradient that is zero in exact arithmetic (top-1 renormalised: the weight is s / s) is
    judged by its absolute rounding (6e-8 on one CPU), not divided by 0."""
    if want.numel() == 0:
        return 0.0 if got.shape == want.shape else float("inf")
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-2)).item()


def _tokens(rank: int, world: int, H: int, dtype) -> torch.Tensor:
    n = TOKENS[rank % len(TOKENS)] if world > 1 else 9
    return torch.randn(1, n, H, generator=torch.Generator().manual_seed(100 + rank)).to(dtype)


def _grads(loss: torch.Tensor, inputs: list) -> list:
    """d loss / d inputs, None for an input it does not reach (a loss over no tokens reaches none)."""
    if loss.grad_fn is None:
        return [None] * len(inputs)
    return list(torch.autograd.grad(loss, inputs, allow_unused=True))


def _params(weights: MoEWeights, dtype) -> MoEWeights:
    return MoEWeights(**{name: None if t is None else torch.nn.Parameter(t.to(dtype)) for name, t in weights.items()})


# ---------------------------------------------------------------------------------------------- block level


def _blocks(rank: int, world: int) -> None:
    for router, mlp, k in BLOCK_CASES:
        for dtype in (torch.float32, torch.bfloat16) if router == "softmax_topk_renorm" else (torch.float32,):
            _block_case(rank, world, router, mlp, k, dtype)


def _block_case(rank: int, world: int, router: str, mlp: str, k, dtype) -> None:
    spec = make_spec(router, 8, k or 1, 24, 20, mlp)
    base = make_weights(spec, torch.float32, "cpu", torch.Generator().manual_seed(7))
    if spec.router.has_bias:  # uneven load: rank 0's experts take most pairs
        base.router_bias = base.router_bias + torch.tensor([2.0] * (8 // world) + [0.0] * (8 - 8 // world))
    where = f"{router}/{mlp} {dtype} on {world} ranks"
    reference = moecompile.FusedMoE(spec, _params(base, dtype), backend="reference")
    sharded = moecompile.ExpertParallelMoE(moecompile.FusedMoE(spec, _params(base, dtype)))
    inputs = [_tokens(r, world, spec.hidden_size, dtype) for r in range(world)]
    x = inputs[rank].clone().requires_grad_()
    y = sharded(x)
    x_ref = inputs[rank].clone().requires_grad_()
    want = reference(x_ref)
    assert y.shape == want.shape and y.dtype == want.dtype, where
    assert _rel(y, want) <= RTOL[dtype], (where, _rel(y, want))
    if dtype != torch.float32:
        return
    # gradients: each rank's loss; the experts' gradients gather every rank's tokens
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(200 + rank))
    replicated = [n for n in ("router_weight", "router_bias", "shared_w1", "shared_gate") if getattr(sharded, n,
                                                                                                      None) is not None]
    mine = [getattr(sharded, n) for n in replicated]
    got = torch.autograd.grad((y * probe).sum(), [x, *mine, sharded.w1, sharded.w2], allow_unused=True)
    own = _grads((want * probe).sum(), [x_ref, *[getattr(reference, n) for n in replicated]])
    for name, g, w, param in zip(["input", *replicated], got, own, [x, *mine]):
        g, w = (torch.zeros_like(param) if t is None else t for t in (g, w))  # None: no token reached it
        assert _rel(g, w) <= RTOL[dtype], (where, name, _rel(g, w))
    total = sum((reference(inputs[r]) * torch.randn(reference(inputs[r]).shape, generator=torch.Generator(
    ).manual_seed(200 + r))).sum() for r in range(world))
    all_w1, all_w2 = torch.autograd.grad(total, [reference.w1, reference.w2])
    lo, hi = sharded.first, sharded.first + sharded.local
    for name, g, w in (("w1", got[-2], all_w1[lo:hi]), ("w2", got[-1], all_w2[lo:hi])):
        g = torch.zeros_like(w) if g is None else g
        assert _rel(g, w) <= RTOL[dtype], (where, name, _rel(g, w))


def _refusals(rank: int, world: int) -> None:
    spec = make_spec("softmax_topk", 6, 2, 16, 8)
    fused = moecompile.FusedMoE(spec, make_weights(spec, torch.float32, "cpu", torch.Generator().manual_seed(1)))
    with pytest.raises(moecompile.MoECompileError, match="6 experts, not divisible by the group's 4 ranks"):
        moecompile.shard_experts(torch.nn.Sequential(fused))
    with pytest.raises(moecompile.MoECompileError, match="ProcessGroup"):
        moecompile.shard_experts(torch.nn.Sequential(fused), group="world")


# ---------------------------------------------------------------------------------------------- model level


def _qwen(rank: int, world: int) -> None:
    from moecompile import hf_zoo

    torch.manual_seed(0)
    model = hf_zoo.build("qwen3_moe").float()
    for layer in model.model.layers:  # uneven load: rank 0's experts score higher
        with torch.no_grad():
            layer.mlp.gate.weight[: 8 // world] += 0.3
    reference = moecompile.optimize(model)
    for block in reference.modules():
        if isinstance(block, moecompile.FusedMoE):
            block.backend = "reference"
    sharded = moecompile.optimize(model, expert_parallel=dist.group.WORLD)
    log = moecompile.report(sharded)
    assert log.passes[-1].name == "expert_parallel" and f"rank {rank} of {world}" in log.passes[-1].note
    assert sum(isinstance(m, moecompile.ExpertParallelMoE) for m in sharded.modules()) == 2
    ids = torch.randint(0, model.config.vocab_size, (2, 3 + 4 * rank), generator=torch.Generator().manual_seed(rank))
    want = reference(input_ids=ids).logits
    got = sharded(input_ids=ids).logits
    assert _rel(got, want) <= 1e-5, _rel(got, want)

    torch._dynamo.reset()
    compiled = torch.compile(sharded, backend="aot_eager", dynamic=False)
    assert _rel(compiled(input_ids=ids).logits, want) <= 1e-5
    with torch._dynamo.config.patch(capture_scalar_outputs=True):  # the exchange traced with symbolic sizes
        torch._dynamo.reset()
        traced = torch.compile(sharded, backend="aot_eager", dynamic=False)
        assert _rel(traced(input_ids=ids).logits, want) <= 1e-5
    torch._dynamo.reset()

    # FSDP2 shards the replicated parameters; each rank's experts stay whole and its own
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    experts = moecompile.expert_parallel.expert_parameters(sharded)
    assert len(experts) == 4
    fully_shard(sharded, mesh=init_device_mesh("cpu", (world,)), ignored_params=experts)
    logits = sharded(input_ids=ids).logits
    assert _rel(logits, want) <= 1e-5
    logits.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in experts)


SCENARIOS = {"blocks": _blocks, "refusals": _refusals, "qwen": _qwen}


@pytest.mark.parametrize("world", [2, 4])
def test_blocks_match_one_process(world, tmp_path):
    _spawn(world, "blocks", tmp_path)


def test_model_eager_compiled_and_fsdp2(tmp_path):
    _spawn(2, "qwen", tmp_path)


def test_indivisible_experts_and_wrong_group_refused(tmp_path):
    _spawn(4, "refusals", tmp_path)


def test_refused_without_torch_distributed(quiet):
    from moecompile import hf_zoo

    model = hf_zoo.build("qwen3_moe")
    with pytest.raises(moecompile.MoECompileError, match="init_process_group"):
        moecompile.optimize(model, expert_parallel=object())
    assert not any(isinstance(m, moecompile.FusedMoE) for m in model.modules())
