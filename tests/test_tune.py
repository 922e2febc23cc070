"""The tile tuner (moecompile/tune.py) under the Triton interpreter: it writes the fastest candidate that matches the
reference into the device's table, which the kernels then read; a wrong candidate never enters the table; bad
requests are one-line errors that leave an existing table as it was. Timings on the CPU are the interpreter's, so
the tests that check which candidate wins make the timing a function of the tiles."""
from __future__ import annotations

import json

import pytest
import torch

from moecompile import tune
from moecompile.kernels import configs, launch
from moecompile.kernels.settings import settings

SHAPE = "H=64,I=40,E=8,k=2"


def fake_timing(monkeypatch, fastest):
    """1 ms for the untuned choice, 0.5 ms for `fastest`'s up tiles, 2 ms for any other candidate."""
    def time_ms(fn, device):
        fn()
        cfg = settings.moe_config
        return 1.0 if cfg is None else 0.5 if cfg.up == fastest.up and cfg.down == fastest.down else 2.0
    monkeypatch.setattr(tune, "_time_ms", time_ms)


def test_the_fastest_correct_candidate_is_written_and_read_by_the_kernels(tuned_dir, monkeypatch, capsys):
    shape = tune.parse_shape(SHAPE)
    fastest = tune.candidates(37, shape, configs.sm_count_of(torch.device("cpu")))[2]
    fake_timing(monkeypatch, fastest)
    assert tune.main(["--shape", SHAPE, "--tokens", "37", "--device", "cpu", "--dtype", "float32",
                      "--max-candidates", "4"]) == 0
    data = json.loads((tuned_dir / "cpu.json").read_text())
    key = configs.table_key(37, 64, 40, 8, 2)
    assert list(data["entries"]) == [key] and data["device"] == "cpu" and data["dtype"] == "float32"
    assert configs.config_of(data["entries"][key]) == configs.MoEConfig(fastest.up, fastest.down, False)
    assert data["entries"][key]["ms"] == 0.5 and data["entries"][key]["untuned_ms"] == 1.0
    assert configs.choose(37, 64, 40, 8, 2, torch.device("cpu")).up == fastest.up  # read in the same process
    assert "1 of 1 rows tuned" in capsys.readouterr().out


def test_untuned_choice_stays_when_no_candidate_beats_it_and_an_old_entry_goes(tuned_dir, monkeypatch):
    key = configs.table_key(37, 64, 40, 8, 2)
    other = configs.table_key(5, 128, 40, 8, 2)
    old = {"up": dict(BM=32, BN=32, BK=32), "down": dict(BM=32, BN=32, BK=32)}
    (tuned_dir / "cpu.json").write_text(json.dumps({"format": 1, "entries": {key: old, other: old}}))
    monkeypatch.setattr(tune, "_time_ms", lambda fn, device: 1.0)  # every candidate ties: within the noise margin
    assert tune.main(["--shape", SHAPE, "--tokens", "37", "--device", "cpu", "--dtype", "float32",
                      "--max-candidates", "2"]) == 0
    assert list(json.loads((tuned_dir / "cpu.json").read_text())["entries"]) == [other]


def test_a_candidate_that_computes_wrong_is_rejected_not_timed(tuned_dir, monkeypatch):
    """The accuracy gate: a tile set whose output is off (here: NaN in one row, the kind of error a tile bug makes)
    is rejected with its error even when it would be the fastest."""
    shape = tune.parse_shape(SHAPE)
    bad = tune.candidates(37, shape, configs.sm_count_of(torch.device("cpu")))[1]
    fake_timing(monkeypatch, bad)
    forward = launch.forward

    def wrong_for_bad(spec, weights, x, seq_len):
        y, logits, slot_weights = forward(spec, weights, x, seq_len)
        if settings.moe_config is not None and settings.moe_config.up == bad.up:
            y = y.clone()
            y[3] = float("nan")
        return y, logits, slot_weights
    monkeypatch.setattr(launch, "forward", wrong_for_bad)
    weights = tune.random_block(shape, torch.float32, torch.device("cpu"))
    result = tune.tune_row(shape, 37, weights, torch.float32, torch.device("cpu"), deadline=float("inf"),
                           max_candidates=3)
    assert result.best is None and result.tried == 3
    assert len(result.rejected) == 1 and "relative error nan" in result.rejected[0]


