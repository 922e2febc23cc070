"""Confirm: the replacement computes what the block computes, shown on inputs aimed at what would tell them apart.

Place in the pipeline: detect -> describe -> **confirm** -> fuse. Two questions, each checked on its own:

1. Does the description compute what the block computes? The block's float32 working copy (copies.py: on the CPU,
   hooks stripped) against the description run by the PyTorch reference, at the block level on thousands of tokens:
   1, 7 and 3x7 tokens, then the aimed families of probes.py (about 3,500 tokens). With the real weights, and, for
   the first block of each structure (later blocks of the same class, shapes and description share the result),
   with re-randomised weights in three variants: as drawn, with every [E] vector (a router or correction bias,
   whatever its name) redrawn around -0.3, and with spread 3. Every token must agree within FP32_RTOL of the
   output's scale, and a position finite in one output and not the other fails (compare.py). A mismatch names the
   weights, the input family, the tokens, and the neighbouring description the block computes there, if one does.
   The result lists, per neighbour (probes.neighbours), on how many tokens the reference routes it differently:
   the evidence that the block is this description and not that one.
2. Do the kernels compute the description on this block? FusedMoE as the model will run it (the Triton kernels on a
   GPU, in the block's dtype and on its device, sharing its weights) against the float32 copy's output, at 3x7
   tokens for a float32 block and 4x64 for a 16-bit one (a mean over 21 tokens swings with one or two near-tie
   routing flips: a Qwen3-30B-A3B-sized bf16 block failed the bar in about 1 draw of 40 there, none at 256): in
   float32 within FP32_RTOL like (1); in bf16/fp16 its mean relative error must stay within NATIVE_MEAN_RTOL, or
   within twice the original block's own error in that dtype, whichever is larger (the original routes near-ties in
   its dtype, FusedMoE in fp32, so the mean is judged, not the maximum). A block that opens its own autocast region
   (autocast_regions.py) is judged so too, FusedMoE opening the same region.

A block whose working copy cannot run on the CPU (code that needs its device) is checked on a float32 copy on its
own device instead, and the result says so. (1) runs no kernel, so confirming compiles no Triton kernel besides the
set (2) needs. The kernels themselves are checked against the reference over a grid of shapes by the test suite.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..capture import call_block, outputs_to
from ..fused import FusedMoE
from .compare import output_error, output_pairs, token_errors
from .copies import redraw_vectors, registered_hooks, working_copy
from .describe import Description
from .probes import Neighbour, Probe, aimed_inputs, neighbours, route_probe, routed_differently
from .routing import float_weights

FP32_RTOL = 1e-4
NATIVE_MEAN_RTOL = 2e-2
SMALL_SHAPES = ((1, 1), (1, 7), (3, 7))
KERNEL_SHAPES = {"float32": (3, 7), "16-bit": (4, 64)}  # check (2)'s input, by the block's dtype
AIMED_TOKENS = 512  # per aimed family (the random family takes twice that)
VECTOR_VARIANTS = (("[E] vectors around -0.3", -0.3, 0.1), ("[E] vectors of spread 3", 0.0, 3.0))


@dataclass
class Confirmation:
    ok: bool
    max_abs_error: float
    rel_error: float
    native_max_abs_error: float | None
    native_mean_rel_error: float | None
    detail: str
    tokens: list[int]
    told_apart: dict[str, int] = field(default_factory=dict)  # neighbour -> tokens routed differently
    checked_on: str = "cpu"  # where the float32 checks ran
    computed_instead: Neighbour | None = None  # on a mismatch: the neighbour the block computes there, if one does


class _Mismatch(Exception):
    """A check failed; the message is the pass log's reason, `neighbour` what the block computes there (or None)."""

    def __init__(self, message: str, neighbour: Neighbour | None = None):
        super().__init__(message)
        self.neighbour = neighbour


class _BlockFailed(Exception):
    """The working copy raised when called (its code may need its own device)."""


def _outputs(module: nn.Module, x: torch.Tensor, rank: int):
    """(hidden states, aux output or None) of `module` on x, given as [B, S, H] or flattened for rank-2 blocks."""
    inp = x if rank == 3 else x.reshape(-1, x.shape[-1])
    if isinstance(module, FusedMoE):  # moecompile's own module: an error is raised as it is
        return call_block(module, inp)[0]
    try:
        return call_block(module, inp)[0]
    except Exception as exc:  # noqa: BLE001 - the user's block; reported, not raised
        raise _BlockFailed(f"{type(exc).__name__}: {exc}") from None


