"""Checkpoints with a routing rewrite: `convert` (saved HF directory -> rewritten directory), `from_pretrained`, and
the strict loading of saved HF directories that both (and the CLI) use.

Place in the pipeline: around optimize() and the routing pass. A converted directory is a normal `save_pretrained`
directory of the original architecture, with the original weights untouched, plus:

  - config.json gets a "moecompile" key: per rewritten layer the router spec before and after the rewrite and the
    effect measured at conversion, the history of conversions, and a note on how to load it;
  - the rewritten routers' biases (the calibrated thresholds of TopK -> ReLU) are extra safetensors entries named
    `moecompile.routing_not_applied.<layer path>.router_bias` in their own file, listed in
    model.safetensors.index.json.

`moecompile.from_pretrained(DIR)` loads the HF model, fuses its MoE blocks and applies the recorded routing. Plain
transformers loads DIR as the original architecture (top-k routing as trained) and its load report warns about the
`moecompile.routing_not_applied.*` entries: the routing change is not applied. Only safetensors are read or written
(no pickle). `convert` writes into a temporary directory beside the output, reloads it and checks the reloaded
model against the converted one in memory, and only then moves it into place, so a failure leaves no output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .calibration_text import check_text_file, text_batches, vocab_size_of
from .errors import MoECompileError
from .fused import FusedMoE
from .outdir import check_target, refuse_existing, staged_output
from .passes.log import Report
from .passes.routing import DEFAULT_COVERAGE, RoutingChange, check_options
from .pipeline import optimize, record_routing, report, rewrite_routing
from .progress import ProgressBar
from .spec import RouterSpec

CONFIG_KEY = "moecompile"
FORMAT_VERSION = 1
EXTRA_PREFIX = "moecompile.routing_not_applied."
EXTRA_FILE = "moecompile-routing.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
LOAD_NOTE = ("routing rewritten by moecompile: load with moecompile.from_pretrained(DIR). Plain transformers loads "
             "the original architecture and routing (the change is NOT applied) and reports the "
             f"{EXTRA_PREFIX}* entries as unexpected")


# ---------------------------------------------------------------- reading a directory


def read_config(path: Path) -> dict:
    if not path.is_dir():
        raise MoECompileError(f"{path}: no such directory; pass a directory written by save_pretrained")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MoECompileError(f"{path}: no config.json; this is not a saved HF model directory (save one with "
                              "model.save_pretrained(DIR))")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoECompileError(f"{config_file}: not valid JSON ({exc}); the checkpoint is damaged, save it again"
                              ) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise MoECompileError(f"{config_file}: no model_type; not an HF model config")
    return config


def weight_files(path: Path) -> list[Path]:
    """The safetensors files the directory's weights live in, each checked to open; refuses pickle checkpoints."""
    index = path / INDEX_FILE
    if (path / SINGLE_FILE).is_file():
        files = [path / SINGLE_FILE]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise MoECompileError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc}); the checkpoint "
                                  "is damaged, save it again") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MoECompileError(f"{path}: the index lists weight files that are not there: {missing}; copy the "
                                  "whole checkpoint directory")
    elif any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise MoECompileError(f"{path}: the weights are pickle files (.bin/.pt); moecompile reads safetensors only. "
                              "Load the model with transformers and save_pretrained it again (safetensors is the "
                              "default)")
    else:
        raise MoECompileError(f"{path}: no weights ({SINGLE_FILE} or {INDEX_FILE}); save the model with "
                              "save_pretrained(DIR)")
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), "pt") as handle:
                handle.keys()
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
            raise MoECompileError(f"{f}: not a readable safetensors file ({type(exc).__name__}: {exc}); the "
                                  "checkpoint is damaged or was cut short, save or copy it again") from None
    return files


@contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers' load report would warn about our own extra entries; the loader checks the keys itself."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_hf(path: str | Path, **hf_kwargs) -> nn.Module:
    """A saved HF directory loaded with transformers (CausalLM, else the base model) in eval mode, strictly: a
    missing or misshapen weight is an error here, where transformers would initialise it at random."""
    path = Path(path)
    read_config(path)
    weight_files(path)
    try:
        import transformers
    except ImportError:
        raise MoECompileError("loading an HF directory needs transformers: pip install 'moecompile[hf]'") from None
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise MoECompileError(f"{path}/config.json could not be read by transformers: {type(exc).__name__}: {exc}"
                              ) from None
    errors = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            with _transformers_quiet():
                model, info = auto.from_pretrained(path, config=config, use_safetensors=True,
                                                   output_loading_info=True, **hf_kwargs)
        except Exception as exc:  # noqa: BLE001 - try the next auto class, then report both
            errors.append(f"{auto.__name__}: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        missing = sorted(info.get("missing_keys", ()))
        if missing:
            raise MoECompileError(f"{path}: the checkpoint lacks {len(missing)} weights of {type(model).__name__} "
                                  f"(e.g. {missing[:3]}); transformers would fill them with random values. Pass a "
                                  "complete checkpoint")
        unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(EXTRA_PREFIX))
        if unexpected:
            warnings.warn(f"moecompile: {path}: {len(unexpected)} checkpoint entries are not used by "
                          f"{type(model).__name__} (e.g. {unexpected[:3]})", stacklevel=2)
        return model.eval()
    raise MoECompileError(f"{path}: the checkpoint could not be loaded ({'; '.join(errors)}); check that its weight "
                          "files are complete safetensors matching config.json")


