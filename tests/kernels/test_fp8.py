"""FP8 expert weights with 128 x 128 block scales (moecompile/fp8.py) through the Triton expert kernels.

The weights are drawn with block magnitudes 2^-6 .. 2^6 apart (2^-3 .. 2^3 in 16-bit), so a scale read from a
neighbouring block (rows or columns, the up rows' offset I that is not a multiple of 128, the partial last block of
H = 200) changes the output far beyond any tolerance. Checks:
- fp32 activations: the FP8 kernels give exactly what the same kernels give on the dequantized fp32 weights (the
  same products in the same order), and the float64 reference within 1e-5;
- bf16 / fp16: the float64 reference on the dequantized weights within the dtype's tolerance (bf16 1.5e-2, fp16
  3e-3, test_experts.py's). Triton's interpreter rounds fp32 to bf16 toward zero where the GPU rounds to nearest,
  which puts its bf16 error at about 1.1e-2 here (3.7e-3 for 16-bit weights given rounded);
- the input's and the router's gradients (the reference's backward on dequantized weights), and none for the FP8
  weights;
- refusals: half-FP8 weights, a missing or misshapen scale, float8_e5m2, an ONNX export.
Tolerances are normwise relative errors."""
from __future__ import annotations

import dataclasses

import cases
import pytest
import torch

from moecompile import FusedMoE, fp8
from moecompile.errors import MoECompileError
from moecompile.kernels import launch
from moecompile.reference import reference_forward
from moecompile.spec import MoEWeights

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter cases run on the CPU machine")
fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                             reason="needs a GPU with FP8 (compute capability 8.9+; run on the device)")


def block_scaled(weight: torch.Tensor, gen: torch.Generator, spread: int) -> torch.Tensor:
    """weight with each 128 x 128 block multiplied by 2^u, u a whole number in [-spread, spread]."""
    rows, cols = weight.shape[-2:]
    exps = torch.randint(-spread, spread + 1, fp8.scale_shape(tuple(weight.shape)), generator=gen).float()
    return (weight.float() * fp8._blocks(2.0 ** exps, rows, cols)).to(weight.dtype)


def fp8_block(router: str, E: int, k: int, H: int, I: int, dtype, device="cpu", seed=0, mlp="swiglu"):
    """(spec, FP8 weights (the routed experts', and the shared experts' where there are), the same weights
    dequantized to dtype, generator)."""
    spec = cases.make_spec(router, E, k, H, I, mlp)
    gen = torch.Generator().manual_seed(seed)
    w = cases.make_weights(spec, torch.float32, "cpu", gen)
    spread = 6 if dtype == torch.float32 else 3  # fp16's range holds outputs of weights 2^3 apart
    tensors = {n: None if t is None else t.to(device, dtype) for n, t in w.items()}
    for name in fp8.QUANTIZABLE:
        if tensors[name] is not None:
            q, scale = fp8.quantize(block_scaled(getattr(w, name), gen, spread))
            tensors[name], tensors[name + "_scale"] = q.to(device), scale.to(device)
    quantized = MoEWeights(**tensors)
    return spec, quantized, fp8.dequantized(quantized, dtype), gen


def reference_error(spec, dequantized: MoEWeights, x: torch.Tensor, y: torch.Tensor) -> float:
    """y's error against the reference on the dequantized weights: float64 on the CPU; on a GPU, fp32 there (a
    Qwen3-sized block in float64 on the host would take minutes; fp32's error is far below bf16's tolerance)."""
    if x.is_cuda:
        weights = MoEWeights(**{n: None if t is None else t.float() for n, t in dequantized.items()})
        y_ref, _ = reference_forward(spec, weights, x.float())
        return cases.relative_error(y.double(), y_ref.double())
    y_ref, _ = reference_forward(spec, cases.upcast(dequantized), x.double())
    return cases.relative_error(y.double(), y_ref)


@cpu_only
@pytest.mark.parametrize("H,I,E,k,T", [(256, 160, 8, 2, 37), (200, 128, 1, 1, 5), (128, 96, 64, 8, 19),
                                       (256, 160, 16, 4, 0), (200, 128, 8, 2, 1), (128, 96, 8, 2, 37)])
def test_fp32_equals_dequantized_weights_cpu(H, I, E, k, T):
    """Shapes: the up rows' offset I = 160 inside a scale block, a partial last block of H = 200, 64 experts."""
    spec, quantized, dequantized, gen = fp8_block("softmax_topk_renorm", E, k, H, I, torch.float32, seed=H + E + T)
    x = torch.randn(T, H, generator=gen)
    y = FusedMoE(spec, quantized, backend="triton")(x)
    y_deq = FusedMoE(spec, dequantized, backend="triton")(x)
    assert torch.equal(y, y_deq), "the FP8 kernels differ from the same kernels on the dequantized weights"
    if T:
        assert reference_error(spec, dequantized, x, y) <= TOL[torch.float32]


@cpu_only
@pytest.mark.parametrize("router,dtype", [("softmax_topk", torch.bfloat16), ("sigmoid_grouped_corr", torch.bfloat16),
                                          ("capacity", torch.bfloat16), ("sigmoid_grouped_corr", torch.float16)])
