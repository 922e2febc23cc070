"""describe's expert hypotheses: which stacked tensor or submodule matrix is gate, up and down, in which layout and
orientation, with which activation; the routed experts matched alone where the container can be called alone (an
HF `*Experts` module, a ModuleList member), and the shared expert and its gate.

Place in the pipeline: search.py asks `stacked_hypotheses` / `list_hypothesis` for the routed experts and
`describe_shared` for the shared expert before searching the router hypotheses jointly with them.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from ...reference import (
    Routing,
    mlp,
    routed_experts,
)
from ...spec import ACTIVATIONS, CLAMPED, MLPSpec, MoESpec, MoEWeights, RouterSpec, SharedExpertSpec
from ..detect import Candidate, TensorRef, effective_parameters, expert_members
from .base import MATCH_RTOL, DescribeError, Extract, rel_err
from .tensors import canonical, fc1_layout, get_tensor, rel_module, rel_ref

GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "clamped_swiglu", "clamped_silu")


@dataclass(frozen=True)
class ExpertsHypothesis:
    """One reading of an expert set: its MLPSpec (roles, layout, orientation, activation) and the recipe that pulls
    its canonical tensors out of a module shaped like the one read."""

    spec: MLPSpec
    extract: Extract  # module -> {"w1", "w2", "b1", "b2"}


def _number(*values, default: float) -> float:
    """The first of `values` that is a number (a module attribute, then its config's), else `default`."""
    return float(next((v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)), default))


def _activation_variants(base: MLPSpec, owner: nn.Module | None) -> list[MLPSpec]:
    if not base.gated:
        return [replace(base, activation=a) for a in ACTIVATIONS if a not in CLAMPED]
    out = [replace(base, activation=a) for a in GATED_ACTIVATIONS if a not in CLAMPED]
    cfg = getattr(owner, "config", None)
    alpha = _number(getattr(owner, "alpha", None), getattr(cfg, "swiglu_alpha", None), default=1.702)
    limit = _number(getattr(owner, "limit", None), getattr(owner, "swiglu_limit", None),
                    getattr(cfg, "swiglu_limit", None), default=7.0)
    out.append(replace(base, activation="clamped_swiglu", activation_alpha=alpha, activation_limit=limit))
    out.append(replace(base, activation="clamped_silu", activation_limit=limit))
    return out


def _order_by_declared_activation(variants: list[MLPSpec], owner: nn.Module | None) -> list[MLPSpec]:
    """Try the activation the module itself names (act_fn / activation attribute) first."""
    if owner is None:
        return variants
    names = " ".join(type(m).__name__.lower() for m in owner.modules()) + " " + " ".join(
        str(getattr(getattr(owner, "config", None), a, "")) for a in ("hidden_act", "activation_function"))
    if getattr(owner, "alpha", None) is not None and getattr(owner, "limit", None) is not None:
        names += " clamped_swiglu"
    elif getattr(owner, "limit", None) is not None or getattr(owner, "swiglu_limit", None) is not None:
        names += " clamped_silu"
    return sorted(variants, key=lambda s: 0 if s.activation.replace("_", "") in names.replace("_", "") else 1)


def stacked_hypotheses(candidate: Candidate) -> list[ExpertsHypothesis]:
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
    fc1_where = [rel_ref(candidate, r) for r in fc1s]
    down_where = rel_ref(candidate, down)
    H = candidate.hidden_size
    b1_where = b2_where = None
    for r in bias_refs:
        if r.tensor.shape[1] == H and b2_where is None:
            b2_where = rel_ref(candidate, r)
        else:
            b1_where = rel_ref(candidate, r)

    def extract(block: nn.Module) -> dict:
        sources = [get_tensor(block, w) for w in fc1_where]
        parts = [s.transpose(1, 2) if fc1_t else s for s in sources]
        w1 = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        w1 = fc1_layout(w1, layout, inter, dim=1)
        down_src = get_tensor(block, down_where)
        out = {
            "w1": canonical(sources[0], w1),
            "w2": canonical(down_src, down_src.transpose(1, 2) if down_t else down_src),
            "b1": None, "b2": None,
        }
        if b1_where is not None:
            b1_src = get_tensor(block, b1_where)
            out["b1"] = canonical(b1_src, fc1_layout(b1_src, layout, inter, dim=1))
            out["b2"] = get_tensor(block, b2_where)
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


