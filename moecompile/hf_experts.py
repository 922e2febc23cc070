"""moecompile's kernels behind transformers' own switch: `experts_implementation="moecompile"`.

Place in the pipeline: beside `optimize`, not inside it. transformers 5.x dispatches every experts module decorated
with `@use_experts_implementation` through its `ExpertsInterface`; `register_transformers()` adds "moecompile" there,
so `from_pretrained(..., experts_implementation="moecompile")` or `model.set_experts_implementation("moecompile")`
run the routed experts through moecompile's dispatch and expert kernels (kernels/launch.forward_routed), with
transformers' own router in front. Unlike `optimize`, the router is not fused and no block is checked against the
original: the module is read from its decorator's flags and its activation's class (`plan_of`); what that reading
cannot express is refused with the reason, never guessed.

Registration is an explicit call rather than a side effect of `import moecompile`: importing transformers' MoE
integration costs about 1.7 s, which `import moecompile` should not impose on users who never touch transformers,
and transformers' own convention for third-party kernels (`AttentionInterface.register`, `ExpertsInterface.register`)
is an explicit register call by the user or library.

Which path each call takes: the kernels on CUDA (or on the CPU under TRITON_INTERPRET=1) in fp32/fp16/bf16;
transformers' grouped_mm code when gradients are needed (moecompile's fused backward serves FusedMoE, not this
path) or when the kernels cannot run on the input's device. `moecompile.report(model)` lists each module's path.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from functools import lru_cache
from types import MappingProxyType

import torch
from torch import nn

from .errors import MoECompileError
from .kernels import graphs, launch
from .spec import MLPSpec, MoESpec, MoEWeights, RouterSpec
from .state import kept

NAME = "moecompile"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# transformers.activations classes (and torch's) by what they compute, as MLPSpec activations
_ACTIVATIONS = MappingProxyType({
    "SiLU": "silu", "SiLUActivation": "silu",
    "GELU": "gelu", "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
    "ReLU": "relu", "ReLUSquaredActivation": "relu2",
})

# experts classes whose own _apply_gate is gpt-oss's clamped SwiGLU: the attributes holding alpha and the limit
_CLAMPED_SWIGLU = MappingProxyType({"GptOssExperts": ("alpha", "limit"),
                                   "OpenAIPrivacyFilterExperts": ("alpha", "limit"),
                                   "MiniMaxM3VLExperts": ("swiglu_alpha", "swiglu_limit")})
# ... those whose _apply_gate is DeepSeek-V4's clamped SiLU (silu of the gate clamped above, times the up clamped to
# +-limit): the attribute holding the limit (DeepSeek-V4 applies its act_fn, which must then be SiLU)
_CLAMPED_SILU = MappingProxyType({"DeepseekV4Experts": "limit", "Glm5NextTextExperts": "swiglu_limit",
                                  "HYV4Experts": "swiglu_limit", "HYV4VLExperts": "swiglu_limit"})
# ... and those whose _apply_gate is the default one computed in fp32 (which the kernels do anyway)
_DEFAULT_GATE_IN_FP32 = frozenset({"BeamExperts"})


@dataclass(frozen=True)
class ExpertsPlan:
    """How the kernels read one experts module: its MLP and its weights' layout (the decorator's flags)."""

    gated: bool
    activation: str
    alpha: float = 1.702
    limit: float = 7.0
    has_bias: bool = False
    transposed: bool = False
    interleaved: bool = False  # gate and up columns alternate (is_concatenated=False)

    def to_key(self) -> str:
        """The plan as the op's string argument (plain formatting: torch.compile traces it as a constant)."""
        return (f"{int(self.gated)};{self.activation};{self.alpha!r};{self.limit!r};{int(self.has_bias)};"
                f"{int(self.transposed)};{int(self.interleaved)}")

    @lru_cache(maxsize=64)  # noqa: B019 (plans are few and frozen; the op asks on every call)
    def mlp(self, hidden: int, inter: int) -> MLPSpec:
        return MLPSpec(hidden_size=hidden, intermediate_size=inter, gated=self.gated, activation=self.activation,
                       activation_alpha=self.alpha, activation_limit=self.limit, has_bias=self.has_bias)

    @classmethod
    @lru_cache(maxsize=64)
    def from_key(cls, key: str) -> ExpertsPlan:
        gated, activation, alpha, limit, has_bias, transposed, interleaved = key.split(";")
        return cls(gated == "1", activation, float(alpha), float(limit), has_bias == "1", transposed == "1",
                   interleaved == "1")


