"""Detect, step 2: read a proposed candidate into an MoESpec and a recipe for its canonical weights.

Place in the pipeline: detect (propose) -> **describe** -> confirm -> fuse.

Structure gives a small set of hypotheses (which tensor is the router, the gate/up/down roles and layouts of the
expert weights, k and the scaling factor from the module's attributes); execution picks among them. Each hypothesis is
run through the reference and compared with the candidate itself, on a float32 working copy of the candidate whose
tensors are re-randomised (copies.py: on the CPU, so a zero-initialised bias cannot hide) and on fresh random
inputs. The experts are matched on their own where they can be called alone (a ModuleList expert, an HF `*Experts`
module), which keeps the joint search over router hypotheses small. A hypothesis that matches on random inputs is
then weighed against its neighbours on aimed inputs (probes.py; the copy's [E] vectors as drawn and redrawn around
-0.3): random inputs do not tell a masked group filled with 0.0 from one filled with -inf, aimed ones do. The first
of the hypothesis and its neighbours that reproduces the copy there is the description. Where nothing matches,
describe raises `DescribeError` with the closest hypothesis and its error: the candidate is then left alone.
"""

from __future__ import annotations

import contextvars
import inspect
import itertools
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..capture import Leaves, call_block, op_census
from ..fused import FusedMoE
from ..reference import (
    Routing,
    apply_norm,
    aux_loss,
    expert_bias_term,
    expert_counts,
    mlp,
    reference_forward,
    routed_experts,
    shared_experts,
)
from ..spec import ACTIVATIONS, AuxLossSpec, MLPSpec, MoESpec, MoEWeights, NormSpec, RouterSpec, SharedExpertSpec
from .autocast_regions import asked_region
from .compare import output_error, output_pairs
from .copies import redraw_vectors, working_copy
from .detect import Candidate, TensorRef, effective_parameters, expert_members, expert_view, is_mlp_like
from .probes import aimed_inputs, neighbours
from .routing import float_weights
from .train_mode import eval_only_reason

MATCH_RTOL = 1e-4  # fp32 max-abs error over max-abs output that counts as "computes the same thing"
SEARCH_TOKENS = 24
REFINE_TOKENS = 64  # per aimed family in the refine step (confirm then checks 512 a family)
REFINE_VECTORS = (-0.3, 0.1)  # the [E] vectors' redraw in the refine step: negative biased scores
K_ATTRS = ("top_k", "num_experts_per_tok", "k", "topk", "moe_topk", "num_experts_per_token", "n_activated_experts",
           "num_selected_experts", "experts_per_token")
SCALE_ATTRS = ("routed_scaling_factor", "route_scale", "routed_scaling")
GROUP_ATTRS = ("n_group", "num_group", "num_expert_group", "n_groups")
TOPK_GROUP_ATTRS = ("topk_group", "topk_groups", "num_limited_groups")
JITTER_ATTRS = ("router_jitter_noise", "jitter_eps", "moe_jitter_eps")
CAPACITY_ATTRS = ("expert_capacity",)
# DeepSpeed's TopKGate: eval_capacity_factor applies in eval mode (what optimize reads), capacity_factor in training
CAPACITY_FACTOR_ATTRS = ("eval_capacity_factor", "capacity_factor")
MIN_CAPACITY_ATTRS = ("min_capacity",)
GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "clamped_swiglu")


class DescribeError(Exception):
    """The candidate could not be read into an MoESpec; the message says why (it goes to the pass log)."""


Extract = Callable[[nn.Module], dict[str, torch.Tensor | None]]


@dataclass
class Description:
    """What describe found: the spec, how to pull canonical weights out of a module shaped like the candidate, the
    input rank the block accepts, and how the spec was read (for the pass log)."""

    spec: MoESpec
    extract: Callable[[nn.Module], MoEWeights]
    input_rank: int
    method: str
    train_note: str | None = None  # why the block can be fused for eval mode only (passes/train_mode.py), or None


# ----------------------------------------------------------------------------------------------------------------
# tensor access relative to the candidate, so one recipe serves the original block and its randomised copy


def _rel(candidate: Candidate, ref: TensorRef) -> tuple[str, str, int]:
    owner = ref.owner_path[len(candidate.path):].lstrip(".") if candidate.path else ref.owner_path
    return owner, ref.name, ref.split_experts


def _get(block: nn.Module, where: tuple) -> torch.Tensor:
    owner = block.get_submodule(where[0]) if where[0] else block
    return expert_view(getattr(owner, where[1]), where[2] if len(where) > 2 else 0)


# set while a torch.compile graph rebuilds canonical weights from its parameter inputs on every call: the re-laid-out
# tensors must stay in the autograd graph of the model's parameters, not become new Parameters
KEEP_AUTOGRAD = contextvars.ContextVar("moecompile_keep_autograd", default=False)


