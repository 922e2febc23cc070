"""MoESpec validation and serialisation."""
import pytest
import torch

from moecompile.spec import MLPSpec, MoESpec, MoEWeights, RouterSpec, SharedExpertSpec


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=4, top_k=5), "top_k must be in 1..4"),
    (dict(num_experts=4, top_k=2, scoring="sparsemixer"), "scoring"),
    (dict(num_experts=4, top_k=None, selection="all_positive"), "needs relu"),
    (dict(num_experts=6, top_k=2, selection="grouped_topk", n_group=4), "not divisible"),
])
def test_router_spec_rejects_inconsistent_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RouterSpec(**kwargs)


def test_clamped_swiglu_must_be_gated():
    with pytest.raises(ValueError, match="gated"):
        MLPSpec(hidden_size=4, intermediate_size=4, gated=False, activation="clamped_swiglu")


def test_round_trip_and_weight_shapes():
    spec = MoESpec(RouterSpec(8, 2, scoring="sigmoid", has_correction_bias=True),
                   MLPSpec(hidden_size=16, intermediate_size=8, activation="gelu"),
                   SharedExpertSpec(MLPSpec(hidden_size=16, intermediate_size=4), sigmoid_gate=True))
    assert MoESpec.from_dict(spec.to_dict()) == spec
    w = MoEWeights(router_weight=torch.zeros(8, 16), w1=torch.zeros(8, 16, 16), w2=torch.zeros(8, 16, 8))
    with pytest.raises(ValueError, match="correction_bias"):
        w.check(spec)
