"""ReMoE's regulariser (remoe.py): the adaptive L1 term moves a ReLU block's sparsity to 1 - k/E, and refuses a
model without ReLU-routed blocks. CPU, fp32; tolerances beside each check."""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

import moecompile
from moecompile import MoECompileError, hf_zoo

sys.path.insert(0, str(Path(__file__).parent / "kernels"))
import cases  # noqa: E402  (the kernels' spec and weight builders)


def test_regulariser_moves_sparsity_to_its_target():
    """A toy ReLU block trained to keep matching its own dense start (so the task pulls toward ~0.5 sparsity) under
    the adaptive L1 term: sparsity goes from ~0.5 (threshold 0) to within 3 points of 1 - k/E = 0.75 (mean of the
    last 100 of 400 steps)."""
    torch.manual_seed(0)
    # a router bias, as routing="relu" gives: with symmetric inputs and no bias, ReLU(x W^T) is positive half the
    # time whatever the scale of W, so only the bias can move sparsity here
    spec = cases.make_spec("relu", 8, 2, 32, 16)
    spec = dataclasses.replace(spec, router=dataclasses.replace(spec.router, has_bias=True))
    weights = cases.make_weights(spec, torch.float32, "cpu", torch.Generator().manual_seed(23))
    params = {n: torch.nn.Parameter(t.detach().clone()) for n, t in weights.items() if t is not None}
    params["router_bias"].data.zero_()
    block = moecompile.FusedMoE(spec, moecompile.MoEWeights(**params), backend="reference")
    x = torch.randn(256, 32)
    with torch.no_grad():
        target = block(x)
    reg = moecompile.ReMoERegularizer(block, k=2)
    opt = torch.optim.Adam(block.parameters(), lr=1e-2)
    history = []
    for _ in range(400):
        loss = (block(x) - target).square().mean() + reg()
        opt.zero_grad()
        loss.backward()
        opt.step()
        reg.step()
        history.append(reg.sparsity)
    assert history[0] < 0.6
    assert abs(sum(history[-100:]) / 100 - 0.75) < 0.03
    assert len(reg.expert_load[""]) == 8 and abs(sum(reg.expert_load[""]) - 1) < 1e-6


def test_regulariser_needs_relu_blocks(quiet):
    model = moecompile.optimize(hf_zoo.build("mixtral"))
    with pytest.raises(MoECompileError, match="no ReLU-routed MoE block"):
        moecompile.ReMoERegularizer(model, k=2)
