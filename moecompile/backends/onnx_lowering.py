"""ONNX lowerings of one fused MoE block: what a FusedMoE computes while torch.onnx exports it (backends/onnx.py).

Place in the pipeline: after optimize() has replaced the blocks by FusedMoE, export_onnx sets each block's
`lowering`; FusedMoE.forward (fused.run_block) then computes with the form here instead of the Triton op, and
torch.onnx's exporter turns that into ONNX operators.

- "standard": plain PyTorch operators that the exporter lowers to standard ONNX (opset 18), so any runtime runs it.
  Routing is the reference's (every router form, ReLU routing and expert capacity included), as (token, expert,
  weight) pairs. The experts run on their pairs only: the pairs are sorted into one padded group per expert (C rows,
  C the largest group, computed by the graph), one batched MatMul per projection over the expert axis (no
  per-expert subgraph), and the results gathered back and summed per token (onnx_grouped). An ONNX If picks, on
  the data, between every expert's weights and a gather of the weights of the experts in use (when at most a third
  are: decode-sized inputs, where reading every expert's weights would dominate; onnx_if). The cost beyond the
  sparse computation is the padding: E * C rows instead of T * k.
- "ort": onnxruntime's `com.microsoft.MoE` contrib operator, where its semantics are the block's (ort_mismatch
  says why not otherwise): softmax over the router output, top-k, optional renormalisation, then per expert
  fc1 -> activation -> fc2 (weights [E, F, H] and [E, H, I]; a gated MLP as "swiglu" with gate and up rows
  interleaved, `gate * sigmoid(alpha * gate) * (up + beta)` with gate <= limit and |up| <= limit). The router
  GEMM, a routing scale, shared experts and an output bias stay outside it as standard operators. In PyTorch it is
  the op `moecompile::ort_moe` (computing the same thing); the exporter translates it to the contrib node.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import route, shared_experts
from ..spec import MoESpec, MoEWeights
from . import onnx_if

STANDARD, ORT = "standard", "ort"


def standard_block(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, seq_len: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block on x [T, H] in standard operators: (y [T, H] in x's dtype, logits [T, E] fp32, slot weights).

    Routing is the reference's (route: top-k, grouped, ReLU, capacity), as P (token, expert, weight) pairs; the
    experts run only on their pairs, grouped by expert (onnx_grouped), through the decode-size If (onnx_if)."""
    routing = route(spec.router, weights, x, seq_len)
    acc = torch.promote_types(x.dtype, torch.float32)
    out = onnx_if.routed_experts(spec, weights, x, routing)
    if spec.shared is not None:
        out = out + shared_experts(spec, weights, x)
    if spec.has_output_bias:
        out = out + weights.output_bias.to(acc)
    return out.to(x.dtype), routing.logits, routing.slot_weights(spec.router.scaling_factor)


