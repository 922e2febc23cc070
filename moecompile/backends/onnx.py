"""ONNX export of an optimized model: export_onnx() and `moecompile export`.

Place in the pipeline: the last stage. The model is optimized on a copy (the user's model is not touched), each
fused block gets an ONNX form (backends/onnx_lowering.py: onnxruntime's com.microsoft.MoE where its semantics are
the block's, standard operators otherwise), torch.onnx's dynamo exporter writes the file, onnx.checker checks it,
and with verify=True onnxruntime runs it against the original PyTorch model at two sequence lengths. The file is
written beside the output path and moved there only when every step passed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import fp8
from ..errors import MoECompileError
from ..fused import FusedMoE
from ..passes.log import BlockRecord, PassRun, Report
from ..pipeline import _structural_copy, optimize, report
from . import onnx_complex, onnx_if, onnx_lowering, topk_ties

MOE_OPS = ("auto", "standard", "ort")
# verify: max |onnxruntime - PyTorch| over max |PyTorch output|, by the exported weights' dtype
VERIFY_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class _Outputs(nn.Module):
    """The model with every input positional (the keyword ones after the positional ones, in order) and its main
    output as a plain tensor (the logits of an HF causal LM run without a cache)."""

    def __init__(self, model: nn.Module, n_args: int, keywords: list[str], hf: bool):
        super().__init__()
        self.model, self.n_args, self.keywords, self.hf = model, n_args, keywords, hf

    def forward(self, *inputs):
        kwargs = dict(zip(self.keywords, inputs[self.n_args:]))
        if self.hf:
            kwargs["use_cache"] = False
        return main_output(self.model(*inputs[:self.n_args], **kwargs))


def main_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise MoECompileError(f"export_onnx: the model returned {type(out).__name__}; export needs a tensor, a tuple "
                          "starting with one, or an output with .logits")


def _as_args(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs), {}
    raise MoECompileError("export_onnx: example_inputs must be a tensor, a tuple of tensors or a dict of keyword "
                          f"tensors (got {type(example_inputs).__name__})")


def _batch_axes(t: torch.Tensor) -> range:
    """Batch and sequence axes: every axis of integer ids; every axis but the last (features) of float inputs."""
    return range(t.dim() if not t.is_floating_point() else t.dim() - 1)


def _length_axis(t: torch.Tensor) -> int:
    """The sequence (or token) axis: axis 1 of [batch, seq] ids, the one before the features of float inputs."""
    return 1 if t.dim() >= 2 and not t.is_floating_point() else max(t.dim() - 2, 0)


def _dynamic_dims(t: torch.Tensor) -> dict:
    """The batch axes, but those whose example size is 0 or 1: they stay static (torch.export specialises them)."""
    return {i: torch.export.Dim.DYNAMIC for i in _batch_axes(t) if t.shape[i] >= 2}


def _static_axes_note(inputs: tuple, names: list[str]) -> str:
    static = [f"{name} axis {i}" for name, t in zip(names, inputs) for i in _batch_axes(t) if t.shape[i] < 2]
    return f"; static (example size < 2): {', '.join(static)}" if static else ""


def _choose_lowerings(model: nn.Module, moe_op: str, rep: Report) -> dict[str, str]:
    """path -> "ort" | "standard" for every fused block, recorded in the pass log; raises before anything is
    written when moe_op="ort" and a block cannot use the contrib operator (every block has a standard form)."""
    choice, cannot = {}, []
    records = {b.path: b for b in rep.blocks}
    for path, module in model.named_modules():
        if not isinstance(module, FusedMoE):
            continue
        if module.spec.autocast is not None:
            raise MoECompileError(
                f"export_onnx: block {path or '<root>'} computes in its own {module.spec.autocast[0]} autocast region "
                f"({module.spec.autocast[1]}), which the ONNX lowering does not reproduce (it would compute in the "
                "weights' dtype). Nothing was written. Remove the region from the block's forward and export the "
                "model cast to that dtype (model.to(torch.bfloat16)) instead")
        dtype = module.weights().w1.dtype
        ort_why = onnx_lowering.ort_mismatch(module.spec, dtype)
        if moe_op == "ort" and ort_why is not None:
            cannot.append(f"{path or '<root>'}: {ort_why}")
            continue
        if moe_op == "standard" or ort_why is not None:
            choice[path] = onnx_lowering.STANDARD
            note = "standard ONNX operators" + (f" (com.microsoft.MoE does not apply: {ort_why})"
                                                if moe_op == "auto" else " (moe_op='standard')")
        else:
            choice[path] = onnx_lowering.ORT
            note = "com.microsoft.MoE"
        if path not in records:  # fused before this process (a checkpoint loaded fused): a record of its own
            records[path] = BlockRecord(path=path, module_type="FusedMoE", decision="fused",
                                        spec_summary=module.spec.summary())
            rep.blocks.append(records[path])
        records[path].export = note
    if cannot:
        raise MoECompileError(f"export_onnx: {len(cannot)} block(s) cannot use com.microsoft.MoE (moe_op='ort'): "
                              + "; ".join(cannot) + "; use moe_op='auto' or 'standard' (--moe-op) for these "
                              "blocks. Nothing was written.")
    return choice


def export_onnx(model: nn.Module, path: str | Path, example_inputs: torch.Tensor | tuple | dict, *,
                dynamic: bool = True, moe_op: str = "auto", verify: bool = False, opset: int = 18,
                external_data: bool | None = None) -> Path:
    """Export `model` (optimized on a copy if it was not) to ONNX at `path`; returns the path.

    example_inputs: a tensor, a tuple of tensors, or a dict of keyword tensors (an HF model: {"input_ids": ids});
        an axis of example size 0 or 1 is exported static (the pass log lists those), so use sizes of at least 2.
    dynamic: batch and sequence axes dynamic (every axis of integer inputs, all but the last of float inputs).
    moe_op: "auto" (com.microsoft.MoE where it computes the block exactly, standard operators elsewhere),
        "standard" (standard operators everywhere), "ort" (the contrib operator everywhere, or an error naming the
        blocks that cannot use it). The choice per block goes to the pass log and the file's metadata.
    verify: run the file in onnxruntime at two sequence lengths against the original model in PyTorch; a
        mismatch over the tolerance (VERIFY_TOLERANCE) is an error and nothing is left at `path`.
    external_data: weights in `<path>.data` beside the file; None (the default): when the model is over 2 GB.
    """
    path = _check_export_target(path, moe_op)
    args, kwargs = _as_args(example_inputs)
    start = time.perf_counter()
    hf = hasattr(model, "config") and hasattr(model, "can_generate")
    exported, rep = _lowered_copy(model, moe_op)
    wrapper = _Outputs(exported, len(args), list(kwargs), hf).eval()
    inputs = (*args, *kwargs.values())
    names = [f"input_{i}" for i in range(len(args))] + list(kwargs)
    dynamic_shapes = (tuple(_dynamic_dims(t) for t in inputs),) if dynamic else None  # one entry: *inputs
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        tmp_file = Path(tmp) / path.name
        program = _torch_onnx_export(wrapper, inputs, names, dynamic_shapes, opset)
        export_s = time.perf_counter() - start
        rep.passes.append(PassRun(name="export_onnx", seconds=export_s, modified=True,
                                  note=f"opset {opset}, moe_op={moe_op}, dynamic={dynamic}"
                                       + (_static_axes_note(inputs, names) if dynamic else "")))
        program.model.metadata_props[REPORT_KEY] = rep.to_json(indent=None)
        program.save(str(tmp_file), external_data=external_data)
        if onnx_if.has_placeholders(program):  # the standard form's decode-size Ifs
            onnx_if.splice_file(tmp_file, opset, _torch_onnx_export)
        _check(tmp_file)
        if verify:
            _verify_into_report(tmp_file, model, args, kwargs, hf, inputs, dynamic, rep)
        for produced in Path(tmp).iterdir():  # the model and its external data, if any
            shutil.move(str(produced), str(path.parent / produced.name))
    return path


def _check_export_target(path, moe_op: str) -> Path:
    """The output path as a Path, after refusing a bad moe_op, a folder, a name not ending in .onnx or a missing
    parent folder (before any work)."""
    if moe_op not in MOE_OPS:
        raise MoECompileError(f"export_onnx: moe_op={moe_op!r} is not one of {MOE_OPS}")
    path = Path(path)
    if path.is_dir():
        raise MoECompileError(f"export_onnx: {path} is an existing folder; pass a file path <name>.onnx (inside the "
                              "folder, or elsewhere)")
    if path.suffix != ".onnx":
        raise MoECompileError(f"export_onnx: {path} does not end in .onnx; name the output file <name>.onnx")
    if not path.parent.is_dir():
        raise MoECompileError(f"export_onnx: the directory {path.parent} does not exist; create it first")
    return path


def _lowered_copy(model: nn.Module, moe_op: str) -> tuple[nn.Module, Report]:
    """A structural copy of `model` (sharing its weights: a second copy of a large model may not fit), optimized
    if it was not, with each FusedMoE's ONNX lowering chosen; and the pass log the file will carry."""
    exported = _structural_copy(model).eval()
    if not any(isinstance(m, FusedMoE) for m in exported.modules()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = optimize(exported, inplace=True)  # a new module when the root itself is the block
    fp8_blocks = [m.source_path or "<block>" for m in exported.modules()
                  if isinstance(m, FusedMoE) and fp8.has_fp8(m.weights())]
    if fp8_blocks:
        raise MoECompileError(
            f"export_onnx: {', '.join(fp8_blocks)} hold FP8 expert weights with block scales, which neither ONNX "
            "lowering takes; export a copy whose experts hold dequantized weights (moecompile.fp8.dequantize: "
            "the 16-bit weights the checkpoint was quantized from)")
    known = _report_or_none(exported) or _report_or_none(model)
    rep = copy.deepcopy(known) if known is not None else Report(model_type=type(model).__name__)
    for path_, kind in _choose_lowerings(exported, moe_op, rep).items():
        module = exported.get_submodule(path_)
        module.lowering = onnx_lowering.lowering_for(kind, module.spec, module.weights())
    return exported, rep


def _verify_into_report(tmp_file: Path, model: nn.Module, args, kwargs, hf: bool, inputs, dynamic: bool,
                        rep: Report) -> None:
    """onnxruntime on the written file against the original model in PyTorch (raises over the tolerance); the
    result becomes the log's verify line, in the file's metadata too."""
    verify_start = time.perf_counter()
    was_training = model.training
    try:
        err, lengths, ties, provider = _verify(tmp_file, _Outputs(model.eval(), len(args), list(kwargs), hf),
                                               inputs, dynamic)
    finally:
        model.train(was_training)
    rep.passes.append(PassRun(name="verify_onnxruntime", seconds=time.perf_counter() - verify_start,
                              modified=False, note=f"{provider}: max error {err:.1e} of max |output| at lengths "
                                                   f"{'/'.join(map(str, lengths))}" + (f" ({ties})" if ties else "")))
    _write_report(tmp_file, rep)


REPORT_KEY = "moecompile.pass_log"  # the file's metadata entry holding export_onnx's Report as JSON


def _write_report(path: Path, rep: Report) -> None:
    """Rewrite the file's pass log in place (its external data, if any, is left as it is)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    entry = next(p for p in model.metadata_props if p.key == REPORT_KEY)
    entry.value = rep.to_json(indent=None)
    onnx.save(model, str(path))


def export_report(path: str | Path) -> Report:
    """The pass log export_onnx wrote into the file at `path` (lowering per block, export and verify)."""
    path = Path(path)
    if not path.is_file():
        raise MoECompileError(f"export_report: {path} is not a file; pass the .onnx file export_onnx wrote")
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same way out
        raise MoECompileError(f"export_report: {path} is not an ONNX file onnx can read ({type(exc).__name__}: "
                              f"{exc})") from None
    entry = next((p.value for p in model.metadata_props if p.key == REPORT_KEY), None)
    if entry is None:
        raise MoECompileError(f"export_report: {path} has no moecompile pass log; it was not written by "
                              "moecompile.export_onnx")
    return Report.from_json(entry)


def _report_or_none(model: nn.Module) -> Report | None:
    try:
        return report(model)
    except MoECompileError:
        return None


def _torch_onnx_export(wrapper: nn.Module, inputs: tuple, names: list[str], dynamic_shapes, opset: int):
    """torch.export, then torch.onnx's translation of the exported program; errors name the node and the module
    it came from."""
    translation = {torch.ops.moecompile.ort_moe.default: onnx_lowering.ort_moe_translation,
                   torch.ops.moecompile.experts_if.default: onnx_if.placeholder_translation}
    inputs = tuple(t.clone() for t in inputs)  # a failed torch.export leaves its dynamic marks on the tensors
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(wrapper, inputs, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as exc:
            site = _specialising_code(wrapper, inputs, dynamic_shapes) if "specialized" in str(exc) else ""
            raise MoECompileError(f"export_onnx: torch.export could not trace the model: {site}"
                                  f"{str(exc).strip()[:3000]}. Nothing was written; make the named code traceable "
                                  "by torch.export (sizes of at least 2 on the dynamic axes of example_inputs, no "
                                  "data-dependent Python control flow) or export with dynamic=False (the CLI's "
                                  "--static)") from exc
        onnx_complex.rewrite_complex_unsqueeze(program)
        try:
            return torch.onnx.export(program, inputs, dynamo=True, input_names=names, output_names=["output"],
                                     opset_version=opset, custom_translation_table=translation, verbose=False,
                                     optimize=True, report=False)
        except Exception as exc:
            where = _failed_node(program, exc)
            if "decompose" in str(exc):  # step 2 of 3: re-tracing the program into core ATen ops
                raise MoECompileError(f"export_onnx: torch.onnx could not decompose {where} into the operators it "
                                      "translates (torch.export had traced it). Nothing was written; a newer torch "
                                      "may decompose it (sizes that depend on the data improved from one release to "
                                      "the next), or replace that code in the module. Exporter's message: "
                                      f"{str(exc).strip()[:1500]}") from exc
            raise MoECompileError(f"export_onnx: torch.onnx has no ONNX translation for {where}. Nothing was "
                                  "written; replace that operation in the module, or register a translation "
                                  f"(torch.onnx custom_translation_table). Exporter's message: "
                                  f"{str(exc).strip()[:1500]}") from exc


def _specialising_code(wrapper: nn.Module, inputs: tuple, dynamic_shapes) -> str:
    """Where the model's code fixed a dynamic axis to its example size (torch.export's error does not say): traced
    again, and at the shape guard `Eq(size, constant)` torch logs, the innermost frame of the running Python stack
    outside torch and moecompile (non-strict export runs the model's own Python), or "" if none was seen."""
    import logging
    import os
    import traceback

    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    ours = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)), logging.__file__)
    sites: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            args = record.args if isinstance(record.args, tuple) else ()
            if "[guard added]" in str(record.msg) and len(args) > 1 and re.fullmatch(r"Eq\(s\d+, \d+\)", str(args[1])):
                user = [f for f in traceback.extract_stack() if not f.filename.startswith(ours)]
                if user:
                    sites.append(f"{user[-1].filename}:{user[-1].lineno} in {user[-1].name}: {user[-1].line}")

    handlers, level, propagate = logger.handlers, logger.level, logger.propagate
    logger.handlers, logger.propagate = [Capture()], False  # the capture only: torch's own handler would print
    logger.setLevel(logging.INFO)
    try:
        torch.export.export(wrapper, tuple(t.clone() for t in inputs), dynamic_shapes=dynamic_shapes, strict=False)
    except Exception:
        pass
    finally:
        logger.handlers, logger.propagate = handlers, propagate
        logger.setLevel(level)
    return f"the axis was fixed to its example size at {sites[-1]}. " if sites else ""


