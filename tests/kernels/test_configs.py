"""The expert GEMMs' tiles (kernels/configs.py): which table a call's tiles come from (forced, the user's tuned
table for the device, the shipped Hopper table, the heuristic), token counts served by a tuned entry, the experts
path a table records, and a damaged table named in the error."""
from __future__ import annotations

import json

import cases
import pytest
import torch
from cases import run_case

from moecompile.kernels import configs, grouped
from moecompile.kernels.settings import configured

pytestmark = pytest.mark.usefixtures("poisoned")

CPU = torch.device("cpu")
TUNED = configs.MoEConfig(configs.GemmConfig(BM=32, BN=32, BK=32, GROUP_M=2, num_warps=2, num_stages=2),
                          configs.GemmConfig(BM=32, BN=64, BK=16, GROUP_M=2, num_warps=2, num_stages=2, split_k=2))


def write_table(path, entries: dict) -> None:
    path.write_text(json.dumps({"format": 1, "device": "cpu", "entries": entries}))


def test_tuned_tiles_serve_token_counts_within_twice_theirs_in_the_same_regime():
    """A tuned entry serves token counts within 2x of the tuned one whose heuristic row block is the same
    (decode-sized calls keep their own); other counts and other layer shapes get nothing from the table."""
    entry = configs.config_of({"up": dict(BM=64, BN=128, BK=64), "down": dict(BM=64, BN=128, BK=64)})
    table = configs.TileTable({configs.table_key(1024, 2048, 768, 128, 8): entry})
    shape = (2048, 768, 128, 8)
    # 1024 tokens x 8 slots over 128 experts is 64 rows an expert (64-row blocks); 700 tokens is 44 (32-row)
    assert [table.nearest_tuned(T, *shape) for T in (1024, 800, 2048, 2049, 700, 1)] == [
        1024, 1024, 1024, None, None, None]
    assert table.nearest_tuned(1024, 2048, 768, 64, 8) is None
    assert table.lookup(800, *shape) == entry and table.lookup(700, *shape) is None


def test_shipped_hopper_table_reads():
    """The table shipped for Hopper is in the tuner's format and each entry's tiles share their row block."""
    table = configs.shipped_table()
    assert len(table.entries) >= 6
    for cfg in table.entries.values():
        assert cfg.up.BM == cfg.down.BM


def test_choose_takes_forced_tiles_then_the_users_table_then_the_heuristic(tuned_dir):
    shape = (64, 72, 40, 8, 2)
    heuristic = configs.heuristic(*shape, configs.sm_count_of(CPU))
    assert configs.choose(*shape, CPU) == heuristic  # no table: the heuristic
    write_table(tuned_dir / "cpu.json", {configs.table_key(*shape): configs.entry_of(TUNED)})
    assert configs.choose(*shape, CPU) == heuristic  # read once per process: a table written later waits for...
    configs.forget_user_tables()  # ...the tuner's forget (or moecompile.reset())
    assert configs.choose(*shape, CPU) == TUNED
    assert configs.choose(48, *shape[1:], CPU) == TUNED  # within 2x, same 32-row regime
    forced = configs.MoEConfig(heuristic.up, heuristic.down, False)
    with configured(moe_config=forced):
        assert configs.choose(*shape, CPU) is forced
    assert configs.choose(*shape, CPU) == TUNED


def test_moecompile_reset_rereads_the_users_table(tuned_dir):
    import moecompile

    shape = (64, 72, 40, 8, 2)
    configs.choose(*shape, CPU)
    write_table(tuned_dir / "cpu.json", {configs.table_key(*shape): configs.entry_of(TUNED)})
    moecompile.reset()
    assert configs.choose(*shape, CPU) == TUNED


def test_a_tuned_table_runs_the_kernels_with_its_tiles_and_stays_exact(tuned_dir, monkeypatch):
    """The op takes the user's tiles (BM 32, a K-split down GEMM) and still matches the fp64 reference."""
    write_table(tuned_dir / "cpu.json", {configs.table_key(64, 72, 40, 8, 2): configs.entry_of(TUNED)})
    chosen = []
    choose = configs.choose
    monkeypatch.setattr(configs, "choose", lambda *a: chosen.append(choose(*a)) or chosen[-1])
    run_case("softmax_topk", 8, 2, 64, 72, 40, torch.float32, "cpu")
    assert chosen == [TUNED]


def test_a_damaged_table_is_an_error_naming_the_file_and_the_way_out(tuned_dir):
    path = tuned_dir / "cpu.json"
    for text in ("{not json", json.dumps({"format": 7, "entries": {}}),
                 json.dumps({"format": 1, "entries": {"T1_H8_I8_E2_S1": {"up": {"BM": 16}}}}),
                 json.dumps({"format": 1, "entries": {"T1_H8_I8_E2_S1": {
                     "up": dict(BM=16, BN=16, BK=16), "down": dict(BM=32, BN=16, BK=16)}}})):  # BM differs
        path.write_text(text)
        configs.forget_user_tables()
        with pytest.raises(configs.TileTableError) as err:
            configs.choose(1, 8, 8, 2, 1, CPU)
        assert str(path) in str(err.value) and "python -m moecompile.tune" in str(err.value)


@pytest.mark.parametrize("tuned", [True, False])
def test_a_tables_experts_path_overrides_the_row_threshold(tuned):
    """A tuned entry's grouped_mm choice (measured) wins over settings.grouped_mm_min_rows (a rule of thumb),
    but not over a layout grouped_mm cannot read, nor over the setting's `None` (never)."""
    spec = cases.make_spec("softmax_topk", 8, 2, 72, 40)
    w = cases.make_weights(spec, torch.bfloat16, "cpu", torch.Generator().manual_seed(0))
    x = torch.empty(30, 72, dtype=torch.bfloat16)
    with configured(grouped_mm_min_rows=0.0 if not tuned else 1e9):
        assert grouped.applies(spec, w, x) is (not tuned)  # the threshold alone
        assert grouped.applies(spec, w, x, tuned) is tuned
    with configured(grouped_mm_min_rows=None):
        assert grouped.applies(spec, w, x, True) is False
    assert grouped.applies(spec, w, x.float(), True) is False  # fp32: grouped_mm cannot run it


def test_fp8_tiles_read_one_scale_block_per_k_step():
    """FP8 weights' tiles (kernels/experts.py _tile_scales) need a K step that divides the 128-wide scale block:
    the largest power of two up to both, whatever the table gave (a tuned BK of 256 on a GPU, or 48)."""
    from moecompile.kernels.configs import GemmConfig, for_scale_blocks
    assert [for_scale_blocks(GemmConfig(64, 64, bk), 128).BK for bk in (16, 32, 48, 128, 256)] == [16, 32, 32, 128, 128]
    kept = GemmConfig(64, 128, 64, GROUP_M=4, num_warps=8, num_stages=4, split_k=2)
    assert for_scale_blocks(kept, 128) is kept
