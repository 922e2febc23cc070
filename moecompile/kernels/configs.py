"""Tile sizes for the expert GEMMs: a table measured on Hopper for the benchmark shapes, a heuristic elsewhere.

Place in the pipeline: kernels/launch.py asks `choose(...)` once per call (a dict lookup); the choice depends only on
shapes, so it is the same on every call with the same shapes and inside CUDA graphs. The table is written by
`tools/tune_moe.py` on the device and committed as `hopper_table.json` beside this file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).with_name("hopper_table.json")


@dataclass(frozen=True)
class GemmConfig:
    """One GEMM's tiles: BM rows (the dispatch padding), BN columns, BK reduction step, GROUP_M row blocks that
    share weight tiles in L2, warps and pipeline stages, and K splits (down GEMM only; partial sums add atomically)."""

    BM: int
    BN: int
    BK: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1

    def to_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass(frozen=True)
class MoEConfig:
    """Both GEMMs walk the same dispatch layout, so they share its row block BM."""

    up: GemmConfig
    down: GemmConfig

    def __post_init__(self) -> None:
        if self.up.BM != self.down.BM:
            raise ValueError(f"up and down GEMMs must share BM (the dispatch padding): {self.up.BM} != {self.down.BM}")


def rows_per_expert(tokens: int, slots: int, num_experts: int) -> float:
    """Average rows an active expert gets: the pairs over the experts they can touch."""
    pairs = tokens * slots
    return pairs / max(1, min(num_experts, pairs))


def table_key(tokens: int, hidden: int, inter: int, num_experts: int, slots: int) -> str:
    return f"T{tokens}_H{hidden}_I{inter}_E{num_experts}_S{slots}"


@lru_cache(maxsize=1)
def _table() -> dict[str, dict]:
    if not TABLE_PATH.exists():
        return {}
    return json.loads(TABLE_PATH.read_text())


def row_block(tokens: int, slots: int, num_experts: int) -> int:
    """The heuristic's row block (its tile regime) for this many rows an expert."""
    rows = rows_per_expert(tokens, slots, num_experts)
    return 16 if rows <= 16 else 32 if rows <= 48 else 64 if rows <= 192 else 128


def heuristic(tokens: int, hidden: int, inter: int, num_experts: int, slots: int, sm_count: int) -> MoEConfig:
    BM = row_block(tokens, slots, num_experts)
    if BM == 16:  # decode: one row block per active expert, so each expert's weights stream once
        up = GemmConfig(BM=16, BN=64, BK=128, GROUP_M=1, num_warps=4, num_stages=4)
        down = GemmConfig(BM=16, BN=64, BK=128, GROUP_M=1, num_warps=4, num_stages=4)
    elif BM == 32:
        up = GemmConfig(BM=32, BN=64, BK=128, GROUP_M=4, num_warps=4, num_stages=4)
        down = GemmConfig(BM=32, BN=64, BK=128, GROUP_M=4, num_warps=4, num_stages=4)
    elif BM == 64:
        up = GemmConfig(BM=64, BN=64, BK=64, GROUP_M=8, num_warps=4, num_stages=4)
        down = GemmConfig(BM=64, BN=128, BK=64, GROUP_M=8, num_warps=4, num_stages=4)
    else:
        # best of tools/tune_moe.py's candidates at 4096 and 16384 tokens (Mixtral, Qwen3) on the H100
        up = GemmConfig(BM=128, BN=128, BK=64, GROUP_M=16, num_warps=8, num_stages=4)
        down = GemmConfig(BM=128, BN=256, BK=64, GROUP_M=16, num_warps=8, num_stages=3)
    # split the down GEMM's reduction when its tiles cannot fill the machine (few tokens, long I)
    active = min(num_experts, tokens * slots)
    down_tiles = max(1, active) * -(-hidden // down.BN)
    split = 1
    while down_tiles * split < sm_count and inter // (down.BK * split * 2) >= 2:
        split *= 2
    if split > 1:
        down = GemmConfig(**{**down.to_dict(), "split_k": split})
    return MoEConfig(up, down)


SMEM_PER_SM = 232448  # bytes of shared memory an SM gives its resident programs (Hopper; Ampere has less)
REGS_PER_SM = 65536


def programs_per_sm(cfg: GemmConfig, b_tiles: int, elem_bytes: int) -> int:
    """How many programs of a GEMM with these tiles fit on one SM at once: its pipeline's shared memory
    (num_stages x (A tile + b_tiles B tiles)) and its registers at the 255-per-thread worst case. A persistent launch
    of more programs than fit leaves the rest waiting for a whole program to finish, which breaks the grouped tile
    order (and its L2 reuse of weight tiles) that the persistent loop relies on."""
    smem = cfg.num_stages * (cfg.BM * cfg.BK + b_tiles * cfg.BK * cfg.BN) * elem_bytes + 1024
    by_smem = SMEM_PER_SM // smem
    by_regs = REGS_PER_SM // (cfg.num_warps * 32 * 255)
    return max(1, min(by_smem, by_regs, 2))


def for_fp32(cfg: GemmConfig) -> GemmConfig:
    """fp32 operands take twice the shared memory per tile: a shorter reduction step and two stages."""
    return GemmConfig(**{**cfg.to_dict(), "BK": min(cfg.BK, 32), "num_stages": 2})


@cache
def _tuned_tokens(hidden: int, inter: int, num_experts: int, slots: int) -> tuple[int, ...]:
    """Token counts the table has entries for at this layer shape."""
    pattern = re.compile(r"T(\d+)" + re.escape(table_key(0, hidden, inter, num_experts, slots)[len("T0"):]))
    return tuple(sorted(int(m.group(1)) for m in map(pattern.fullmatch, _table()) if m))


@lru_cache(maxsize=4096)
def nearest_tuned(tokens: int, hidden: int, inter: int, num_experts: int, slots: int) -> int | None:
    """The tuned token count nearest to `tokens` (by ratio) at this layer shape, if within a factor of 2 and in
    the heuristic's row block regime (decode-sized calls keep their small row blocks)."""
    regime = row_block(tokens, slots, num_experts)
    near = [(max(tuned, tokens) / max(1, min(tuned, tokens)), tuned)
            for tuned in _tuned_tokens(hidden, inter, num_experts, slots)
            if row_block(tuned, slots, num_experts) == regime]
    best = min(near, default=None)
    return best[1] if best is not None and best[0] <= 2 else None


def choose(tokens: int, hidden: int, inter: int, num_experts: int, slots: int, device: torch.device) -> MoEConfig:
    """On a Hopper GPU, the tuned entry for this layer shape at the nearest tuned token count (nearest_tuned), else
    the heuristic."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        tuned = nearest_tuned(tokens, hidden, inter, num_experts, slots)
        if tuned is not None:
            entry = _table()[table_key(tuned, hidden, inter, num_experts, slots)]
            return MoEConfig(GemmConfig(**entry["up"]), GemmConfig(**entry["down"]))
    return heuristic(tokens, hidden, inter, num_experts, slots, sm_count_of(device))


@cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count_of(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the Triton interpreter runs programs one after another; few programs, same tiles
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
