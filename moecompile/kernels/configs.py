"""Tile sizes for the expert GEMMs: tuned tables (the user's, then one measured on Hopper), a heuristic elsewhere.

Place in the pipeline: kernels/launch.py asks `choose(...)` once per call (a dict lookup); the choice depends only on
shapes, so it is the same on every call with the same shapes and inside CUDA graphs. Three sources, first match wins:
a table the user tuned for this GPU (`python -m moecompile.tune`, written to `tuned_path(device)`), the table measured
on Hopper for the benchmark shapes (`hopper_table.json` beside this file, written by the same tuner), the heuristic.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from ..state import kept
from .settings import settings

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
    # the routed experts on torch._grouped_mm, as measured by the tuner (None: settings.grouped_mm_min_rows decides)
    grouped_mm: bool | None = None

    def __post_init__(self) -> None:
        if self.up.BM != self.down.BM:
            raise ValueError(f"up and down GEMMs must share BM (the dispatch padding): {self.up.BM} != {self.down.BM}")


def rows_per_expert(tokens: int, slots: int, num_experts: int) -> float:
    """Average rows an active expert gets: the pairs over the experts they can touch."""
    pairs = tokens * slots
    return pairs / max(1, min(num_experts, pairs))


def table_key(tokens: int, hidden: int, inter: int, num_experts: int, slots: int) -> str:
    return f"T{tokens}_H{hidden}_I{inter}_E{num_experts}_S{slots}"


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


def for_scale_blocks(cfg: GemmConfig, block: int) -> GemmConfig:
    """cfg with a reduction step that divides `block` (a power of two): the largest power of two up to both, so
    that each K step of a block-scaled weight reads one block's scale."""
    bk = min(cfg.BK, block)
    bk = 1 << (bk.bit_length() - 1)
    return cfg if bk == cfg.BK else GemmConfig(**{**cfg.to_dict(), "BK": bk})