def _canonical(source: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Keep the source Parameter itself when no copy was needed (shared storage, trained together); else a new
    Parameter (or buffer tensor) holding the re-laid-out copy. A view of a Parameter (DBRX's [E*I, H] seen as
    [E, I, H]) is copied: a Parameter cannot be a view. Under KEEP_AUTOGRAD, the re-laid-out tensor, contiguous."""
    if KEEP_AUTOGRAD.get():
        return value.contiguous()  # the kernels take canonical, contiguous weights
    if (value is source and source._base is None) or isinstance(value, nn.Parameter):
        return value
    value = value.detach().contiguous()
    base = source if source._base is None else source._base
    if isinstance(base, nn.Parameter):
        return nn.Parameter(value, requires_grad=base.requires_grad)
    return value


def _fc1_layout(t: torch.Tensor, layout: str, inter: int, dim: int) -> torch.Tensor:
    if layout in ("concat_gate_up", "none", "separate"):
        return t
    if layout == "concat_up_gate":
        return torch.cat(t.split(inter, dim=dim)[::-1], dim=dim)
    index = [slice(None)] * t.dim()
    gate, up = list(index), list(index)
    gate[dim], up[dim] = slice(0, None, 2), slice(1, None, 2)
    return torch.cat([t[tuple(gate)], t[tuple(up)]], dim=dim)


# ----------------------------------------------------------------------------------------------------------------
# expert hypotheses


@dataclass
class ExpertsHypothesis:
    spec: MLPSpec
    extract: Extract  # block -> {"w1","w2","b1","b2"}


def _activation_variants(base: MLPSpec, owner: nn.Module | None) -> list[MLPSpec]:
    if not base.gated:
        return [replace(base, activation=a) for a in ACTIVATIONS if a != "clamped_swiglu"]
    out = [replace(base, activation=a) for a in GATED_ACTIVATIONS if a != "clamped_swiglu"]
    alpha = getattr(owner, "alpha", None) if owner is not None else None
    limit = getattr(owner, "limit", None) if owner is not None else None
    cfg = getattr(owner, "config", None)
    alpha = alpha if isinstance(alpha, (int, float)) else getattr(cfg, "swiglu_alpha", 1.702)
    limit = limit if isinstance(limit, (int, float)) else getattr(cfg, "swiglu_limit", 7.0)
    out.append(replace(base, activation="clamped_swiglu", activation_alpha=float(alpha), activation_limit=float(limit)))
    return out


def _order_by_declared_activation(variants: list[MLPSpec], owner: nn.Module | None) -> list[MLPSpec]:
    """Try the activation the module itself names (act_fn / activation attribute) first."""
    if owner is None:
        return variants
    names = " ".join(type(m).__name__.lower() for m in owner.modules()) + " " + " ".join(
        str(getattr(getattr(owner, "config", None), a, "")) for a in ("hidden_act", "activation_function"))
    if getattr(owner, "alpha", None) is not None and getattr(owner, "limit", None) is not None:
        names += " clamped_swiglu"
    return sorted(variants, key=lambda s: 0 if s.activation.replace("_", "") in names.replace("_", "") else 1)


def _stacked_hypotheses(candidate: Candidate) -> list[ExpertsHypothesis]:
    E, H = candidate.num_experts, candidate.hidden_size
    refs = candidate.stacked
    owner = candidate.stacked_owner
    mats = [r for r in refs if r.tensor.dim() == 3]
    bias_refs = [r for r in _expert_bias_refs(candidate)]
    hyps: list[ExpertsHypothesis] = []
    # Which tensor is "down": it maps I -> H, stored [E, H, I] or transposed [E, I, H].
    for down in mats:
        others = [m for m in mats if m is not down]
        for down_t in (False, True):
            d_shape = down.tensor.shape[1:]
            if (d_shape[0] if not down_t else d_shape[1]) != H:
                continue
            inter = d_shape[1] if not down_t else d_shape[0]
            fc1_options = []
            for fc1 in others:
                for t in (False, True):
                    s = fc1.tensor.shape[1:]
                    out_dim, in_dim = (s[0], s[1]) if not t else (s[1], s[0])
                    if in_dim != H:
                        continue
                    if out_dim == 2 * inter:
                        for layout in ("concat_gate_up", "interleaved", "concat_up_gate"):
                            fc1_options.append(((fc1,), t, layout, True))
                    if out_dim == inter:
                        fc1_options.append(((fc1,), t, "none", False))
            for g, u in itertools.permutations(others, 2):
                for t in (False, True):
                    shapes = [x.tensor.shape[1:] for x in (g, u)]
                    if all(((s[0], s[1]) if not t else (s[1], s[0])) == (inter, H) for s in shapes):
                        fc1_options.append(((g, u), t, "separate", True))
            for fc1s, fc1_t, layout, gated in fc1_options:
                if len(fc1s) + 1 != len(mats):
                    continue  # every stacked matrix must have a role
                base = MLPSpec(hidden_size=H, intermediate_size=inter, gated=gated, source_gate_up=layout,
                               source_transposed=fc1_t, source_container="stacked",
                               has_bias=_biases_fit(bias_refs, E, H, inter, gated))
                extract = _stacked_extract(candidate, fc1s, fc1_t, layout, down, down_t, inter, gated,
                                           bias_refs if base.has_bias else [])
                for variant in _order_by_declared_activation(_activation_variants(base, owner), owner):
                    hyps.append(ExpertsHypothesis(variant, extract))
    # HF declares its layout: put the hypothesis it declares first.
    if owner is not None and hasattr(owner, "is_transposed"):
        declared = "concat_gate_up" if getattr(owner, "is_concatenated", True) else "interleaved"
        hyps.sort(key=lambda h: (h.spec.source_transposed != owner.is_transposed,
                                 h.spec.gated and h.spec.source_gate_up != declared))
    return hyps


def _expert_bias_refs(candidate: Candidate) -> list[TensorRef]:
    E = candidate.num_experts
    owners = {id(r.owner): (r.owner, r.owner_path) for r in candidate.stacked}
    refs = []
    for owner, owner_path in owners.values():
        for name, tensor in itertools.chain(owner.named_parameters(recurse=False), owner.named_buffers(recurse=False)):
            if tensor is not None and tensor.dim() == 2 and tensor.shape[0] == E:
                refs.append(TensorRef(owner, owner_path, name))
    return refs


def _biases_fit(bias_refs: list[TensorRef], E: int, H: int, inter: int, gated: bool) -> bool:
    sizes = sorted(r.tensor.shape[1] for r in bias_refs)
    return len(sizes) == 2 and sorted([2 * inter if gated else inter, H]) == sizes


def _stacked_extract(candidate, fc1s, fc1_t, layout, down, down_t, inter, gated, bias_refs) -> Extract:
    fc1_where = [_rel(candidate, r) for r in fc1s]
    down_where = _rel(candidate, down)
    H = candidate.hidden_size
    b1_where = b2_where = None
    for r in bias_refs:
        if r.tensor.shape[1] == H and b2_where is None:
            b2_where = _rel(candidate, r)
        else:
            b1_where = _rel(candidate, r)

    def extract(block: nn.Module) -> dict:
        sources = [_get(block, w) for w in fc1_where]
        parts = [s.transpose(1, 2) if fc1_t else s for s in sources]
        w1 = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        w1 = _fc1_layout(w1, layout, inter, dim=1)
        down_src = _get(block, down_where)
        out = {
            "w1": _canonical(sources[0], w1),
            "w2": _canonical(down_src, down_src.transpose(1, 2) if down_t else down_src),
            "b1": None, "b2": None,
        }
        if b1_where is not None:
            b1_src = _get(block, b1_where)
            out["b1"] = _canonical(b1_src, _fc1_layout(b1_src, layout, inter, dim=1))
            out["b2"] = _get(block, b2_where)
        return out

    return extract


def _linear_like(module: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(relative name, weight, bias) for each weight matrix of an MLP-like module."""
    found = []
    for qualified, p in effective_parameters(module):
        if p.dim() != 2:
            continue
        name, _, pname = qualified.rpartition(".")
        sub = module.get_submodule(name) if name else module
        bias = getattr(sub, "bias", None) if pname == "weight" else None
        found.append((qualified, p, bias if isinstance(bias, torch.Tensor) else None))
    return found


def _mlp_hypotheses(module: nn.Module, H: int) -> list[tuple[MLPSpec, Callable[[nn.Module], dict]]]:
    """Hypotheses for one MLP-like module: roles of its matrices (stored [out, in] or [in, out]) and activations."""
    mats = _linear_like(module)
    out: list[tuple[MLPSpec, Callable[[nn.Module], dict]]] = []

    linear_weights = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}

    def oriented(w: torch.Tensor, want_in: int):  # -> (transposed?, out_dim) options
        opts = []
        if w.shape[1] == want_in:
            opts.append((False, w.shape[0]))
        if w.shape[0] == want_in and w.shape[0] != w.shape[1] and id(w) not in linear_weights:
            opts.append((True, w.shape[1]))
        return opts

    for di, (dname, dw, db) in enumerate(mats):
        down_orients = ((False, dw.shape[0]),) if id(dw) in linear_weights else ((False, dw.shape[0]),
                                                                                 (True, dw.shape[1]))
        for d_t, _d_out in [(t, o) for t, o in down_orients if o == H]:
            inter = dw.shape[1] if not d_t else dw.shape[0]
            rest = [m for i, m in enumerate(mats) if i != di]
            options = []
            if len(rest) == 1:
                for t, o in oriented(rest[0][1], H):
                    if o == 2 * inter:
                        options += [((rest[0],), t, lay, True) for lay in ("concat_gate_up", "concat_up_gate",
                                                                          "interleaved")]
                    if o == inter:
                        options.append(((rest[0],), t, "none", False))
            elif len(rest) == 2:
                for g, u in itertools.permutations(rest, 2):
                    for t in (False, True):
                        if all(any(tt == t and o == inter for tt, o in oriented(m[1], H)) for m in (g, u)):
                            options.append(((g, u), t, "separate", True))
            for fc1s, t, layout, gated in options:
                has_bias = all(m[2] is not None for m in fc1s) and db is not None
                if not has_bias and (any(m[2] is not None for m in fc1s) or db is not None):
                    continue  # a bias on some layers only is not in the spec
                base = MLPSpec(hidden_size=H, intermediate_size=inter, gated=gated, has_bias=has_bias,
                               source_gate_up=layout, source_transposed=t, source_container="module")
                names = [m[0] for m in fc1s]
                extract = _module_extract(names, t, layout, dname, d_t, inter, has_bias)
                for variant in _order_by_declared_activation(_activation_variants(base, module), module):
                    out.append((variant, extract))
    return out


