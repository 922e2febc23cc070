"""Tiny HF transformers MoE models built from their config classes (no hub download), for coverage and tests.

Place in the pipeline: outside it; a source of real models. `moe_families()` lists every model type of the installed
transformers whose modeling code has an MoE block (an `*Experts` class, a `use_experts_implementation` decorator, or a
class named *MoE* / *SparseMoe* / *SparseMLP*); `build(model_type, experts_implementation)` shrinks the config's sizes
generically and builds the CausalLM (or base) model with random weights.
"""

from __future__ import annotations

import functools
import importlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_MOE_CLASS = re.compile(r"^class \w*(Experts|MoE|Moe|SparseMoe|SparseMLP)\w*\(", re.M)

# Size knobs found across MoE configs, and the small value each gets when the config has it.
SMALL_SIZES: dict[str, object] = {
    "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 48, "shared_expert_intermediate_size": 48,
    "ffn_hidden_size": 96, "expert_intermediate_size": 48, "num_hidden_layers": 2, "num_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128,
    "max_position_embeddings": 128, "num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8,
    "moe_num_experts": 8, "num_experts_per_tok": 2, "moe_k": 2, "moe_topk": 2, "n_shared_experts": 1,
    "n_group": 2, "topk_group": 1, "first_k_dense_replace": 0, "decoder_sparse_step": 1, "moe_layer_freq": 1,
    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "d_model": 64, "d_ff": 96, "d_kv": 16, "num_heads": 4, "expert_capacity": 3,
    "num_decoder_layers": 2,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_expand": 2,
    "mamba_dt_rank": 8, "sliding_window": 64,
    "global_attn_every_n_layers": 2, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1,
    "expert_layer_offset": 0, "moe_top_k": 2, "n_layers": 2, "n_heads": 4,
    "index_n_heads": 2, "index_head_dim": 16, "index_topk": 8,
}


def _models_dir() -> Path:
    import transformers

    return Path(transformers.__file__).parent / "models"


def moe_families() -> list[str]:
    """Model folders of the installed transformers whose modeling code holds an MoE block, sorted."""
    found = []
    for folder in sorted(p for p in _models_dir().iterdir() if p.is_dir()):
        text = "".join(f.read_text(errors="ignore") for f in folder.glob("modeling_*.py"))
        if "use_experts_implementation" in text or _MOE_CLASS.search(text):
            found.append(folder.name)
    return found


def decorated_families() -> list[str]:
    """Families whose experts class carries transformers' @use_experts_implementation (the experts switch)."""
    return [family for family in moe_families()
            if any("@use_experts_implementation" in f.read_text(errors="ignore")
                   for f in (_models_dir() / family).glob("modeling_*.py"))]


def _config_and_model_classes(family: str):
    from transformers.models.auto import configuration_auto, modeling_auto

    mapping = configuration_auto.CONFIG_MAPPING_NAMES
    types = [t for t in mapping if t == family] + [t for t in mapping if t == f"{family}_text"]
    if not types:
        raise LookupError(f"{family}: no config class registered for this model type")
    model_type = types[-1] if f"{family}_text" in types else types[0]
    config_cls = getattr(importlib.import_module("transformers"), mapping[model_type])
    for table in (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, modeling_auto.MODEL_MAPPING_NAMES):
        name = table.get(model_type)
        if name:
            return config_cls, getattr(importlib.import_module("transformers"), name)
    raise LookupError(f"{family}: no CausalLM or base model class for model type {model_type}")


def _shrink(config) -> None:
    """Set every size knob of `config` and of its sub-configs (DBRX keeps attention and FFN in their own) small."""
    from transformers import PretrainedConfig

    for key, value in SMALL_SIZES.items():
        if hasattr(config, key) and not isinstance(getattr(config, key), (list, dict, PretrainedConfig)):
            setattr(config, key, value)
    for name, sub in list(vars(config).items()):
        if isinstance(sub, PretrainedConfig) and name != "text_config":
            _shrink(sub)


@functools.cache
def _reads_mrope(family: str) -> bool:
    return any("mrope_section" in f.read_text(errors="ignore") for f in (_models_dir() / family).glob("modeling_*.py"))