def plan_of(module: nn.Module) -> ExpertsPlan | str:
    """The module's plan, or why the kernels cannot run it (a reason naming the way out). Plain Python on the
    module's attributes and types, so torch.compile reads it as constants."""
    cls = type(module).__name__
    if getattr(module, "_is_expert_parallel", False):
        return f"{cls} is sharded for expert parallelism (ids of other ranks' experts); moecompile's experts " \
               f"implementation runs every expert locally: load without the expert-parallel plan, or use grouped_mm"
    if getattr(module, "has_post_expert_norm", False):
        return f"{cls} normalises each expert's output before the routing weight (has_post_expert_norm), which the " \
               f"kernels do not; use experts_implementation='grouped_mm' for this model"
    gated = bool(getattr(module, "has_gate", True))
    interleaved = gated and not getattr(module, "is_concatenated", True)
    has_bias, transposed = bool(getattr(module, "has_bias", False)), bool(getattr(module, "is_transposed", False))
    gate = getattr(type(module), "_apply_gate", None)
    act = type(getattr(module, "act_fn", None)).__name__
    if gated and getattr(gate, "__name__", "") != "_default_apply_gate" and cls not in _DEFAULT_GATE_IN_FP32:
        if cls in _CLAMPED_SWIGLU:  # (up + 1) * gate * sigmoid(alpha * gate), gate and up clamped
            alpha, limit = (float(getattr(module, name)) for name in _CLAMPED_SWIGLU[cls])
            return ExpertsPlan(True, "clamped_swiglu", alpha, limit, has_bias, transposed, interleaved)
        if cls in _CLAMPED_SILU and (_ACTIVATIONS.get(act) == "silu" or cls != "DeepseekV4Experts"):
            limit = float(getattr(module, _CLAMPED_SILU[cls]))
            return ExpertsPlan(True, "clamped_silu", limit=limit, has_bias=has_bias, transposed=transposed,
                               interleaved=interleaved)
        return f"{cls} combines gate and up with its own _apply_gate, which moecompile does not know; use " \
               f"experts_implementation='grouped_mm' for this model"
    if act not in _ACTIVATIONS:
        return f"{cls}'s activation {act} is none of those the kernels compute ({', '.join(sorted(_ACTIVATIONS))}); " \
               f"use experts_implementation='grouped_mm' for this model"
    if interleaved:
        return f"{cls} keeps gate and up columns interleaved with the default gate; use grouped_mm for this model"
    return ExpertsPlan(gated, _ACTIVATIONS[act], has_bias=has_bias, transposed=transposed)


# the path each experts module's last eager call took (for moecompile.report); compiled calls do not record
_PATHS: weakref.WeakKeyDictionary = kept("hf_experts.py: the last path of each experts module",
                                         weakref.WeakKeyDictionary())


def experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts interface: hidden_states [T, H], the router's top_k_index and top_k_weights [T, k]
    -> [T, H]. The kernels where they can run; transformers' grouped_mm code where they cannot (say why)."""
    plan = plan_of(module)
    if not torch.compiler.is_compiling():
        plan = _checked(module, plan)
    if isinstance(plan, str):
        raise MoECompileError(f"experts_implementation='moecompile': {plan}")
    gate_up = module.gate_up_proj if plan.gated else module.up_proj
    fallback = _fallback_reason(module, hidden_states, gate_up)
    if fallback is not None:
        from transformers.integrations.moe import grouped_mm_experts_forward

        _record(module, f"transformers grouped_mm ({fallback})")
        return grouped_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights)
    _record(module, "moecompile kernels")
    bias1 = (module.gate_up_proj_bias if plan.gated else module.up_proj_bias) if plan.has_bias else None
    bias2 = module.down_proj_bias if plan.has_bias else None
    return torch.ops.moecompile.hf_experts(hidden_states, top_k_index, top_k_weights, gate_up, module.down_proj,
                                           bias1, bias2, plan.to_key())


# (experts class, plan) -> the plan, or why the module's own activation disagrees with it on probe values
_CHECKED: dict[tuple[type, ExpertsPlan], ExpertsPlan | str] = kept("hf_experts.py: activations checked by probing", {})


def _checked(module: nn.Module, plan: ExpertsPlan | str) -> ExpertsPlan | str:
    """The plan, once the module's own gate (or activation) computes what it says on probe values across the
    clamps' range: a class read by name whose code changed in a later transformers is refused, not guessed. Eager
    calls only (the first per class); torch.compile traces plan_of alone."""
    if isinstance(plan, str):
        return plan
    key = (type(module), plan)
    if key not in _CHECKED:
        _CHECKED[key] = plan
        from .reference import activation, glu

        mlp = plan.mlp(hidden=1, inter=64)
        with torch.no_grad():
            h = torch.randn(32, 128 if plan.gated else 64, generator=torch.Generator().manual_seed(0)) * 6
            h = h.to(device=module.down_proj.device)
            if plan.gated:
                gate, up = (h[:, 0::2], h[:, 1::2]) if plan.interleaved else h.chunk(2, dim=-1)
                want, got = glu(mlp, gate, up), module._apply_gate(h)
            else:
                want, got = activation(mlp, h), module.act_fn(h)
            if not torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-4):
                _CHECKED[key] = (f"{type(module).__name__}'s activation does not compute {plan.activation} as read "
                                 f"from its flags and class (max difference "
                                 f"{(got.float() - want.float()).abs().max().item():.2e} on probe values); use "
                                 f"experts_implementation='grouped_mm' for this model")
    return _CHECKED[key]


def _fallback_reason(module: nn.Module, x: torch.Tensor, gate_up: torch.Tensor) -> str | None:
    if torch.is_grad_enabled() and (x.requires_grad or gate_up.requires_grad):
        return "gradients are needed; moecompile's fused backward serves moecompile.optimize's FusedMoE"
    if x.device.type != "cuda" and not launch.INTERPRETED:
        return f"the kernels run on CUDA (on the CPU only under TRITON_INTERPRET=1); input is on {x.device.type}"
    if x.dtype not in _DTYPES or gate_up.dtype != x.dtype:
        return f"the kernels take fp32/fp16/bf16 weights in the input's dtype; weights {gate_up.dtype}, input {x.dtype}"
    return None


def _record(module: nn.Module, path: str) -> None:
    if not torch.compiler.is_compiling():
        _PATHS[module] = path