def _extra_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in weight_files(path):
        with safe_open(str(f), "pt") as handle:
            for key in handle.keys():
                if key.startswith(EXTRA_PREFIX):
                    out[key] = handle.get_tensor(key)
    return out


# ---------------------------------------------------------------- loading


@dataclasses.dataclass
class _Loaded:
    source: nn.Module  # the plain HF model: original architecture and weights, what save_pretrained writes
    model: nn.Module  # optimized, with any recorded routing applied
    base_routers: dict[str, RouterSpec]  # each fused block's router as read from the HF model
    meta: dict | None


def file_digests(path: Path) -> dict[str, str]:
    """SHA-256 of every file in the directory but config.json (which records them), by name."""
    digests = {}
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.name != "config.json"):
        h = hashlib.sha256()
        with f.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                h.update(chunk)
        digests[f.name] = h.hexdigest()
    return digests


def _check_digests(path: Path, meta: dict) -> None:
    """The files of a directory convert wrote are the bytes it wrote: safetensors has no checksum of its own, so
    a flipped byte in a tensor would load silently."""
    recorded = meta.get("sha256") if isinstance(meta, dict) else None
    if not isinstance(recorded, dict):
        return  # written before checksums were recorded
    found = file_digests(path)
    for name, digest in sorted(recorded.items()):
        if name not in found:
            raise MoECompileError(f"{path / name}: missing; the checkpoint written by moecompile convert lists it. "
                                  "Copy the whole directory again")
        if found[name] != digest:
            raise MoECompileError(f"{path / name}: its SHA-256 differs from the one recorded when it was written; "
                                  "the file is damaged (copy it again, or convert the original again)")


