"""Autotuning of the fused kernels' tiles for a user's layer shapes: `python -m moecompile.tune --shape ...`.

Place in the pipeline: beside the kernels, run once per GPU and model shape like the tuned tables serving engines
ship. For each shape and token count it times the block's launches (router, dispatch, both expert GEMMs, combine;
kernels/launch.forward) with each candidate tile set, and with torch._grouped_mm for the expert GEMMs where that
applies; a candidate whose output is not within the dtype's tolerance of the PyTorch reference is rejected (never
timed into the table). The fastest is written to the device's table (kernels/configs.tuned_path: one JSON file per
GPU name under $MOECOMPILE_TUNED_DIR or ~/.cache/moecompile/tuned) when it beats the untuned choice by more than the
noise margin; kernels/configs.choose reads that table first, for token counts within 2x of a tuned one.

    python -m moecompile.tune --shape qwen3_30b_a3b --tokens 1 128 1024 4096
    python -m moecompile.tune --model path/to/checkpoint            # the shape from its config.json
    python -m moecompile.tune --shape H=4096,I=1536,E=128,k=8 --out my_table.json

Only top-k routing's tiles are tuned (ReLU routing's rows vary per call); tables are per GPU, not per dtype (tune
with the dtype you serve in: bf16 and fp16 share tiles, fp32 derives its own from them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch

from . import __version__
from .kernels import configs, grouped, launch
from .kernels.settings import configured
from .reference import reference_forward
from .spec import MLPSpec, MoESpec, MoEWeights, RouterSpec

PRESETS = {  # name: (hidden H, expert intermediate I, experts E, top-k k) of the public checkpoints' MoE layers
    "mixtral_8x7b": (4096, 14336, 8, 2),
    "mixtral_8x22b": (6144, 16384, 8, 2),
    "qwen3_30b_a3b": (2048, 768, 128, 8),
    "qwen3_235b_a22b": (4096, 1536, 128, 8),
    "olmoe": (2048, 1024, 64, 8),
    "deepseek_v3": (7168, 2048, 256, 8),
    "gpt_oss_20b": (2880, 2880, 32, 4),
}
DEFAULT_TOKENS = (1, 16, 128, 1024, 4096, 16384)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# normwise relative error against the float64 reference that a candidate's output must keep (the kernel tests' bar)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
NOISE = 0.03  # a tuned entry must beat the untuned choice by more than this fraction of its time


class TuneError(ValueError):
    """A request the tuner cannot run (unknown shape, no GPU, unreadable model config); the message says why."""


@dataclass(frozen=True)
class LayerShape:
    name: str
    H: int
    I: int
    E: int
    k: int

    def spec(self) -> MoESpec:
        return MoESpec(router=RouterSpec(num_experts=self.E, top_k=self.k),
                       experts=MLPSpec(hidden_size=self.H, intermediate_size=self.I))


def parse_shape(text: str) -> LayerShape:
    """A preset name (PRESETS) or "H=..,I=..,E=..,k=..", each a positive integer, k <= E."""
    if text in PRESETS:
        return LayerShape(text, *PRESETS[text])
    fields: dict[str, int] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in ("H", "I", "E", "k") or not value.strip().isdigit() or int(value) < 1:
            raise TuneError(f"--shape {text!r}: give a preset ({', '.join(PRESETS)}) or H=..,I=..,E=..,k=.. with "
                            f"positive integers (e.g. H=2048,I=768,E=128,k=8)")
        fields[name.strip()] = int(value)
    if set(fields) != {"H", "I", "E", "k"} or fields["k"] > fields["E"]:
        raise TuneError(f"--shape {text!r}: all of H, I, E and k are needed, with k <= E")
    return LayerShape(text, fields["H"], fields["I"], fields["E"], fields["k"])


def shape_from_config(path: Path) -> LayerShape:
    """The MoE layer shape a transformers checkpoint's config.json (or the file itself) describes."""
    file = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise TuneError(f"--model {path}: cannot read {file} ({exc}); give a checkpoint folder with a config.json "
                        f"or the file itself") from None
    config = config.get("text_config") or config  # multimodal configs keep the language model's inside

    def first(*keys):
        return next((config[key] for key in keys if isinstance(config.get(key), int)), None)

    H = first("hidden_size")
    I = first("moe_intermediate_size", "intermediate_size")
    E = first("n_routed_experts", "num_local_experts", "num_experts")
    k = first("num_experts_per_tok", "experts_per_token", "moe_topk")
    if None in (H, I, E, k):
        raise TuneError(f"--model {path}: {file} names no MoE layer (hidden_size, moe_intermediate_size or "
                        f"intermediate_size, the number of experts and experts per token); give --shape instead")
    return LayerShape(config.get("model_type", path.name), H, I, E, k)


