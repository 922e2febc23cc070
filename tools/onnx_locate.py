"""Where a whole-model ONNX mismatch comes from: the first nodes whose onnxruntime output differs from PyTorch's.

The model's moecompile copy (standard ONNX form) is exported with torch.export, translated by torch.onnx (its
optimizer off, so ONNX values keep the names of the exported program's nodes), and every value that has a node of
the same name is made a graph output. onnxruntime (graph optimizations off) and an interpreter over the exported
program run the same input; the nodes are listed in graph order where they differ by over 1e-4 of their max |value|
(integer outputs: the count of differing elements), with the model source line each came from. `empty`-like nodes
and their slices differ by design (uninitialised memory) and are not listed.
This found the DeepSeek sparse-attention indexers' top-k ties (results/onnx_coverage.md, verify's tie note).
Run: `python tools/onnx_locate.py FAMILY [LENGTH]` (CPU, about a minute).
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the benchmarks' model builders

import torch
from onnx_coverage import untie_constant_weights  # benchmarks/ is the script's directory
from torch.export.graph_signature import InputKind

import moecompile
from moecompile import hf_zoo
from moecompile.backends import onnx as onnx_backend
from moecompile.backends import onnx_lowering
from moecompile.fused import FusedMoE

SHOWN = 12


def node_values(program: torch.export.ExportedProgram, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor-valued node of `program` on `ids`, by node name."""
    state = {**program.state_dict, **program.constants}
    flat = [ids if spec.kind == InputKind.USER_INPUT else state[spec.target]
            for spec in program.graph_signature.input_specs]
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if isinstance(out, torch.Tensor):
                values[node.name] = out.detach().clone()
            return out

    with torch.no_grad():
        Recorder(program.graph_module).run(*flat)
    return values


def source_line(node: torch.fx.Node) -> str:
    """The innermost frame of the model's own source in the node's stack trace (not a re-traced graph's)."""
    trace = [line.strip() for line in (node.meta.get("stack_trace") or "").splitlines() if line.strip()]
    frames = [(trace[i], trace[i + 1]) for i in range(len(trace) - 1)
              if trace[i].startswith("File ") and "eval_with_key" not in trace[i]]
    return f"{frames[-1][0].split('/')[-1]}: {frames[-1][1]}" if frames else ""


def uninitialised(program: torch.export.ExportedProgram) -> set[str]:
    """`empty`-like nodes and the slices, views and slice_scatters of them: their values are uninitialised memory
    in both runtimes until every element has been written."""
    names: set[str] = set()
    for node in program.graph.nodes:
        target = str(node.target)
        if "empty" in target or (any(a.name in names for a in node.all_input_nodes)
                                 and any(op in target for op in ("slice", "view", "transpose", "select"))):
            names.add(node.name)
    return names


def main(family: str, length: int = 14) -> None:
    warnings.simplefilter("ignore")
    model = untie_constant_weights(hf_zoo.build(family, "grouped_mm"))  # as onnx_coverage.py does
    lowered = moecompile.optimize(model)
    for module in lowered.modules():
        if isinstance(module, FusedMoE):
            module.lowering = onnx_lowering.StandardLowering()
    inputs = hf_zoo.example_inputs(model)
    args = tuple(inputs.values())
    wrapper = onnx_backend._Outputs(lowered.eval(), 0, list(inputs), True).eval()
    dynamic = (tuple(onnx_backend._dynamic_dims(t) for t in args),)
    program = torch.export.export(wrapper, args, dynamic_shapes=dynamic, strict=False)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        onnx_program = torch.onnx.export(program, args, dynamo=True, input_names=list(inputs),
                                         output_names=["output"], opset_version=18, optimize=False, report=False)
    decomposed = onnx_program.exported_program  # the program torch.onnx translated, node for node
    ids = torch.randint(0, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
    want = node_values(decomposed, ids)
    graph = onnx_program.model_proto
    named = [(out, node.op_type) for node in graph.graph.node for out in node.output if out in want]
    present = {o.name for o in graph.graph.output}
    graph.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n, _ in named if n not in present)
    fx_nodes, skipped = {n.name: n for n in decomposed.graph.nodes}, uninitialised(decomposed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(graph, str(path), save_as_external_data=True)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input_ids": ids.numpy()})))
    shown = 0
    for name, op_type in named:
        expected, actual = want[name], torch.from_numpy(got[name])
        node = fx_nodes[name]
        if actual.shape != expected.shape or name in skipped:
            continue
        if expected.dtype.is_floating_point:
            err = ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
            differs, text = err > 1e-4, f"{err:.1e} of max |value|"
        else:
            count = (actual.to(expected.dtype) != expected).sum().item()
            differs, text = count > 0, f"{count}/{expected.numel()} elements"
        if differs:
            print(f"{name} ({node.target}, ONNX {op_type}): {text}  [{source_line(node)}]")
            shown += 1
            if shown == SHOWN:
                break
    if not shown:
        print(f"{family} length {length}: every node matches")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
