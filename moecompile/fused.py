"""FusedMoE: the module a confirmed block is replaced by; it holds the spec and the canonical weights.

Place in the pipeline: the eager lowering target of the fuse pass. On CUDA tensors it computes with the Triton
kernels (kernels/moe.py, one PyTorch op); elsewhere, and for calls the kernels do not take, with the reference
(reference.py). `backend` forces one: "triton" raises rather than fall back, "reference" never uses the kernels.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import fp8
from .errors import MoECompileError
from .kernels import moe as kernel_moe
from .outputs import block_outputs
from .reference import input_norm, reference_forward
from .spec import MoESpec, MoEWeights

BACKENDS = ("auto", "triton", "reference")


class FusedMoE(nn.Module):
    """One MoE block described by `spec`; accepts [..., H] inputs and returns what the original block returned.

    Weight tensors given as `nn.Parameter` are registered as parameters (and shared with the source module when the
    layout needed no copy); plain tensors become buffers (e.g. a correction bias that is not trained by gradient).
    """

    def __init__(self, spec: MoESpec, weights: MoEWeights, *, source_path: str = "", backend: str = "auto"):
        super().__init__()
        weights.check(spec)
        if backend not in BACKENDS:
            raise MoECompileError(f"FusedMoE backend {backend!r} is not one of {BACKENDS}")
        self.spec = spec
        self.spec_json = spec.to_json()
        self.backend = backend
        self.source_path = source_path
        self.router_tap: nn.Module | None = None  # set by the fuse pass for HF models recording router logits
        self.lowering: nn.Module | None = None  # export_onnx's copy: the ONNX form (backends/onnx_lowering.py)
        # an OrderedDict as nn.Module's hook dicts: RemovableHandle keeps a weak reference to it (a dict has none)
        self._logits_hooks: OrderedDict[int, Callable[[torch.Tensor], None]] = OrderedDict()
        # set by the fuse pass when the original block computed otherwise in train mode (passes/train_mode.py)
        self.eval_only_reason: str | None = None
        self._weight_names: list[str] = []
        for name, tensor in weights.items():
            self._set_weight(name, tensor)

    def register_logits_hook(self, hook: Callable[[torch.Tensor], None]) -> RemovableHandle:
        """Call `hook(logits)` with the router logits [T, E] (fp32) of every forward. The logits are the op's own
        output, differentiable: a loss on them (ReMoE's L1 on ReLU(logits)) is differentiated by the block's
        backward, with no second router GEMM."""
        handle = RemovableHandle(self._logits_hooks)
        self._logits_hooks[handle.id] = hook
        return handle

    def weights(self) -> MoEWeights:
        return MoEWeights(**{name: getattr(self, name) for name in self._weight_names})

    def replace_weights(self, **tensors: torch.Tensor | None) -> None:
        """Replace, add or (None) drop weight tensors by MoEWeights name, checked against the spec first (nothing
        changes if the check fails). Parameters stay parameters; plain tensors become buffers."""
        dataclasses.replace(self.weights(), **tensors).check(self.spec)
        for name, tensor in tensors.items():
            self._set_weight(name, tensor)

    def _set_weight(self, name: str, tensor: torch.Tensor | None) -> None:
        """Register one weight under its MoEWeights name (replacing one of that name; None: none)."""
        self._parameters.pop(name, None)
        self._buffers.pop(name, None)
        if name in self._weight_names:
            self._weight_names.remove(name)
        if tensor is None:
            return
        if isinstance(tensor, nn.Parameter):
            self.register_parameter(name, tensor)
        else:
            self.register_buffer(name, tensor)
        self._weight_names.append(name)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | tuple:
        if self.training and self.eval_only_reason is not None:
            raise MoECompileError(
                f"FusedMoE {self.source_path or '<block>'} is fused for eval mode only: the original block "
                f"{self.eval_only_reason}. Call model.eval() for inference; to train, train the original model (or "
                "turn that training-only behaviour off, e.g. router_jitter_noise=0) and optimize afterwards")
        return run_block(self.spec, self.weights(), hidden_states, spec_json=self.spec_json, backend=self.backend,
                         router_tap=self.router_tap, source_path=self.source_path,
                         lowering=self.lowering, logits_hooks=tuple(self._logits_hooks.values()))

    def extra_repr(self) -> str:
        return self.spec.summary()


def run_block(spec: MoESpec, weights: MoEWeights, hidden_states: torch.Tensor, *, spec_json: str | None = None,
              backend: str = "auto", router_tap: nn.Module | None = None, source_path: str = "",
              through_op: bool = False, lowering: nn.Module | None = None, logits_hooks: tuple = (),
              compute: Callable | None = None) -> torch.Tensor | tuple:
    """What a FusedMoE computes, for weights passed in: FusedMoE.forward, and the torch.compile backend's graph
    calls (which rebuild the weights from the graph's parameter inputs each call). through_op: always the
    registered op (kernels where they run, the reference elsewhere), which Inductor can trace on any device.
    lowering: the ONNX form (backends/onnx_lowering.py) to compute with while torch.onnx exports, or None.
    logits_hooks: callables given the router logits (FusedMoE.register_logits_hook).
    compute: computes the block's core (no input norm, no residual) in place of the kernels or the reference:
    compute(spec, weights, x, seq_len) -> (y in x's dtype, logits, slot weights, routing or None); expert
    parallelism's exchange (expert_parallel.py)."""
    if spec.autocast is not None and lowering is None:
        return _in_own_autocast(spec, weights, hidden_states, backend=backend, router_tap=router_tap,
                                source_path=source_path, through_op=through_op, logits_hooks=logits_hooks)
    H = spec.hidden_size
    if hidden_states.shape[-1] != H:
        raise MoECompileError(
            f"FusedMoE {source_path or '<block>'}: input's last dimension is {hidden_states.shape[-1]}, "
            f"the block's hidden size is {H}; pass hidden states of shape [..., {H}]")
    lead_shape = hidden_states.shape[:-1]
    x = hidden_states.reshape(-1, H)
    block_input, residual = x, spec.residual
    if spec.input_norm is not None or residual:  # ops around the fused core (gpt-oss's MLPBlock)
        if spec.input_norm is not None:
            x = input_norm(spec, weights, x)
        spec, spec_json = _core(spec)
    seq_len = hidden_states.shape[-2] if hidden_states.dim() >= 2 and x.shape[0] else None
    autocast_dtype = _autocast_dtype(x)
    if autocast_dtype is not None and lowering is None:
        x, weights = _cast_for_autocast(x, weights, autocast_dtype)
    routing = None  # the reference's, when it computed the block
    if lowering is not None:
        y, logits, slot_weights = lowering(spec, weights, x, seq_len)
    elif compute is not None:
        y, logits, slot_weights, routing = compute(spec, weights, x, seq_len)
    elif through_op or _use_kernels(spec, weights, x, backend, source_path):
        need_routing = router_tap is not None or spec.extra_output != "none" or spec.outputs is not None \
            or bool(logits_hooks)
        # autocast off inside (the inputs are cast above); entered only under autocast, so that traced graphs
        # (torch.export, dynamo) of the usual case hold the op itself, not an autocast region around it
        with torch.autocast(x.device.type, enabled=False) if autocast_dtype is not None else nullcontext():
            y, logits, slot_weights = kernel_moe.run(spec, weights, x, seq_len, spec_json or spec.to_json(),
                                                     need_routing, through_op=through_op)
    else:
        y, routing = reference_forward(spec, weights, x, seq_len)
        logits = routing.logits
        slot_weights = None if spec.router.is_variable_k else routing.topk_weights()
    if residual:
        y = y + block_input.to(y.dtype)
    if router_tap is not None:
        router_tap(logits)
    for hook in logits_hooks:
        hook(logits)
    if not spec.flat_output:
        y = y.reshape(*lead_shape, H)
    return block_outputs(spec, weights, x, seq_len, y, logits, slot_weights, routing, hidden_states.dtype)


def _in_own_autocast(spec: MoESpec, weights: MoEWeights, hidden_states: torch.Tensor, **options):
    """run_block for a block that opens its own autocast region: the same region around the block (on its device
    type only, as autocast would), the output cast back to the input's dtype."""
    device_type, dtype = spec.autocast
    inner, inner_json = _without_autocast(spec)
    with torch.autocast(device_type, dtype=getattr(torch, dtype)):
        out = run_block(inner, weights, hidden_states, spec_json=inner_json, **options)
    if isinstance(out, tuple):  # the hidden states (and the output biases returned apart) in the input's dtype
        return (out[0].to(hidden_states.dtype),) + tuple(
            t.to(hidden_states.dtype) if spec.extra_output == "expert_bias" else t for t in out[1:])
    return out.to(hidden_states.dtype)


@functools.lru_cache(maxsize=256)
def _without_autocast(spec: MoESpec) -> tuple[MoESpec, str]:
    inner = dataclasses.replace(spec, autocast=None)
    return inner, inner.to_json()


@functools.lru_cache(maxsize=256)
def _core(spec: MoESpec) -> tuple[MoESpec, str]:
    """The block without its input norm and residual (run_block applies those around it), and its JSON."""
    core = dataclasses.replace(spec, input_norm=None, residual=False)
    return core, core.to_json()


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives matmuls on x's device, or None when autocast is off there."""
    device_type = x.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


EXPERT_MATMUL_WEIGHTS = ("w1", "w2", "b1", "b2", "shared_w1", "shared_w2", "shared_b1", "shared_b2")


def _cast_for_autocast(x: torch.Tensor, weights: MoEWeights, dtype: torch.dtype):
    """Under autocast the block's matmuls run in the autocast dtype, as the original block's nn.Linear and matmul
    calls would: the input and the expert weights are cast (differentiably: gradients reach the fp32 parameters);
    the router keeps its own dtype, and the kernels route in fp32 as they always do."""
    cast = {name: t.to(dtype) if name in EXPERT_MATMUL_WEIGHTS and t is not None and t.is_floating_point()
            and not fp8.is_fp8(t) else t for name, t in weights.items()}  # FP8 weights stay (with their scales)
    return x.to(dtype), MoEWeights(**cast)


def _use_kernels(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, backend: str, source_path: str) -> bool:
    if backend == "reference" or (backend == "auto" and not x.is_cuda):
        return False
    reason = kernel_moe.unsupported_reason(spec, weights, x)
    if backend == "triton" and reason is not None:
        raise MoECompileError(f"FusedMoE {source_path or '<block>'}: backend='triton' but the Triton kernels "
                              f"cannot run this call: {reason}; use backend='auto' or 'reference'")
    return reason is None
