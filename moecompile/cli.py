"""The `moecompile` command: optimize a model from a script or a saved HF directory, and inspect pass logs.

Place in the pipeline: the outermost layer; it calls optimize() and renders Report objects.

    moecompile optimize MODEL [--report FILE] [--strict] [--no-verify]
        MODEL is a saved HF directory (config.json + safetensors) or a Python file defining build_model() -> nn.Module
    moecompile inspect REPORT.json
    moecompile stats MODEL [--routing relu|topk] [--k K|auto] [--text FILE] [--seq-len N] [--batches N]
        routing statistics per MoE layer (experts per token, load) on batches of token ids: bytes of a text file
        (modulo the vocabulary) or, without --text, random ids; with --routing, the first half of the batches
        calibrates the rewrite and the second half is measured
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


def load_model(source: str) -> nn.Module:
    """A model from a saved HF directory or a Python script defining build_model()."""
    path = Path(source)
    if not path.exists():
        raise MoECompileError(f"{source}: no such file or directory; pass a saved HF model directory or a .py file "
                              "that defines build_model()")
    if path.is_dir():
        return _load_hf_dir(path)
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


def _load_hf_dir(path: Path) -> nn.Module:
    if not (path / "config.json").is_file():
        raise MoECompileError(f"{path}: no config.json; this is not a saved HF model directory "
                              "(save one with model.save_pretrained(DIR))")
    try:
        import transformers
    except ImportError:
        raise MoECompileError("loading an HF directory needs transformers: pip install 'moecompile[hf]'") from None
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise MoECompileError(f"{path}/config.json could not be read: {type(exc).__name__}: {exc}") from None
    errors = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            return auto.from_pretrained(path, config=config).eval()
        except Exception as exc:  # noqa: BLE001 - try the next auto class, then report both
            errors.append(f"{auto.__name__}: {type(exc).__name__}: {str(exc)[:300]}")
    raise MoECompileError(f"{path}: the checkpoint could not be loaded ({'; '.join(errors)}); check that its weight "
                          "files are complete safetensors matching config.json")


def _cmd_optimize(args) -> int:
    from .backends.eager import optimize, report

    model = load_model(args.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = optimize(model, verify=not args.no_verify, strict=args.strict)
    rep = report(optimized)
    print(rep.table())
    if args.report:
        rep.save(args.report)
        print(f"report written to {args.report}")
    return 0


def _cmd_inspect(args) -> int:
    from .passes.log import Report

    path = Path(args.report)
    try:
        rep = Report.from_json(path.read_text())
    except FileNotFoundError:
        raise MoECompileError(f"{path}: no such report file; write one with `moecompile optimize MODEL --report "
                              f"{path}`") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MoECompileError(f"{path}: not a moecompile report ({type(exc).__name__}: {exc}); reports are written "
                              "by `moecompile optimize --report` or Report.save()") from None
    print(rep.table())
    return 0


def _token_batches(model: nn.Module, text: str | None, seq_len: int, count: int) -> tuple[list, str]:
    import torch

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise MoECompileError("stats needs a model with config.vocab_size (an HF causal LM) to build token batches")
    if text is not None:
        try:
            data = Path(text).read_bytes()
        except FileNotFoundError:
            raise MoECompileError(f"{text}: no such text file; pass --text FILE with some text, or leave it out to "
                                  "measure on random token ids") from None
        ids = torch.tensor(list(data), dtype=torch.long) % vocab
        if ids.numel() < seq_len * count:
            raise MoECompileError(f"{text}: {ids.numel()} bytes, fewer than --batches x --seq-len = "
                                  f"{seq_len * count}; pass a longer file or smaller numbers")
        return [ids[i * seq_len:(i + 1) * seq_len][None] for i in range(count)], f"bytes of {text}"
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, seq_len), generator=gen) for _ in range(count)], "random token ids (seed 0)"


def _cmd_stats(args) -> int:
    from .backends.eager import optimize, report
    from .stats import format_stats, routing_stats

    if args.batches < (2 if args.routing else 1) or args.seq_len < 1:
        raise MoECompileError("--batches must be >= 1 (>= 2 with --routing) and --seq-len >= 1")
    model = load_model(args.model)
    batches, source = _token_batches(model, args.text, args.seq_len, args.batches)
    options = {}
    measured = batches
    if args.routing:
        half = len(batches) // 2
        k = args.k
        if k not in (None, "auto"):
            if not k.isdigit():
                raise MoECompileError(f"--k {k!r}: pass an integer number of experts or 'auto'")
            k = int(k)
        options = dict(routing=args.routing, calibration=batches[:half], **({"k": k} if k is not None else {}))
        measured = batches[half:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = optimize(model, **options)
    if args.routing:
        print(report(optimized).table())
    print(f"routing statistics on {len(measured)} batches x {args.seq_len} tokens ({source}):")
    print(format_stats(routing_stats(optimized, measured)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moecompile", description="Find, describe and fuse the MoE blocks of a model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("optimize", help="optimize a model and print its pass log")
    p.add_argument("model", help="a saved HF model directory, or a .py file defining build_model()")
    p.add_argument("--report", help="write the pass log (JSON) to this file")
    p.add_argument("--strict", action="store_true", help="fail if any MoE block is left alone")
    p.add_argument("--no-verify", action="store_true", help="skip confirming replacements against the originals")
    p.set_defaults(func=_cmd_optimize)
    p = sub.add_parser("inspect", help="print a pass log written by `optimize --report`")
    p.add_argument("report", help="a report JSON file")
    p.set_defaults(func=_cmd_inspect)
    p = sub.add_parser("stats", help="routing statistics per MoE layer on token batches")
    p.add_argument("model", help="a saved HF model directory, or a .py file defining build_model()")
    p.add_argument("--routing", choices=["relu", "topk"], help="rewrite the routing first (calibrated on half the "
                   "batches)")
    p.add_argument("--k", help="k for --routing topk: an integer or 'auto'")
    p.add_argument("--text", help="a text file whose bytes (modulo the vocabulary) are the token ids")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batches", type=int, default=8)
    p.set_defaults(func=_cmd_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MoECompileError as exc:
        print(f"moecompile: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