@torch.library.custom_op("moecompile::hf_experts", mutates_args=())
def _hf_experts_op(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, bias1: torch.Tensor | None, bias2: torch.Tensor | None,
                   plan_key: str) -> torch.Tensor:
    """One opaque call for torch.compile: the experts' weights in the module's own layout, read as views."""
    plan = ExpertsPlan.from_key(plan_key)
    down_canonical = down.transpose(1, 2) if plan.transposed else down  # [E, H, I]
    mlp = plan.mlp(x.shape[-1], down_canonical.shape[2])
    w1 = gate_up.transpose(1, 2) if plan.transposed else gate_up  # [E, F, H]
    layout = launch.CANONICAL
    if plan.interleaved:  # views of the gate rows; each up row one row (bias column) further on
        layout = launch.GateUpLayout(w1_up=w1.stride(1), b1_up=None if bias1 is None else bias1.stride(1))
        w1 = w1[:, 0::2]
        bias1 = None if bias1 is None else bias1[:, 0::2]
    k = ids.shape[-1]
    spec = MoESpec(router=RouterSpec(num_experts=w1.shape[0], top_k=k), experts=mlp)
    expert_weights = MoEWeights(router_weight=x.new_empty(0), w1=w1, w2=down_canonical, b1=bias1, b2=bias2)

    def run(x, ids, weights) -> tuple[torch.Tensor]:
        T = x.shape[0]
        return (launch.forward_routed(spec, expert_weights, x, ids.reshape(T, k), weights.reshape(T, k), layout),)
    if not graphs.applies(x):
        return run(x, ids, weights)[0]
    # few tokens: one graph replay instead of the launches and their Python (1.1 ms of host time per call at one
    # token on the H100, against 52 us on the GPU); the key holds what the launches read besides the inputs
    key = ("hf_experts", plan_key, *[(t.data_ptr(), t.dtype, t.shape, t.stride()) for t in (gate_up, down, bias1, bias2)
                                     if t is not None])
    return graphs.call(key, run, x, ids, weights, copy_out=1)[0]


@_hf_experts_op.register_fake
def _(x, ids, weights, gate_up, down, bias1, bias2, plan_key):
    return x.new_empty(x.shape)


def register_transformers() -> str:
    """Add "moecompile" to transformers' experts implementations (ExpertsInterface); returns the name to pass as
    `experts_implementation=`. Idempotent."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as exc:
        raise MoECompileError(f"register_transformers: this transformers has no experts interface ({exc}); it "
                              f"needs transformers 5.x (pip install 'transformers>=5.17')") from None
    ExpertsInterface.register(NAME, experts_forward)
    return NAME


def experts_report(model: nn.Module):
    """A Report with one record per experts module set to "moecompile" (decision "experts_kernels" when its last
    call ran on the kernels or it has not run yet, "left" with the reason otherwise), or None when there is none."""
    from .passes.log import BlockRecord, Report

    paths = experts_paths(model)
    if not paths:
        return None
    modules = dict(model.named_modules())
    blocks = []
    for name, path in paths.items():
        plan = plan_of(modules[name])
        record = BlockRecord(path=name, module_type=type(modules[name]).__name__, method="experts_implementation",
                             spec=None if isinstance(plan, str) else asdict(plan))
        if path == "moecompile kernels" or path == "not called yet":
            record.decision, record.reason = "experts_kernels", path
            layout = ", ".join([plan.activation, *_layout_words(plan)])
            record.spec_summary = f"experts on moecompile's kernels ({path}): {layout}"
        else:
            record.leave(path)
        blocks.append(record)
    return Report(type(model).__name__, blocks, message=(
        "experts_implementation='moecompile': the experts run on moecompile's dispatch and expert kernels behind "
        "transformers' own router; the router is not fused and blocks are not checked one by one "
        "(moecompile.optimize does both)"))


def _layout_words(plan: ExpertsPlan) -> list[str]:
    words = ["gated" if plan.gated else "plain"]
    words += [w for w, on in (("interleaved", plan.interleaved), ("transposed", plan.transposed),
                              ("biases", plan.has_bias)) if on]
    return words


def experts_paths(model: nn.Module) -> dict[str, str]:
    """{module name: the path its last eager call took, or its plan / refusal before any call} for every experts
    module of `model` set to experts_implementation="moecompile"."""
    out = {}
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if getattr(config, "_experts_implementation", None) != NAME or not hasattr(module, "has_gate"):
            continue
        plan = plan_of(module)
        out[name] = _PATHS.get(module) or (f"refused: {plan}" if isinstance(plan, str) else "not called yet")
    return out