def _module_extract(fc1_names, fc1_t, layout, down_name, down_t, inter, has_bias):
    def get(m: nn.Module, qual: str) -> torch.Tensor:
        owner, _, name = qual.rpartition(".")
        return getattr(m.get_submodule(owner) if owner else m, name)

    def bias_of(m: nn.Module, qual: str):
        owner, _, _ = qual.rpartition(".")
        return getattr(m.get_submodule(owner) if owner else m, "bias", None)

    def extract(m: nn.Module) -> dict:
        ws = [get(m, n).t() if fc1_t else get(m, n) for n in fc1_names]
        w1 = _fc1_layout(torch.cat(ws, 0) if len(ws) > 1 else ws[0], layout, inter, dim=0)
        d = get(m, down_name)
        out = {"w1": w1, "w2": d.t() if down_t else d, "b1": None, "b2": None}
        if has_bias:
            bs = [bias_of(m, n) for n in fc1_names]
            out["b1"] = _fc1_layout(torch.cat(bs, 0) if len(bs) > 1 else bs[0], layout, inter, dim=0)
            out["b2"] = bias_of(m, down_name)
        return out

    return extract


def _match_mlp(module: nn.Module, H: int, x: torch.Tensor) -> tuple[MLPSpec, Callable[[nn.Module], dict]]:
    """Pick the MLP hypothesis that reproduces `module(x)`; raise DescribeError otherwise."""
    with torch.no_grad():
        target = module(x)
        if isinstance(target, tuple):
            bias = target[1] if len(target) == 2 else None
            # Megatron's skip-bias-add experts return (output without the down bias, that bias): the sum is the MLP
            skip_bias = isinstance(bias, torch.Tensor) and bias.dim() == 1 and bias.shape[0] == target[0].shape[-1]
            target = target[0] + bias if skip_bias else target[0]
        best = (float("inf"), None)
        for spec, extract in _mlp_hypotheses(module, H):
            try:
                w = extract(module)
                got = mlp(spec, x, w["w1"], w["w2"], w["b1"], w["b2"])
            except RuntimeError:  # a role assignment whose shapes do not compose (e.g. biases of other sizes)
                continue
            err = _rel_err(got, target)
            if err <= MATCH_RTOL:
                return spec, extract
            best = min(best, (err, spec.activation), key=lambda b: b[0])
    raise DescribeError(f"no MLP form reproduces {type(module).__name__} (closest: {best[1]}, rel err {best[0]:.2e})")


def _list_hypothesis(candidate: Candidate, copy_block: nn.Module, x: torch.Tensor) -> ExpertsHypothesis:
    experts = expert_members(copy_block.get_submodule(_rel_module(candidate, candidate.experts_list_path)))
    spec, one = _match_mlp(experts[0], candidate.hidden_size, x)
    spec = replace(spec, source_container="module_list")
    list_path = _rel_module(candidate, candidate.experts_list_path)

    def extract(block: nn.Module) -> dict:
        members = expert_members(block.get_submodule(list_path))
        per_expert = [one(e) for e in members]
        first = members[0]
        ref = next(first.parameters())
        stacked = {}
        for key in ("w1", "w2", "b1", "b2"):
            if per_expert[0][key] is None:
                stacked[key] = None
            else:
                stacked[key] = _canonical(ref, torch.stack([p[key] for p in per_expert]))
        return stacked

    return ExpertsHypothesis(spec, extract)


def _rel_module(candidate: Candidate, path: str) -> str:
    return path[len(candidate.path):].lstrip(".") if candidate.path else path


# ----------------------------------------------------------------------------------------------------------------
# router hypotheses


def _attr(modules: list[nn.Module], names: tuple[str, ...]):
    for m in modules:
        for holder in (m, getattr(m, "config", None)):
            if holder is None:
                continue
            for n in names:
                v = getattr(holder, n, None)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    yield v


