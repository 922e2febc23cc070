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


def test_optimize_script(tmp_path, capsys):
    script = tmp_path / "model.py"
    script.write_text("import sys\nsys.path.insert(0, %r)\nimport handwritten\n"
                      "def build_model():\n    return handwritten.DeepModel()\n" % str(__import__("pathlib").Path(__file__).parent))
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