def _mlp_hypotheses(module: nn.Module, H: int) -> list[ExpertsHypothesis]:
    """Hypotheses for one MLP-like module: roles of its matrices (stored [out, in] or [in, out]) and activations."""
    mats = _linear_like(module)
    out: list[ExpertsHypothesis] = []

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
                    out.append(ExpertsHypothesis(variant, extract))
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
        w1 = fc1_layout(torch.cat(ws, 0) if len(ws) > 1 else ws[0], layout, inter, dim=0)
        d = get(m, down_name)
        out = {"w1": w1, "w2": d.t() if down_t else d, "b1": None, "b2": None}
        if has_bias:
            bs = [bias_of(m, n) for n in fc1_names]
            out["b1"] = fc1_layout(torch.cat(bs, 0) if len(bs) > 1 else bs[0], layout, inter, dim=0)
            out["b2"] = bias_of(m, down_name)
        return out

    return extract


def match_mlp(module: nn.Module, H: int, x: torch.Tensor) -> tuple[MLPSpec, Callable[[nn.Module], dict]]:
    """Pick the MLP hypothesis that reproduces `module(x)`; raise DescribeError otherwise."""
    with torch.no_grad():
        target = module(x)
        if isinstance(target, tuple):
            bias = target[1] if len(target) == 2 else None
            # Megatron's skip-bias-add experts return (output without the down bias, that bias): the sum is the MLP
            skip_bias = isinstance(bias, torch.Tensor) and bias.dim() == 1 and bias.shape[0] == target[0].shape[-1]
            target = target[0] + bias if skip_bias else target[0]
        best = (float("inf"), None)
        for spec, extract in ((h.spec, h.extract) for h in _mlp_hypotheses(module, H)):
            try:
                w = extract(module)
                got = mlp(spec, x, w["w1"], w["w2"], w["b1"], w["b2"])
            except RuntimeError:  # a role assignment whose shapes do not compose (e.g. biases of other sizes)
                continue
            err = rel_err(got, target)
            if err <= MATCH_RTOL:
                return spec, extract
            best = min(best, (err, spec.activation), key=lambda b: b[0])
    raise DescribeError(f"no MLP form reproduces {type(module).__name__} (closest: {best[1]}, rel err {best[0]:.2e})")


def list_hypothesis(candidate: Candidate, copy_block: nn.Module, x: torch.Tensor) -> ExpertsHypothesis:
    experts = expert_members(copy_block.get_submodule(rel_module(candidate, candidate.experts_list_path)))
    spec, one = match_mlp(experts[0], candidate.hidden_size, x)
    spec = replace(spec, source_container="module_list")
    list_path = rel_module(candidate, candidate.experts_list_path)

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
                stacked[key] = canonical(ref, torch.stack([p[key] for p in per_expert]))
        return stacked

    return ExpertsHypothesis(spec, extract)


def match_stacked_alone(candidate: Candidate, probe: nn.Module, hyps: list[ExpertsHypothesis], flat_x: torch.Tensor,
                        gen: torch.Generator) -> ExpertsHypothesis | None:
    """HF `*Experts` modules take (hidden_states, top_k_index, top_k_weights): match the experts on their own."""
    owner = candidate.stacked_owner
    rel_owner = rel_module(candidate, next(r.owner_path for r in candidate.stacked if r.owner is owner))
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
        if rel_err(got, target) <= MATCH_RTOL:
            return h
    return None


def describe_shared(candidate: Candidate, probe: nn.Module, x: torch.Tensor
                    ) -> tuple[SharedExpertSpec | None, Callable[[nn.Module], dict] | None]:
    """The shared expert's spec and weights recipe (None, None without one); its gate read as a sigmoid gate."""
    if not candidate.shared:
        if candidate.shared_gate is not None:
            raise DescribeError(f"{candidate.shared_gate[0]} looks like a shared-expert gate but no shared expert "
                                "was found beside it")
        return None, None
    if len(candidate.shared) > 1:
        names = ", ".join(p for p, _ in candidate.shared)
        raise DescribeError(f"several shared-expert candidates ({names}); moecompile fuses one shared MLP per block")
    shared_path, _ = candidate.shared[0]
    rel = rel_module(candidate, shared_path)
    spec, extract = match_mlp(probe.get_submodule(rel), candidate.hidden_size, x)
    gate_rel = None
    if candidate.shared_gate is not None:
        gate_module = candidate.shared_gate[1]
        if getattr(gate_module, "bias", None) is not None:
            raise DescribeError(f"{candidate.shared_gate[0]} has a bias; the shared-expert gate in moecompile has none")
        gate_rel = rel_module(candidate, candidate.shared_gate[0])
    shared_spec = SharedExpertSpec(mlp=replace(spec, source_container="module"), sigmoid_gate=gate_rel is not None)

    def shared_extract(block: nn.Module) -> dict:
        module = block.get_submodule(rel)
        source = next(module.parameters())
        out = {f"shared_{k}": (None if v is None else canonical(source, v)) for k, v in extract(module).items()}
        out["shared_gate"] = block.get_submodule(gate_rel).weight if gate_rel else None
        return out

    return shared_spec, shared_extract