def _router_modules(candidate: Candidate) -> list[nn.Module]:
    """The block and every module from it down to a router tensor's owner: where routing attributes live (Switch
    keeps expert_capacity on the router module around its classifier Linear)."""
    modules = [candidate.module]
    for ref in candidate.router:
        rel = _rel(candidate, ref)[0]
        parts = rel.split(".") if rel else []
        for depth in range(1, len(parts) + 1):
            sub = candidate.module.get_submodule(".".join(parts[:depth]))
            if all(sub is not m for m in modules):
                modules.append(sub)
    return modules


def _router_hypotheses(candidate: Candidate, census: set[str], k_values: list[int]) -> list[dict]:
    E = candidate.num_experts
    modules = _router_modules(candidate)
    scales = [float(v) for v in _attr(modules, SCALE_ATTRS)]
    n_group = next((int(v) for v in _attr(modules, GROUP_ATTRS) if int(v) > 1 and E % int(v) == 0), 1)
    topk_group = next((int(v) for v in _attr(modules, TOPK_GROUP_ATTRS) if 1 <= int(v) <= n_group), n_group)
    # an expert capacity the block declares (Switch Transformers): describe's inputs are too short to reach it, so
    # it is read from the attribute and exercised by confirm's longer inputs
    capacity = next((int(v) for v in _attr(modules, CAPACITY_ATTRS) if v >= 1), None)
    forms = [("softmax", "score_then_select"), ("softmax", "select_then_score"), ("sigmoid", "score_then_select"),
             ("sigmoid", "select_then_score"), ("none", "select_then_score")]
    if "softplus" in census or not census:
        forms.insert(0, ("sqrtsoftplus", "score_then_select"))
    # The ops the block ran reorder the forms: a sigmoid and no softmax puts sigmoid first.
    forms.sort(key=lambda f: 0 if f[0] in census or (f[0] == "sqrtsoftplus" and "softplus" in census) else 1)
    hyps: list[dict] = []
    for k in k_values:
        for scoring, order in forms:
            for renorm in (False, True):
                if renorm and scoring == "softmax" and order == "select_then_score":
                    continue
                for on_input in (False, True):
                    for corr in [None] + list(candidate.vectors):
                        groups = [(1, 1, "top2_sum", "-inf")]
                        if n_group > 1:  # masked groups at -inf, or at 0.0 (transformers' DeepSeek-V2 family)
                            groups = [(n_group, topk_group, score, fill) for fill in ("-inf", "zero")
                                      for score in ("top2_sum", "max")] + groups
                        for g, tg, gs, fill in groups:
                            if k > tg * E // g:
                                continue
                            hyps.append(dict(top_k=k, scoring=scoring, score_order=order, renormalize=renorm,
                                             weight_on_input=on_input, correction=corr, n_group=g, topk_group=tg,
                                             group_score=gs, group_fill=fill, scales=scales))
    for eps in dict.fromkeys(float(v) for v in _attr(modules, JITTER_ATTRS)):
        if 2 in k_values and E >= 2:
            hyps.append(dict(top_k=2, scoring="softmax", score_order="select_then_score", renormalize=False,
                             weight_on_input=False, correction=None, n_group=1, topk_group=1,
                             group_score="top2_sum", scales=scales, selection="sparsemixer", jitter_eps=eps))
    for hyp in hyps:
        hyp["expert_capacity"] = capacity
    factors = list(dict.fromkeys(float(v) for v in _attr(modules, CAPACITY_FACTOR_ATTRS) if float(v) > 0))
    if factors and capacity is None:  # a capacity from the token count (GShard, DeepSpeed): tried first
        min_capacity = next((int(v) for v in _attr(modules, MIN_CAPACITY_ATTRS) if int(v) >= 0), 0)
        hyps = _capacity_hypotheses(hyps, factors, min_capacity) + hyps
    if "relu" in census or not k_values:
        hyps.insert(0 if "topk" not in census else len(hyps),
                    dict(top_k=None, scoring="relu", score_order="score_then_select", renormalize=False,
                         weight_on_input=False, correction=None, n_group=1, topk_group=1, group_score="top2_sum",
                         scales=scales, expert_capacity=capacity))
    return hyps


def _capacity_hypotheses(hyps: list[dict], factors: list[float], min_capacity: int) -> list[dict]:
    """The plain top-k hypotheses again with a capacity factor: each factor the block declares, choices queued
    token-major or slot-major, renormalised before or after the drop, the capacity per batch or per sequence."""
    out = []
    for h in hyps:
        if h["correction"] is not None or h["weight_on_input"] or h["n_group"] > 1 or "selection" in h:
            continue
        for factor in factors:
            for order in ("token_major", "slot_major") if h["top_k"] > 1 else ("token_major",):
                for after in (False, True) if h["renormalize"] else (False,):
                    for scope in ("batch", "sequence"):
                        out.append(dict(h, capacity_factor=factor, min_capacity=min_capacity, capacity_order=order,
                                        renorm_after_drop=after, capacity_scope=scope))
    return out


def _k_values(candidate: Candidate) -> list[int]:
    E = candidate.num_experts
    modules = _router_modules(candidate)
    declared = []
    for v in _attr(modules, K_ATTRS):
        if float(v).is_integer() and 1 <= int(v) <= E and int(v) not in declared:
            declared.append(int(v))
    return declared or list(range(1, min(E, 8) + 1))


