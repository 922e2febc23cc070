"""The MoE description: one frozen record of what a router + experts block computes.

Place in the pipeline: detect reads a block into an `MoESpec` plus `MoEWeights` (canonical tensors); routing
rewrites map spec -> spec; lowering (FusedMoE, kernels, export) specialises on it. `reference.py` computes it.

What a block computes, in the canonical form every field below refers to (x: [T, H]):

    logits  = x @ router_weight.T (+ router_bias)                      router_weight: [E, H]
    score_then_select:  scores = score(logits); chosen = select(scores (+ correction_bias)); w = scores[chosen]
    select_then_score:  chosen = select(logits (+ correction_bias));   w = score(logits[chosen]) over the chosen
    grouped_topk: groups of E / n_group experts scored by their best (max) or two best (top2_sum) choice values;
                 the final top-k runs over the choice values with the experts outside the best topk_group groups set
                 to group_fill: -inf (never chosen) or 0.0 (transformers' DeepSeek-V2/AXK2/Mistral 4 gates and
                 DeepSeek-V3's original code: with a negative correction bias an unchosen group's expert, at 0.0,
                 can beat a chosen one, and it then weighs its own score)
    w = w / max(sum(w), renorm_min) if renormalize;  w = w * scaling_factor
    expert_capacity (Switch Transformers): within one sequence (the input's second-to-last dim; with
                 capacity_scope "batch", within the call), only the first expert_capacity tokens in order that chose
                 expert e get it; for the others that choice weighs 0
    capacity_factor (GShard, DeepSpeed): the same with capacity max(ceil(n / E * factor * k), min_capacity) for the
                 n tokens of the batch or sequence, choices queued token-major or slot-major (all first choices
                 first); renorm_after_drop renormalises over the kept choices
    sparsemixer (PhiMoE, eval): k = 2 rounds; round r picks the best remaining logit m_r and weighs it by a softmax
                 over the logits l with (m_r - l) / max(|l|, m_r) <= 2 * jitter_eps (earlier picks excluded)
    all_positive (ReMoE): chosen = the experts whose gate relu(logit) is > 0 or NaN (a NaN token stays NaN), w = gate
    y = sum over chosen e of  w_e * expert_e(x)       (or expert_e(w_e * x) when weight_on_input)
      + shared(x) (* sigmoid(x @ shared_gate.T) when the shared expert is gated)
      + output_bias                                   (one [H] vector for the whole block: JetMoE)
    returned: y, or (y, router logits | top-k weights | a load-balancing loss, AuxLossSpec), or
      (y - B, B) with B = sum over chosen e of w_e * b2_e ("expert_bias": Megatron's skip-bias-add SwitchMLP)
    input_norm / residual (gpt-oss's reference MLPBlock): everything above runs on norm(x), and x is added to y
    expert_e(x) = down_e(glu(gate_e(x), up_e(x))) + b2_e   (gated)   |   down_e(act(up_e(x))) + b2_e   (plain)

Canonical expert weights: w1 [E, F, H] with F = 2*I (gate rows first, then up rows) for gated experts and F = I for
plain ones; b1 [E, F]; w2 [E, H, I]; b2 [E, H]. Top-1 routing is top-k with k = 1.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from . import fp8

Scoring = Literal["softmax", "sigmoid", "sqrtsoftplus", "relu", "none"]
Selection = Literal["topk", "grouped_topk", "all_positive", "sparsemixer"]
ScoreOrder = Literal["score_then_select", "select_then_score"]
GroupScore = Literal["max", "top2_sum"]
GroupFill = Literal["-inf", "zero"]
Activation = Literal["silu", "gelu", "gelu_tanh", "relu", "relu2", "clamped_swiglu", "clamped_silu"]
GateUpLayout = Literal["separate", "concat_gate_up", "concat_up_gate", "interleaved", "none"]
ExtraOutput = Literal["none", "router_logits", "topk_weights", "aux_loss", "expert_bias"]
CountedChoices = Literal["top1", "topk"]
# what a block may return besides its hidden states ("y"), by name: MoESpec.outputs
OUTPUT_LEAVES = ("y", "router_logits", "topk_weights", "aux_loss", "expert_counts")
CapacityScope = Literal["sequence", "batch"]
NormKind = Literal["rms", "layer"]
CapacityOrder = Literal["token_major", "slot_major"]

SCORINGS: tuple[str, ...] = ("softmax", "sigmoid", "sqrtsoftplus", "relu", "none")  # sqrtsoftplus: DeepSeek-V4
SELECTIONS: tuple[str, ...] = ("topk", "grouped_topk", "all_positive", "sparsemixer")
GROUP_FILLS: tuple[str, ...] = ("-inf", "zero")
# clamped_swiglu: gpt-oss; clamped_silu: DeepSeek-V4 (silu of the clamped gate times the clamped up)
ACTIVATIONS: tuple[str, ...] = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "clamped_swiglu", "clamped_silu")
CLAMPED: tuple[str, ...] = ("clamped_swiglu", "clamped_silu")  # gated only; gate clamped above, up to +-limit


@dataclass(frozen=True)
class RouterSpec:
    """How a token's experts and their combine weights are chosen."""

    num_experts: int
    top_k: int | None  # None only for selection == "all_positive" (a variable number per token)
    scoring: Scoring = "softmax"
    selection: Selection = "topk"
    score_order: ScoreOrder = "score_then_select"
    renormalize: bool = False
    renorm_min: float = 0.0  # denominator floor: max(sum, renorm_min); DeepSeek adds 1e-20, Ernie clamps
    scaling_factor: float = 1.0
    has_bias: bool = False  # added to the logits
    has_correction_bias: bool = False  # added to the scores for selection only (DeepSeek-V3 e_score_correction_bias)
    n_group: int = 1
    topk_group: int = 1
    group_score: GroupScore = "top2_sum"
    group_fill: GroupFill = "-inf"  # what unchosen groups' experts score in the final top-k
    weight_on_input: bool = False  # Llama 4: expert_e(w_e * x) instead of w_e * expert_e(x)
    jitter_eps: float = 0.0  # sparsemixer only: the relative logit gap that keeps an expert in a round's softmax
    # per sequence (capacity_scope "batch": per call) and expert; later tokens' choice of that expert is dropped
    expert_capacity: int | None = None
    # a capacity from the token count (GShard, DeepSpeed top1gating/top2gating): max(ceil(n / E * (factor * k)),
    # min_capacity) per expert, n the tokens of the scope ("batch": the call's tokens; "sequence": one sequence)
    capacity_factor: float | None = None
    min_capacity: int = 0
    capacity_scope: CapacityScope = "sequence"
    # which choices queue first for a capacity: "token_major" (token t's k choices before token t+1's: Switch) or
    # "slot_major" (every token's first choice, then every second choice: DeepSpeed top2gating)
    capacity_order: CapacityOrder = "token_major"
    renorm_after_drop: bool = False  # renormalise over the choices kept within capacity (DeepSpeed top2gating)

    def __post_init__(self) -> None:
        _check(self.num_experts >= 1, f"num_experts must be >= 1, got {self.num_experts}")
        _check(self.scoring in SCORINGS, f"scoring {self.scoring!r} is not one of {SCORINGS}")
        _check(self.selection in SELECTIONS, f"selection {self.selection!r} is not one of {SELECTIONS}")
        if self.selection == "all_positive":
            _check(self.top_k is None, "all_positive selection takes no top_k")
            _check(self.scoring == "relu", "all_positive selection needs relu scoring (ReMoE)")
        else:
            _check(self.top_k is not None and 1 <= self.top_k <= self.num_experts,
                   f"top_k must be in 1..{self.num_experts}, got {self.top_k}")
        if self.selection == "grouped_topk":
            _check(self.num_experts % self.n_group == 0,
                   f"num_experts {self.num_experts} is not divisible by n_group {self.n_group}")
            _check(1 <= self.topk_group <= self.n_group, f"topk_group must be in 1..{self.n_group}")
            _check(self.top_k <= self.topk_group * self.num_experts // self.n_group,
                   "top_k exceeds the experts in the chosen groups")
        _check(self.group_fill in GROUP_FILLS, f"group_fill {self.group_fill!r} is not one of {GROUP_FILLS}")
        _check(self.group_fill == "-inf" or self.selection == "grouped_topk",
               "group_fill applies to grouped_topk selection only")
        if self.expert_capacity is not None:
            _check(self.expert_capacity >= 1, f"expert_capacity must be >= 1, got {self.expert_capacity}")
            _check(self.selection in ("topk", "grouped_topk"), "expert_capacity applies to top-k selection only")
        if self.capacity_factor is not None:
            _check(self.capacity_factor > 0, f"capacity_factor must be > 0, got {self.capacity_factor}")
            _check(self.expert_capacity is None, "give expert_capacity or capacity_factor, not both")
            _check(self.selection in ("topk", "grouped_topk"), "capacity_factor applies to top-k selection only")
        _check(self.capacity_scope in ("sequence", "batch") and self.capacity_order in ("token_major", "slot_major"),
               "capacity_scope is 'sequence' or 'batch'; capacity_order is 'token_major' or 'slot_major'")
        _check(not self.renorm_after_drop or (self.renormalize and self.has_capacity),
               "renorm_after_drop needs renormalize and a capacity")
        if self.selection == "sparsemixer":
            _check(self.top_k == 2 and self.num_experts >= 2, "sparsemixer selection picks exactly 2 experts")
            _check(self.score_order == "select_then_score" and self.scoring == "softmax",
                   "sparsemixer scores each pick by a softmax over its own masked logits")

    @property
    def is_variable_k(self) -> bool:
        return self.selection == "all_positive"

    @property
    def has_capacity(self) -> bool:
        return self.expert_capacity is not None or self.capacity_factor is not None