def candidates(tokens: int, shape: LayerShape, sm_count: int) -> list[configs.MoEConfig]:
    """Tile sets around the heuristic's regime: its row block and the ones beside it, each with a few column and
    reduction tiles, warps and stages (the space engines' tuned tables come from), plus down-GEMM K splits where
    few row blocks leave the machine idle."""
    G = configs.GemmConfig
    blocks = (16, 32, 64, 128)
    regime = blocks.index(configs.row_block(tokens, shape.k, shape.E))
    out: list[configs.MoEConfig] = []
    for BM in blocks[max(0, regime - 1):regime + 2]:
        group = 1 if BM == 16 else 4 if BM == 32 else 8 if BM == 64 else 16
        warps = 8 if BM == 128 else 4
        for BN_up, BN_down, BK, stages in ((64, 64, 128, 4), (64, 128, 64, 4), (128, 128, 64, 3),
                                           (128, 256, 64, 3), (64, 128, 128, 3)):
            up = G(BM, BN_up, BK, group, warps, stages)
            for split in (1, 2, 4) if BM <= 32 else (1,):
                if split == 1 or shape.I // (BK * split) >= 2:  # each K split keeps two steps or more
                    out.append(configs.MoEConfig(up, G(BM, BN_down, BK, group, warps, stages, split), False))
    heuristic = configs.heuristic(tokens, shape.H, shape.I, shape.E, min(shape.k, 8), sm_count)
    return list(dict.fromkeys([configs.MoEConfig(heuristic.up, heuristic.down, False), *out]))


@dataclass
class RowResult:
    shape: LayerShape
    tokens: int
    untuned_ms: float
    best: configs.MoEConfig | None = None  # None: the untuned choice stays
    best_ms: float | None = None
    tried: int = 0
    rejected: list[str] = field(default_factory=list)  # "tiles: why"
    out_of_time: bool = False

    def row(self) -> str:
        if self.best is None:
            verdict = "untuned choice kept"
        elif self.best.grouped_mm:
            verdict = "grouped_mm"
        else:
            verdict = f"up {self.best.up.BM}x{self.best.up.BN}x{self.best.up.BK} down BN {self.best.down.BN} " \
                      f"split {self.best.down.split_k}"
        best = "" if self.best_ms is None else f" -> {self.best_ms:.3f} ms"
        more = " (stopped at the time budget)" if self.out_of_time else ""
        why = "".join(f"\n{'':>18}rejected {r}" for r in self.rejected[:3])  # a wrong output is a kernel bug
        return (f"{self.shape.name:>16} T={self.tokens:<6} untuned {self.untuned_ms:.3f} ms{best}: {verdict}; "
                f"{self.tried} tried, {len(self.rejected)} rejected{more}{why}")