def _failed_node(program, exc: Exception) -> str:
    """'node <name> (<target>) in module <path>' for the node the exporter's error names, else 'the model'."""
    match = re.search(r"(?:translating node|While executing) %(\S+)", str(exc))
    if match is None:
        return "an operation of the model"
    node = next((n for n in program.graph.nodes if n.name == match.group(1)), None)
    if node is None:
        return f"node {match.group(1)}"
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else "model"
    path = "<root>" if path == "model" else path.removeprefix("model.")  # the user's model is the wrapper's .model
    return f"node {node.name} ({node.target}) in module {path}"


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx prints its progress to stdout, and its registry warns that torchvision's ops are skipped when
    torchvision is not installed (no MoE model needs them); the pass log says what happened instead."""
    import logging

    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        registry.setLevel(level)


def _check(file: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(file), full_check=True)
    except Exception as exc:
        raise MoECompileError(f"export_onnx: the exported file fails onnx.checker: {exc}. Nothing was written; "
                              "this is a moecompile bug, please report it with the model") from exc


def _random_like(name: str, t: torch.Tensor, length: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    shape = list(t.shape)
    shape[_length_axis(t)] = length
    if "mask" in name:  # an attention mask: every position attended (random ids would not be a mask)
        return torch.ones(shape, dtype=t.dtype)
    if t.is_floating_point():
        return torch.randn(shape, generator=gen).to(t.dtype)
    return torch.randint(0, vocab, shape, generator=gen).to(t.dtype)


def session_providers() -> list[str]:
    """onnxruntime's providers for a session: CUDA first where onnxruntime-gpu and a GPU are there, then the CPU.
    onnxruntime-gpu (1.21 on) finds its CUDA libraries once preload_dlls() has loaded them (those torch's CUDA wheel
    brought); without that the CUDA provider fails to load and the session quietly runs on the CPU."""
    import onnxruntime as ort

    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _verify(file: Path, original: _Outputs, inputs: tuple, dynamic: bool) -> tuple[float, tuple, str, str]:
    """Worst error of onnxruntime against `original` (the user's model, called as the exported wrapper is) on
    random inputs shaped like `inputs`, at the example's length and 5 more, a note ("" or what ties changed), and
    the provider that ran it (CUDA where onnxruntime-gpu and a GPU are there, else the CPU).

    Over the tolerance, PyTorch runs once more with ONNX TopK's tie order (topk_ties.py): if that matches, the
    model's own top-k met exact ties, which onnxruntime breaks by the lower index and torch.topk in its own order;
    the file is kept and the note gives both errors. Otherwise it is an error."""
    import onnxruntime as ort

    providers = session_providers()
    try:
        session = ort.InferenceSession(str(file), providers=providers)
    except Exception as exc:  # e.g. no kernel for an operator in this dtype on this provider
        raise MoECompileError(f"export_onnx verify: onnxruntime ({', '.join(providers)}) cannot load the file: "
                              f"{' '.join(str(exc).split())[:500]}. Nothing was written; export without verify, or "
                              "verify where the runtime has those kernels (bf16 needs onnxruntime-gpu)") from exc
    names = [i.name for i in session.get_inputs()]
    vocab = getattr(getattr(original.model, "config", None), "vocab_size", None)
    vocab = vocab or int(max((t.max().item() for t in inputs if not t.is_floating_point()), default=1)) + 1
    base = inputs[0].shape[_length_axis(inputs[0])]
    lengths = (base, base + 5) if dynamic else (base,)
    tol = VERIFY_TOLERANCE.get(_weights_dtype(original), 1e-4)
    worst, notes, gen = 0.0, [], torch.Generator().manual_seed(0)
    for length in lengths:
        fresh = [_random_like(name, t, length, vocab, gen) for name, t in zip(names, inputs)]
        feeds = {name: t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy()
                 for name, t in zip(names, fresh)}
        got = torch.from_numpy(session.run(None, feeds)[0]).float()
        with torch.no_grad():
            want = original(*fresh).float()
        if got.shape != want.shape:
            raise MoECompileError(f"export_onnx verify: onnxruntime returned shape {tuple(got.shape)}, PyTorch "
                                  f"{tuple(want.shape)} at length {length}. Nothing was written")
        err = _relative_error(got, want)
        if not err <= tol:  # NaN fails too
            with torch.no_grad(), topk_ties.onnx_topk_ties():
                tie_err = _relative_error(got, original(*fresh).float())
            if not tie_err <= tol:
                raise MoECompileError(
                    f"export_onnx verify: onnxruntime differs from PyTorch by {err:.2e} of max |output| at length "
                    f"{length} (tolerance {tol:.0e}; {tie_err:.2e} with ONNX's top-k tie order). Nothing was "
                    "written; export with moe_op='standard' to tell whether the MoE lowering is the cause")
            notes.append(f"at length {length} the model's own top-k met exact ties: {err:.1e} against PyTorch, "
                         f"{tie_err:.1e} with ties broken as ONNX TopK does (lower index first)")
            err = tie_err
        worst = max(worst, err)
    return worst, lengths, "; ".join(notes), session.get_providers()[0]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def _weights_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
