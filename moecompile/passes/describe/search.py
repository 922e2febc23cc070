"""describe itself: the block's working copy run on random inputs, the hypotheses (experts.py x router.py) tried
against its output, a match weighed against its neighbours on aimed inputs, a norm and residual peeled off where the
block holds them, and DescribeError with the closest miss where nothing matches.

Place in the pipeline: detect (propose) -> **describe** -> confirm -> fuse; the pass manager calls `describe`.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from ...capture import Leaves, call_block, op_census
from ...fused import FusedMoE
from ...reference import (
    apply_norm,
    reference_forward,
)
from ...spec import AuxLossSpec, MoESpec, MoEWeights, NormSpec
from ..autocast_regions import asked_region
from ..compare import output_error, output_pairs
from ..copies import redraw_vectors, working_copy
from ..detect import Candidate, expert_members
from ..probes import aimed_inputs, neighbours
from ..routing import float_weights
from ..train_mode import eval_only_reason
from .base import MATCH_RTOL, DescribeError, Description, rel_err
from .experts import ExpertsHypothesis, describe_shared, list_hypothesis, match_stacked_alone, stacked_hypotheses
from .outputs import aux_err, fit_aux, fit_scale, leaf_kind, read_leaves
from .router import RouterHypothesis, k_candidates, router_hypotheses, router_weights
from .tensors import canonical, get_tensor, rel_module, rel_ref

SEARCH_TOKENS = 24


REFINE_TOKENS = 64  # per aimed family in the refine step (confirm then checks 512 a family)


REFINE_VECTORS = (-0.3, 0.1)  # the [E] vectors' redraw in the refine step: negative biased scores


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

    expert_hyps = _expert_readings(candidate, probe, flat_x, gen)
    shared_spec, shared_extract = describe_shared(candidate, probe, flat_x[:8])
    router_hyps = router_hypotheses(candidate, census, k_candidates(candidate))
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
    raise _not_found(candidate, probe, x if input_rank == 3 else flat_x, refused, best)


def _expert_readings(candidate: Candidate, probe: nn.Module, flat_x: torch.Tensor, gen: torch.Generator
                     ) -> list[ExpertsHypothesis]:
    """The routed experts' readings, matched alone where the container can be called alone (a listed expert, an HF
    `*Experts` module): then one."""
    if candidate.experts_list is not None:
        return [list_hypothesis(candidate, probe, flat_x[:8])]
    readings = stacked_hypotheses(candidate)
    if not readings:
        raise DescribeError("expert tensors have no gate/up/down reading consistent with hidden size "
                            f"{candidate.hidden_size}: shapes {[tuple(r.tensor.shape) for r in candidate.stacked]}")
    alone = match_stacked_alone(candidate, probe, readings, flat_x, gen)
    return readings if alone is None else [alone]


def _not_found(candidate: Candidate, probe: nn.Module, x: torch.Tensor, refused: list[str],
               best: tuple[float, str]) -> DescribeError:
    """Why no reading was taken: readings refused on aimed inputs, expert-choice routing, or the closest miss."""
    if refused:
        return DescribeError("descriptions reproduce the block on random inputs but not on inputs aimed at their "
                             f"differences: {'; '.join(refused[:3])}; the block's routing is not pinned down by any "
                             "description moecompile expresses")
    chooser = _expert_choice(candidate, probe, x)
    if chooser is not None:
        return DescribeError(chooser)
    return DescribeError(f"no description reproduces the block (closest: {best[1] or 'none'}, "
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
                if isinstance(want, torch.Tensor) and want.shape == got.shape and rel_err(got, want) <= MATCH_RTOL:
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
            for scale in [*rh.scales, None]:
                spec, weights = _assemble(candidate, probe, eh, expert_weights, rh, scale, shared_spec,
                                          shared_extract, output_bias, aux, flat_x,
                                          input_rank == 3 and y_target.dim() == 2)
                if spec is None:
                    continue
                with torch.no_grad():
                    if scale is None and not rh.weight_on_input:
                        spec, weights = fit_scale(spec, weights, flat_x, y_target)
                    y, routing = reference_forward(spec, weights, flat_x)
                if spec.aux_loss is not None:
                    spec = fit_aux(spec, routing.logits, aux)
                    if spec is None:
                        continue
                err = max(rel_err(y.reshape(y_target.shape), y_target), aux_err(spec, weights, routing, aux))
                if leaves is not None and err <= MATCH_RTOL:
                    spec, leaves_err = read_leaves(spec, weights, routing, leaves)
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
    experts = expert_members(probe.get_submodule(rel_module(candidate, candidate.experts_list_path)))
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


def _assemble(candidate, block, eh, expert_weights, rh: RouterHypothesis, scale, shared_spec, shared_extract,
              output_bias, aux, flat_x, flat_out):
    """The spec and weights of one (experts, router, scale) reading, or (None, None) where they make no spec."""
    E = candidate.num_experts
    router_w = router_weights(candidate, block, rh)
    extra, aux_spec = "none", None
    if aux is not None:
        bias_sized = aux.dim() and aux.shape[-1] == flat_x.shape[-1] != E and aux.numel() == flat_x.numel()
        extra = "expert_bias" if bias_sized else leaf_kind(aux, flat_x.shape[0], E, rh.top_k)
        if extra in (None, "expert_counts") or (extra == "aux_loss" and rh.top_k is None):
            return None, None
        # a loss: its formula and coefficient are fitted once the routing is known (fit_aux)
        aux_spec = AuxLossSpec() if extra == "aux_loss" else None
    try:
        router = rh.router_spec(E, scale, has_bias=router_w["router_bias"] is not None)
        spec = MoESpec(router=router, experts=eh.spec, shared=shared_spec, extra_output=extra, flat_output=flat_out,
                       has_output_bias=output_bias, aux_loss=aux_spec)
    except ValueError:
        return None, None
    weights = MoEWeights(**router_w, **expert_weights, **_rest_weights(candidate, block, spec, shared_extract))
    return spec, weights


def _rest_weights(candidate, block, spec, shared_extract) -> dict:
    """The shared-expert tensors and the output bias, as the spec has them."""
    out = shared_extract(block) if shared_extract else {}
    if spec.has_output_bias:
        out["output_bias"] = get_tensor(block, rel_ref(candidate, candidate.output_bias))
    return out


def _weights_recipe(candidate, eh, rh, spec, shared_extract) -> Callable[[nn.Module], MoEWeights]:
    def extract(block: nn.Module) -> MoEWeights:
        w = MoEWeights(**router_weights(candidate, block, rh), **eh.extract(block),
                       **_rest_weights(candidate, block, spec, shared_extract))
        src = get_tensor(block, rel_ref(candidate, candidate.router[0]))
        w.router_weight = canonical(src, w.router_weight)
        w.check(spec)
        return w

    return extract
