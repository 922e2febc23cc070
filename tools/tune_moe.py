"""Tile sweep for the expert GEMMs at the benchmark shapes: times FusedMoE with each candidate config and writes the
best per (tokens, shape) as a table in the format of moecompile/kernels/hopper_table.json.

Run on the device: `python tools/tune_moe.py --shapes mixtral_8x7b --tokens 4096 --out DIR`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the benchmarks' model builders

import torch
import triton.testing
from moe_layer import SHAPES, hf_block, twin

from moecompile.kernels import configs

G = configs.GemmConfig
CANDIDATES = [
    (G(128, 128, 64, 16, 8, 4), G(128, 256, 64, 16, 8, 3)),
    (G(128, 128, 64, 8, 8, 3), G(128, 128, 64, 8, 8, 3)),
    (G(128, 64, 64, 8, 4, 4), G(128, 128, 64, 8, 4, 4)),
    (G(128, 64, 64, 8, 8, 4), G(128, 128, 64, 8, 8, 4)),
    (G(64, 128, 64, 8, 4, 4), G(64, 128, 64, 8, 4, 4)),
    (G(64, 64, 64, 8, 4, 4), G(64, 128, 64, 8, 4, 4)),
    (G(64, 128, 64, 16, 4, 3), G(64, 256, 64, 16, 8, 3)),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="*", default=["mixtral_8x7b"])
    parser.add_argument("--tokens", nargs="*", type=int, default=[4096])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    out_path = Path(args.out, "hopper_table.json")
    table = json.loads(configs.TABLE_PATH.read_text()) if configs.TABLE_PATH.exists() else {}  # kept, updated
    real_choose = configs.choose
    for name in args.shapes:
        cfg = SHAPES[name]
        block, _ = hf_block(cfg["family"], cfg["H"], cfg["I"], cfg["E"], cfg["k"])
        fused = twin(block, cfg["family"], cfg["H"], cfg["I"], cfg["E"], cfg["k"], cfg.get("relu", False))
        for T in args.tokens:
            x = torch.randn(T, cfg["H"], device="cuda", dtype=torch.bfloat16)
            results = []
            for up, down in [(None, None), *CANDIDATES]:
                if up is None:  # the heuristic alone, not the table being rewritten
                    configs.choose = lambda T_, H_, I_, E_, S_, dev: configs.heuristic(
                        T_, H_, I_, E_, S_, configs.sm_count_of(dev))
                else:
                    configs.choose = lambda *a, up=up, down=down, **k: configs.MoEConfig(up, down)
                try:
                    with torch.no_grad():
                        fused(x)
                        ms = triton.testing.do_bench(lambda: fused(x), warmup=10, rep=50, return_mode="median")
                except Exception as exc:
                    print(name, T, up, "failed", type(exc).__name__, str(exc)[:120])
                    continue
                results.append((ms, up, down))
                print(name, T, "heuristic" if up is None else (up, down), f"{ms:.3f} ms", flush=True)
            configs.choose = real_choose
            ms, up, down = min(results, key=lambda r: r[0])
            key = configs.table_key(T, cfg["H"], cfg["I"], cfg["E"], min(cfg["k"], 8))
            table.pop(key, None)  # the heuristic won: no entry
            if up is not None:
                table[key] = dict(up=up.to_dict(), down=down.to_dict(), ms=ms)
        del block, fused
        torch.cuda.empty_cache()
    out_path.write_text(json.dumps(table, indent=1))
    print(json.dumps(table))


if __name__ == "__main__":
    main()