class StandardLowering(nn.Module):
    """FusedMoE.lowering for the standard-operator form."""

    kind = STANDARD

    def forward(self, spec: MoESpec, weights: MoEWeights, x: torch.Tensor, seq_len: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return standard_block(spec, weights, x, seq_len)


# ---------------------------------------------------------------- onnxruntime's MoE operator

ORT_DTYPES = (torch.float32, torch.float16)


def ort_mismatch(spec: MoESpec, dtype: torch.dtype) -> str | None:
    """Why com.microsoft.MoE cannot compute this block exactly, or None."""
    r, e = spec.router, spec.experts
    if dtype not in ORT_DTYPES:
        return f"weights are {dtype}; onnxruntime's MoE kernels take float32 and float16"
    if r.is_variable_k:
        return "ReLU routing (a variable number of experts per token); the operator takes a fixed k"
    if r.selection != "topk":
        return f"{r.selection} selection; the operator does a plain top-k"
    if r.scoring != "softmax":
        return f"{r.scoring} scoring; the operator applies softmax to the router output"
    if r.has_correction_bias:
        return "a correction bias on the choice; the operator chooses on the softmax alone"
    if r.has_capacity:
        return "expert capacity; the operator drops no tokens"
    if r.weight_on_input:
        return "weights applied to the expert input; the operator weighs the expert output"
    if e.gated and e.activation not in ("silu", "clamped_swiglu", "clamped_silu"):
        return f"gated {e.activation}; the operator's gated form is SwiGLU"
    if not e.gated and e.activation not in ("relu", "silu"):
        return f"{e.activation} activation; checked against onnxruntime only for relu and silu"
    return None


def _ort_activation(spec: MoESpec) -> tuple[str, float, float, float]:
    """(activation_type, activation_alpha, activation_beta, swiglu_limit) for the operator."""
    e = spec.experts
    if not e.gated:
        return e.activation, 1.0, 0.0, math.inf
    if e.activation == "clamped_swiglu":
        return "swiglu", e.activation_alpha, 1.0, e.activation_limit
    if e.activation == "clamped_silu":  # the operator's swiglu with alpha 1 and no +1 on up
        return "swiglu", 1.0, 0.0, e.activation_limit
    return "swiglu", 1.0, 0.0, math.inf


@torch.library.custom_op("moecompile::ort_moe", mutates_args=())
def ort_moe_op(x: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc1_bias: torch.Tensor | None,
               fc2: torch.Tensor, fc2_bias: torch.Tensor | None, k: int, activation_type: str,
               normalize_routing_weights: bool, activation_alpha: float, activation_beta: float,
               swiglu_limit: float) -> torch.Tensor:
    """What com.microsoft.MoE computes on x [T, H] (its CPU kernel's definition), in PyTorch."""
    probs = router_logits.float().softmax(dim=-1)
    weight, idx = probs.topk(k, dim=-1)
    if normalize_routing_weights:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    dense = torch.zeros_like(probs).scatter(1, idx, weight)
    h = torch.einsum("th,efh->tef", x.float(), fc1.float())
    if fc1_bias is not None:
        h = h + fc1_bias.float()
    if activation_type == "swiglu":
        gate, up = h[..., 0::2].clamp(max=swiglu_limit), h[..., 1::2].clamp(-swiglu_limit, swiglu_limit)
        h = gate * torch.sigmoid(activation_alpha * gate) * (up + activation_beta)
    else:
        h = F.relu(h) if activation_type == "relu" else F.silu(h)
    y = torch.einsum("tei,ehi->teh", h, fc2.float())
    if fc2_bias is not None:
        y = y + fc2_bias.float()
    return torch.einsum("teh,te->th", y, dense).to(x.dtype)


@ort_moe_op.register_fake
def _(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k, activation_type, normalize_routing_weights,
      activation_alpha, activation_beta, swiglu_limit):
    return torch.empty_like(x)


@lru_cache(maxsize=1)
def _ort_moe_schema():
    """com.microsoft.MoE's signature, for the exporter's tracer (onnx registers no schema for onnxruntime's
    contrib operators): 8 inputs (fc3 unused here), one output."""
    from onnx.defs import OpSchema

    P = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    inputs = [P("input", "T"), P("router_probs", "T"), P("fc1_experts_weights", "T"),
              P("fc1_experts_bias", "T", param_option=optional), P("fc2_experts_weights", "T"),
              P("fc2_experts_bias", "T", param_option=optional), P("fc3_experts_weights", "T", param_option=optional),
              P("fc3_experts_bias", "T", param_option=optional)]
    A = OpSchema.Attribute
    AT = OpSchema.AttrType
    attributes = [A("k", AT.INT, ""), A("activation_type", AT.STRING, ""),
                  A("normalize_routing_weights", AT.INT, ""), A("swiglu_fusion", AT.INT, ""),
                  A("activation_alpha", AT.FLOAT, ""), A("activation_beta", AT.FLOAT, ""),
                  A("swiglu_limit", AT.FLOAT, ""), A("use_sparse_mixer", AT.INT, "")]
    attributes = [OpSchema.Attribute(a.name, a.type, a.description, required=False) for a in attributes]
    return OpSchema("MoE", "com.microsoft", 1, inputs=inputs, outputs=[P("output", "T")],
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
                    attributes=attributes)


def ort_moe_translation(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k, activation_type,
                        normalize_routing_weights, activation_alpha, activation_beta, swiglu_limit):
    """torch.onnx translation of moecompile::ort_moe into the com.microsoft.MoE node."""
    import onnx
    import onnxscript
    from onnxscript import opset18 as op

    moe = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MoE", _ort_moe_schema())
    attrs = dict(k=k, activation_type=activation_type, normalize_routing_weights=int(normalize_routing_weights))
    if activation_type == "swiglu":
        attrs.update(swiglu_fusion=1, activation_alpha=activation_alpha, activation_beta=activation_beta)
        if math.isfinite(swiglu_limit):
            attrs["swiglu_limit"] = swiglu_limit
    out = moe(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, **attrs)
    # onnxruntime 1.30 and 1.31's CPU kernel zeroes its output before it reads its input, and the operator lets the
    # output take the input's buffer (MayInplace), so where the block's input has no later reader the output is
    # all zeros. An exact select that reads the input after the node keeps the input alive past it.
    return op.Where(op.Constant(value=onnx.helper.make_tensor("false", onnx.TensorProto.BOOL, [], [False])), x, out)


def _interleave(t: torch.Tensor, inter: int, dim: int) -> torch.Tensor:
    """Gate rows then up rows -> gate and up rows alternating, along `dim`."""
    gate, up = t.split(inter, dim=dim)
    return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)


