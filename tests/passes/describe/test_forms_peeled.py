"""Ops around the MoE core inside the block: gpt-oss's reference `MLPBlock` normalises its input (its own RMSNorm,
`scale`, eps 1e-5), routes and runs the experts with einsum on gathered weights (interleaved SwiGLU, biases), and
adds the input back. The norm and the residual are peeled off as ops around the fused core. Fused and checked on
4,096 fresh tokens (fp32, normwise relative error 1e-5), gradients included; also a LayerNorm variant without the
residual."""
from __future__ import annotations

import handwritten as hw
import pytest
import torch
from handwritten import GptOssMLPBlock as MLPBlock
from torch import nn

H = 32


FORMS = {
    # softmax over the top-k logits reads as the renormalised top-k of the softmax: the same values
    "gpt_oss_mlp_block": (lambda: MLPBlock(), "rms norm in | softmax>top2 renorm bias | gated clamped_swiglu"),
    "layernorm_no_residual": (lambda: MLPBlock(nn.LayerNorm(H), residual=False),
                              "layer norm in | softmax>top2 renorm bias"),
}


@pytest.mark.parametrize("name", FORMS)
def test_norm_and_residual_peeled_around_the_fused_core(name, quiet):
    build, summary = FORMS[name]
    torch.manual_seed(0)
    block = build().eval()
    x = torch.randn(4096, H)
    fused, _, (want,) = hw.fuse_and_compare(block, x, summary)
    assert fused.spec.residual == block.residual
    # the input's gradient goes through the peeled norm and residual too
    grads = []
    for module in (block, fused):
        x_grad = x[:300].clone().requires_grad_(True)
        (module(x_grad) * want[:300]).sum().backward()
        grads.append(x_grad.grad)
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 1e-5