def random_block(shape: LayerShape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> MoEWeights:
    """Weights scaled so each layer's output is O(1) (what the accuracy check needs); the tiles do not care."""
    gen = torch.Generator(device=device).manual_seed(seed)
    E, H, I = shape.E, shape.H, shape.I

    def rnd(*dims, scale):
        return (torch.randn(*dims, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    return MoEWeights(router_weight=rnd(E, H, scale=H ** -0.5), w1=rnd(E, 2 * I, H, scale=H ** -0.5),
                      w2=rnd(E, H, I, scale=I ** -0.5))


def _time_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    fn()  # the interpreter: one run after a warm-up, for the mechanics, not the speed
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (y.double() - ref).norm()
    return float(diff / ref.norm().clamp(min=1e-30))


def tune_row(shape: LayerShape, tokens: int, weights: MoEWeights, dtype: torch.dtype, device: torch.device,
             deadline: float, max_candidates: int | None = None) -> RowResult:
    """Time the untuned choice and each candidate at this token count; the best one that is within tolerance."""
    spec = shape.spec()
    gen = torch.Generator(device=device).manual_seed(tokens)
    x = torch.randn(tokens, shape.H, generator=gen, device=device, dtype=torch.float32).to(dtype)
    with torch.no_grad():
        upcast = MoEWeights(**{n: None if t is None else t.double() for n, t in weights.items()})
        ref, _ = reference_forward(spec, upcast, x.double())

    def run(cfg: configs.MoEConfig | None) -> float:
        """ms of the block's launches with these tiles (None: the untuned choice); ValueError if it is wrong."""
        with configured(moe_config=cfg), torch.no_grad():
            y = launch.forward(spec, weights, x, tokens)[0]
            err = _relative_error(y, ref)
            if not err <= TOLERANCE[dtype]:  # NaN fails too
                raise ValueError(f"output relative error {err:.2e} > {TOLERANCE[dtype]:.0e}")
            return _time_ms(lambda: launch.forward(spec, weights, x, tokens), device)

    sm_count = configs.sm_count_of(device)
    result = RowResult(shape, tokens, run(None))
    trials = candidates(tokens, shape, sm_count)[:max_candidates]
    if grouped.unsupported_reason(spec, weights, x) is None:  # the untuned tiles, experts on grouped_mm
        untuned = configs.untuned_choice(tokens, shape.H, shape.I, shape.E, min(shape.k, 8), device)
        trials.append(configs.MoEConfig(untuned.up, untuned.down, True))
    best_ms = result.untuned_ms * (1 - NOISE)
    for cfg in trials:
        if time.monotonic() > deadline:
            result.out_of_time = True
            break
        result.tried += 1
        try:
            ms = run(cfg)
        except Exception as exc:  # a tile set this GPU cannot compile (shared memory) or one that computes wrong
            result.rejected.append(f"{configs.entry_of(cfg)}: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        if ms < best_ms:
            result.best, result.best_ms, best_ms = cfg, ms, ms
    return result


def write_table(path: Path, results: list[RowResult], dtype: torch.dtype, device: torch.device) -> None:
    """Merge the results into the table at `path` (other shapes' entries kept; an entry whose row was tuned again
    and lost to the untuned choice is removed), written atomically."""
    configs.TileTable.load(path)  # a malformed table is an error, not overwritten
    entries = json.loads(path.read_text())["entries"] if path.exists() else {}
    for r in results:
        key = configs.table_key(r.tokens, r.shape.H, r.shape.I, r.shape.E, min(r.shape.k, 8))
        entries.pop(key, None)
        if r.best is not None:
            entries[key] = {**configs.entry_of(r.best), "ms": round(r.best_ms, 5), "untuned_ms": round(r.untuned_ms, 5)}
    import triton

    data = {"format": configs.TileTable.FORMAT, "device": configs.device_name(device),
            "dtype": str(dtype).removeprefix("torch."), "written": date.today().isoformat(),
            "versions": {"moecompile": __version__, "torch": torch.__version__, "triton": triton.__version__},
            "entries": dict(sorted(entries.items()))}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    configs.forget_user_tables()  # this process reads the new table on its next call


def _check_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TuneError("the tuner times the Triton kernels on a CUDA GPU and none is visible "
                        "(torch.cuda.is_available() is False); for a dry run under the Triton interpreter, set "
                        "TRITON_INTERPRET=1 and pass --device cpu")
    if device.type == "cpu" and not launch.INTERPRETED:
        raise TuneError("--device cpu runs the kernels under the Triton interpreter: set TRITON_INTERPRET=1 "
                        "before starting Python")
    if device.type not in ("cuda", "cpu"):
        raise TuneError(f"--device {name}: the kernels run on cuda (or cpu under the Triton interpreter)")
    return device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moecompile.tune", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", default=[],
                        help=f"a preset ({', '.join(PRESETS)}) or H=..,I=..,E=..,k=..; repeat for several")
    parser.add_argument("--model", action="append", default=[], type=Path,
                        help="a transformers checkpoint folder (or its config.json): its MoE layer's shape")
    parser.add_argument("--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS),
                        help=f"token counts per call to tune (default {' '.join(map(str, DEFAULT_TOKENS))})")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu under TRITON_INTERPRET=1")
    parser.add_argument("--out", type=Path, help="the table to write (default: the one the kernels read for this "
                                                 "GPU, under $MOECOMPILE_TUNED_DIR or ~/.cache/moecompile/tuned)")
    parser.add_argument("--budget-s", type=float, default=1800.0, help="stop trying candidates after this long")
    parser.add_argument("--max-candidates", type=int, help="try at most this many tile sets a row")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        shapes = [parse_shape(s) for s in args.shape] + [shape_from_config(p) for p in args.model]
        if not shapes:
            raise TuneError("name at least one --shape or --model")
        if any(t < 1 for t in args.tokens):
            raise TuneError("--tokens: token counts are positive")
        device = _check_device(args.device)
        out = args.out or configs.tuned_path(device)
        configs.TileTable.load(out)  # refuse a malformed table before measuring anything
    except (TuneError, configs.TileTableError) as exc:
        print(f"moecompile.tune: error: {exc}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    deadline = time.monotonic() + args.budget_s
    results = []
    for shape in shapes:
        weights = random_block(shape, dtype, device)
        for tokens in args.tokens:
            results.append(tune_row(shape, tokens, weights, dtype, device, deadline, args.max_candidates))
            print(results[-1].row(), flush=True)
        del weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_table(out, results, dtype, device)
    gains = [r.untuned_ms / r.best_ms for r in results if r.best_ms]
    summary = f", geomean {statistics.geometric_mean(gains):.2f}x over the untuned choice where tuned" if gains else ""
    print(f"wrote {out}: {sum(r.best is not None for r in results)} of {len(results)} rows tuned{summary}. "
          f"The kernels read it for {configs.device_name(device)} from the next call on "
          f"(another process: at its first call).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
