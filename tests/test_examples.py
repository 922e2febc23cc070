"""The examples run end to end (few steps; the full runs and their figures are in docs/routing.md)."""
import math
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_remoe_finetune_runs_and_reports_each_form():
    done = subprocess.run([sys.executable, str(EXAMPLES / "remoe_finetune.py"), "--pretrain-steps", "6", "--steps",
                           "6", "--hidden", "32"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "topk->relu" in out and "relu->topk" in out  # both rewrites ran and logged their effect
    losses = dict(re.findall(r"^  (top-2 after 6 steps|ReLU, as converted|top-2 after 12 steps|ReLU, fine-tuned 6 "
                             r"steps|top-2 from the fine-tuned ReLU)\s+([0-9.]+)", out, re.M))
    assert len(losses) == 5, out
    assert all(0 < float(v) < math.log(256) + 1 for v in losses.values())  # nats per byte, near-uniform at worst
    assert re.search(r"sparsity on held-out text: [0-9.]+ as converted, [0-9.]+ after fine-tuning", out)
    assert "3/4 ReLU fine-tuning" in done.stderr and "sparsity=" in done.stderr  # the progress bar
