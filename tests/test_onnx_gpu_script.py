"""benchmarks/onnx_gpu.py (run on the GPU with onnxruntime-gpu) checked here on onnxruntime's CPU provider at tiny
shapes: every impl gives each token count a row, the logits within 1e-2 of PyTorch eager's largest (fp16), the
operator taken where it applies (Qwen3; test_onnx.py holds where it does not, such as DeepSeek-V3's grouped
routing), and the Memcpy count read from the optimized graph. One model: the script's check, not the lowering's."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import onnx_gpu  # noqa: E402

IMPLS = {"ort_contrib", "ort_standard", "torch_eager", "moecompile", "compile_backend"}


def test_script_on_the_cpu_provider(tmp_path, quiet):
    assert onnx_gpu.main(["--device", "cpu", "--small", "--models", "qwen3_30b_a3b_2l",
                          "--reps", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "onnx_gpu_small.json").read_text())
    timed = [r for r in result["rows"] if "impl" in r]
    for model in ("qwen3_30b_a3b_2l",):
        for tokens in (1, 16):
            rows = [r for r in timed if r["model"] == model and r["tokens"] == tokens]
            assert {r["impl"] for r in rows} == IMPLS
            assert all(r["ms"] > 0 and r["rel_err"] <= 1e-2 for r in rows), rows
    files = {r["model"]: r["files"] for r in result["rows"] if "files" in r}
    assert files["qwen3_30b_a3b_2l"]["ort_contrib"]["lowerings"] == ["com.microsoft.MoE"]
    assert all(m["memcpy_nodes"] == 0 for f in files.values() for m in f.values())  # the CPU provider copies none
    assert "| qwen3_30b_a3b_2l | 16 |" in (tmp_path / "onnx_gpu_small.md").read_text()
