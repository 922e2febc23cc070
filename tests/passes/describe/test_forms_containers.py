"""Expert containers as training frameworks build them: the expert list one or two modules down inside containers
(DeepSpeed's `MOELayer -> Experts.deepspeed_experts`, Megatron's `MoELayer -> SequentialMLP.local_experts`),
experts in an `nn.ModuleDict`, and a `forward(*inputs)` signature. Single-device versions; each fused and checked on
4,096 fresh tokens (fp32, normwise relative error 1e-5)."""
from __future__ import annotations

import handwritten as hw
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moecompile

H, I, E, K = 32, 40, 8, 2


def softmax_top2(logits):
    probs = logits.softmax(dim=-1)
    weight, index = probs.topk(K, dim=-1)
    return weight / weight.sum(dim=-1, keepdim=True), index


class TopKGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.wg = nn.Linear(H, E, bias=False)

    def forward(self, x):
        return softmax_top2(self.wg(x))


class Experts(nn.Module):  # DeepSpeed: the list under a container with no tensors of its own
    def __init__(self):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(hw.SwiGLU(H, I) for _ in range(E))


class DeepSpeedMOELayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = TopKGate()
        self.experts = Experts()

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, H)
        weight, index = self.gate(x)
        return hw.loop_over_experts(self.experts.deepspeed_experts, x, index, weight).reshape(shape)


class Router(nn.Module):  # Megatron's TopKRouter keeps its weight as a bare parameter
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, H) * H ** -0.5)

    def forward(self, x):
        return softmax_top2(F.linear(x, self.weight))


class SequentialMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.local_experts = nn.ModuleList(hw.SwiGLU(H, I) for _ in range(E))


class MegatronMoELayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = Router()
        self.experts = SequentialMLP()

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, H)
        weight, index = self.router(x)
        return hw.loop_over_experts(self.experts.local_experts, x, index, weight).reshape(shape)


class DictExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleDict({f"expert_{e}": hw.SwiGLU(H, I) for e in range(E)})

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, H)
        weight, index = softmax_top2(self.gate(x))
        experts = [self.experts[f"expert_{e}"] for e in range(E)]
        return hw.loop_over_experts(experts, x, index, weight).reshape(shape)


class StarInputs(nn.Module):  # DeepSpeed's MOELayer.forward(*input)
    def __init__(self):
        super().__init__()
        self.gate = TopKGate()
        self.experts = nn.ModuleList(hw.SwiGLU(H, I) for _ in range(E))

    def forward(self, *inputs):
        x = inputs[0]
        shape = x.shape
        x = x.reshape(-1, H)
        weight, index = self.gate(x)
        return hw.loop_over_experts(self.experts, x, index, weight).reshape(shape)


FORMS = {"deepspeed_experts_container": DeepSpeedMOELayer, "megatron_local_experts": MegatronMoELayer,
         "module_dict": DictExperts, "forward_star_inputs": StarInputs}


@pytest.mark.parametrize("name", FORMS)
def test_container_forms_fused(name, quiet):
    torch.manual_seed(0)
    hw.fuse_and_compare(FORMS[name]().eval(), torch.randn(4, 1024, H), "softmax>top2 renorm | gated silu E=8")


def test_container_inside_a_decoder_layer_is_found_at_the_block(quiet):
    """A decoder layer around a container-form block: the block itself is fused, not the layer."""
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(H)
            self.mlp = DeepSpeedMOELayer()

        def forward(self, x):
            return x + self.mlp(self.norm(x))

    torch.manual_seed(1)
    layer = Layer().eval()
    fused = moecompile.optimize(layer, strict=True)
    assert [b.path for b in moecompile.report(fused).blocks] == ["mlp"]
    x = torch.randn(2, 100, H)
    with torch.no_grad():
        assert (fused(x) - layer(x)).norm() / layer(x).norm() < 1e-5