class OrtLowering(nn.Module):
    """FusedMoE.lowering for com.microsoft.MoE: the operator's weight layout made once, at export, as buffers."""

    kind = ORT

    def __init__(self, spec: MoESpec, weights: MoEWeights):
        super().__init__()
        e = spec.experts
        fc1, b1 = weights.w1.detach(), None if weights.b1 is None else weights.b1.detach()
        if e.gated:
            fc1 = _interleave(fc1, e.intermediate_size, 1)
            b1 = None if b1 is None else _interleave(b1, e.intermediate_size, 1)
        self.register_buffer("fc1", fc1.contiguous())
        self.register_buffer("fc2", weights.w2.detach().contiguous())
        self.register_buffer("fc1_bias", None if b1 is None else b1.contiguous())
        self.register_buffer("fc2_bias", None if weights.b2 is None else weights.b2.detach().contiguous())
        self.activation = _ort_activation(spec)

    def forward(self, spec: MoESpec, weights: MoEWeights, x: torch.Tensor, seq_len: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = spec.router
        logits = F.linear(x, weights.router_weight, weights.router_bias)
        y = torch.ops.moecompile.ort_moe(x, logits, self.fc1, self.fc1_bias, self.fc2, self.fc2_bias, r.top_k,
                                         self.activation[0], r.renormalize or r.score_order != "score_then_select",
                                         *self.activation[1:])
        acc = torch.promote_types(x.dtype, torch.float32)
        out = y.to(acc) * r.scaling_factor if r.scaling_factor != 1.0 else y.to(acc)
        if spec.shared is not None:
            out = out + shared_experts(spec, weights, x)
        if spec.has_output_bias:
            out = out + weights.output_bias.to(acc)
        logits = logits.to(acc)
        slot = None
        if spec.extra_output == "topk_weights":  # what the block returns beside its output
            slot = route(r, weights, x).topk_weights()
        return out.to(x.dtype), logits, slot


def lowering_for(kind: str, spec: MoESpec, weights: MoEWeights) -> nn.Module:
    return OrtLowering(spec, weights) if kind == ORT else StandardLowering()
