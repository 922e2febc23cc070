"""ONNX on a GPU runtime: whole MoE models exported by moecompile, run by onnxruntime's CUDA provider with I/O bound
on the device, beside PyTorch eager, moecompile.optimize and torch.compile(backend="moecompile"), in one run.

Models (random weights, fp16, built from their configs): a Qwen3-30B-A3B shape at 2 and 8 layers, a Mixtral-8x7B
shape at 2 layers, and a DeepSeek-V3-shaped MoE layer (E 256, grouped sigmoid routing with a correction bias, one
shared expert) in a 1-layer model. Tokens: batch 1 x 1, 16, 512, 2048, no cache. Per model, the file is exported
twice (moe_op="auto": com.microsoft.MoE where it computes the block, and "standard"), with dynamic axes.

Rows (results/onnx_gpu.json, .md): model, tokens, impl (ort_contrib, ort_standard, torch_eager, moecompile,
compile_backend), ms (median), rel_err (max |logits - PyTorch eager's| over max |PyTorch eager's|). Per file also:
the Memcpy nodes onnxruntime put into the optimized graph (host-device copies in the hot path; subgraphs counted),
and a run with the provider's CUDA graph (enable_cuda_graph) at 1 token, or the reason it could not run.

Run on the device after carrying onnxruntime-gpu (../shared/tools/ort-gpu-pieces.sh says how; then
PYTHONPATH=/tmp/ortsite:$PWD): `python benchmarks/onnx_gpu.py --out benchmarks/results`; `--models` for fewer.
`--device cpu --small` checks the script here on onnxruntime's CPU provider (tiny shapes, tokens 1 and 16).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import e2e  # benchmarks/ is the script's directory: the same HF model builder
import numpy as np
import torch

import moecompile
from moecompile.backends.onnx import session_providers

RESULTS = Path(__file__).parent / "results"
MODELS = {
    "qwen3_30b_a3b_2l": ("qwen3_moe", dict(e2e.FULL["qwen3_moe"], layers=2)),
    "qwen3_30b_a3b_8l": ("qwen3_moe", dict(e2e.FULL["qwen3_moe"], layers=8)),
    "mixtral_8x7b_2l": ("mixtral", e2e.FULL["mixtral"]),
    "deepseek_v3_1l": ("deepseek_v3", dict(layers=1, H=7168, I=2048, E=256, k=8, heads=32, kv=32, head_dim=128)),
}
TOKENS = (1, 16, 512, 2048)
VOCAB = 32000


def build(family: str, cfg: dict, device: str, vocab: int) -> torch.nn.Module:
    if family != "deepseek_v3":
        return e2e.build(family, cfg, torch.float16, device, vocab)
    import transformers

    config = transformers.DeepseekV3Config(
        vocab_size=vocab, hidden_size=cfg["H"], num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv"], moe_intermediate_size=cfg["I"], intermediate_size=cfg["I"] * 9,
        n_routed_experts=cfg["E"], num_experts_per_tok=cfg["k"], n_group=8 if cfg["E"] % 8 == 0 else 1,
        topk_group=4 if cfg["E"] % 8 == 0 else 1, n_shared_experts=1, first_k_dense_replace=0,
        q_lora_rank=None if cfg["H"] < 1024 else 1536, kv_lora_rank=min(512, cfg["H"] // 2),
        qk_rope_head_dim=cfg["head_dim"] // 2, qk_nope_head_dim=cfg["head_dim"], v_head_dim=cfg["head_dim"],
        max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.DeepseekV3ForCausalLM._from_config(config, experts_implementation="grouped_mm",
                                                                dtype=torch.float16)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        for name, buf in model.named_buffers():
            if "correction_bias" in name:
                buf.normal_(0, 0.1)
    return model.eval()


def _providers(device: str, cuda_graph: bool = False) -> list:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    session_providers()  # preloads onnxruntime-gpu's CUDA libraries
    options = {"enable_cuda_graph": "1"} if cuda_graph else {}
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


def memcpy_nodes(path: Path, device: str) -> int:
    """Memcpy nodes in the graph onnxruntime optimized for this provider, subgraphs (If branches) included."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    optimized = path.with_suffix(".optimized.onnx")
    options.optimized_model_filepath = str(optimized)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     optimized.with_suffix(".data").name)
    ort.InferenceSession(str(path), options, providers=_providers(device))

    def count(graph) -> int:
        n = 0
        for node in graph.node:
            n += node.op_type.startswith("Memcpy")
            n += sum(count(a.g) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
        return n

    return count(onnx.load(str(optimized), load_external_data=False).graph)


class OrtRunner:
    """One session with inputs and outputs bound on the device (io_binding), so that no copy is timed."""

    def __init__(self, path: Path, device: str, cuda_graph: bool = False):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=_providers(device, cuda_graph))
        self.device = device
        self.provider = self.session.get_providers()[0]
        self.binding = self.session.io_binding()
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.output = self.session.get_outputs()[0].name
        self._held: list[torch.Tensor] = []

    def bind(self, feeds: dict[str, torch.Tensor]) -> None:
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        self._held = [t.contiguous() for t in feeds.values()]
        for name, t in zip(feeds, self._held):
            self.binding.bind_input(name, self.device, 0, _numpy_dtype(t.dtype), list(t.shape), t.data_ptr())
        self.binding.bind_output(self.output, self.device)

    def __call__(self) -> None:
        self.session.run_with_iobinding(self.binding)

    def logits(self) -> torch.Tensor:
        return torch.from_numpy(self.binding.copy_outputs_to_cpu()[0]).float()