def _check_finite(path: Path, model: nn.Module) -> None:
    """A NaN or Inf weight makes every output that reads it NaN: name the tensor now rather than later."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.numel() and not bool(tensor.isfinite().all()):
            bad = int((~tensor.isfinite()).sum())
            raise MoECompileError(f"{path}: the weight {name} holds {bad} NaN/Inf values of {tensor.numel()}; the "
                                  "checkpoint is damaged or diverged in training. Use an earlier checkpoint")


def _load(path: Path, verify: bool, hf_kwargs: dict) -> _Loaded:
    meta = read_config(path).get(CONFIG_KEY)
    if meta is not None:
        _check_digests(path, meta)
    source = load_hf(path, **hf_kwargs)
    _check_finite(path, source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimize(source, verify=verify)
    rep = report(model)
    if not rep.fused:
        reasons = "; ".join(f"{b.path}: {b.reason}" for b in rep.blocks) or rep.message
        raise MoECompileError(f"{path}: {type(source).__name__} has no MoE block moecompile can fuse ({reasons}); "
                              "routing can only be rewritten in MoE models")
    base = {b.path: model.get_submodule(b.path).spec.router for b in rep.fused}
    if meta is not None:
        _apply_recorded(path, model, meta)
    return _Loaded(source, model, base, meta)


def _apply_recorded(path: Path, model: nn.Module, meta: dict) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or not isinstance(meta.get("layers"), dict):
        raise MoECompileError(f"{path}/config.json: the '{CONFIG_KEY}' entry is not format {FORMAT_VERSION} of this "
                              f"moecompile ({__version__}); convert the original checkpoint again")
    extras = _extra_tensors(path)
    changes = []
    for layer, entry in meta["layers"].items():
        try:
            block = model.get_submodule(layer) if layer else None
        except AttributeError:
            block = None
        if not isinstance(block, FusedMoE):
            raise MoECompileError(f"{path}: the checkpoint rewrote the routing of {layer!r}, but that is not a fused "
                                  "MoE block of this model (see moecompile.report); it cannot be applied")
        try:
            before, router = RouterSpec(**entry["router_before"]), RouterSpec(**entry["router"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MoECompileError(f"{path}/config.json: layer {layer!r}: a malformed router record ({exc})") from None
        if block.spec.router != before:
            raise MoECompileError(f"{path}: layer {layer!r} reads as {block.spec.summary()} but was converted from a "
                                  f"block routed {before}; convert the original checkpoint again")
        bias = None
        if router.has_bias:
            bias = extras.get(entry.get("router_bias", ""))
            if bias is None:
                raise MoECompileError(f"{path}: layer {layer!r}: the router bias {entry.get('router_bias')!r} is not "
                                      "in the weight files; the checkpoint is incomplete")
            old = block.weights().router_weight
            bias = nn.Parameter(bias.to(device=old.device, dtype=old.dtype), requires_grad=True)
        weights = dataclasses.replace(block.weights(), router_bias=bias, correction_bias=(
            block.weights().correction_bias if router.has_correction_bias else None))
        fused = FusedMoE(dataclasses.replace(block.spec, router=router), weights, source_path=block.source_path,
                         backend=block.backend)
        fused.router_tap = block.router_tap
        fused.train(block.training)
        model.set_submodule(layer, fused)
        if entry.get("change"):
            changes.append(RoutingChange(**entry["change"]))
    record_routing(report(model), model, changes, f"{meta.get('routing')}: {len(meta['layers'])} blocks, as "
                   "recorded in the checkpoint", name="routing (checkpoint)")


def from_pretrained(path: str | Path, *, verify: bool = True, **hf_kwargs) -> nn.Module:
    """Load a saved HF directory with its MoE blocks fused and, for a directory `moecompile convert` wrote, the
    recorded routing rewrite applied. `hf_kwargs` (dtype, device_map, ...) go to transformers' from_pretrained;
    `moecompile.report(model)` gives the pass log, with the effect measured at conversion."""
    return _load(Path(path), verify, hf_kwargs).model


# ---------------------------------------------------------------- writing


def _layer_records(loaded: _Loaded, model: nn.Module) -> dict[str, dict]:
    records = {b.path: b for b in report(model).fused}
    layers = {}
    for path, base in loaded.base_routers.items():
        block = model.get_submodule(path)
        if block.spec.router == base:
            continue
        entry = {"router": dataclasses.asdict(block.spec.router), "router_before": dataclasses.asdict(base),
                 "change": records[path].routing_change}
        if block.spec.router.has_bias:
            entry["router_bias"] = f"{EXTRA_PREFIX}{path}.router_bias"
        layers[path] = entry
    return layers


def _write(loaded: _Loaded, model: nn.Module, source_dir: Path, out: Path, history: list[dict]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    loaded.source.save_pretrained(out)
    pickles = [p.name for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    if pickles:
        raise MoECompileError(f"save_pretrained wrote pickle files {pickles}; this transformers does not write "
                              "safetensors by default, and moecompile writes safetensors only")
    layers = _layer_records(loaded, model)
    extras = {e["router_bias"]: model.get_submodule(p).router_bias.detach().cpu().contiguous()
              for p, e in layers.items() if "router_bias" in e}
    if (out / SINGLE_FILE).is_file():  # transformers reads a single file before an index: make it an index
        (out / SINGLE_FILE).rename(out / "model-00001-of-00001.safetensors")
        with safe_open(str(out / "model-00001-of-00001.safetensors"), "pt") as handle:
            weight_map = {key: "model-00001-of-00001.safetensors" for key in handle.keys()}
        index = {"metadata": {}, "weight_map": weight_map}
    else:
        index = json.loads((out / INDEX_FILE).read_text())
    if extras:
        save_file(extras, str(out / EXTRA_FILE), metadata={"format": "pt"})
        index["weight_map"].update({key: EXTRA_FILE for key in extras})
    index.setdefault("metadata", {})["total_size"] = sum(
        (out / name).stat().st_size for name in set(index["weight_map"].values()))
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    config = json.loads((out / "config.json").read_text())
    for item in source_dir.iterdir():  # tokenizer and other side files, as they were
        if item.is_file() and not (out / item.name).exists() and item.suffix not in WEIGHT_SUFFIXES and \
                item.name != INDEX_FILE:
            shutil.copy2(item, out / item.name)
    config[CONFIG_KEY] = {"format": FORMAT_VERSION, "note": LOAD_NOTE, "routing": history[-1]["routing"],
                          "layers": layers, "history": history, "sha256": file_digests(out)}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _first_output(out) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_reload(out: Path, model: nn.Module, batch: dict, hf_kwargs: dict) -> float:
    """Reload what was written and compare it with the converted model in memory; the two must agree."""
    reloaded = _load(out, verify=False, hf_kwargs=hf_kwargs).model
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        want, got = _first_output(model(**inputs)).float(), _first_output(reloaded(**inputs)).float()
    err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
    if not err <= 1e-5:  # same weights and spec: only kernel-choice noise is allowed
        raise MoECompileError(f"the written checkpoint reloads to a model that differs from the converted one (max "
                              f"relative difference {err:.3g}); nothing was written. Please report this")
    return err


def convert(source: str | Path, out: str | Path, routing: str, *, k: int | str | None = None,
            calibration: str | Path | None = None, seq_len: int = 256, batches: int = 16,
            coverage: float = DEFAULT_COVERAGE, overwrite: bool = False, verify: bool = True,
            progress: bool = True, **hf_kwargs: Any) -> Report:
    """Rewrite the routing of the saved HF model in `source` and write the result to `out` (see the module doc).

    routing: "relu" (TopK -> ReLU, calibrated on `calibration`, a text file) or "topk" (ReLU -> TopK with k an int
    or "auto"; `source` must then be a ReLU checkpoint this function wrote). Returns the pass log (a Report).
    Errors (a bad option, a missing or malformed input, a model without MoE blocks) are raised before anything is
    written; a failure while writing removes the partial output."""
    source, out = Path(source), Path(out)
    _check_convert_inputs(source, out, routing, k, calibration, coverage, overwrite)
    loaded = _load(source, verify, hf_kwargs)
    left = report(loaded.model).left
    if left:
        raise MoECompileError(f"{source}: {len(left)} MoE block(s) could not be fused, so their routing cannot be "
                              f"rewritten ({'; '.join(f'{b.path}: {b.reason}' for b in left)}); nothing was written")
    vocab = vocab_size_of(loaded.source.config)
    calib, calib_source = (None, None) if calibration is None else text_batches(calibration, vocab, seq_len,
                                                                                 batches, tokenizer_dir=source)
    bar = ProgressBar(len(loaded.base_routers), f"{routing} routing") if progress else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = rewrite_routing(loaded.model, routing, k=k, calibration=calib, coverage=coverage,
                                   progress=None if bar is None else bar.update)
    tokens = 0 if calib is None else sum(b["input_ids"].numel() for b in calib)
    history = list((loaded.meta or {}).get("history", [])) + [{
        "routing": routing, "k": k, "coverage": coverage if k == "auto" else None,
        "calibration": None if calibration is None else Path(calibration).name, "calibration_source": calib_source,
        "calibration_tokens": tokens, "moecompile_version": __version__}]
    check_batch = (calib[0] if calib else {"input_ids": torch.arange(16)[None] % vocab}) if verify else None
    cleaned = _write_checkpoint(loaded, model, source, out, history, overwrite, check_batch, hf_kwargs)
    rep = report(model)
    rep.message = "; ".join([f"converted {source} -> {out} ({routing} routing; calibration: "
                             f"{calib_source or 'none'})", *cleaned])
    return rep


def _check_convert_inputs(source: Path, out: Path, routing: str, k, calibration, coverage: float,
                          overwrite: bool) -> None:
    """Every check convert can make before loading the model: options, the calibration file, the source's config,
    the output path, and that a top-k rewrite starts from a ReLU checkpoint."""
    check_options(routing, k, coverage)
    if k == "auto" and calibration is None:
        raise MoECompileError("--k auto picks k per layer from calibration data: pass --calibration TEXT_FILE, or "
                              "give k as an integer")
    if calibration is not None:
        check_text_file(calibration)
    config = read_config(source)  # its weight files are checked by the load, before anything is written
    check_target(out, source)
    refuse_existing(out, overwrite)
    if routing == "topk" and not (config.get(CONFIG_KEY) or {}).get("routing") == "relu":
        raise MoECompileError(f"{source}: --routing topk takes a ReLU-routed checkpoint (one `moecompile convert "
                              "--routing relu` wrote); this one routes top-k already")


def _write_checkpoint(loaded, model, source: Path, out: Path, history: list, overwrite: bool,
                      check_batch: dict | None, hf_kwargs: dict) -> list[str]:
    """Writes the converted checkpoint into a staging folder beside `out`, reloads and checks it (with a
    check_batch), then puts it in place; on any failure the staging folder is removed. Returns the notes of what an
    earlier interrupted run had left and was cleaned."""
    with staged_output(out, overwrite) as (tmp, cleaned):
        _write(loaded, model, source, tmp, history)
        if check_batch is not None:
            _check_reload(tmp, model, check_batch, hf_kwargs)
    return cleaned
