"""Checkpoints for expert parallelism: an optimized model saved once, then loaded by every rank with only its own
experts read from disk.

Place in the pipeline: after optimize. `save_for_expert_parallel(model, DIR)` runs once, where the whole model fits
(a large CPU host will do). That is where optimize confirmed every block against the original module on the block's
own weights. `load_expert_parallel(DIR, group)` then runs on each rank. It builds the transformers model from
DIR's config on the meta device. For every fused block it reads the replicated tensors whole and its own experts'
rows of the expert tensors (safetensors `get_slice`), so no rank reads another rank's experts. It puts an
ExpertParallelMoE (expert_parallel.py) where the block was, and loads the rest of the model.

Why a checkpoint of its own rather than the original one: a rank that never holds every expert cannot run the
original block, so it could not confirm the fused block the way optimize does. The confirmation is made once, when
DIR is written; the descriptions and tensor names it confirmed are stored with the weights.

DIR holds config.json (the transformers config) and model.safetensors: the optimized model's state dict (a tensor
shared by several names, such as tied embeddings, is stored once and the other names are recorded), with the
metadata key "moecompile": the format, the model class, and per fused block its path, description (spec) and
which of its tensors are parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import MoECompileError
from .expert_parallel import EXPERT_TENSORS, ExpertParallelMoE, check_group, pass_note, unshardable_reason
from .fused import FusedMoE
from .outdir import check_target, staged_output
from .spec import MoESpec

FORMAT = "moecompile-expert-parallel"
VERSION = 1
WEIGHTS = "model.safetensors"
META_KEY = "moecompile"


def save_for_expert_parallel(model: nn.Module, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write `model` (a transformers model after moecompile.optimize, every MoE block fused) to the directory `out`
    for load_expert_parallel. The directory appears complete or not at all. Returns its path."""
    from safetensors.torch import save_file

    out = Path(out)
    blocks = [(path, m) for path, m in model.named_modules() if isinstance(m, FusedMoE)]
    config = getattr(model, "config", None)
    _check_savable(model, blocks, config)
    tensors, aliases = _unique_tensors(model)
    meta = {"format": FORMAT, "version": VERSION, "model_class": type(model).__name__, "aliases": aliases,
            "blocks": [{"path": path, "spec": block.spec.to_dict(),
                        "parameters": [n for n, _ in block.named_parameters(recurse=False)]}
                       for path, block in blocks]}
    check_target(out, None)
    with staged_output(out, overwrite) as (tmp, _):
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS), metadata={META_KEY: json.dumps(meta)})
    return out


def _check_savable(model: nn.Module, blocks: list, config) -> None:
    from .pipeline import _REPORTS

    if config is None or not hasattr(config, "save_pretrained"):
        raise MoECompileError(f"save_for_expert_parallel: {type(model).__name__} has no transformers config; the "
                              "expert-parallel checkpoint is for transformers models (load_expert_parallel rebuilds "
                              "the model from its config)")
    if not blocks:
        raise MoECompileError(f"save_for_expert_parallel: {type(model).__name__} has no fused MoE block; call "
                              "moecompile.optimize(model) first")
    log = _REPORTS.get(model)
    if log is not None and log.left:
        where = ", ".join(b.path or "<root>" for b in log.left)
        raise MoECompileError(f"save_for_expert_parallel: blocks left as they were ({where}); expert parallelism "
                              "needs every MoE block fused (moecompile.report(model) says why they were left)")
    for path, block in blocks:
        if block.lowering is not None or block.eval_only_reason is not None:
            raise MoECompileError(f"save_for_expert_parallel: block {path} is fused for ONNX export or eval mode "
                                  "only; save a model fresh from moecompile.optimize")


def _unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each storage once (safetensors refuses shared tensors), and {dropped name: kept name}."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, aliases


def load_expert_parallel(path: str | Path, group=None) -> nn.Module:
    """The model saved by save_for_expert_parallel, on the CPU, with every fused block an ExpertParallelMoE holding
    this rank's experts of `group` (None: the default group). Reads the replicated tensors and this rank's rows of
    the expert tensors only. Call in every rank of the group."""
    from safetensors import safe_open

    path = Path(path)
    world = check_group(group)
    meta = _read_meta(path)
    specs = {b["path"]: MoESpec.from_dict(b["spec"]) for b in meta["blocks"]}
    for where, spec in specs.items():  # before anything is built or read
        reason = unshardable_reason(spec, world)
        if reason is not None:
            raise MoECompileError(f"load_expert_parallel: block {where}: {reason}")
    model = _skeleton(path, meta["model_class"])
    rank = torch.distributed.get_rank(group)
    aliases = meta.get("aliases", {})
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        names = set(f.keys())
        for block_meta in meta["blocks"]:
            where, spec = block_meta["path"], specs[block_meta["path"]]
            local = spec.num_experts // world
            tensors = {}
            # a block tensor may be stored under another name that shares it (a router tap's weight)
            for name in _block_tensor_names(where, names | set(aliases)):
                short, stored = (name[len(where) + 1:] if where else name), aliases.get(name, name)
                if short in EXPERT_TENSORS:
                    tensor = f.get_slice(stored)[rank * local:(rank + 1) * local]
                else:
                    tensor = f.get_tensor(stored)
                if short in block_meta["parameters"]:
                    tensor = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
                tensors[short] = tensor
            block = ExpertParallelMoE.from_local(spec, tensors, group, source_path=where)
            if where:
                model.set_submodule(where, block)
            else:
                model = block
        rest = {name: f.get_tensor(name) for name in names if not _under(name, specs)}
    _load_rest(model, rest, {a: k for a, k in aliases.items() if not _under(a, specs)}, path)
    model.eval()
    _record(model, path, len(specs))
    return model