def small_config(family: str, experts_implementation: str | None = None) -> PretrainedConfig:
    config_cls, _ = _config_and_model_classes(family)
    config = config_cls()
    _shrink(config)
    if hasattr(config, "qk_rope_head_dim"):
        # MLA: rotary runs over the rope part of each head (which is all of head_dim unless the rope is partial)
        rope = getattr(config, "rope_parameters", None) or {}
        config.head_dim = int(config.qk_rope_head_dim / rope.get("partial_rotary_factor", 1.0))
    if hasattr(config, "kv_lora_rank") and hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = config.num_attention_heads  # MLA expands the latent to every head
    # no KV cache: a hybrid model whose tiny config holds only linear-attention layers cannot size one
    config.use_cache = False
    attn = getattr(config, "attn_config", None)
    if attn is not None and not hasattr(attn, "rope_theta"):
        # DBRX's default config in transformers 5.23 does not run: its attention reads rope_theta, which the config
        # no longer sets, and clamps with clip_qkv, which defaults to None
        attn.rope_theta = 10000.0
        attn.clip_qkv = attn.clip_qkv or 8.0
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and ("mrope_section" in rope or _reads_mrope(family)):
        # multimodal rope: the sections split the rotary half of head_dim, which the shrink made small
        half = int(getattr(config, "head_dim", 16) * rope.get("partial_rotary_factor", 1.0)) // 2
        sections = rope.get("mrope_section") or [8, 12, 12]  # GLM-4V's rotary embedding falls back to this
        scaled = [max(1, s * half // sum(sections)) for s in sections]
        scaled[-1] += half - sum(scaled)
        rope["mrope_section"] = scaled
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[name])
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and types:
        # keep one layer of each kind (hybrid attention / linear attention / mamba families need both)
        distinct = list(dict.fromkeys(types))
        layers = max(2, len(distinct))
        try:
            config.num_hidden_layers = layers
            config.layer_types = (distinct * layers)[:layers]
        except AttributeError:
            pass  # a derived property (Jamba): its period knobs above set it
    mlp_types = getattr(config, "mlp_layer_types", None)
    if isinstance(mlp_types, list) and mlp_types:
        # every layer an MoE layer, one of each MoE kind (DeepSeek-V3.2 starts with dense layers, V4 with hash-routed)
        sparse = [t for t in dict.fromkeys(mlp_types) if t != "dense"]
        if sparse:
            config.mlp_layer_types = (sparse * config.num_hidden_layers)[:config.num_hidden_layers]
    for name in ("mlp_only_layers",):
        if isinstance(getattr(config, name, None), list):
            setattr(config, name, [])
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    return config


def build(family: str, experts_implementation: str | None = None, *, seed: int = 0,
          dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny random-weight model of `family` in eval mode."""
    _, model_cls = _config_and_model_classes(family)
    config = small_config(family, experts_implementation)
    torch.manual_seed(seed)
    kwargs = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    try:
        model = model_cls._from_config(config, **kwargs)
    except (TypeError, ValueError):
        model = model_cls._from_config(config)
    _randomize_constant_routers(model, getattr(config, "initializer_range", 0.02))
    return model.to(dtype).eval()


def _randomize_constant_routers(model: torch.nn.Module, std: float) -> None:
    """Router weights that come out of construction constant drawn from N(0, std) instead: some transformers
    releases leave one at torch.zeros (AFMoE's router; Ernie 4.5 MoE's on 5.17), and a constant router scores every
    expert alike, so every token meets exact top-k ties and the model tests nothing about routing."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if _ROUTER_WEIGHT.search(name) and param.dim() == 2 and param.numel() > 1 \
                    and bool((param == param.flatten()[0]).all()):
                param.normal_(0.0, std)


_ROUTER_WEIGHT = re.compile(r"(^|\.)(router|gate)(\.\w+)?\.weight$")  # not gate_proj / gate_up_proj


def has_experts_implementation(model: torch.nn.Module) -> bool:
    """Whether the model's experts switch implementation with `experts_implementation`."""
    return any(hasattr(m, "is_concatenated") and hasattr(m, "has_gate") for m in model.modules())


EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def experts_implementations(family: str) -> tuple[str, ...]:
    """The experts implementations `family` switches between, or ("n/a",) for a family without the switch."""
    return EXPERTS_IMPLEMENTATIONS if has_experts_implementation(build(family)) else ("n/a",)


def example_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 9, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    vocab = getattr(model.config, "vocab_size", 128)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    if getattr(model.config, "is_encoder_decoder", False):
        # the encoder's mask given: traced (torch.export), transformers' T5-style encoders do not make one
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "decoder_input_ids": ids[:, : max(1, seq // 2)]}
    return {"input_ids": ids}


def model_output(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The model's main output: logits for a CausalLM, the last hidden state for a base model."""
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
