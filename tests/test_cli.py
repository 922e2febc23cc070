"""The moecompile command: optimize a saved HF directory and a script, inspect a report, bad input."""
import json
import subprocess
import sys

import pytest

from moecompile import hf_zoo
from moecompile.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "moecompile.cli", *args], capture_output=True, text=True, timeout=300)


def test_optimize_hf_dir_writes_report_and_inspect_reads_it(tmp_path):
    model = hf_zoo.build("qwen3_moe")
    model.save_pretrained(tmp_path / "ckpt")
    assert list((tmp_path / "ckpt").glob("*.safetensors"))
    report = tmp_path / "report.json"
    done = run("optimize", str(tmp_path / "ckpt"), "--report", str(report))
    assert done.returncode == 0, done.stderr
    assert "2 of 2 MoE blocks fused" in done.stdout
    data = json.loads(report.read_text())
    assert [b["decision"] for b in data["blocks"]] == ["fused", "fused"]
    shown = run("inspect", str(report))
    assert shown.returncode == 0 and "model.layers.1.mlp" in shown.stdout


def test_optimize_with_fp8_experts_logs_each_blocks_error(tmp_path, capsys):
    model = hf_zoo.build("mixtral")
    model.save_pretrained(tmp_path / "ckpt")
    report = tmp_path / "report.json"
    assert main(["optimize", str(tmp_path / "ckpt"), "--expert-weights", "fp8", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "expert weights (they change what the model computes" in out and "output error" in out
    blocks = json.loads(report.read_text())["blocks"]
    assert len(blocks) == 2 and all(b["expert_weights"].startswith("fp8") for b in blocks)
    with pytest.raises(SystemExit):
        main(["optimize", str(tmp_path / "ckpt"), "--expert-weights", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_optimize_script(tmp_path, capsys):
    script = tmp_path / "model.py"
    script.write_text("import sys\nsys.path.insert(0, {!r})\nimport handwritten\n"
                      "def build_model():\n    return handwritten.DeepModel()\n".format(
                          str(__import__("pathlib").Path(__file__).parent)))
    assert main(["optimize", str(script)]) == 0
    assert "2 of 2 MoE blocks fused" in capsys.readouterr().out


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no such file or directory"),
    (lambda d: d.mkdir(), "no config.json"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{not json")), "config.json: not valid JSON"),
])
def test_bad_model_paths(tmp_path, capsys, setup, message):
    target = tmp_path / "model"
    setup(target)
    assert main(["optimize", str(target), "--report", str(tmp_path / "r.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_truncated_checkpoint(tmp_path, capsys):
    model = hf_zoo.build("mixtral")
    model.save_pretrained(tmp_path)
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["optimize", str(tmp_path)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_inspect_bad_report(tmp_path, capsys):
    bad = tmp_path / "r.json"
    bad.write_text("[]")
    assert main(["inspect", str(bad)]) == 2
    assert "not a moecompile report" in capsys.readouterr().err


def test_stats_on_text_with_relu_rewrite(tmp_path, capsys):
    model = hf_zoo.build("mixtral")
    model.save_pretrained(tmp_path / "ckpt")
    text = tmp_path / "corpus.txt"
    text.write_text(open(json.__file__).read() * 4)  # real text that ships with Python
    assert main(["stats", str(tmp_path / "ckpt"), "--routing", "relu", "--text", str(text), "--batches", "8"]) == 0
    out = capsys.readouterr().out
    assert "topk->relu" in out and f"bytes of {text.name}" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("model.layers.")]
    stats_rows = [r for r in rows if r[1].isdigit()]  # layer, tokens, mean, ...
    assert len(stats_rows) == 2 and all(int(r[1]) == 4 * 128 for r in stats_rows)
    assert all(0 < float(r[2]) <= 8 for r in stats_rows)


def test_stats_bad_input(tmp_path, capsys):
    model = hf_zoo.build("mixtral")
    model.save_pretrained(tmp_path / "ckpt")
    assert main(["stats", str(tmp_path / "ckpt"), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "no such text file" in capsys.readouterr().err


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "a folder, not a report file"),
    (lambda p: p.write_bytes(bytes(range(256)) * 4), "a binary file, not a moecompile report"),
    (lambda p: p.write_text("[1, 2]"), "not a moecompile report"),
])
def test_inspect_folder_or_binary_is_one_line(tmp_path, make, message):
    target = tmp_path / "report.json"
    make(target)
    done = run("inspect", str(target))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_calibration_folder_is_one_line(tmp_path, capsys):
    hf_zoo.build("mixtral").save_pretrained(tmp_path / "src")
    (tmp_path / "texts").mkdir()
    assert main(["convert", str(tmp_path / "src"), "--routing", "relu", "--calibration", str(tmp_path / "texts"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "a folder, not a text file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_to_an_existing_folder_is_one_line(tmp_path):
    hf_zoo.build("mixtral").save_pretrained(tmp_path / "src")
    (tmp_path / "model.onnx").mkdir()
    (tmp_path / "model.onnx" / "mine.txt").write_text("mine")
    done = run("export", str(tmp_path / "src"), str(tmp_path / "model.onnx"))
    assert done.returncode == 2 and "is an existing folder" in done.stderr and "Traceback" not in done.stderr
    assert [p.name for p in (tmp_path / "model.onnx").iterdir()] == ["mine.txt"]


def test_export_refuses_a_script_without_running_it(tmp_path, capsys):
    ran = tmp_path / "ran"
    script = tmp_path / "model.py"
    script.write_text(f"open({str(ran)!r}, 'w').write('ran')\ndef build_model():\n    raise SystemExit\n")
    assert main(["export", str(script), str(tmp_path / "m.onnx")]) == 2
    assert "the script was not run" in capsys.readouterr().err
    assert not ran.exists()


def test_optimize_help_says_a_script_is_executed():
    done = run("optimize", "--help")
    assert done.returncode == 0 and "executed as Python" in " ".join(done.stdout.split())


def test_meta_device_model_says_load_the_weights_first(tmp_path, capsys):
    script = tmp_path / "model.py"
    script.write_text("import torch, sys\nsys.path.insert(0, {!r})\nimport handwritten\n"
                      "def build_model():\n    with torch.device('meta'):\n        return handwritten.DeepModel()\n"
                      .format(str(__import__("pathlib").Path(__file__).parent)))
    assert main(["optimize", str(script)]) == 2
    assert "on the meta device" in capsys.readouterr().err


def test_shard_writes_an_expert_parallel_checkpoint(tmp_path):
    """`moecompile shard` optimizes a saved checkpoint and writes it for load_expert_parallel (whose loading is
    tested in test_ep_checkpoint.py); a second run onto the same --out is refused with the way out, and a script is
    refused without being run."""
    import safetensors

    hf_zoo.build("qwen3_moe").save_pretrained(tmp_path / "ckpt")
    done = run("shard", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ep"))
    assert done.returncode == 0, done.stderr
    assert "load_expert_parallel" in done.stdout and "model.layers.1.mlp" in done.stdout
    with safetensors.safe_open(str(tmp_path / "ep" / "model.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["moecompile"])
    assert [b["path"] for b in meta["blocks"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    again = run("shard", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ep"))
    assert again.returncode == 2 and "already exists" in again.stderr and "overwrite" in again.stderr
    script = tmp_path / "m.py"
    script.write_text("raise SystemExit('ran')\n")
    refused = run("shard", str(script), "--out", str(tmp_path / "ep2"))
    assert refused.returncode == 2 and "saved HF model directory" in refused.stderr and not (tmp_path / "ep2").exists()