@torch.no_grad()
def confirm(block: nn.Module, description: Description, *, seed: int = 0, rerandomized: bool = True,
            shapes: tuple[tuple[int, int], ...] | None = None, kernels: bool = True) -> Confirmation:
    """Compare `block` with FusedMoE(description) as described in the module docstring. `rerandomized=False` skips
    the re-randomised weights (a block whose structure and description were confirmed with them already);
    `shapes` replaces the inputs by random ones of these (batch, seq) shapes and `kernels=False` skips (2): the
    torch.compile backend's spot check of weights confirmed before at another token count."""
    param = next(block.parameters())
    result = Confirmation(True, 0.0, 0.0, None, None, "", [])
    batch, seq = KERNEL_SHAPES["16-bit" if param.dtype in (torch.bfloat16, torch.float16) else "float32"]
    kernel_x = torch.randn(batch, seq, description.spec.hidden_size,
                           generator=torch.Generator().manual_seed(seed + 11))
    # (1) is a float32 question: the working copies compute without the block's own autocast region, and so does the
    # description (autocast_regions.py); (2) runs the region
    as_float32 = replace(description, spec=replace(description.spec, autocast=None))
    try:
        try:
            exact = _check_description(block, as_float32, seed, rerandomized, shapes, result, "cpu", kernel_x)
        except _BlockFailed:
            if param.device.type == "cpu":
                raise
            result.checked_on, result.told_apart, result.tokens = str(param.device), {}, []
            exact = _check_description(block, as_float32, seed, rerandomized, shapes, result, param.device,
                                       kernel_x)
        if kernels:
            _check_kernels(block, description, kernel_x, exact, result)
    except _Mismatch as exc:
        result.ok, result.detail, result.computed_instead = False, str(exc), exc.neighbour
    except _BlockFailed as exc:
        result.ok, result.detail = False, f"the block raised on confirm's inputs: {exc}"
    return result


def _variants(block: nn.Module, num_experts: int, seed: int, rerandomized: bool, device
              ) -> Iterator[tuple[str, nn.Module]]:
    """(label, working copy) for each weight variant; the re-randomised copy is reused (vectors redrawn in place)."""
    copy = working_copy(block, device=device)
    yield "real weights", copy
    if not rerandomized:
        return
    del copy
    copy = working_copy(block, seed=seed + 3, device=device)
    yield "re-randomised weights", copy
    for i, (label, mean, std) in enumerate(VECTOR_VARIANTS):
        redraw_vectors(copy, num_experts, mean, std, seed + 5 + i)
        yield f"re-randomised weights, {label}", copy


def _check_description(block, description: Description, seed: int, rerandomized: bool, shapes, result: Confirmation,
                       device, kernel_x: torch.Tensor):
    """Check (1) of the module docstring; returns the float32 block's outputs on kernel_x, for check (2)."""
    spec, rank, H = description.spec, description.input_rank, description.spec.hidden_size
    gen = torch.Generator().manual_seed(seed + 7)
    exact = None
    for label, copy in _variants(block, spec.num_experts, seed, rerandomized, device):
        if exact is None:  # the real weights' copy
            exact = outputs_to(_outputs(copy, kernel_x.to(device), rank), "cpu")
        weights = description.extract(copy)
        if shapes is not None:
            probes = [Probe(f"{b}x{s}", torch.randn(b, s, H, generator=gen)) for b, s in shapes]
        else:
            probes = [Probe(f"{b}x{s}", torch.randn(b, s, H, generator=gen)) for b, s in SMALL_SHAPES]
            probes += aimed_inputs(spec, float_weights(weights), gen, AIMED_TOKENS)
        for probe in probes:
            probe = Probe(probe.name, probe.x.to(device))
            err, rel = _check_probe(copy, description, weights, probe, label, result)
            if label == "real weights":
                result.max_abs_error = max(result.max_abs_error, err)
                result.rel_error = max(result.rel_error, rel)
                result.tokens.append(probe.x.shape[0] * probe.x.shape[1])
    return exact


def _check_probe(copy: nn.Module, description: Description, weights, probe: Probe, label: str,
                 result: Confirmation) -> tuple[float, float]:
    """Block vs description on one probe; raises _Mismatch, else adds the neighbours it told apart to `result`."""
    spec, rank = description.spec, description.input_rank
    want = _outputs(copy, probe.x, rank)
    got = _outputs(FusedMoE(spec, weights, backend="reference"), probe.x, rank)
    worst = (0.0, 0.0)
    for got_t, want_t in output_pairs(got, want, spec.num_experts):
        error = output_error(got_t, want_t)
        if error.nonfinite_mismatch < 0:
            raise _Mismatch(f"with {label} on {probe.name} inputs the block returns {tuple(want_t.shape)}, the "
                            f"description {None if got_t is None else tuple(got_t.shape)}")
        if not error.within(FP32_RTOL):
            bad = token_errors(got_t, want_t, error.scale) > FP32_RTOL
            instead = _computed_instead(want, description, weights, probe)
            explained = (f"; there the block computes the description with {instead.label} ({instead.spec.summary()})"
                         if instead else "; no neighbouring description (one field changed) computes it either")
            raise _Mismatch(f"float32 mismatch with {label} on {probe.name} inputs "
                            f"({probe.x.shape[0]}x{probe.x.shape[1]} tokens): {error.describe()} > {FP32_RTOL:.0e} "
                            f"on {int(bad.sum())} of {bad.numel()} tokens" + explained, instead)
        worst = max(worst, (error.max_abs, error.rel), key=lambda w: w[1])
    _count_told_apart(spec, weights, probe, result.told_apart)
    return worst


