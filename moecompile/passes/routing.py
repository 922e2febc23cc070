"""Routing rewrites on fused blocks: TopK -> ReLU (ReMoE) and ReLU -> TopK, with calibration and measured effect.

Place in the pipeline: after the fuse pass, on FusedMoE modules only (optimize(model, routing=...) runs it, and
`rewrite_routing(optimized_model, ...)` runs it on its own). These rewrites change what the model computes, so they
are opt-in and each block's record in the pass log says what changed and by how much (active experts per token,
output error against the block before the rewrite, on the calibration tokens).

TopK -> ReLU: the router becomes ReMoE's `gates = ReLU(x W_r^T + b)` (no softmax, no top-k, no renormalisation);
the expert weights stay. With calibration batches, b = b_old - tau with one threshold tau per layer: the (1 - k/E)
quantile of that layer's logits over the calibration tokens, so the mean number of positive gates per token is the
old k; then the output scale s minimising ||s * routed_relu - routed_topk|| is kept if it lowers the error. Without
calibration, tau = 0 (ReMoE's own initialisation): the result is a starting point for training only, and the log
says so.

ReLU -> TopK: top-k over the ReLU gates, no renormalisation (the gate magnitudes are the combine weights). k = E
computes exactly what the ReLU block computed. k="auto" picks, per layer, the smallest k covering `coverage` of the
active (token, expert) pairs on the calibration tokens.

Every block is rewritten into a new FusedMoE that shares the unchanged weights, block by block in forward order, so a
block calibrates on what the rewritten blocks before it hand it (one pass over the calibration batches per block).
A failure puts every block back, so the model is left as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MoECompileError
from ..fused import FusedMoE
from ..reference import reference_forward, route, routed_experts
from ..spec import MoESpec, MoEWeights, RouterSpec

MAX_CALIBRATION_TOKENS = 65536  # per layer; more adds little to a quantile and costs memory
DEFAULT_COVERAGE = 0.99


@dataclass
class RoutingChange:
    """What one block's routing rewrite did, measured on the calibration tokens (None where none were given)."""

    path: str
    direction: str  # "topk->relu" | "relu->topk"
    k_before: float | None  # the old k (top-k) or the mean active experts (ReLU)
    k_after: float | None  # the target / measured mean active (ReLU) or the new k (top-k)
    threshold: float | None = None  # TopK -> ReLU: tau folded into the router bias
    output_scale: float = 1.0
    calibration_tokens: int = 0
    mean_active: float | None = None
    active_p5: float | None = None
    active_p50: float | None = None
    active_p95: float | None = None
    same_choice_share: float | None = None  # tokens whose chosen expert set is unchanged
    pairs_kept_share: float | None = None  # ReLU -> TopK: active pairs the new k keeps
    output_rel_error: float | None = None  # normwise, against the block before the rewrite
    note: str = ""

    def summary(self) -> str:
        parts = [self.direction]
        if self.mean_active is not None:
            parts.append(f"active/token mean {self.mean_active:.2f} (p5 {self.active_p5:g}, p50 {self.active_p50:g}, "
                         f"p95 {self.active_p95:g})")
        if self.k_after is not None and self.direction == "relu->topk":
            parts.append(f"k={int(self.k_after)}")
        if self.same_choice_share is not None:
            parts.append(f"same experts {100 * self.same_choice_share:.1f}% of tokens")
        if self.pairs_kept_share is not None:
            parts.append(f"pairs kept {100 * self.pairs_kept_share:.1f}%")
        if self.output_rel_error is not None:
            parts.append(f"output rel err {self.output_rel_error:.3g}")
        if self.output_scale != 1.0:
            parts.append(f"scale {self.output_scale:.3g}")
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)


# ---------------------------------------------------------------- calibration inputs


def iterate_batches(model: nn.Module, batches: Iterable) -> None:
    """Run the model on each batch (a tensor passed positionally, or a dict passed as keyword arguments)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if isinstance(batch, torch.Tensor):
                model(batch.to(device))
            elif isinstance(batch, dict):
                model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
            else:
                raise MoECompileError(f"calibration batch {i} is a {type(batch).__name__}; each batch must be a "
                                      "tensor (passed positionally) or a dict (passed as keyword arguments)")


def collect_block_inputs(model: nn.Module, batches: Iterable, max_tokens: int = MAX_CALIBRATION_TOKENS,
                         paths: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The hidden states reaching each FusedMoE (those in `paths`, or all) over the batches, [N, H] fp32 on the
    CPU, per module path."""
    inputs: dict[str, list[torch.Tensor]] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook_for(path):
        def hook(module, args):
            x = args[0].detach().reshape(-1, module.spec.hidden_size)
            room = max_tokens - counts.get(path, 0)
            if room > 0:
                inputs.setdefault(path, []).append(x[:room].float().cpu())
                counts[path] = counts.get(path, 0) + min(room, x.shape[0])
        return hook

    for path, module in model.named_modules():
        if isinstance(module, FusedMoE) and (paths is None or path in paths):
            hooks.append(module.register_forward_pre_hook(hook_for(path)))
    try:
        iterate_batches(model, batches)
    finally:
        for h in hooks:
            h.remove()
    return {path: torch.cat(chunks) for path, chunks in inputs.items()}