def test_16bit_against_reference_cpu(dtype, router):
    spec, quantized, dequantized, gen = fp8_block(router, 16, 4, 256, 160, dtype, seed=3)
    x = torch.randn(61, 256, generator=gen).to(dtype)
    y = FusedMoE(spec, quantized, backend="triton")(x)
    assert reference_error(spec, dequantized, x, y) <= TOL[dtype]


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_experts_in_fp8_cpu(dtype):
    """The shared experts' FP8 weights (2-D scales) through the dense path of the same kernels, beside FP8 routed
    experts, with a sigmoid shared gate: fp32 exactly the kernels on the dequantized weights, bf16 within tolerance."""
    spec, quantized, dequantized, gen = fp8_block("softmax_topk", 8, 2, 256, 160, dtype, seed=5, mlp="shared_gated")
    assert quantized.shared_w1_scale is not None and quantized.shared_w1_scale.dim() == 2
    x = torch.randn(29, 256, generator=gen).to(dtype)
    y = FusedMoE(spec, quantized, backend="triton")(x)
    if dtype == torch.float32:
        assert torch.equal(y, FusedMoE(spec, dequantized, backend="triton")(x))
    assert reference_error(spec, dequantized, x, y) <= TOL[dtype]


@cpu_only
def test_thousands_of_tokens_cpu():
    """2048 tokens over 16 experts, k 4: every expert many rows, several row blocks each."""
    spec, quantized, dequantized, gen = fp8_block("softmax_topk", 16, 4, 128, 96, torch.float32, seed=9)
    x = torch.randn(2048, 128, generator=gen)
    y = FusedMoE(spec, quantized, backend="triton")(x)
    assert torch.equal(y, FusedMoE(spec, dequantized, backend="triton")(x))
    assert reference_error(spec, dequantized, x, y) <= TOL[torch.float32]


@cpu_only
def test_gradients_of_input_and_router_cpu():
    """The input's and the router's gradients with FP8 experts (computed by the reference on the dequantized
    weights) against float64 autograd; the FP8 weights are buffers and get none."""
    spec, quantized, dequantized, gen = fp8_block("softmax_topk_renorm", 8, 2, 256, 160, torch.float32, seed=4)
    router = torch.nn.Parameter(quantized.router_weight.clone())
    fused = FusedMoE(spec, dataclasses.replace(quantized, router_weight=router), backend="triton")
    x = torch.randn(23, 256, generator=gen, requires_grad=True)
    probe = torch.randn(23, 256, generator=gen)
    (fused(x) * probe).sum().backward()
    xr = x.detach().double().requires_grad_(True)
    rr = router.detach().double().requires_grad_(True)
    ref = cases.upcast(dataclasses.replace(dequantized, router_weight=rr))
    y_ref, _ = reference_forward(spec, dataclasses.replace(ref, router_weight=rr), xr)
    (y_ref * probe.double()).sum().backward()
    assert cases.relative_error(x.grad.double(), xr.grad) <= TOL[torch.float32]
    assert cases.relative_error(router.grad.double(), rr.grad) <= TOL[torch.float32]
    assert not any(name in ("w1", "w2") for name, _ in fused.named_parameters())


@cpu_only
def test_refusals_cpu(tmp_path):
    spec, quantized, dequantized, gen = fp8_block("softmax_topk", 8, 2, 256, 160, torch.float32)
    x = torch.randn(4, 256)
    half = dataclasses.replace(quantized, w2=dequantized.w2, w2_scale=None)
    assert "one of w1 and w2" in launch.unsupported_reason(spec, half, x)
    spec_s, quantized_s, dequantized_s, _ = fp8_block("softmax_topk", 8, 2, 256, 160, torch.float32, mlp="shared_gated")
    half_shared = dataclasses.replace(quantized_s, shared_w2=dequantized_s.shared_w2, shared_w2_scale=None)
    assert "one of shared_w1 and shared_w2" in launch.unsupported_reason(spec_s, half_shared, x)
    with pytest.raises(ValueError, match="w1_scale should have shape"):
        dataclasses.replace(quantized, w1_scale=None).check(spec)
    with pytest.raises(ValueError, match="w1_scale should have shape"):
        dataclasses.replace(quantized, w1_scale=quantized.w1_scale[:, :1]).check(spec)
    with pytest.raises(ValueError, match="float8_e5m2"):
        dataclasses.replace(quantized, w1=quantized.w1.to(torch.float8_e5m2)).check(spec)
    with pytest.raises(ValueError, match="w2_scale is set but weights.w2 is torch.float32"):
        dataclasses.replace(quantized, w2=dequantized.w2).check(spec)
    from moecompile.backends.onnx import export_onnx
    model = torch.nn.Sequential(FusedMoE(spec, quantized, backend="triton"))
    with pytest.raises(MoECompileError, match="FP8 expert weights"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 3, 256))
    assert not list(tmp_path.iterdir())


@fp8_gpu
@pytest.mark.parametrize("T", [1, 7, 512, 4096])
def test_qwen3_shape_bf16_cuda(T):
    """A Qwen3-30B-A3B-sized block (H 2048, I 768, E 128, k 8) in bf16 on the GPU: decode (split K), prefill."""
    spec, quantized, dequantized, gen = fp8_block("softmax_topk_renorm", 128, 8, 2048, 768, torch.bfloat16,
                                                  "cuda", seed=T)
    x = torch.randn(T, 2048, generator=gen).to("cuda", torch.bfloat16)
    y = FusedMoE(spec, quantized, backend="triton")(x)
    assert reference_error(spec, dequantized, x, y) <= TOL[torch.bfloat16]
