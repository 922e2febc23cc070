"""Checkpoint conversion (`moecompile convert`, moecompile.convert / from_pretrained; checkpoint.py) on real HF
classes saved with save_pretrained: round trips through save and load, what plain transformers makes of a converted
directory, and bad input that must fail with a clear error and write nothing. CPU, fp32; tolerances beside each
check."""
import json
import logging
from pathlib import Path

import pytest
import torch
import transformers

import moecompile
from moecompile import MoECompileError, hf_zoo
from moecompile.calibration_text import text_batches
from moecompile.cli import main


@pytest.fixture
def corpus(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(Path(json.__file__).read_text() * 3)  # real text that ships with Python
    return text


def saved(tmp_path, family, name="src"):
    model = hf_zoo.build(family)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def held_out(seed=5):
    return torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(seed))


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def nothing_written(parent: Path, out: Path) -> bool:
    return not out.exists() and not [p for p in parent.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_relu_convert_round_trips_and_plain_transformers_loads_the_original(tmp_path, corpus, family, quiet):
    original, src = saved(tmp_path, family)
    out = tmp_path / "relu"
    assert main(["convert", str(src), "--routing", "relu", "--calibration", str(corpus), "--out", str(out),
                 "--seq-len", "128", "--batches", "8"]) == 0
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    meta = json.loads((out / "config.json").read_text())["moecompile"]
    assert meta["routing"] == "relu" and len(meta["layers"]) == 2

    # in memory, the same rewrite on the same calibration batches
    batches, _ = text_batches(corpus, 128, 128, 8)
    want = moecompile.optimize(original, routing="relu", calibration=batches)
    loaded = moecompile.from_pretrained(out)
    ids = held_out()
    assert relative(logits(loaded, ids), logits(want, ids)) < 1e-6  # same weights and spec; fp32 summation noise
    rep = moecompile.report(loaded)
    assert all(b.routing_change["direction"] == "topk->relu" for b in rep.fused)
    assert all(b.spec["router"]["scoring"] == "relu" for b in rep.fused)
    stats = moecompile.routing_stats(loaded, batches)
    assert all(abs(s.mean_active - 2) < 1e-6 for s in stats)  # on its own calibration tokens: exactly the old k

    # plain transformers: the original architecture and routing, and a warning naming the routing entries
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        plain = transformers.AutoModelForCausalLM.from_pretrained(out)
    finally:
        hf_logger.removeHandler(handler)
    assert type(plain) is type(original)
    assert torch.equal(logits(plain, ids), logits(original, ids))  # bit for bit: the weights are untouched
    warned = "\n".join(r.getMessage() for r in records if r.levelno >= logging.WARNING)
    assert "moecompile.routing_not_applied" in warned and "UNEXPECTED" in warned


def test_topk_convert_with_k_equal_E_reproduces_the_relu_checkpoint(tmp_path, corpus, quiet):
    _, src = saved(tmp_path, "qwen3_moe")
    relu_dir, topk_dir, auto_dir = tmp_path / "relu", tmp_path / "top8", tmp_path / "auto"
    assert main(["convert", str(src), "--routing", "relu", "--calibration", str(corpus), "--out", str(relu_dir),
                 "--seq-len", "128", "--batches", "4"]) == 0
    assert main(["convert", str(relu_dir), "--routing", "topk", "--k", "8", "--out", str(topk_dir)]) == 0
    relu, top8 = moecompile.from_pretrained(relu_dir), moecompile.from_pretrained(topk_dir)
    ids = held_out()
    assert relative(logits(top8, ids), logits(relu, ids)) < 1e-6  # k = E keeps every positive gate
    assert all(b.spec["router"]["top_k"] == 8 for b in moecompile.report(top8).fused)
    history = json.loads((topk_dir / "config.json").read_text())["moecompile"]["history"]
    assert [h["routing"] for h in history] == ["relu", "topk"]

    assert main(["convert", str(relu_dir), "--routing", "topk", "--k", "auto", "--calibration", str(corpus),
                 "--out", str(auto_dir), "--seq-len", "128", "--batches", "4"]) == 0
    for block in moecompile.report(moecompile.from_pretrained(auto_dir)).fused:
        change = block.routing_change
        assert change["direction"] == "relu->topk" and change["pairs_kept_share"] >= 0.99
        assert block.spec["router"]["top_k"] == change["k_after"]


def test_tokenizer_beside_the_checkpoint_is_used_and_copied(tmp_path, corpus, quiet):
    from tokenizers import Tokenizer, models, pre_tokenizers

    _, src = saved(tmp_path, "mixtral")
    words = sorted(set(corpus.read_text().split()))[:127]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(src)
    out = tmp_path / "relu"
    rep = moecompile.convert(src, out, "relu", calibration=corpus, seq_len=64, batches=4, progress=False)
    assert "tokenized with the checkpoint's tokenizer" in rep.message
    assert (out / "tokenizer.json").is_file()
    assert all(b.routing_change["calibration_tokens"] == 4 * 64 for b in rep.fused)


def test_overwrite_replaces_and_without_it_an_existing_output_is_kept(tmp_path, corpus, capsys, quiet):
    _, src = saved(tmp_path, "mixtral")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["convert", str(src), "--routing", "relu", "--calibration", str(corpus), "--out", str(out), "--seq-len",
            "64", "--batches", "2"]
    assert main(args) == 2
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(args + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _drop_one_tensor(src: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    tensors.pop(next(k for k in tensors if "self_attn.q_proj" in k))
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


def _to_pickle(src: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()


@pytest.mark.parametrize("damage, message", [
    (lambda src: (src / "config.json").unlink(), "no config.json"),
    (lambda src: (src / "config.json").write_text("{oops"), "config.json: not valid JSON"),
    (lambda src: (src / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:2000]),
     "not a readable safetensors file"),
    (_drop_one_tensor, "the checkpoint lacks 1 weights"),
    (_to_pickle, "pickle files"),
    (lambda src: (src / "model.safetensors").unlink(), "no weights"),
])
def test_malformed_checkpoint_is_a_clear_error_and_writes_nothing(tmp_path, corpus, capsys, damage, message, quiet):
    _, src = saved(tmp_path, "mixtral")
    damage(src)
    out = tmp_path / "out"
    assert main(["convert", str(src), "--routing", "relu", "--calibration", str(corpus), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert nothing_written(tmp_path, out)


@pytest.mark.parametrize("args, message", [
    (["--routing", "relu", "--calibration", "MISSING"], "no such text file"),
    (["--routing", "topk", "--k", "2"], "takes a ReLU-routed checkpoint"),
    (["--routing", "topk", "--k", "auto"], "needs calibration data|--k auto picks k"),
    (["--routing", "topk", "--k", "two"], "pass an integer number of experts"),
    (["--routing", "relu", "--k", "2"], "takes no k"),
])
def test_bad_flags_are_clear_errors_and_write_nothing(tmp_path, capsys, args, message, quiet):
    _, src = saved(tmp_path, "mixtral")
    out = tmp_path / "out"
    args = [a if a != "MISSING" else str(tmp_path / "missing.txt") for a in args]
    assert main(["convert", str(src), *args, "--out", str(out)]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert nothing_written(tmp_path, out)


def test_non_moe_model_is_a_clear_error_and_writes_nothing(tmp_path, corpus, capsys, quiet):
    _, src = saved(tmp_path, "llama")
    out = tmp_path / "out"
    assert main(["convert", str(src), "--routing", "relu", "--calibration", str(corpus), "--out", str(out)]) == 2
    assert "has no MoE block moecompile can fuse" in capsys.readouterr().err
    assert nothing_written(tmp_path, out)


def test_failure_while_writing_leaves_no_output(tmp_path, corpus, monkeypatch, quiet):
    from moecompile import checkpoint

    _, src = saved(tmp_path, "mixtral")
    out = tmp_path / "out"

    def broken_check(*args, **kwargs):
        raise MoECompileError("simulated failure after writing")

    monkeypatch.setattr(checkpoint, "_check_reload", broken_check)
    with pytest.raises(MoECompileError, match="simulated failure"):
        moecompile.convert(src, out, "relu", calibration=corpus, seq_len=64, batches=2, progress=False)
    assert nothing_written(tmp_path, out)


def test_from_pretrained_refuses_a_record_that_does_not_match_the_model(tmp_path, corpus, quiet):
    _, src = saved(tmp_path, "mixtral")
    out = tmp_path / "relu"
    moecompile.convert(src, out, "relu", calibration=corpus, seq_len=64, batches=2, progress=False)
    config = json.loads((out / "config.json").read_text())
    config["moecompile"]["layers"]["model.layers.0.mlp"]["router_before"]["top_k"] = 3
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoECompileError, match="was converted from a block routed"):
        moecompile.from_pretrained(out)
