"""reference.py against independent per-token loops and hand-computed cases, for every router/selection/activation
variant of the spec. Tolerances: fp32 1e-5 absolute unless stated."""
import math

import pytest
import torch

from moecompile.reference import reference_forward, route
from moecompile.spec import MLPSpec, MoESpec, MoEWeights, RouterSpec, SharedExpertSpec

H, I, E = 6, 5, 4


def weights_for(spec: MoESpec, gen) -> MoEWeights:
    r, e = spec.router, spec.experts
    w = MoEWeights(router_weight=torch.randn(E, H, generator=gen), w1=torch.randn(E, e.fc1_rows, H, generator=gen) / 3,
                   w2=torch.randn(E, H, I, generator=gen) / 3)
    if r.has_bias:
        w.router_bias = torch.randn(E, generator=gen)
    if r.has_correction_bias:
        w.correction_bias = torch.randn(E, generator=gen)
    if e.has_bias:
        w.b1, w.b2 = torch.randn(E, e.fc1_rows, generator=gen), torch.randn(E, H, generator=gen)
    if spec.shared:
        w.shared_w1 = torch.randn(spec.shared.mlp.fc1_rows, H, generator=gen) / 3
        w.shared_w2 = torch.randn(H, spec.shared.mlp.intermediate_size, generator=gen) / 3
        if spec.shared.sigmoid_gate:
            w.shared_gate = torch.randn(1, H, generator=gen)
    return w


def naive_expert(spec: MLPSpec, x, w1, w2, b1, b2):
    """One token through one expert, written out without reference.py's helpers."""
    h = w1 @ x + (b1 if b1 is not None else 0)
    if spec.gated:
        g, u = h[:I], h[I:]
        if spec.activation == "clamped_swiglu":
            g, u = g.clamp(max=spec.activation_limit), u.clamp(-spec.activation_limit, spec.activation_limit)
            a = (u + 1) * g * torch.sigmoid(spec.activation_alpha * g)
        else:
            a = ACT[spec.activation](g) * u
    else:
        a = ACT[spec.activation](h)
    return w2 @ a + (b2 if b2 is not None else 0)


ACT = {"silu": lambda v: v * torch.sigmoid(v), "relu": lambda v: v.clamp(min=0), "relu2": lambda v: v.clamp(min=0) ** 2,
       "gelu": lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2))),
       "gelu_tanh": lambda v: 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))}