# ----------------------------------------------------------------------------------------------------------------
# the search


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs error over the largest |want|; inf for other shapes or where NaN/Inf positions differ."""
    return output_error(got, want).rel


def _router_weights(candidate: Candidate, block: nn.Module, hyp: dict) -> dict:
    ref = candidate.router[0]
    w = _get(block, _rel(candidate, ref))
    E = candidate.num_experts
    out = {"router_weight": w if w.shape[0] == E and w.shape[1] == candidate.hidden_size else w.t(),
           "router_bias": None, "correction_bias": None}
    owner_bias = getattr(ref.owner, "bias", None)
    # the router module's `bias` is a router bias (added to the logits) unless this hypothesis reads it as the
    # correction bias (added for choice only: DeepSeek-V3's own Gate calls it `bias`): its role is what it does
    corr = hyp["correction"]
    bias_is_correction = corr is not None and corr.owner is ref.owner and corr.name == "bias"
    if isinstance(owner_bias, torch.Tensor) and owner_bias.numel() == E and ref.name == "weight" \
            and not bias_is_correction:
        out["router_bias"] = _get(block, (_rel(candidate, ref)[0], "bias"))
    if hyp["correction"] is not None:
        bias = _get(block, _rel(candidate, hyp["correction"]))
        out["correction_bias"] = bias if bias.dim() == 1 else _canonical(bias, bias.reshape(E))
    return out


def describe(candidate: Candidate, *, seed: int = 0) -> Description:
    """Read `candidate` into a Description, or raise DescribeError saying why it cannot be read."""
    E, H = candidate.num_experts, candidate.hidden_size
    others = _other_inputs(candidate.module)
    if others:
        # FusedMoE takes hidden states only: a block whose caller passes more (DeepSeek-V4's layers pass input_ids,
        # which its hash-routed blocks route by) cannot be replaced without breaking that call
        raise DescribeError(f"its forward also takes {', '.join(others)}; moecompile fuses blocks that take hidden "
                            "states only, so the model's calls keep working")
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, SEARCH_TOKENS, H, generator=gen)
    probe, target, input_rank, where = _run_probe(candidate.module, seed, x)
    x = x.to(next(probe.parameters()).device)
    y_target, aux = target
    if isinstance(aux, torch.Tensor) and aux.shape == y_target.shape and H != E:
        y_target = y_target + aux  # (y without the experts' biases, their sum): read the whole output
    census = op_census(probe, x if input_rank == 3 else x[0])
    method = ("ops traced" if census else "ops not traced (search in default order)") + where
    flat_x = x.reshape(-1, H)

    # experts first, alone where the container can be called alone
    if candidate.experts_list is not None:
        expert_hyps = [_list_hypothesis(candidate, probe, flat_x[:8])]
    else:
        expert_hyps = _stacked_hypotheses(candidate)
        if not expert_hyps:
            raise DescribeError("expert tensors have no gate/up/down reading consistent with hidden size "
                                f"{H}: shapes {[tuple(r.tensor.shape) for r in candidate.stacked]}")
        alone = _match_stacked_alone(candidate, probe, expert_hyps, flat_x, gen)
        if alone is not None:
            expert_hyps = [alone]

    shared_spec, shared_extract = _describe_shared(candidate, probe, flat_x[:8])
    k_values = _k_values(candidate)
    router_hyps = _router_hypotheses(candidate, census, k_values)
    best = (float("inf"), "")
    refused: list[str] = []  # hypotheses that matched random inputs and failed aimed ones, and where
    output_bias_options = (True, False) if candidate.output_bias is not None else (False,)
    def readings():  # the block as it is first; a peeled reading only if that finds nothing
        yield None
        yield from _peels(probe, H, flat_x)

    for peel in readings():
        found = _search(candidate, probe, peel, expert_hyps, output_bias_options, router_hyps, shared_spec,
                        shared_extract, x, flat_x, y_target, aux, input_rank, method, seed, refused, best)
        if isinstance(found, Description):
            return replace(found, spec=_with_autocast(found.spec, probe),
                           train_note=eval_only_reason(candidate.module, probe, H, seed))
        best = found
    if refused:
        raise DescribeError("descriptions reproduce the block on random inputs but not on inputs aimed at their "
                            f"differences: {'; '.join(refused[:3])}; the block's routing is not pinned down by any "
                            "description moecompile expresses")
    chooser = _expert_choice(candidate, probe, x if input_rank == 3 else flat_x)
    if chooser is not None:
        raise DescribeError(chooser)
    raise DescribeError(f"no description reproduces the block (closest: {best[1] or 'none'}, "
                        f"rel err {best[0]:.2e}); its routing or experts use a form moecompile does not express")


def _with_autocast(spec: MoESpec, probe: nn.Module) -> MoESpec:
    """`spec` with the autocast region the block opened (its working copy ran without it: autocast_regions.py)."""
    try:
        region = asked_region(probe)
    except ValueError as exc:
        raise DescribeError(f"{exc}; moecompile describes a block that computes in one") from None
    return spec if region is None else replace(spec, autocast=region)


@dataclass
class Peel:
    """Ops around the MoE core inside the block (gpt-oss's reference MLPBlock): an input norm (a child module,
    read as NormSpec) and a residual add of the block's input."""

    child: str
    norm: NormSpec
    weight_name: str
    bias_name: str | None
    residual: bool


def _peels(probe: nn.Module, H: int, flat_x: torch.Tensor) -> list[Peel]:
    """The ways to read a norm child of the block as its input norm, with and without a residual add."""
    for name, child in probe.named_children():
        params = dict(child.named_parameters())
        # its own tensors only (a graph region's child holds parameter-free GraphModules)
        if any("." in n for n in params) or not 1 <= len(params) <= 2 \
                or any(p.dim() != 1 or p.numel() != H for p in params.values()) \
                or "norm" not in (name + type(child).__name__).lower():
            continue
        weight_name = next((n for n in params if n in ("weight", "scale", "gamma", "g")), next(iter(params)))
        bias_name = next((n for n in params if n != weight_name), None)
        eps_values = [v for v in (getattr(child, a, None) for a in ("eps", "variance_epsilon", "epsilon"))
                      if isinstance(v, float)] or [torch.finfo(torch.float32).eps, 1e-5, 1e-6]
        with torch.no_grad():
            want = child(flat_x)
            for kind, eps in itertools.product(("rms", "layer"), eps_values):
                norm = NormSpec(kind=kind, eps=eps, has_bias=bias_name is not None)
                got = apply_norm(norm, params[weight_name], params.get(bias_name), flat_x)
                if isinstance(want, torch.Tensor) and want.shape == got.shape and _rel_err(got, want) <= MATCH_RTOL:
                    return [Peel(name, norm, weight_name, bias_name, residual) for residual in (True, False)]
    return []