class TileTable:
    """Tuned tiles by layer shape and token count (`table_key`), as written by `python -m moecompile.tune`.

    The file: {"format": 1, "device": ..., "dtype": ..., "written": ..., "versions": {...},
    "entries": {table_key: {"up": GemmConfig fields, "down": ..., "grouped_mm": bool (optional), "ms": ...}}}."""

    FORMAT = 1

    def __init__(self, entries: dict[str, MoEConfig], path: Path | None = None):
        self.entries = entries
        self.path = path
        self._nearest: dict[tuple[int, int, int, int, int], int | None] = {}
        self._tokens: dict[tuple[int, int, int, int], tuple[int, ...]] = {}

    @classmethod
    def load(cls, path: Path) -> TileTable:
        """The table in `path` ({} when there is none); TileTableError naming the file when it cannot be read."""
        if not path.exists():
            return cls({}, path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != cls.FORMAT:
                raise ValueError(f"format {data.get('format')!r}, this moecompile reads format {cls.FORMAT}")
            return cls({key: config_of(entry) for key, entry in data["entries"].items()}, path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TileTableError(
                f"the tuned tiles in {path} cannot be read ({type(exc).__name__}: {exc}); write it again with "
                f"`python -m moecompile.tune` or delete it (the kernels then use their heuristic)") from None

    def _tuned_tokens(self, hidden: int, inter: int, num_experts: int, slots: int) -> tuple[int, ...]:
        """Token counts the table has entries for at this layer shape."""
        shape = (hidden, inter, num_experts, slots)
        if shape not in self._tokens:
            pattern = re.compile(r"T(\d+)" + re.escape(table_key(0, *shape)[len("T0"):]))
            self._tokens[shape] = tuple(sorted(int(m.group(1)) for m in map(pattern.fullmatch, self.entries) if m))
        return self._tokens[shape]

    def nearest_tuned(self, tokens: int, hidden: int, inter: int, num_experts: int, slots: int) -> int | None:
        """The tuned token count nearest to `tokens` (by ratio) at this layer shape, if within a factor of 2 and in
        the heuristic's row block regime (decode-sized calls keep their small row blocks)."""
        key = (tokens, hidden, inter, num_experts, slots)
        if key not in self._nearest:
            regime = row_block(tokens, slots, num_experts)
            near = [(max(tuned, tokens) / max(1, min(tuned, tokens)), tuned)
                    for tuned in self._tuned_tokens(hidden, inter, num_experts, slots)
                    if row_block(tuned, slots, num_experts) == regime]
            best = min(near, default=None)
            self._nearest[key] = best[1] if best is not None and best[0] <= 2 else None
        return self._nearest[key]

    def lookup(self, tokens: int, hidden: int, inter: int, num_experts: int, slots: int) -> MoEConfig | None:
        tuned = self.nearest_tuned(tokens, hidden, inter, num_experts, slots)
        return None if tuned is None else self.entries[table_key(tuned, hidden, inter, num_experts, slots)]


class TileTableError(ValueError):
    pass


def config_of(entry: dict) -> MoEConfig:
    """A table entry's tiles (and its experts path, when the tuner measured both)."""
    grouped_mm = entry.get("grouped_mm")
    if grouped_mm is not None and not isinstance(grouped_mm, bool):
        raise TypeError(f"grouped_mm must be true, false or absent, not {grouped_mm!r}")
    return MoEConfig(GemmConfig(**entry["up"]), GemmConfig(**entry["down"]), grouped_mm)


def entry_of(cfg: MoEConfig) -> dict:
    entry: dict = dict(up=cfg.up.to_dict(), down=cfg.down.to_dict())
    if cfg.grouped_mm is not None:
        entry["grouped_mm"] = cfg.grouped_mm
    return entry


@cache
def shipped_table() -> TileTable:
    """The table measured on Hopper for the benchmark shapes, shipped beside this file."""
    return TileTable.load(TABLE_PATH)


TUNED_DIR_ENV = "MOECOMPILE_TUNED_DIR"


def tuned_dir() -> Path:
    """Where `python -m moecompile.tune` writes, and the kernels read, a user's tuned tables:
    $MOECOMPILE_TUNED_DIR, else $XDG_CACHE_HOME/moecompile/tuned (~/.cache/moecompile/tuned)."""
    if os.environ.get(TUNED_DIR_ENV):
        return Path(os.environ[TUNED_DIR_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "moecompile", "tuned")


def device_name(device: torch.device) -> str:
    """The file name a device's tuned table has: its GPU's name (e.g. NVIDIA_H200), "cpu" for the interpreter."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def tuned_path(device: torch.device) -> Path:
    return tuned_dir() / f"{device_name(device)}.json"


# read once per device and directory; moecompile.reset() (or the tuner, after writing) makes the next call read again
_USER_TABLES: dict[tuple[torch.device, str | None], TileTable] = kept(
    "kernels/configs.py: user-tuned tile tables by device", {})


def user_table(device: torch.device) -> TileTable:
    key = (device, os.environ.get(TUNED_DIR_ENV))
    table = _USER_TABLES.get(key)
    if table is None:
        table = _USER_TABLES[key] = TileTable.load(tuned_path(device))
    return table


def forget_user_tables() -> None:
    """Read the user's tables again at the next call (after the tuner writes one)."""
    _USER_TABLES.clear()


def untuned_choice(tokens: int, hidden: int, inter: int, num_experts: int, slots: int,
                   device: torch.device) -> MoEConfig:
    """The tiles without a user's table: on a Hopper GPU the shipped table's, else the heuristic's."""
    shape = (tokens, hidden, inter, num_experts, slots)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        tuned = shipped_table().lookup(*shape)
        if tuned is not None:
            return tuned
    return heuristic(*shape, sm_count_of(device))


def choose(tokens: int, hidden: int, inter: int, num_experts: int, slots: int, device: torch.device) -> MoEConfig:
    """The tiles for one call: forced ones (settings.moe_config, the tuner's), else the user's tuned table for this
    device (tuned_path) at the nearest tuned token count (TileTable.nearest_tuned), else the untuned choice."""
    if settings.moe_config is not None:
        return settings.moe_config
    tuned = user_table(device).lookup(tokens, hidden, inter, num_experts, slots)
    return tuned if tuned is not None else untuned_choice(tokens, hidden, inter, num_experts, slots, device)


@cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count_of(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the Triton interpreter runs programs one after another; few programs, same tiles
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
