"""benchmarks/remoe_repro.py's CPU smoke run (--tiny): both arms, the conversion path and the report run end to
end and write what the GPU runs will write. Not a result: a few steps of a 2-layer model."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "remoe_repro.py"), "--tiny", "--out", str(out),
                           *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_tiny_runs_write_records_and_report(tmp_path):
    _run("--routing", "topk", "--k", "1", "--steps", "20", out=tmp_path)
    _run("--routing", "relu", "--k", "1", "--steps", "20", out=tmp_path)
    _run("--conversion", "--k", "1", "--finetune-steps", "6", out=tmp_path)
    _run("--report", out=tmp_path)
    runs = {r["name"]: r for r in json.loads((tmp_path / "remoe_repro.json").read_text())["runs"]}
    assert set(runs) == {"topk_k1_s0_tiny", "relu_k1_s0_tiny", "conversion_topk_k1_s0_tiny"}
    for name in ("topk_k1_s0_tiny", "relu_k1_s0_tiny"):
        r = runs[name]
        assert r["steps"] == 20 and r["tokens"] == 20 * 4 * 64 and r["val_loss"] < 5.6  # below log(256)
        assert len(r["active_by_layer"]) == 2
    assert runs["topk_k1_s0_tiny"]["active_by_layer"] == [1.0, 1.0]
    assert runs["relu_k1_s0_tiny"]["sparsity_curve"]
    stages = [p["stage"] for p in runs["conversion_topk_k1_s0_tiny"]["path"]]
    assert stages[0] == "topk (trained)" and stages[1] == "relu (converted)" and stages[-1].startswith("topk k=1")
    assert "| relu_k1_s0_tiny | relu | 1 |" in (tmp_path / "remoe_repro.md").read_text()