@dataclass(frozen=True)
class MLPSpec:
    """One expert MLP (routed or shared) in canonical form, and how its weights were laid out in the source."""

    hidden_size: int
    intermediate_size: int
    gated: bool = True
    activation: Activation = "silu"
    activation_alpha: float = 1.702  # clamped_swiglu only: glu = g * sigmoid(alpha * g)
    activation_limit: float = 7.0  # clamped_*: gate clamped above, up clamped to [-limit, limit]
    has_bias: bool = False
    source_gate_up: GateUpLayout = "concat_gate_up"  # layout in the source module (canonical is concat_gate_up)
    source_transposed: bool = False  # source stored [in, out] per expert instead of [out, in]
    source_container: Literal["stacked", "module_list", "module"] = "stacked"

    def __post_init__(self) -> None:
        _check(self.activation in ACTIVATIONS, f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        _check(self.gated or self.activation not in CLAMPED, f"{self.activation} needs a gated MLP")
        _check(self.hidden_size >= 1 and self.intermediate_size >= 1, "sizes must be positive")

    @property
    def fc1_rows(self) -> int:
        return 2 * self.intermediate_size if self.gated else self.intermediate_size


@dataclass(frozen=True)
class SharedExpertSpec:
    """Experts every token goes through, beside the routed ones (all shared experts fused into one MLP)."""

    mlp: MLPSpec
    sigmoid_gate: bool = False  # Qwen2-MoE: shared(x) * sigmoid(x @ shared_gate.T)


@dataclass(frozen=True)
class AuxLossSpec:
    """The load-balancing loss a block returns beside its output (extra_output "aux_loss"):

        loss = coefficient * E * sum_e f_e * P_e,   P_e = mean over tokens of softmax(logits)_e,
        f_e = share of tokens whose first choice (top-1 of the logits) is e       counted "top1": Switch Transformer,
              GShard / DeepSpeed top1gating and top2gating (l_aux = mean(me * ce) * E * E is the same value)
            = (number of the tokens' top-k choices that are e) / tokens           counted "topk": transformers'
              load_balancing_loss_func (Mixtral, Qwen-MoE, ...)
        (+ z_coefficient * mean_t logsumexp(logits_t)^2: ST-MoE's router z-loss, added to the same scalar)
    """

    counted: CountedChoices = "top1"
    coefficient: float = 1.0
    z_coefficient: float = 0.0  # plus z_coefficient * mean over tokens of logsumexp(logits)^2 (ST-MoE's router z-loss)


@dataclass(frozen=True)
class NormSpec:
    """A norm the block applies to its input before routing and experts (gpt-oss's reference MLPBlock):
    "rms": x * rsqrt(mean(x^2) + eps) * norm_weight;  "layer": (x - mean) * rsqrt(var + eps) * norm_weight + norm_bias;
    computed in fp32 and cast back to the input's dtype."""

    kind: NormKind = "rms"
    eps: float = 1e-6
    has_bias: bool = False


def _leaves(tree):
    for item in tree:
        if isinstance(item, tuple):
            yield from _leaves(item)
        else:
            yield item


def _as_tuples(tree):
    """A structure read back from JSON (lists) as the tuples MoESpec holds (a spec is hashable)."""
    return tuple(_as_tuples(item) if isinstance(item, list) else item for item in tree)


@dataclass(frozen=True)
class MoESpec:
    """The whole block: router, routed experts, shared experts, and what the block returns."""

    router: RouterSpec
    experts: MLPSpec
    shared: SharedExpertSpec | None = None
    extra_output: ExtraOutput = "none"  # the block returns (y, router_logits), (y, topk_weights) or (y, aux_loss)
    flat_output: bool = False  # the block returns [T, H] for [..., H] input (Llama 4)
    has_output_bias: bool = False  # one [H] bias added to the block's output (JetMoE)
    aux_loss: AuxLossSpec | None = None  # the loss returned when extra_output is "aux_loss"
    input_norm: NormSpec | None = None  # applied to x first; router, experts and shared experts see norm(x)
    residual: bool = False  # the block returns x + its output (the input before the norm)
    # the autocast region the block opens itself, (device type, dtype name), e.g. ("cpu", "bfloat16"): on that
    # device its matmuls compute in that dtype, as autocast does; its output is cast back to the input's dtype
    autocast: tuple[str, str] | None = None
    # the block's return structure when it is more than y or (y, one extra): nested tuples of OUTPUT_LEAVES names,
    # "y" first, e.g. ("y", ("expert_counts", "aux_loss")) for `return out, (counts, loss)`; extra_output is then
    # "none". expert_counts: tokens per expert (int64 [E], choices before any capacity drop), counting each token's
    # first choice ("top1": DeepSpeed's exp_counts) or all its k choices ("topk": Megatron's tokens_per_expert)
    outputs: tuple | None = None
    expert_counts: CountedChoices | None = None

    def __post_init__(self) -> None:
        if self.shared is not None:
            _check(self.shared.mlp.hidden_size == self.experts.hidden_size, "shared expert hidden size differs")
        _check(not (self.extra_output == "topk_weights" and self.router.is_variable_k),
               "a variable-k router has no [T, k] weights to return")
        leaves = list(_leaves(self.outputs)) if self.outputs is not None else ["y", self.extra_output]
        if self.outputs is not None:
            _check(self.extra_output == "none", "outputs replaces extra_output: give one of them")
            _check(self.outputs[0] == "y" and leaves.count("y") == 1 and set(leaves) <= set(OUTPUT_LEAVES),
                   f"outputs must be nested tuples of {OUTPUT_LEAVES}, 'y' first and once, got {self.outputs}")
            _check(not self.router.is_variable_k or not {"topk_weights", "expert_counts"} & set(leaves),
                   "a variable-k router has no [T, k] weights or k choices to count")
        _check(("aux_loss" in leaves) == (self.aux_loss is not None),
               "an aux_loss description goes with an aux_loss output, and only with it")
        _check(("expert_counts" in leaves) == (self.expert_counts is not None),
               "expert_counts (which choices are counted) goes with an expert_counts output, and only with it")
        _check(self.aux_loss is None or not self.router.is_variable_k,
               "a load-balancing loss over top-k choices needs a top-k router")
        _check(self.autocast is None or (len(self.autocast) == 2 and self.autocast[1] in ("bfloat16", "float16")),
               f"autocast must be (device type, 'bfloat16' or 'float16'), got {self.autocast}")
        _check(self.extra_output != "expert_bias" or (self.experts.has_bias and not self.router.weight_on_input),
               "returning the experts' output biases apart needs expert biases weighted on the output")

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def hidden_size(self) -> int:
        return self.experts.hidden_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MoESpec:
        shared = data.get("shared")
        return cls(
            router=RouterSpec(**data["router"]),
            experts=MLPSpec(**data["experts"]),
            shared=None if shared is None else SharedExpertSpec(mlp=MLPSpec(**shared["mlp"]),
                                                                sigmoid_gate=shared["sigmoid_gate"]),
            extra_output=data.get("extra_output", "none"),
            flat_output=data.get("flat_output", False),
            has_output_bias=data.get("has_output_bias", False),
            aux_loss=None if data.get("aux_loss") is None else AuxLossSpec(**data["aux_loss"]),
            input_norm=None if data.get("input_norm") is None else NormSpec(**data["input_norm"]),
            residual=data.get("residual", False),
            autocast=None if data.get("autocast") is None else tuple(data["autocast"]),
            outputs=None if data.get("outputs") is None else _as_tuples(data["outputs"]),
            expert_counts=data.get("expert_counts"),
        )

    def summary(self) -> str:
        """One line for a person: 'softmax>top2 renorm | gated silu E=8 H=32 I=64 | shared(gated)'."""
        r = self.router
        sel = "relu>all_positive" if r.is_variable_k else (
            f"{r.scoring}>top{r.top_k}" if r.score_order == "score_then_select" else f"top{r.top_k}>{r.scoring}")
        if r.selection == "grouped_topk":
            sel += f" groups {r.topk_group}/{r.n_group}" + (" fill 0" if r.group_fill == "zero" else "")
        if r.selection == "sparsemixer":
            sel = f"sparsemixer eps={r.jitter_eps:g}"
        if r.expert_capacity is not None:
            sel += f" capacity {r.expert_capacity}"
        if r.capacity_factor is not None:
            sel += (f" capacity factor {r.capacity_factor:g}" + (f" min {r.min_capacity}" if r.min_capacity else "")
                    + f" per {r.capacity_scope}" + (" slot-major" if r.capacity_order == "slot_major" else "")
                    + (" renorm after drop" if r.renorm_after_drop else ""))
        tags = [sel]
        if r.renormalize:
            tags.append("renorm")
        if r.scaling_factor != 1.0:
            tags.append(f"x{r.scaling_factor:g}")
        if r.has_bias:
            tags.append("bias")
        if r.has_correction_bias:
            tags.append("corr_bias")
        if r.weight_on_input:
            tags.append("weight_on_input")
        e = self.experts
        mlp = (f"{'gated' if e.gated else 'plain'} {e.activation} E={r.num_experts} H={e.hidden_size} "
               f"I={e.intermediate_size}")
        parts = [" ".join(tags), mlp]
        if self.shared is not None:
            gate = " gated" if self.shared.sigmoid_gate else ""
            parts.append(f"shared I={self.shared.mlp.intermediate_size}{gate}")
        if self.has_output_bias:
            parts.append("output bias")
        if self.aux_loss is not None:
            parts.append(f"aux loss {self.aux_loss.counted} x{self.aux_loss.coefficient:g}" + (
                f" + z-loss x{self.aux_loss.z_coefficient:g}" if self.aux_loss.z_coefficient else ""))
        if self.input_norm is not None:
            parts.insert(0, f"{self.input_norm.kind} norm in")
        if self.residual:
            parts.append("+ residual")
        if self.autocast is not None:
            parts.append(f"in its {self.autocast[0]} autocast {self.autocast[1]}")
        if self.outputs is not None:
            parts.append("returns " + repr(self.outputs).replace("'", "").replace(",)", ")")
                         + (f" counting {self.expert_counts}" if self.expert_counts else ""))
        return " | ".join(parts)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass
class MoEWeights:
    """Canonical tensors of one block (see the module docstring for shapes). Optional ones are None."""

    router_weight: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    router_bias: torch.Tensor | None = None
    correction_bias: torch.Tensor | None = None
    b1: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    shared_w1: torch.Tensor | None = None
    shared_w2: torch.Tensor | None = None
    shared_b1: torch.Tensor | None = None
    shared_b2: torch.Tensor | None = None
    shared_gate: torch.Tensor | None = None  # [1, H]
    output_bias: torch.Tensor | None = None  # [H]
    norm_weight: torch.Tensor | None = None  # [H], the input norm's
    norm_bias: torch.Tensor | None = None  # [H]
    # w1 / w2 (shared_w1 / shared_w2) in float8_e4m3fn: their block scales (moecompile/fp8.py),
    # [E, ceil(rows/128), ceil(cols/128)] fp32 ([ceil(rows/128), ceil(cols/128)] for the shared experts')
    w1_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    shared_w1_scale: torch.Tensor | None = None
    shared_w2_scale: torch.Tensor | None = None

    def check(self, spec: MoESpec) -> None:
        """Raise ValueError if a tensor's presence or shape disagrees with the spec."""
        E, H, e = spec.num_experts, spec.hidden_size, spec.experts
        want: dict[str, tuple[int, ...] | None] = {
            "router_weight": (E, H),
            "router_bias": (E,) if spec.router.has_bias else None,
            "correction_bias": (E,) if spec.router.has_correction_bias else None,
            "w1": (E, e.fc1_rows, H),
            "w2": (E, H, e.intermediate_size),
            "b1": (E, e.fc1_rows) if e.has_bias else None,
            "b2": (E, H) if e.has_bias else None,
        }
        s = spec.shared
        want.update({
            "shared_w1": (s.mlp.fc1_rows, H) if s else None,
            "shared_w2": (H, s.mlp.intermediate_size) if s else None,
            "shared_b1": (s.mlp.fc1_rows,) if s and s.mlp.has_bias else None,
            "shared_b2": (H,) if s and s.mlp.has_bias else None,
            "shared_gate": (1, H) if s and s.sigmoid_gate else None,
            "output_bias": (H,) if spec.has_output_bias else None,
            "norm_weight": (H,) if spec.input_norm is not None else None,
            "norm_bias": (H,) if spec.input_norm is not None and spec.input_norm.has_bias else None,
        })
        for name in fp8.QUANTIZABLE:
            weight, scale = getattr(self, name), getattr(self, name + "_scale")
            if weight is None:
                continue
            if fp8.is_fp8(weight):
                want[name + "_scale"] = fp8.scale_shape(tuple(weight.shape))
            elif weight.dtype.is_floating_point and weight.element_size() == 1:
                raise ValueError(f"weights.{name} is {weight.dtype}; the FP8 format taken is float8_e4m3fn with "
                                 "128 x 128 block scales (moecompile/fp8.py)")
            elif scale is not None:
                raise ValueError(f"weights.{name}_scale is set but weights.{name} is {weight.dtype}, not FP8")
        for name, shape in want.items():
            tensor = getattr(self, name)
            if shape is None and tensor is not None:
                raise ValueError(f"weights.{name} is set but the spec has no such tensor")
            if shape is not None and (tensor is None or tuple(tensor.shape) != shape):
                got = None if tensor is None else tuple(tensor.shape)
                raise ValueError(f"weights.{name} should have shape {shape}, got {got}")

    def items(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        for field in dataclasses.fields(self):
            yield field.name, getattr(self, field.name)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