def _numpy_dtype(dtype: torch.dtype):
    return {torch.int64: np.int64, torch.float16: np.float16, torch.float32: np.float32}[dtype]


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float().cpu() - want.float().cpu()).abs().max() / want.float().abs().max().clamp(min=1e-30)).item()


def measure_model(name: str, family: str, cfg: dict, tokens: tuple[int, ...], device: str, reps: int,
                  work: Path) -> list[dict]:
    vocab = VOCAB if cfg["H"] >= 1024 else 512
    model = build(family, cfg, device, vocab)
    rows: list[dict] = []
    gen = torch.Generator(device=device).manual_seed(1)
    inputs = {T: torch.randint(0, vocab, (1, T), device=device, generator=gen) for T in tokens}
    with torch.no_grad():
        want = {T: model(input_ids=ids).logits.float() for T, ids in inputs.items()}
    files = {}
    for impl, moe_op in (("ort_contrib", "auto"), ("ort_standard", "standard")):
        path = work / f"{name}_{moe_op}.onnx"
        start = time.perf_counter()
        example = torch.randint(0, vocab, (1, 7), device=device, generator=gen)  # not 1: export specialises 1
        moecompile.export_onnx(model, path, {"input_ids": example}, moe_op=moe_op, verify=False, dynamic=True)
        files[impl] = {"path": path, "export_s": round(time.perf_counter() - start, 1),
                       "lowerings": sorted({b.export for b in moecompile.export_report(path).blocks})}
    for impl, meta in files.items():
        runner = OrtRunner(meta["path"], device)
        meta["provider"] = runner.provider
        try:
            meta["memcpy_nodes"] = memcpy_nodes(meta["path"], device)
        except Exception as exc:  # noqa: BLE001 - reported, the timings go on
            meta["memcpy_nodes"] = f"{type(exc).__name__}: {exc}"[:200]
        for T, ids in inputs.items():
            runner.bind({"input_ids": ids})
            runner()
            rows.append({"model": name, "tokens": T, "impl": impl, "ms": e2e.timed(runner, device, reps),
                         "rel_err": rel(runner.logits(), want[T])})
        del runner
        if device == "cuda":
            meta["cuda_graph_1_token"] = cuda_graph_run(meta["path"], inputs[tokens[0]], want[tokens[0]], reps)
    fused = moecompile.optimize(model)
    compiled = torch.compile(model, backend="moecompile")
    with torch.no_grad():
        for impl, fn in (("torch_eager", model), ("moecompile", fused), ("compile_backend", compiled)):
            for T, ids in inputs.items():
                got = fn(input_ids=ids).logits
                rows.append({"model": name, "tokens": T, "impl": impl,
                             "ms": e2e.timed(lambda fn=fn, ids=ids: fn(input_ids=ids), device, reps),
                             "rel_err": rel(got, want[T])})
    for meta in files.values():
        meta["path"] = meta["path"].name
    rows.append({"model": name, "files": files})
    del model, fused, compiled
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def cuda_graph_run(path: Path, ids: torch.Tensor, want: torch.Tensor, reps: int) -> dict:
    """The file on the provider's CUDA graph (captured on the first run, replayed after), or why it cannot run."""
    try:
        runner = OrtRunner(path, "cuda", cuda_graph=True)
        runner.bind({"input_ids": ids})
        runner()
        return {"ms": e2e.timed(runner, "cuda", reps), "rel_err": rel(runner.logits(), want)}
    except Exception as exc:  # noqa: BLE001 - a form the CUDA graph cannot take is a result, said as it is
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# ONNX on onnxruntime's {env['provider']} ({env['device']}, {env['date']})", "",
             f"onnxruntime {env['onnxruntime']}, torch {env['torch']}, transformers {env['transformers']}; "
             f"`{result['command']}`. Median ms per call, I/O bound on the device; rel err: max |logits - PyTorch "
             "eager's| / max |PyTorch eager's| (fp16).", "",
             "| model | tokens | ort_contrib | ort_standard | torch_eager | moecompile | compile_backend |",
             "|---|---|---|---|---|---|---|"]
    timed = [r for r in result["rows"] if "impl" in r]
    for model in dict.fromkeys(r["model"] for r in timed):
        for T in dict.fromkeys(r["tokens"] for r in timed if r["model"] == model):
            cells = {r["impl"]: f"{r['ms']:.3f} ({r['rel_err']:.0e})" for r in timed
                     if r["model"] == model and r["tokens"] == T}
            lines.append(f"| {model} | {T} | " + " | ".join(cells.get(i, "-") for i in (
                "ort_contrib", "ort_standard", "torch_eager", "moecompile", "compile_backend")) + " |")
    lines += ["", "| model | file | lowerings | Memcpy nodes | CUDA graph at 1 token | export s |",
              "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for impl, meta in r.get("files", {}).items():
            graph = meta.get("cuda_graph_1_token", {})
            graph = graph.get("error") or (f"{graph['ms']:.3f} ms" if graph else "-")
            lines.append(f"| {r['model']} | {impl} | {'; '.join(meta['lowerings'])} | {meta['memcpy_nodes']} | "
                         f"{graph} | {meta['export_s']} |")
    return "\n".join(lines) + "\n"


def write_results(rows: list, args, command: str, ort_version: str, transformers_version: str) -> dict:
    provider = next((m["provider"] for r in rows for m in r.get("files", {}).values()), "-")
    result = {"environment": {"date": datetime.date.today().isoformat(), "provider": provider,
                              "device": torch.cuda.get_device_name() if args.device == "cuda" else "CPU",
                              "onnxruntime": ort_version, "torch": torch.__version__,
                              "transformers": transformers_version},
              "command": command, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_small" if args.small else ""
    (out / f"onnx_gpu{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"onnx_gpu{suffix}.md").write_text(markdown(result))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="tiny shapes (a check of the script)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    import onnxruntime as ort
    import transformers

    if args.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit("onnxruntime has no CUDAExecutionProvider here: carry onnxruntime-gpu first "
                         "(../shared/tools/ort-gpu-pieces.sh), or pass --device cpu")
    tokens = tuple(args.tokens) if not args.small else (1, 16)
    rows = []
    command = " ".join(["python benchmarks/onnx_gpu.py", *(sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            family, cfg = MODELS[name]
            if args.small:
                cfg = dict(cfg, H=64, I=48, heads=4, kv=4 if family == "deepseek_v3" else 2, head_dim=16,
                           E=min(cfg["E"], 16), layers=min(cfg["layers"], 2))
            rows += measure_model(name, family, cfg, tokens, args.device, args.reps, Path(tmp))
            print(json.dumps(rows[-1])[:400], flush=True)
            # written after each model, so that a run cut short by a time limit keeps what it measured
            result = write_results(rows, args, command, ort.__version__, transformers.__version__)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