def naive_block(spec: MoESpec, w: MoEWeights, x):
    """Per-token loop: every expert evaluated, routing written from the docstring's formulas."""
    r = spec.router
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = w.router_weight @ x[t] + (w.router_bias if w.router_bias is not None else 0)
        if r.selection == "all_positive":
            chosen = [(e, logits[e].item()) for e in range(E) if logits[e] > 0]
        else:
            score = {"softmax": lambda v: v.exp() / v.exp().sum(), "sigmoid": torch.sigmoid, "none": lambda v: v,
                     "sqrtsoftplus": lambda v: torch.log1p(v.exp()).sqrt()}[r.scoring]
            if r.score_order == "score_then_select":
                s = score(logits)
                c = s + (w.correction_bias if w.correction_bias is not None else 0)
                if r.selection == "grouped_topk":
                    groups = c.view(r.n_group, -1)
                    gs = (groups.sort(descending=True).values[:, :2].sum(-1) if r.group_score == "top2_sum"
                          else groups.max(-1).values)
                    keep = gs.argsort(descending=True)[:r.topk_group]
                    mask = torch.full((r.n_group, E // r.n_group), float("-inf"))
                    mask[keep] = 0
                    c = c + mask.view(-1)
                idx = c.argsort(descending=True)[:r.top_k]
                vals = s[idx]
            else:
                idx = logits.argsort(descending=True)[:r.top_k]
                vals = score(logits[idx])
            if r.renormalize:
                vals = vals / vals.sum()
            chosen = list(zip(idx.tolist(), (vals * r.scaling_factor).tolist()))
        for e, g in chosen:
            b1 = w.b1[e] if w.b1 is not None else None
            b2 = w.b2[e] if w.b2 is not None else None
            if r.weight_on_input:
                out[t] += naive_expert(spec.experts, g * x[t], w.w1[e], w.w2[e], b1, b2)
            else:
                out[t] += g * naive_expert(spec.experts, x[t], w.w1[e], w.w2[e], b1, b2)
        if spec.shared:
            sh = naive_expert(spec.shared.mlp, x[t], w.shared_w1, w.shared_w2, None, None)
            if spec.shared.sigmoid_gate:
                sh = sh * torch.sigmoid(w.shared_gate[0] @ x[t])
            out[t] += sh
    return out


mlp_gated = MLPSpec(hidden_size=H, intermediate_size=I)
ROUTERS = {
    "softmax_topk_renorm": RouterSpec(E, 2, renormalize=True),
    "softmax_topk": RouterSpec(E, 2),
    "topk_then_softmax_bias": RouterSpec(E, 2, score_order="select_then_score", has_bias=True),
    "sigmoid_grouped_corr_scaled": RouterSpec(E, 2, scoring="sigmoid", selection="grouped_topk", n_group=2,
                                              topk_group=1, renormalize=True, scaling_factor=2.5,
                                              has_correction_bias=True),
    "softmax_grouped_max": RouterSpec(E, 2, selection="grouped_topk", n_group=2, topk_group=1, group_score="max"),
    "top1": RouterSpec(E, 1),
    "sqrtsoftplus_corr_renorm": RouterSpec(E, 2, scoring="sqrtsoftplus", renormalize=True, has_correction_bias=True),
    "top_all": RouterSpec(E, E),
    "sigmoid_top1_on_input": RouterSpec(E, 1, scoring="sigmoid", score_order="select_then_score", weight_on_input=True),
    "relu_all_positive": RouterSpec(E, None, scoring="relu", selection="all_positive"),
}


@pytest.mark.parametrize("name", ROUTERS)
def test_router_variants_match_naive_loop(name):
    gen = torch.Generator().manual_seed(hash(name) % 1000)
    spec = MoESpec(router=ROUTERS[name], experts=mlp_gated)
    w = weights_for(spec, gen)
    x = torch.randn(9, H, generator=gen)
    y, _ = reference_forward(spec, w, x)
    torch.testing.assert_close(y, naive_block(spec, w, x), atol=1e-5, rtol=1e-5)


ACT_CASES = [(a, g, b) for a in ["silu", "gelu", "gelu_tanh", "relu", "relu2", "clamped_swiglu"] for g in (True, False)
             for b in (True, False) if g or a != "clamped_swiglu"]  # clamped_swiglu is gated only (test_spec)


@pytest.mark.parametrize("act, gated, bias", ACT_CASES)
def test_activation_variants_match_naive_loop(act, gated, bias):
    gen = torch.Generator().manual_seed(3)
    spec = MoESpec(router=RouterSpec(E, 2, renormalize=True),
                   experts=MLPSpec(hidden_size=H, intermediate_size=I, gated=gated, activation=act, has_bias=bias,
                                   activation_limit=0.7))
    w = weights_for(spec, gen)
    x = torch.randn(7, H, generator=gen) * 2  # large enough that clamping and negative branches are exercised
    y, _ = reference_forward(spec, w, x)
    torch.testing.assert_close(y, naive_block(spec, w, x), atol=1e-5, rtol=1e-5)


def test_shared_expert_with_sigmoid_gate_matches_naive_loop():
    gen = torch.Generator().manual_seed(5)
    spec = MoESpec(router=RouterSpec(E, 2), experts=mlp_gated,
                   shared=SharedExpertSpec(MLPSpec(hidden_size=H, intermediate_size=I), sigmoid_gate=True))
    w = weights_for(spec, gen)
    x = torch.randn(5, H, generator=gen)
    torch.testing.assert_close(reference_forward(spec, w, x)[0], naive_block(spec, w, x), atol=1e-5, rtol=1e-5)


def test_routing_hand_computed():
    # logits for one token are [0, ln2, ln3, ln4]: softmax = [1,2,3,4]/10; top-2 = experts 3, 2 with 0.4, 0.3.
    router = RouterSpec(4, 2, renormalize=True)
    x = torch.tensor([[1.0]])
    w = MoEWeights(router_weight=torch.tensor([[0.0], [math.log(2)], [math.log(3)], [math.log(4)]]),
                   w1=torch.zeros(4, 2, 1), w2=torch.zeros(4, 1, 1))
    r = route(router, w, x)
    assert r.expert_index.tolist() == [3, 2]
    torch.testing.assert_close(r.weight, torch.tensor([4 / 7, 3 / 7]))
    r = route(RouterSpec(4, 2), w, x)  # no renormalisation
    torch.testing.assert_close(r.weight, torch.tensor([0.4, 0.3]))
    # ReLU routing: logits [0, .69, 1.1, 1.39] -> 3 positive gates (0 is not positive)
    r = route(RouterSpec(4, None, scoring="relu", selection="all_positive"), w, x)
    assert r.expert_index.tolist() == [1, 2, 3]


def test_zero_tokens_and_autograd():
    gen = torch.Generator().manual_seed(0)
    spec = MoESpec(router=RouterSpec(E, 2, renormalize=True), experts=mlp_gated)
    w = weights_for(spec, gen)
    y, routing = reference_forward(spec, w, torch.zeros(0, H))
    assert y.shape == (0, H) and routing.weight.numel() == 0
    w64 = MoEWeights(**{k: (None if v is None else v.double().requires_grad_()) for k, v in w.items()})
    x = torch.randn(4, H, dtype=torch.float64, requires_grad=True)

    def f(x, rw, w1, w2):
        return reference_forward(spec, MoEWeights(router_weight=rw, w1=w1, w2=w2), x)[0]

    assert torch.autograd.gradcheck(f, (x, w64.router_weight, w64.w1, w64.w2))


def test_sparsemixer_hand_computed():
    # logits [4, 3.9, 1, 0], jitter_eps 0.05: round 1 picks expert 0 (m = 4); (4 - l) / max(|l|, 4) <= 0.1 keeps
    # experts 0 and 1 -> weight e^4 / (e^4 + e^3.9). Round 2 picks expert 1 (m = 3.9) among the rest: the gap test keeps
    # experts 0 (gap < 0, but already picked: -inf) and 1 -> its softmax over itself alone is 1.
    router = RouterSpec(4, 2, selection="sparsemixer", score_order="select_then_score", jitter_eps=0.05)
    w = MoEWeights(router_weight=torch.tensor([[4.0], [3.9], [1.0], [0.0]]), w1=torch.zeros(4, 2, 1),
                   w2=torch.zeros(4, 1, 1))
    r = route(router, w, torch.tensor([[1.0]]))
    assert r.expert_index.tolist() == [0, 1]
    torch.testing.assert_close(r.weight, torch.tensor([1 / (1 + math.exp(-0.1)), 1.0]))
    # a wide gap (eps 1): round 1 keeps every logit within 2 of 4 relative -> softmax over all four
    r = route(RouterSpec(4, 2, selection="sparsemixer", score_order="select_then_score", jitter_eps=1.0), w,
              torch.tensor([[1.0]]))
    all4 = torch.tensor([4.0, 3.9, 1.0, 0.0]).softmax(0)
    torch.testing.assert_close(r.weight[0], all4[0])
    torch.testing.assert_close(r.weight[1], torch.tensor([3.9, 1.0, 0.0]).softmax(0)[0])


def test_expert_capacity_hand_computed():
    # 2 sequences of 3 tokens, 2 experts, top-1, capacity 1: every token prefers expert 0 except the second token of
    # sequence 0; per sequence only the first token choosing an expert gets it.
    router = RouterSpec(2, 1, expert_capacity=1)
    w = MoEWeights(router_weight=torch.tensor([[1.0], [-1.0]]), w1=torch.zeros(2, 2, 1), w2=torch.zeros(2, 1, 1))
    x = torch.tensor([[1.0], [-1.0], [2.0], [3.0], [1.0], [0.5]])
    r = route(router, w, x, seq_len=3)
    assert r.expert_index.tolist() == [0, 1, 0, 0, 0, 0]
    kept = (r.weight > 0).tolist()
    assert kept == [True, True, False, True, False, False]


def test_output_bias_added_once():
    gen = torch.Generator().manual_seed(11)
    spec = MoESpec(router=RouterSpec(E, 2), experts=mlp_gated, has_output_bias=True)
    w = weights_for(spec, gen)
    w.output_bias = torch.randn(H, generator=gen)
    x = torch.randn(5, H, generator=gen)
    plain = MoESpec(router=RouterSpec(E, 2), experts=mlp_gated)
    torch.testing.assert_close(reference_forward(spec, w, x)[0], naive_block(plain, w, x) + w.output_bias,
                               atol=1e-5, rtol=1e-5)