# ---------------------------------------------------------------- one block


def float_weights(weights: MoEWeights) -> MoEWeights:
    return MoEWeights(**{name: None if t is None else t.detach().float().cpu() for name, t in weights.items()})


def active_stats(active: torch.Tensor) -> dict:
    a = active.double()
    q = torch.quantile(a, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    return dict(mean_active=a.mean().item(), active_p5=q[0].item(), active_p50=q[1].item(), active_p95=q[2].item())


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


def _chosen_mask(routing, num_tokens: int, num_experts: int) -> torch.Tensor:
    mask = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    mask[routing.token_index, routing.expert_index] = routing.weight != 0
    return mask


def to_relu(spec: MoESpec, weights: MoEWeights, x: torch.Tensor | None, path: str = ""
            ) -> tuple[MoESpec, MoEWeights, RoutingChange]:
    """A top-k block rewritten to ReLU routing, calibrated on x [N, H] (or not, if x is None)."""
    r = spec.router
    if r.is_variable_k:
        raise MoECompileError(f"{path or 'block'}: already ReLU-routed")
    if spec.extra_output == "topk_weights":
        raise MoECompileError(f"{path or 'block'}: the block returns its [T, k] top-k weights, which a variable "
                              "number of experts per token cannot give")
    E, k = r.num_experts, r.top_k
    relu_router = RouterSpec(num_experts=E, top_k=None, scoring="relu", selection="all_positive", has_bias=True,
                             weight_on_input=r.weight_on_input)
    old_bias = weights.router_bias
    change = RoutingChange(path=path, direction="topk->relu", k_before=float(k), k_after=float(k))
    bias_values = torch.zeros(E) if old_bias is None else old_bias.detach().float().cpu()
    if x is None or x.shape[0] == 0:
        tau = 0.0
        change.note = ("no calibration data: threshold 0 (ReMoE's initialisation); a starting point for training "
                       "only, not a substitute for the top-k model")
    else:
        fw = float_weights(weights)
        logits = torch.nn.functional.linear(x, fw.router_weight, bias_values)
        tau = torch.quantile(logits.flatten().double()[:2 ** 24], 1 - k / E).item() if k < E else (
            logits.min().item() - 1.0)
    new_bias = (bias_values - tau).to(weights.router_weight.dtype).to(weights.router_weight.device)
    new_spec = dataclasses.replace(spec, router=relu_router)
    new_weights = dataclasses.replace(weights, router_bias=nn.Parameter(new_bias, requires_grad=True),
                                      correction_bias=None)
    change.threshold = tau
    if x is not None and x.shape[0] > 0:
        fw_new = dataclasses.replace(fw, router_bias=new_bias.detach().float().cpu(), correction_bias=None)
        _measure_relu(spec, fw, new_spec, fw_new, x, change)
        if change.output_scale != 1.0:
            new_spec = dataclasses.replace(new_spec, router=dataclasses.replace(
                relu_router, scaling_factor=change.output_scale))
    return new_spec, new_weights, change


def _measure_relu(old_spec, fw_old, new_spec, fw_new, x, change: RoutingChange) -> None:
    """Active experts, unchanged choices, the output scale and the output error, on the calibration tokens (fp32
    CPU copies of the weights before and after)."""
    T, E = x.shape[0], old_spec.num_experts
    with torch.no_grad():
        y_old, routing_old = reference_forward(old_spec, fw_old, x)
        routing_new = route(new_spec.router, fw_new, x)
        relu_routed = routed_experts(new_spec, fw_new, x, routing_new)
        old_routed = routed_experts(old_spec, fw_old, x, routing_old)
        fixed = y_old.double() - old_routed.double()  # shared experts and output bias: not scaled
        denom = relu_routed.double().pow(2).sum().item()
        scale = (relu_routed.double() * old_routed.double()).sum().item() / denom if denom > 0 else 1.0
        err_1 = _rel_error(fixed + relu_routed.double(), y_old)
        err_s = _rel_error(fixed + scale * relu_routed.double(), y_old)
        if scale > 0 and err_s < err_1:
            change.output_scale, change.output_rel_error = scale, err_s
        else:
            change.output_rel_error = err_1
    change.calibration_tokens = T
    change.__dict__.update(active_stats(routing_new.active_per_token(T)))
    same = _chosen_mask(routing_old, T, E) == _chosen_mask(routing_new, T, E)
    change.same_choice_share = same.all(dim=1).double().mean().item()


def pick_k(gates: torch.Tensor, coverage: float = DEFAULT_COVERAGE) -> int:
    """The smallest k such that keeping each token's k largest positive gates keeps `coverage` of the positive
    (token, expert) pairs. gates [N, E] >= 0."""
    active = (gates > 0).sum(dim=1)
    total = active.sum().item()
    if total == 0:
        return 1
    E = gates.shape[1]
    for k in range(1, E + 1):
        if active.clamp(max=k).sum().item() >= coverage * total:
            return k
    return E


def to_topk(spec: MoESpec, weights: MoEWeights, k: int | str, x: torch.Tensor | None, path: str = "",
            coverage: float = DEFAULT_COVERAGE) -> tuple[MoESpec, MoEWeights, RoutingChange]:
    """A ReLU block rewritten to top-k over its ReLU gates (no renormalisation)."""
    r = spec.router
    if not r.is_variable_k:
        raise MoECompileError(f"{path or 'block'}: routing='topk' takes ReLU-routed blocks; this one routes "
                              f"{r.scoring}>top{r.top_k} already")
    E = r.num_experts
    fw = None if x is None else float_weights(weights)
    gates = None
    if x is not None and x.shape[0] > 0:
        gates = route(r, fw, x).logits.relu()
    if k == "auto":
        if gates is None:
            raise MoECompileError("routing='topk' with k='auto' needs calibration batches (calibration=...) to "
                                  "pick k per layer; pass them, or give k as an integer")
        k = pick_k(gates, coverage)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= E:
        raise MoECompileError(f"{path or 'block'}: k must be an integer in 1..{E} or 'auto', got {k!r}")
    new_router = RouterSpec(num_experts=E, top_k=k, scoring="relu", selection="topk", renormalize=False,
                            has_bias=r.has_bias, scaling_factor=r.scaling_factor, weight_on_input=r.weight_on_input)
    new_spec = dataclasses.replace(spec, router=new_router)
    change = RoutingChange(path=path, direction="relu->topk", k_before=None, k_after=float(k))
    if gates is not None:
        active = (gates > 0).sum(dim=1)
        change.k_before = active.double().mean().item()
        change.calibration_tokens = x.shape[0]
        change.__dict__.update(active_stats(active.clamp(max=k)))
        change.pairs_kept_share = (active.clamp(max=k).sum() / active.sum().clamp(min=1)).item()
        with torch.no_grad():
            y_relu, _ = reference_forward(spec, fw, x)
            y_topk, _ = reference_forward(new_spec, fw, x)
        change.output_rel_error = _rel_error(y_topk, y_relu)
    return new_spec, weights, change


# ---------------------------------------------------------------- the model


ROUTINGS = ("relu", "topk")


def check_options(routing: str, k: int | str | None, coverage: float) -> None:
    """The rewrite's options, checked before anything runs (optimize() calls this before it fuses)."""
    if routing not in ROUTINGS:
        raise MoECompileError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    if routing == "topk" and k is None:
        raise MoECompileError("routing='topk' needs k: an integer, or 'auto' with calibration batches")
    if routing == "relu" and k is not None:
        raise MoECompileError("routing='relu' takes no k: the calibration targets each block's own top-k")
    if not 0 < coverage <= 1:
        raise MoECompileError(f"coverage must be in (0, 1], got {coverage}")


def rewrite_routing(model: nn.Module, routing: str, *, k: int | str | None = None, calibration: Iterable | None = None,
                    coverage: float = DEFAULT_COVERAGE, progress: Callable[[], None] | None = None
                    ) -> tuple[nn.Module, list[RoutingChange]]:
    """Rewrite the routing of every FusedMoE in `model` (in place): routing="relu" (TopK -> ReLU) or "topk"
    (ReLU -> TopK, with k an int or "auto"). Returns the model (a new FusedMoE when the model is one block) and one
    RoutingChange per block. `progress()` is called after each block. On any error every block is put back, so the
    model is unchanged."""
    check_options(routing, k, coverage)
    blocks = [(path, m) for path, m in model.named_modules() if isinstance(m, FusedMoE)]
    if not blocks:
        raise MoECompileError(f"{type(model).__name__} has no fused MoE block to rewrite; run moecompile.optimize "
                              "first (a model with no MoE block cannot change its routing)")
    batches = list(calibration) if calibration is not None else None
    changes, swapped = [], []
    try:
        # block by block in forward order: each block calibrates on the inputs it gets with the blocks before it
        # already rewritten, so the target holds for the rewritten model, not only for the original
        for path, module in blocks:
            x = None
            if batches is not None:
                x = collect_block_inputs(model, batches, paths={path}).get(path)
                if x is None:
                    raise MoECompileError(f"the calibration batches did not reach the MoE block {path!r} (were "
                                          "they empty?)")
            if routing == "relu":
                spec, weights, change = to_relu(module.spec, module.weights(), x, path)
            else:
                spec, weights, change = to_topk(module.spec, module.weights(), k, x, path, coverage)
            fused = FusedMoE(spec, weights, source_path=module.source_path, backend=module.backend)
            fused.train(module.training)
            fused.router_tap = module.router_tap
            changes.append(change)
            if progress is not None:
                progress()
            if path == "":
                return fused, changes
            swapped.append((path, module))
            model.set_submodule(path, fused)
    except BaseException:
        for path, original in reversed(swapped):
            model.set_submodule(path, original)
        raise
    return model, changes