def _count_told_apart(spec, weights, probe: Probe, told_apart: dict[str, int]) -> None:
    cpu_probe = Probe(probe.name, probe.x.float().cpu())
    weights = float_weights(weights)
    chosen = route_probe(spec, weights, cpu_probe)
    for n in neighbours(spec):
        differ = routed_differently(chosen, route_probe(n.spec, n.weights(weights), cpu_probe))
        told_apart[n.label] = told_apart.get(n.label, 0) + int(differ.sum())


def _computed_instead(block_outputs, description: Description, weights, probe: Probe) -> Neighbour | None:
    """The neighbouring description the block computes on this probe, if one does."""
    spec, rank = description.spec, description.input_rank
    want = block_outputs[0]
    for n in neighbours(spec):
        try:
            got = _outputs(FusedMoE(n.spec, n.weights(weights), backend="reference"), probe.x, rank)[0]
        except (ValueError, RuntimeError):
            continue
        if output_error(got, want).within(FP32_RTOL):
            return n
    return None


def neighbour_description(description: Description, neighbour: Neighbour, why: str) -> Description:
    """`description` with one field changed to `neighbour`'s (its weights mapped by the neighbour's bias roles)."""
    def extract(block):
        return neighbour.weights(description.extract(block))
    return Description(neighbour.spec, extract, description.input_rank,
                       f"{description.method}; {why} chose {neighbour.label} over {description.spec.summary()}",
                       description.train_note)


def _check_kernels(block: nn.Module, description: Description, kernel_x: torch.Tensor, exact,
                   result: Confirmation) -> None:
    """Check (2): FusedMoE on the block's own weights, device and dtype against the float32 copy's `exact` outputs."""
    param = next(block.parameters())
    dtype, rank, spec = param.dtype, description.input_rank, description.spec
    exact = outputs_to(exact, param.device)
    x = kernel_x.to(device=param.device, dtype=dtype)
    fused = FusedMoE(spec, description.extract(block))
    got = _outputs(fused, x, rank)
    errors = [output_error(g, w) for g, w in output_pairs(got, exact, spec.num_experts)]
    native = max(errors, key=lambda e: e.rel)
    if dtype == torch.float32 and spec.autocast is None:
        if not native.within(FP32_RTOL):
            raise _Mismatch(f"the kernels disagree with the float32 block at {x.shape[0]}x{x.shape[1]} tokens: "
                            f"{native.describe()} > {FP32_RTOL:.0e}")
        return
    result.native_max_abs_error = native.max_abs
    native_mean = max(_mean_rel(e) for e in errors)
    result.native_mean_rel_error = native_mean
    with _hooks_off(block):
        own = _outputs(block, x, rank)
    if own[0].dtype != got[0].dtype:
        raise _Mismatch(f"the block returns {own[0].dtype} for {dtype} input, FusedMoE {got[0].dtype}")
    if spec.autocast is not None:
        dtype = f"{dtype} (in its autocast {spec.autocast[1]})"
    original_mean = max(_mean_rel(output_error(g, w)) for g, w in output_pairs(own, exact, spec.num_experts))
    bar = max(NATIVE_MEAN_RTOL, 2 * original_mean) if math.isfinite(original_mean) else NATIVE_MEAN_RTOL
    if not native_mean <= bar:
        raise _Mismatch(f"{dtype} mismatch: mean relative error against the float32 block {native_mean:.2e} > "
                        f"{bar:.2e} (the original in {dtype}: {original_mean:.2e})")


def _mean_rel(error) -> float:
    """The mean relative error, or inf where the outputs' shapes or non-finite positions differ."""
    return math.inf if error.nonfinite_mismatch else error.mean_rel


@contextmanager
def _eval(block: nn.Module):
    modes = [(m, m.training) for m in block.modules()]
    block.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


@contextmanager
def _hooks_off(block: nn.Module):
    """The block's own forward, without the hooks its user registered (they must not see confirm's inputs)."""
    saved = [(m, name, getattr(m, name)) for m, name in registered_hooks(block)]
    for module, name, _ in saved:
        setattr(module, name, type(getattr(module, name))())
    try:
        with _eval(block):
            yield
    finally:
        for module, name, hooks in saved:
            setattr(module, name, hooks)