def _record(model: nn.Module, path: Path, blocks: int) -> None:
    """moecompile.report(model): the load as a pass of its own."""
    from .passes.log import PassRun, Report
    from .pipeline import _REPORTS

    first = next(m for m in model.modules() if isinstance(m, ExpertParallelMoE))
    report = Report(type(model).__name__, [], message=(
        f"loaded from {path} by load_expert_parallel: the blocks were confirmed by optimize when it was saved"))
    report.passes.append(PassRun("expert_parallel", 0.0, True,
                                 pass_note(blocks, first) + " (read from the checkpoint alone)"))
    _REPORTS[model] = report


def _under(name: str, block_paths) -> bool:
    """Whether a state-dict name belongs to one of the blocks (a block at "" is the whole model)."""
    return any(name == p or name.startswith(p + ".") if p else True for p in block_paths)


def _block_tensor_names(where: str, names: set[str]) -> list[str]:
    prefix = where + "." if where else ""
    return [n for n in names if n.startswith(prefix) and "." not in n[len(prefix):]]


def _read_meta(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    file = path / WEIGHTS
    if not (path / "config.json").is_file() or not file.is_file():
        raise MoECompileError(f"load_expert_parallel: {path} is not a directory written by "
                              f"save_for_expert_parallel (it needs config.json and {WEIGHTS}); write one with "
                              "moecompile.ep_checkpoint.save_for_expert_parallel(optimized_model, DIR)")
    try:
        with safe_open(str(file), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError) as exc:
        raise MoECompileError(f"load_expert_parallel: {file} cannot be read as safetensors ({exc})") from None
    try:
        meta = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MoECompileError(f"load_expert_parallel: {file} has no moecompile expert-parallel metadata (a plain "
                              "checkpoint?); write one with save_for_expert_parallel(optimized_model, DIR)")
    if meta.get("version") != VERSION:
        raise MoECompileError(f"load_expert_parallel: {file} is format version {meta.get('version')}; this "
                              f"moecompile reads version {VERSION}")
    return meta


def _skeleton(path: Path, class_name: str) -> nn.Module:
    """The transformers model of DIR's config, on the meta device (no memory for its weights)."""
    import transformers

    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise MoECompileError(f"load_expert_parallel: the saved model class {class_name} is not in this "
                              f"transformers ({transformers.__version__})")
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return cls(config)


def _load_rest(model: nn.Module, rest: dict[str, torch.Tensor], aliases: dict[str, str], path: Path) -> None:
    for alias, kept in aliases.items():
        if kept in rest:
            rest[alias] = rest[kept]
    state = model.state_dict()
    unexpected = sorted(set(rest) - set(state))
    if unexpected:
        raise MoECompileError(f"load_expert_parallel: {path / WEIGHTS} holds tensors this model does not have "
                              f"(e.g. {unexpected[0]}); was it written from another model class or version?")
    model.load_state_dict(rest, strict=False, assign=True)
    for alias, kept in aliases.items():  # assign=True made two Parameters of one tensor: share the object again
        owner, _, attr = alias.rpartition(".")
        kept_owner, _, kept_attr = kept.rpartition(".")
        setattr(model.get_submodule(owner), attr, getattr(model.get_submodule(kept_owner), kept_attr))
    on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if on_meta:
        # non-persistent buffers (rotary inverse frequencies) are not in any state dict: the model's own
        # initialisation computes them
        init = getattr(model, "_init_weights", None)
        buffers_only = not any(n for n, _ in model.named_parameters() if n in on_meta)
        if not buffers_only or init is None:
            raise MoECompileError(f"load_expert_parallel: {len(on_meta)} tensors were not in {path / WEIGHTS} "
                                  f"(e.g. {on_meta[0]})")
        _materialise_buffers(model)


def _materialise_buffers(model: nn.Module) -> None:
    """Non-persistent buffers left on the meta device (rotary frequencies), recomputed on the CPU by rebuilding the
    module that owns them from the model's config."""
    for module in model.modules():
        meta_buffers = [b for b, t in module.named_buffers(recurse=False) if t.is_meta]
        if not meta_buffers:
            continue
        try:
            fresh = type(module)(config=model.config)
        except TypeError:
            fresh = type(module)(model.config)
        for b in meta_buffers:
            module.register_buffer(b, getattr(fresh, b), persistent=False)
        for attr, value in vars(fresh).items():  # plain tensor attributes beside them (original_inv_freq)
            if isinstance(value, torch.Tensor) and getattr(module, attr, None) is not None \
                    and getattr(module, attr).is_meta:
                setattr(module, attr, value)
