"""describe (passes/describe/): the router readings it tries, in the order the block's attributes and ops give, and
the reasons it gives where no reading reproduces the block. Hand-written forms it reads: test_forms_*.py here."""
import handwritten as hw
import pytest
import torch

import moecompile
from moecompile import hf_zoo
from moecompile.passes.describe import DescribeError, describe
from moecompile.passes.describe.router import RouterHypothesis, k_candidates, router_hypotheses
from moecompile.passes.detect import propose


def test_router_readings_take_k_groups_and_scale_from_the_blocks_attributes(quiet):
    """DeepSeek-V3 declares k, its expert groups and a scaling factor (on the block and in its config): every reading
    tries that k and that scale (once), the grouped readings use its groups, masked groups filled with -inf and
    with 0.0 are both tried, and with a sigmoid among the ops run the sigmoid readings come first."""
    model = hf_zoo.build("deepseek_v3")
    config = model.config
    candidate = propose(model)[0]
    assert k_candidates(candidate) == [config.num_experts_per_tok]
    readings = router_hypotheses(candidate, {"sigmoid", "topk"}, k_candidates(candidate))
    assert {h.top_k for h in readings} == {config.num_experts_per_tok}
    assert all(h.scales == (config.routed_scaling_factor,) for h in readings)
    grouped = [h for h in readings if h.n_group > 1]
    assert grouped and all((h.n_group, h.topk_group) == (config.n_group, config.topk_group) for h in grouped)
    assert {h.group_fill for h in grouped} == {"-inf", "zero"}
    assert readings[0].scoring == "sigmoid"
    assert any(h.correction is not None and h.correction.name == "e_score_correction_bias" for h in readings)


def test_relu_reading_first_when_the_block_ran_a_relu_and_no_topk():
    candidate = propose(hw.ReluRouterMoE())[0]
    readings = router_hypotheses(candidate, {"relu"}, k_candidates(candidate))
    assert readings[0].top_k is None and readings[0].scoring == "relu"
    assert readings[0].router_spec(candidate.num_experts, None, has_bias=False).selection == "all_positive"


@pytest.mark.parametrize("reading, selection", [
    (RouterHypothesis(top_k=2, scoring="softmax", score_order="score_then_select"), "topk"),
    (RouterHypothesis(top_k=2, scoring="sigmoid", score_order="score_then_select", n_group=4, topk_group=2),
     "grouped_topk"),
    (RouterHypothesis(top_k=2, scoring="softmax", score_order="select_then_score", selection="sparsemixer",
                      jitter_eps=0.01), "sparsemixer"),
])
def test_a_reading_names_its_selection(reading, selection):
    router = reading.router_spec(8, 2.5, has_bias=True)
    assert router.selection == selection and router.scaling_factor == 2.5 and router.has_bias
    assert reading.router_spec(8, None, has_bias=False).scaling_factor == 1.0


def test_a_reading_the_spec_cannot_express_raises_value_error():
    """k larger than the number of experts: no RouterSpec (the search skips the reading)."""
    with pytest.raises(ValueError):
        RouterHypothesis(top_k=9, scoring="softmax", score_order="score_then_select").router_spec(8, None, False)


class Sparsemixer(torch.nn.Module):
    """A router moecompile does not express: expert chosen by top-1 of (logits + a fixed per-token jitter)."""

    def __init__(self, H=32, E=4):
        super().__init__()
        self.router = torch.nn.Linear(H, E, bias=False)
        self.experts = torch.nn.ModuleList(hw.SwiGLU(H, 16) for _ in range(E))

    def forward(self, x):
        logits = self.router(x)
        idx = (logits + torch.sin(1000 * x[..., :4])).argmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            m = idx == e
            out[m] = expert(x[m])
        return out


def test_unsupported_router_reported_with_closest_error():
    candidate = propose(Sparsemixer())[0]
    with pytest.raises(DescribeError, match="no description reproduces the block .*rel err"):
        describe(candidate)


class TokenRoutedMoE(hw.ListMoE):
    """A block its caller feeds more than hidden states (DeepSeek-V4 passes input_ids): replacing it by a module
    that takes hidden states only would break that call."""

    def forward(self, x, token_ids=None):
        return super().forward(x)


class TokenRoutedModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = TokenRoutedMoE()

    def forward(self, x, token_ids):
        return self.moe(x, token_ids=token_ids)


def test_block_taking_other_inputs_left_and_model_still_runs(quiet):
    model = TokenRoutedModel()
    optimized = moecompile.optimize(model)
    (record,) = moecompile.report(optimized).blocks
    assert record.decision == "left" and "token_ids" in record.reason
    x, ids = torch.randn(2, 5, 32), torch.zeros(2, 5, dtype=torch.long)
    torch.testing.assert_close(optimized(x, ids), model(x, ids))