def test_the_tuned_tiles_are_exact_on_the_kernels(tuned_dir):
    """Every candidate the tuner tries at a decode and a mid-size count matches the fp64 reference in fp32 (the
    tuner's own gate, run for real on the interpreter: no candidate is rejected)."""
    shape = tune.parse_shape("H=72,I=136,E=8,k=2")
    weights = tune.random_block(shape, torch.float32, torch.device("cpu"))
    for tokens in (1, 45):
        result = tune.tune_row(shape, tokens, weights, torch.float32, torch.device("cpu"), float("inf"),
                               max_candidates=8)
        assert result.tried == 8 and result.rejected == [], result.rejected


def test_model_config_gives_the_shape(tmp_path):
    """A real transformers config written with save_pretrained: Qwen3-MoE's moe_intermediate_size and num_experts,
    Mixtral's intermediate_size and num_local_experts."""
    from transformers import MixtralConfig, Qwen3MoeConfig

    Qwen3MoeConfig(hidden_size=96, moe_intermediate_size=48, intermediate_size=200, num_experts=16,
                   num_experts_per_tok=4).save_pretrained(tmp_path / "qwen")
    MixtralConfig(hidden_size=64, intermediate_size=80, num_local_experts=4,
                  num_experts_per_tok=2).save_pretrained(tmp_path / "mixtral")
    qwen = tune.shape_from_config(tmp_path / "qwen")
    assert (qwen.H, qwen.I, qwen.E, qwen.k) == (96, 48, 16, 4)
    mixtral = tune.shape_from_config(tmp_path / "mixtral" / "config.json")
    assert (mixtral.H, mixtral.I, mixtral.E, mixtral.k) == (64, 80, 4, 2)


@pytest.mark.parametrize("argv, message", [
    (["--shape", "H=64,I=40,E=8"], "all of H, I, E and k"),
    (["--shape", "H=64,I=40,E=2,k=4"], "k <= E"),
    (["--shape", "llama9"], "give a preset"),
    (["--tokens", "1"], "at least one --shape or --model"),
    (["--shape", SHAPE, "--tokens", "0"], "token counts are positive"),
    (["--model", "/nonexistent/ckpt"], "cannot read"),
    (["--shape", SHAPE, "--device", "cuda"], "none is visible"),
    (["--shape", SHAPE, "--device", "mps"], "the kernels run on cuda"),
])
def test_bad_requests_are_one_line_errors(argv, message, capsys, tuned_dir):
    if torch.cuda.is_available() and "cuda" in argv:
        pytest.skip("a GPU is visible here: --device cuda is a valid request")
    assert tune.main(argv + ([] if "--device" in argv else ["--device", "cpu"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("moecompile.tune: error:") and message in err and "Traceback" not in err
    assert not any(tuned_dir.iterdir())  # nothing written


def test_a_damaged_table_is_refused_before_tuning_and_left_as_it_was(tuned_dir, capsys):
    path = tuned_dir / "cpu.json"
    path.write_text("{damaged")
    assert tune.main(["--shape", SHAPE, "--tokens", "1", "--device", "cpu"]) == 2
    assert str(path) in capsys.readouterr().err and path.read_text() == "{damaged"


def test_a_model_config_without_an_moe_layer_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                      "intermediate_size": 128}))
    assert tune.main(["--model", str(tmp_path), "--device", "cpu"]) == 2
    assert "names no MoE layer" in capsys.readouterr().err
