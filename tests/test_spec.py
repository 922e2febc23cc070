"""MoESpec validation and serialisation."""
import json

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


def test_output_structure_and_autocast_round_trip_through_json():
    """A structure and an autocast region survive JSON (lists back to tuples: the spec stays hashable, the kernels
    cache by it); an inconsistent structure is refused."""
    from moecompile.spec import AuxLossSpec

    spec = MoESpec(RouterSpec(8, 2), MLPSpec(hidden_size=16, intermediate_size=8),
                   outputs=("y", ("expert_counts", "aux_loss")), expert_counts="topk",
                   aux_loss=AuxLossSpec(counted="topk", coefficient=0.02), autocast=("cuda", "bfloat16"))
    back = MoESpec.from_dict(json.loads(spec.to_json()))
    assert back == spec and hash(back) == hash(spec)
    assert "returns (y, (expert_counts, aux_loss)) counting topk" in spec.summary()
    with pytest.raises(ValueError, match="expert_counts"):
        MoESpec(RouterSpec(8, 2), MLPSpec(hidden_size=16, intermediate_size=8), outputs=("y", "expert_counts"))
    with pytest.raises(ValueError, match="'y' first"):
        MoESpec(RouterSpec(8, 2), MLPSpec(hidden_size=16, intermediate_size=8), outputs=("router_logits", "y"))
    with pytest.raises(ValueError, match="autocast"):
        MoESpec(RouterSpec(8, 2), MLPSpec(hidden_size=16, intermediate_size=8), autocast=("cuda", "float64"))