def _search(candidate, probe, peel: Peel | None, expert_hyps, output_bias_options, router_hyps, shared_spec,
            shared_extract, x, flat_x, y_target, aux, input_rank, method, seed, refused, best):
    """The hypotheses against the block's output; with a peel, the core's (norm(x) in, the residual taken off).
    Returns the Description found, or the closest miss (error, summary)."""
    if peel is not None:
        with torch.no_grad():
            flat_x = probe.get_submodule(peel.child)(flat_x)
            if peel.residual:
                y_target = y_target - x.reshape(y_target.shape)
    leaves, aux = (aux, None) if isinstance(aux, Leaves) else (None, aux)  # a structure: read after the routing
    for eh, output_bias in itertools.product(expert_hyps, output_bias_options):
        expert_weights = eh.extract(probe)
        for rh in router_hyps:
            for scale in rh["scales"] + [None]:
                spec, weights = _assemble(candidate, probe, eh, expert_weights, rh, scale, shared_spec,
                                          shared_extract, output_bias, aux, flat_x,
                                          input_rank == 3 and y_target.dim() == 2)
                if spec is None:
                    continue
                with torch.no_grad():
                    if scale is None and not rh["weight_on_input"]:
                        spec, weights = _fit_scale(spec, weights, flat_x, y_target)
                    y, routing = reference_forward(spec, weights, flat_x)
                if spec.aux_loss is not None:
                    spec = _fit_aux(spec, routing.logits, aux)
                    if spec is None:
                        continue
                err = max(_rel_err(y.reshape(y_target.shape), y_target), _aux_err(spec, weights, routing, aux))
                if leaves is not None and err <= MATCH_RTOL:
                    spec, leaves_err = _read_leaves(spec, weights, routing, leaves)
                    if spec is None:
                        continue
                    err = max(err, leaves_err)
                if err <= MATCH_RTOL:
                    recipe = _weights_recipe(candidate, eh, rh, spec, shared_extract)
                    if peel is not None:
                        spec, recipe = _peeled(spec, recipe, peel)
                    found = Description(spec, recipe, input_rank, method)
                    refined = _refine(probe, found, seed, refused)
                    if refined is not None:
                        return refined
                if err < best[0]:
                    best = (err, spec.summary())
    return best


def _peeled(spec: MoESpec, recipe, peel: Peel):
    """The description with the peeled ops around it, and a weights recipe that adds the norm's tensors."""
    def extract(block: nn.Module) -> MoEWeights:
        weights = recipe(block)
        norm = block.get_submodule(peel.child)
        weights.norm_weight = getattr(norm, peel.weight_name)
        weights.norm_bias = getattr(norm, peel.bias_name) if peel.bias_name else None
        return weights
    return replace(spec, input_norm=peel.norm, residual=peel.residual), extract


def _expert_choice(candidate: Candidate, probe: nn.Module, x: torch.Tensor) -> str | None:
    """A reason naming expert-choice routing when every expert of a listed set took the same number of rows, other
    than all tokens (each expert picked its top tokens: the selection runs along the token axis), else None."""
    if candidate.experts_list is None:
        return None
    experts = expert_members(probe.get_submodule(_rel_module(candidate, candidate.experts_list_path)))
    rows: list[int] = []
    handles = [m.register_forward_hook(lambda m, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1])
                                                                       .shape[0])) for m in experts]
    try:
        with torch.no_grad():
            call_block(probe, x)
    except Exception:  # noqa: BLE001 - the user's block; the generic reason stands
        return None
    finally:
        for h in handles:
            h.remove()
    T = x.reshape(-1, x.shape[-1]).shape[0]
    if len(rows) == len(experts) and len(set(rows)) == 1 and 0 < rows[0] < T:
        return (f"expert-choice routing: each of the {len(experts)} experts took exactly {rows[0]} of {T} tokens "
                "(the experts pick their tokens, not the tokens their experts); moecompile fuses token-choice "
                "blocks only")
    return None


def _run_probe(block: nn.Module, seed: int, x: torch.Tensor):
    """(re-randomised working copy, its outputs on x, input rank, a note for the log): on the CPU, else, where the
    block's code does not run there, on its own device."""
    device = next(block.parameters()).device
    for where in (torch.device("cpu"), device):
        probe = working_copy(block, seed=seed, device=where)
        try:
            with torch.no_grad():
                target, input_rank = call_block(probe, x.to(where))
            return probe, target, input_rank, "" if where.type == "cpu" else f"; read on {where} (the block does " \
                "not run on the CPU)"
        except Exception as exc:  # noqa: BLE001 - any failure of the user's block is reported, not raised
            error = f"{type(exc).__name__}: {exc}"
        if where == device:
            break
    raise DescribeError(f"calling the block on hidden states [..., {x.shape[-1]}] failed: {error}")


def _refine(probe: nn.Module, found: Description, seed: int, refused: list[str]) -> Description | None:
    """`found`, or the first of its neighbours, that reproduces the probe copy on aimed inputs; None (and a note in
    `refused`) when neither does."""
    failure = _fails_aimed(probe, found.spec, found.extract, found.input_rank, seed)
    if failure is None:
        return found
    for n in neighbours(found.spec):
        def extract(block, n=n):
            return n.weights(found.extract(block))
        if _fails_aimed(probe, n.spec, extract, found.input_rank, seed) is None:
            return Description(n.spec, extract, found.input_rank,
                               f"{found.method}; aimed inputs chose {n.label} over {found.spec.summary()}")
    refused.append(f"{found.spec.summary()} ({failure})")
    return None


def _fails_aimed(probe: nn.Module, spec: MoESpec, extract, input_rank: int, seed: int) -> str | None:
    """Where `spec` fails to reproduce the probe copy on the aimed families (its [E] vectors as drawn, then redrawn
    around -0.3), or None."""
    E = spec.num_experts
    with _vectors_kept(probe, E), torch.no_grad():
        for variant in ("as drawn", "[E] vectors around -0.3"):
            if variant != "as drawn":
                redraw_vectors(probe, E, *REFINE_VECTORS, seed + 5)
            weights = extract(probe)
            gen = torch.Generator().manual_seed(seed + 2)
            cpu_weights = float_weights(weights)
            for family in aimed_inputs(spec, cpu_weights, gen, REFINE_TOKENS):
                x = family.x.to(next(probe.parameters()).device)
                x = x if input_rank == 3 else x.reshape(-1, x.shape[-1])
                try:
                    want = call_block(probe, x)[0]
                except Exception as exc:  # noqa: BLE001 - the user's block
                    return f"the block raised on {family.name} inputs: {type(exc).__name__}"
                got = call_block(FusedMoE(spec, weights, backend="reference"), x)[0]
                for g, w in output_pairs(got, want, E):
                    if not output_error(g, w).within(MATCH_RTOL):
                        return f"{family.name} inputs, {variant}: {output_error(g, w).describe()}"
    return None


@contextmanager
def _vectors_kept(block: nn.Module, num_experts: int):
    """Restores the block's floating [E] / [1, E] tensors (which redraw_vectors changes) on exit."""
    kept = [(t, t.detach().clone()) for t in itertools.chain(block.parameters(), block.buffers())
            if t.is_floating_point() and t.numel() == num_experts and t.dim() <= 2]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in kept:
                tensor.copy_(value)


