"""The `moecompile` command: optimize a model from a script or a saved HF directory, and inspect pass logs.

Place in the pipeline: the outermost layer; it calls optimize() and renders Report objects.

    moecompile optimize MODEL [--report FILE] [--strict] [--no-verify]
        MODEL is a saved HF directory (config.json + safetensors) or a Python file defining build_model() -> nn.Module
        (the file is executed)
    moecompile inspect REPORT.json [--html PAGE.html]
        the pass log as a table, or as one self-contained HTML page (report_html.py)
    moecompile stats MODEL [--routing relu|topk] [--k K|auto] [--text FILE] [--seq-len N] [--batches N] [--report F]
        routing statistics per MoE layer (experts per token, load) on batches of token ids: a text file (tokenized
        with the checkpoint's tokenizer, else its bytes modulo the vocabulary) or, without --text, random ids; with
        --routing, the first half of the batches calibrates the rewrite and the second half is measured
    moecompile convert HF_DIR --routing relu|topk [--k K|auto] [--calibration TEXT_FILE] --out DIR
        rewrite the routing of a saved checkpoint and save it (checkpoint.py); moecompile.from_pretrained(DIR)
        loads it, plain transformers loads the original architecture
    moecompile export HF_DIR OUT.onnx [--moe-op auto|standard|ort] [--verify] [--static]
        export to ONNX (backends/onnx.py): the MoE blocks as com.microsoft.MoE or standard operators
    moecompile shard HF_DIR --out DIR [--overwrite]
        optimize a saved checkpoint and write it for expert parallelism (ep_checkpoint.py): each rank then loads only
        its experts with moecompile.load_expert_parallel(DIR)
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import warnings
from pathlib import Path

from torch import nn

from .errors import MoECompileError


def load_model(source: str, verify: bool = True) -> nn.Module:
    """A model from a saved HF directory (loaded fused, with any recorded routing rewrite applied) or a Python
    script defining build_model() (not optimized yet)."""
    path = Path(source)
    if not path.exists():
        raise MoECompileError(f"{source}: no such file or directory; pass a saved HF model directory or a .py file "
                              "that defines build_model()")
    if path.is_dir():
        from .checkpoint import from_pretrained

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return from_pretrained(path, verify=verify)  # fused, with any routing rewrite its config records
    if path.suffix == ".py":
        namespace = runpy.run_path(str(path), run_name="moecompile_model_script")
        build = namespace.get("build_model")
        if not callable(build):
            raise MoECompileError(f"{source}: the script defines no build_model() function; add "
                                  "`def build_model(): return model` returning a torch.nn.Module")
        model = build()
        if not isinstance(model, nn.Module):
            raise MoECompileError(f"{source}: build_model() returned {type(model).__name__}, not a torch.nn.Module")
        return model
    raise MoECompileError(f"{source}: not a directory or a .py file; pass a saved HF model directory or a script")


def _cmd_optimize(args) -> int:
    from .pipeline import optimize, quantize_experts, report

    model = load_model(args.model, verify=not args.no_verify)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = model if _is_optimized(model) else optimize(model, verify=not args.no_verify, strict=args.strict)
        if args.expert_weights:
            quantize_experts(optimized, args.expert_weights)
    rep = report(optimized)
    if args.strict and rep.left:
        raise MoECompileError(f"--strict: {len(rep.left)} MoE block(s) left alone; see the log above")
    print(rep.table())
    if args.report:
        rep.save(args.report)
        print(f"report written to {args.report}")
    return 0


def _cmd_inspect(args) -> int:
    from .passes.log import Report

    path = Path(args.report)
    if path.is_dir():
        raise MoECompileError(f"{path}: a folder, not a report file; pass the JSON file `moecompile optimize MODEL "
                              "--report FILE` wrote")
    try:
        rep = Report.from_json(path.read_text())
    except FileNotFoundError:
        raise MoECompileError(f"{path}: no such report file; write one with `moecompile optimize MODEL --report "
                              f"{path}`") from None
    except UnicodeDecodeError:
        raise MoECompileError(f"{path}: a binary file, not a moecompile report (JSON text written by `moecompile "
                              "optimize --report`)") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise MoECompileError(f"{path}: not a moecompile report ({type(exc).__name__}: {exc}); reports are written "
                              "by `moecompile optimize --report` or Report.save()") from None
    if args.html:
        from .report_html import write

        target = Path(args.html)
        if target.is_dir() or not target.parent.is_dir():
            raise MoECompileError(f"--html {target}: pass a file path in an existing folder (e.g. report.html)")
        write(rep, target)
        print(f"pass log page written to {target}")
    else:
        print(rep.table())
    return 0


def _is_optimized(model: nn.Module) -> bool:
    from .pipeline import report

    try:
        report(model)
        return True
    except MoECompileError:
        return False


def _parse_k(k: str | None):
    if k in (None, "auto"):
        return k
    if not k.isdigit():
        raise MoECompileError(f"--k {k!r}: pass an integer number of experts or 'auto'")
    return int(k)


def _cmd_stats(args) -> int:
    from .calibration_text import random_batches, text_batches, vocab_size_of
    from .pipeline import optimize, report, rewrite_routing
    from .stats import format_stats, routing_stats

    if args.batches < (2 if args.routing else 1) or args.seq_len < 1:
        raise MoECompileError("--batches must be >= 1 (>= 2 with --routing) and --seq-len >= 1")
    k = _parse_k(args.k)
    model = load_model(args.model)
    vocab = vocab_size_of(getattr(model, "config", None))
    tokenizer_dir = args.model if Path(args.model).is_dir() else None
    batches, source = (random_batches(vocab, args.seq_len, args.batches) if args.text is None else
                       text_batches(args.text, vocab, args.seq_len, args.batches, tokenizer_dir))
    if args.routing and len(batches) < 2:
        raise MoECompileError(f"{args.text}: one sequence of {args.seq_len} tokens; --routing needs two (one to "
                              "calibrate, one to measure): pass a longer file or a smaller --seq-len")
    half = len(batches) // 2 if args.routing else 0
    options = {} if not args.routing else dict(routing=args.routing, calibration=batches[:half],
                                                **({"k": k} if k is not None else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not _is_optimized(model):
            model = optimize(model, **options)
        elif options:
            model, _ = rewrite_routing(model, **options)
    if args.routing:
        print(report(model).table())
    measured = batches[half:]
    print(f"routing statistics on {len(measured)} batches x {args.seq_len} tokens ({source}):")
    stats = routing_stats(model, measured)
    print(format_stats(stats))
    if args.report:
        rep = report(model)
        rep.layer_stats = [s.to_dict() for s in stats]
        rep.save(args.report)
        print(f"report with the statistics written to {args.report} (`moecompile inspect {args.report} --html "
              "page.html` draws them)")
    return 0


def _cmd_convert(args) -> int:
    from .checkpoint import convert

    rep = convert(args.model, args.out, args.routing, k=_parse_k(args.k), calibration=args.calibration,
                  seq_len=args.seq_len, batches=args.batches, overwrite=args.overwrite, verify=not args.no_verify)
    print(rep.table())
    print(f"written to {args.out}; load it with moecompile.from_pretrained({str(args.out)!r})")
    return 0


def _cmd_export(args) -> int:
    import torch

    from .backends.onnx import export_onnx, export_report

    if Path(args.model).is_file():  # before load_model: a script would be run only to be refused
        raise MoECompileError(f"{args.model}: export from the command line takes a saved HF model directory (its "
                              "config names the vocabulary); the script was not run. For other models call "
                              "moecompile.export_onnx(model, path, example_inputs)")
    model = load_model(args.model)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise MoECompileError(f"{args.model}: export from the command line takes a saved HF model directory (its "
                              "config names the vocabulary); for other models call moecompile.export_onnx(model, "
                              "path, example_inputs)")
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    out = export_onnx(model, args.out, {"input_ids": ids}, dynamic=not args.static, moe_op=args.moe_op,
                      verify=args.verify)
    print(export_report(out).table())
    print(f"written to {out}")
    return 0


def _cmd_shard(args) -> int:
    from .ep_checkpoint import save_for_expert_parallel
    from .pipeline import report

    if not Path(args.model).is_dir():
        raise MoECompileError(f"{args.model}: shard takes a saved HF model directory (config.json + safetensors)")
    model = load_model(args.model)  # fused (every block confirmed) by from_pretrained
    out = save_for_expert_parallel(model, args.out, overwrite=args.overwrite)
    print(report(model).table())
    print(f"written to {out}; on every rank: moecompile.load_expert_parallel({str(out)!r}) after "
          "torch.distributed.init_process_group")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moecompile",
                                     description="Find, describe and fuse the MoE blocks of a model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("optimize", help="optimize a model and print its pass log")
    p.add_argument("model", help="a saved HF model directory, or a .py file defining build_model(); the file is "
                   "executed as Python, so pass only scripts you trust")
    p.add_argument("--report", help="write the pass log (JSON) to this file")
    p.add_argument("--strict", action="store_true", help="fail if any MoE block is left alone")
    p.add_argument("--no-verify", action="store_true", help="skip confirming replacements against the originals")
    p.add_argument("--expert-weights", choices=["fp8"], help="store the fused blocks' experts in FP8 (128 x 128 block "
                   "scales); this changes what the model computes, and the log gives each block's output error")
    p.set_defaults(func=_cmd_optimize)
    p = sub.add_parser("inspect", help="print a pass log written by `optimize --report` (or `stats --report`)")
    p.add_argument("report", help="a report JSON file")
    p.add_argument("--html", help="write the pass log as one self-contained HTML page (blocks, routing plots) here")
    p.set_defaults(func=_cmd_inspect)
    p = sub.add_parser("stats", help="routing statistics per MoE layer on token batches")
    p.add_argument("model", help="a saved HF model directory, or a .py file defining build_model() (executed as "
                   "Python: pass only scripts you trust)")
    p.add_argument("--routing", choices=["relu", "topk"], help="rewrite the routing first (calibrated on half the "
                   "batches)")
    p.add_argument("--k", help="k for --routing topk: an integer or 'auto'")
    p.add_argument("--text", help="a text file whose bytes (modulo the vocabulary) are the token ids")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--report", help="write the pass log with these statistics (JSON) to this file")
    p.set_defaults(func=_cmd_stats)
    p = sub.add_parser("convert", help="rewrite a saved HF checkpoint's routing and save it (safetensors)")
    p.add_argument("model", help="a saved HF model directory (for --routing topk: one converted to relu)")
    p.add_argument("--routing", choices=["relu", "topk"], required=True)
    p.add_argument("--k", help="k for --routing topk: an integer or 'auto' (needs --calibration)")
    p.add_argument("--calibration", help="a text file to calibrate on (the checkpoint's tokenizer, else its bytes)")
    p.add_argument("--out", required=True, help="the directory to write (must not exist or be empty)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--batches", type=int, default=16, help="at most this many calibration sequences")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the written checkpoint to check it")
    p.set_defaults(func=_cmd_convert)
    p = sub.add_parser("export", help="export a saved HF model to ONNX (optimized on the way)")
    p.add_argument("model", help="a saved HF model directory")
    p.add_argument("out", help="the .onnx file to write (weights over 2 GB go to OUT.data beside it)")
    p.add_argument("--moe-op", choices=["auto", "standard", "ort"], default="auto",
                   help="the MoE blocks' ONNX form: com.microsoft.MoE where it applies (auto), standard operators, "
                        "or the contrib operator everywhere (ort)")
    p.add_argument("--verify", action="store_true", help="run the file in onnxruntime against PyTorch at two "
                   "sequence lengths; a mismatch is an error and nothing is written")
    p.add_argument("--static", action="store_true", help="fixed batch and sequence axes")
    p.add_argument("--batch", type=int, default=2, help="batch size of the example input")
    p.add_argument("--seq-len", type=int, default=16, help="sequence length of the example input")
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("shard", help="write a saved HF checkpoint, optimized, for expert parallelism (each rank then "
                       "reads only its experts)")
    p.add_argument("model", help="a saved HF model directory")
    p.add_argument("--out", required=True, help="the directory to write (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_cmd_shard)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MoECompileError as exc:
        print(f"moecompile: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only, permissions: what the OS refused, on one line
        from .outdir import describe_os_error

        print(f"moecompile: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
