"""Training with fused blocks: the op's backward under torch.compile, torch.utils.checkpoint, HF gradient
checkpointing, autocast and FSDP2's fully_shard (one process), each against the same step without moecompile or
against float64 autograd through the reference. On the CPU the Triton kernels run in the interpreter.

Tolerances: normwise relative error per gradient; 1e-5 where both sides compute in fp32 with the same math, 1e-4
against an HF model (its experts sum in another order), 2.5e-2 under bf16 autocast (kernels/test_backward.py's
bf16 bound)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import moecompile
from moecompile import hf_zoo
from moecompile.kernels import backward as kernel_backward
from moecompile.spec import MoEWeights

sys.path.insert(0, str(Path(__file__).parent / "kernels"))
import cases  # noqa: E402  (the kernels' spec and weight builders)

# the GPU when there is one (the device run), else the CPU with the kernels in Triton's interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _block(router="softmax_topk_renorm", mlp="shared_gated", dtype=torch.float32, seed=0):
    spec = cases.make_spec(router, 8, 2, 32, 24, mlp)
    w = cases.make_weights(spec, dtype, DEVICE, torch.Generator().manual_seed(seed))
    params = MoEWeights(**{n: None if t is None else nn.Parameter(t) for n, t in w.items()})
    return moecompile.FusedMoE(spec, params, backend="triton")


def _grads(module: nn.Module, x: torch.Tensor, probe: torch.Tensor, call=None) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    x, probe = x.to(DEVICE), probe.to(DEVICE)
    x = x.detach().clone().requires_grad_(True)
    y = (call if call is not None else module)(x)
    (y.float() * probe).sum().backward()
    return {"x": x.grad, **{n: p.grad for n, p in module.named_parameters() if p.grad is not None}}


def _assert_same(got: dict, want: dict, tol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        err = cases.relative_error(got[name].cpu(), want[name].cpu())
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.fixture
def count_backward(monkeypatch):
    calls = []
    real = kernel_backward.backward
    monkeypatch.setattr(kernel_backward, "backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_compiled_training_graph_calls_the_fused_backward(count_backward):
    """torch.compile(fullgraph=True) of a training step: AOTAutograd traces the op and its backward op as one call
    each, and the gradients are the eager ones."""
    block = _block()
    x, probe = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    eager = _grads(block, x, probe)
    count_backward.clear()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    _assert_same(_grads(block, x, probe, compiled), eager, 1e-6)
    assert count_backward, "the compiled backward did not run the Triton backward"


def test_activation_checkpointing():
    """torch.utils.checkpoint around the block (non-reentrant): the op saves its inputs only, so the recompute
    changes nothing but when the forward runs."""
    block = _block()
    x, probe = torch.randn(19, 32), torch.randn(19, 32)
    plain = _grads(block, x, probe)
    ckpt = _grads(block, x, probe, lambda t: torch.utils.checkpoint.checkpoint(block, t, use_reentrant=False))
    _assert_same(ckpt, plain, 1e-6)


def test_autocast_runs_the_experts_in_bf16_with_fp32_parameters(count_backward):
    """Under autocast the expert matmuls run in bf16, as nn.Linear's would; the gradients reach the fp32
    parameters and agree with float64 autograd on the bf16-rounded expert weights and input."""
    block = _block(mlp="swiglu")
    x, probe = torch.randn(37, 32, device=DEVICE), torch.randn(37, 32, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert block(x).dtype == torch.bfloat16
        got = _grads(block, x, probe)
    assert count_backward, "autocast fell back to the reference backward"
    assert all(g.dtype == torch.float32 for g in got.values())
    rounded = {n: (p.detach().bfloat16() if n in ("w1", "w2") else p.detach()).cpu().double().requires_grad_(True)
               for n, p in block.named_parameters()}
    xr = x.bfloat16().cpu().double().requires_grad_(True)
    y, _ = moecompile.reference.reference_forward(block.spec, MoEWeights(**rounded), xr)
    (y * probe.cpu().double()).sum().backward()
    _assert_same(got, {"x": xr.grad, **{n: t.grad for n, t in rounded.items()}}, 2.5e-2)


def test_hf_gradient_checkpointing_matches_the_original_model(count_backward):
    """A tiny Qwen3-MoE from its config, optimized, its blocks on the kernels, trained one step with transformers'
    gradient checkpointing: every parameter's gradient as in the original model's step."""
    original = hf_zoo.build("qwen3_moe").to(DEVICE)
    inputs = {n: t.to(DEVICE) for n, t in hf_zoo.example_inputs(original, batch=2, seq=12).items()}
    optimized = moecompile.optimize(original)
    fused = [m for m in optimized.modules() if isinstance(m, moecompile.FusedMoE)]
    assert fused, moecompile.report(optimized)
    for m in fused:
        m.backend = "triton"

    def step(model):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad(set_to_none=True)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    want = step(original)
    got = step(optimized)
    assert len(count_backward) >= len(fused), "a fused block's backward did not run on the kernels"
    fused_names = {"mlp.router_weight": "mlp.gate.weight", "mlp.w1": "mlp.experts.gate_up_proj",
                   "mlp.w2": "mlp.experts.down_proj"}  # Qwen3-MoE's experts are already in the canonical layout
    renamed = {}
    for name, grad in got.items():
        for fused_name, hf_name in fused_names.items():
            name = name.replace(fused_name, hf_name)
        renamed[name] = grad
    assert any("gate_up_proj" in n for n in renamed) and renamed.keys() == want.keys()
    _assert_same(renamed, want, 1e-4)


def test_fsdp2_fully_shard_on_one_process(tmp_path, count_backward):
    """FSDP2's fully_shard (gloo, world size 1) around a model holding a FusedMoE: the step's gradients are the
    unsharded model's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 32), _block(seed=1), nn.Linear(32, 32)).to(DEVICE)

    x, probe = torch.randn(23, 32), torch.randn(23, 32)
    want = _grads(model(), x, probe)
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", init_method=f"file://{tmp_path}/pg", rank=0,
                            world_size=1)
    try:
        sharded = model()
        fully_shard(sharded[1], mesh=init_device_mesh(DEVICE, (1,)))
        fully_shard(sharded, mesh=init_device_mesh(DEVICE, (1,)))
        count_backward.clear()
        got = _grads(sharded, x, probe)
        got = {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in got.items()}
    finally:
        dist.destroy_process_group()
    assert count_backward
    _assert_same(got, want, 1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor's Triton code generation needs a GPU")
def test_inductor_training_cuda(count_backward):
    """torch.compile with Inductor (the default backend) of a bf16 training step: the same gradients as eager."""
    block = _block(dtype=torch.bfloat16)
    x, probe = torch.randn(2, 300, 32, dtype=torch.bfloat16), torch.randn(2, 300, 32)
    eager = _grads(block, x, probe)
    count_backward.clear()
    compiled = torch.compile(block, fullgraph=True)
    _assert_same(_grads(block, x, probe, compiled), eager, 1e-2)
    assert count_backward