def _other_inputs(block: nn.Module) -> list[str]:
    """Named forward inputs of the block besides the hidden states."""
    try:
        params = list(inspect.signature(block.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _match_stacked_alone(candidate, probe, hyps, flat_x, gen) -> ExpertsHypothesis | None:
    """HF `*Experts` modules take (hidden_states, top_k_index, top_k_weights): match the experts on their own."""
    owner = candidate.stacked_owner
    rel_owner = _rel_module(candidate, next(r.owner_path for r in candidate.stacked if r.owner is owner))
    module = probe.get_submodule(rel_owner) if rel_owner else probe
    if module is probe:
        return None
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    if len(params) < 3:
        return None
    E, T = candidate.num_experts, flat_x.shape[0]
    k = min(2, E)
    device = flat_x.device
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(device)
    w = torch.rand(T, k, generator=gen).to(device)
    try:
        with torch.no_grad():
            target = module(flat_x, idx, w)
    except Exception:  # noqa: BLE001 - not the HF calling convention: match jointly with the router instead
        return None
    if isinstance(target, tuple):
        target = target[0]
    routing = Routing(torch.zeros(T, E, device=device), torch.arange(T, device=device).repeat_interleave(k),
                      idx.reshape(-1), w.reshape(-1), k)
    dummy_router = RouterSpec(num_experts=E, top_k=k)
    for h in hyps:
        spec = MoESpec(router=dummy_router, experts=h.spec)
        ew = h.extract(probe)
        weights = MoEWeights(router_weight=torch.zeros(E, candidate.hidden_size, device=device), **ew)
        with torch.no_grad():
            got = routed_experts(spec, weights, flat_x, routing)
        if _rel_err(got, target) <= MATCH_RTOL:
            return h
    return None


def _describe_shared(candidate: Candidate, probe: nn.Module, x: torch.Tensor):
    if not candidate.shared:
        if candidate.shared_gate is not None:
            raise DescribeError(f"{candidate.shared_gate[0]} looks like a shared-expert gate but no shared expert "
                                "was found beside it")
        return None, None
    if len(candidate.shared) > 1:
        names = ", ".join(p for p, _ in candidate.shared)
        raise DescribeError(f"several shared-expert candidates ({names}); moecompile fuses one shared MLP per block")
    shared_path, _ = candidate.shared[0]
    rel = _rel_module(candidate, shared_path)
    spec, extract = _match_mlp(probe.get_submodule(rel), candidate.hidden_size, x)
    gate_rel = None
    if candidate.shared_gate is not None:
        gate_module = candidate.shared_gate[1]
        if getattr(gate_module, "bias", None) is not None:
            raise DescribeError(f"{candidate.shared_gate[0]} has a bias; the shared-expert gate in moecompile has none")
        gate_rel = _rel_module(candidate, candidate.shared_gate[0])
    shared_spec = SharedExpertSpec(mlp=replace(spec, source_container="module"), sigmoid_gate=gate_rel is not None)

    def shared_extract(block: nn.Module) -> dict:
        module = block.get_submodule(rel)
        source = next(module.parameters())
        out = {f"shared_{k}": (None if v is None else _canonical(source, v)) for k, v in extract(module).items()}
        out["shared_gate"] = block.get_submodule(gate_rel).weight if gate_rel else None
        return out

    return shared_spec, shared_extract


def _assemble(candidate, block, eh, expert_weights, rh, scale, shared_spec, shared_extract, output_bias, aux, flat_x,
              flat_out):
    E = candidate.num_experts
    router_w = _router_weights(candidate, block, rh)
    extra, aux_spec = "none", None
    if aux is not None:
        bias_sized = aux.dim() and aux.shape[-1] == flat_x.shape[-1] != E and aux.numel() == flat_x.numel()
        extra = "expert_bias" if bias_sized else _leaf_kind(aux, flat_x.shape[0], E, rh["top_k"])
        if extra in (None, "expert_counts") or (extra == "aux_loss" and rh["top_k"] is None):
            return None, None
        # a loss: its formula and coefficient are fitted once the routing is known (_fit_aux)
        aux_spec = AuxLossSpec() if extra == "aux_loss" else None
    try:
        router = RouterSpec(
            num_experts=E, top_k=rh["top_k"], scoring=rh["scoring"],
            selection=_selection(rh),
            score_order=rh["score_order"], renormalize=rh["renormalize"],
            renorm_min=1e-20 if rh["renormalize"] else 0.0, scaling_factor=1.0 if scale is None else scale,
            has_bias=router_w["router_bias"] is not None, has_correction_bias=rh["correction"] is not None,
            n_group=rh["n_group"], topk_group=rh["topk_group"], group_score=rh["group_score"],
            group_fill=rh.get("group_fill", "-inf"), weight_on_input=rh["weight_on_input"],
            jitter_eps=rh.get("jitter_eps", 0.0),
            expert_capacity=rh["expert_capacity"], capacity_factor=rh.get("capacity_factor"),
            min_capacity=rh.get("min_capacity", 0), capacity_scope=rh.get("capacity_scope", "sequence"),
            capacity_order=rh.get("capacity_order", "token_major"),
            renorm_after_drop=rh.get("renorm_after_drop", False))
        spec = MoESpec(router=router, experts=eh.spec, shared=shared_spec, extra_output=extra, flat_output=flat_out,
                       has_output_bias=output_bias, aux_loss=aux_spec)
    except ValueError:
        return None, None
    weights = MoEWeights(**router_w, **expert_weights, **_rest_weights(candidate, block, spec, shared_extract))
    return spec, weights


def _selection(rh: dict) -> str:
    if "selection" in rh:
        return rh["selection"]
    return "all_positive" if rh["top_k"] is None else ("grouped_topk" if rh["n_group"] > 1 else "topk")


def _rest_weights(candidate, block, spec, shared_extract) -> dict:
    """The shared-expert tensors and the output bias, as the spec has them."""
    out = shared_extract(block) if shared_extract else {}
    if spec.has_output_bias:
        out["output_bias"] = _get(block, _rel(candidate, candidate.output_bias))
    return out


def _fit_scale(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, y_target: torch.Tensor):
    """Least-squares scaling factor of the routed sum, rounded to 1.0 when it is within rounding of it."""
    routing_spec = replace(spec, shared=None, extra_output="none", has_output_bias=False, aux_loss=None)
    y_routed, _ = reference_forward(routing_spec, weights, x)
    y_rest = y_target.reshape(y_routed.shape).float()
    if spec.shared is not None:
        y_rest = y_rest - shared_experts(spec, weights, x)
    if spec.has_output_bias:
        y_rest = y_rest - weights.output_bias.float()
    denom = (y_routed.float() * y_routed.float()).sum().item()
    if denom == 0:
        return spec, weights
    c = (y_rest * y_routed.float()).sum().item() / denom
    if abs(c - 1.0) < 1e-5 or not (c > 0):
        return spec, weights
    return replace(spec, router=replace(spec.router, scaling_factor=c)), weights


def _round_number(value: float, digits: int = 3) -> bool:
    """Whether `value` is a number people write as a loss coefficient (0.01, 0.001, 1, 0.02, 1.25e-3: three
    significant digits at most). A wrong loss formula fits the block's loss with an arbitrary ratio."""
    if not math.isfinite(value) or value <= 0:
        return False
    rounded = float(f"{value:.{digits - 1}e}")
    return abs(rounded - value) <= 1e-5 * value


# router z-loss coefficients tried beside the load-balancing one (ST-MoE uses 1e-3; none first)
Z_COEFFICIENTS = (0.0, 1e-3, 1e-4, 5e-4, 2e-3, 5e-3, 1e-2, 1e-1, 1.0)


def _fit_aux(spec: MoESpec, logits: torch.Tensor, aux: torch.Tensor) -> MoESpec | None:
    """`spec` with the load-balancing loss (which choices it counts, its coefficient, a router z-loss term) that
    gives the block's loss `aux` on these logits, or None. Top-1 counting first (with k = 1 both read the same); a
    z-loss coefficient from Z_COEFFICIENTS, the load-balancing coefficient then solved and accepted only as a round
    number (aimed inputs and confirm check the pair on other inputs)."""
    z = logits.float().logsumexp(dim=-1).square().mean().item()
    for z_coefficient in Z_COEFFICIENTS:
        for counted in ("top1", "topk"):
            trial = replace(spec, aux_loss=AuxLossSpec(counted=counted))
            value = aux_loss(trial, logits).item()
            ratio = (aux.float().item() - z_coefficient * z) / value if value else math.nan
            if _round_number(ratio):
                return replace(trial, aux_loss=AuxLossSpec(counted=counted, coefficient=float(f"{ratio:.2e}"),
                                                           z_coefficient=z_coefficient))
    return None


def _leaf_kind(leaf: torch.Tensor, T: int, E: int, k: int | None) -> str | None:
    """Which of the outputs a fused block computes `leaf` can be, by its shape and dtype."""
    if leaf.dim() == 0 and leaf.is_floating_point():
        return "aux_loss"
    if leaf.dim() == 1 and leaf.numel() == E and (not leaf.is_floating_point() or bool((leaf == leaf.round()).all())):
        return "expert_counts"  # int64 (bincount, DeepSpeed's exp_counts) or whole floats (torch.histc)
    if leaf.dim() and leaf.shape[-1] == E and leaf.numel() == T * E:
        return "router_logits"
    if k is not None and leaf.dim() and leaf.shape[-1] == k and leaf.numel() == T * k:
        return "topk_weights"
    return None


def _read_leaves(spec: MoESpec, weights: MoEWeights, routing: Routing, leaves: Leaves
                 ) -> tuple[MoESpec | None, float]:
    """`spec` returning the block's structure (MoESpec.outputs), each leaf read by its shape and checked against
    what the description computes on this routing, and the largest leaf error; (None, inf) where a leaf is none of
    the outputs moecompile computes, or fits no loss formula or counting."""
    T, E, k = routing.logits.shape[0], spec.num_experts, spec.router.top_k
    kinds = [_leaf_kind(leaf, T, E, k) for leaf in leaves]
    if None in kinds or kinds.count("aux_loss") > 1 or kinds.count("expert_counts") > 1:
        return None, math.inf

    def named(tree):
        return tuple(named(item) if isinstance(item, tuple) else item if item == "y" else kinds[item]
                     for item in tree)
    try:
        spec = replace(spec, extra_output="none", outputs=named(leaves.tree),
                       aux_loss=AuxLossSpec() if "aux_loss" in kinds else None,
                       expert_counts="top1" if "expert_counts" in kinds else None)
    except ValueError:
        return None, math.inf
    if "aux_loss" in kinds:
        spec = _fit_aux(spec, routing.logits, leaves[kinds.index("aux_loss")])
        if spec is None:
            return None, math.inf
    if "expert_counts" in kinds:
        want = leaves[kinds.index("expert_counts")].to(routing.logits.device)
        counted = next((c for c in ("top1", "topk") if torch.equal(
            expert_counts(replace(spec, expert_counts=c), routing), want.long())), None)
        if counted is None:
            return None, math.inf
        spec = replace(spec, expert_counts=counted)
    return spec, max((_leaf_err(kind, spec, weights, routing, leaf) for kind, leaf in zip(kinds, leaves)),
                     default=0.0)


def _aux_err(spec: MoESpec, weights: MoEWeights, routing: Routing, aux: torch.Tensor | None) -> float:
    return 0.0 if aux is None else _leaf_err(spec.extra_output, spec, weights, routing, aux)


def _leaf_err(kind: str, spec: MoESpec, weights: MoEWeights, routing: Routing, leaf: torch.Tensor) -> float:
    """How far `leaf` is from the output `kind` the description computes on this routing (counts: 0, _read_leaves
    compares them exactly)."""
    if kind == "expert_bias":
        return _rel_err(expert_bias_term(spec, weights, routing), leaf.reshape(-1, leaf.shape[-1]).float())
    if kind == "aux_loss":
        return _rel_err(aux_loss(spec, routing.logits), leaf.float())
    if kind == "router_logits":
        return _rel_err(routing.logits, leaf.reshape(routing.logits.shape).float())
    if kind == "topk_weights":
        got = routing.topk_weights()
        # HF returns the k weights in top-k order; compare as sorted sets so an equal-valued order does not matter
        return _rel_err(got.sort(dim=-1).values, leaf.reshape(got.shape).float().sort(dim=-1).values)
    return 0.0


def _weights_recipe(candidate, eh, rh, spec, shared_extract) -> Callable[[nn.Module], MoEWeights]:
    def extract(block: nn.Module) -> MoEWeights:
        w = MoEWeights(**_router_weights(candidate, block, rh), **eh.extract(block),
                       **_rest_weights(candidate, block, spec, shared_extract))
        src = _get(block, _rel(candidate, candidate.router[0]))
        w.router_weight = _canonical(src, w.router_weight)
        w.check(spec)
        return w

    return extract


__all__ = ["Description", "DescribeError", "describe", "is_mlp_like"]
