"""Where a whole-model ONNX mismatch comes from (the 'error outside MoE' rows of results/onnx_coverage.md).

At two lengths, each against the model itself: its moecompile copy with the standard ONNX form in eager, the
torch.export program of that copy, and onnxruntime (graph optimizations off, then on) on torch.onnx's file of the
program. Prints the max error over max |output| of each.
Run: `python benchmarks/onnx_locate.py FAMILY` (CPU, a few minutes).
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import warnings
from pathlib import Path

import onnxruntime as ort
import torch

import moecompile
from moecompile import hf_zoo
from moecompile.backends import onnx as onnx_backend
from moecompile.backends import onnx_lowering
from moecompile.fused import FusedMoE
from onnx_coverage import untie_constant_weights  # benchmarks/ is the script's directory


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def main(family: str) -> None:
    warnings.simplefilter("ignore")
    model = untie_constant_weights(hf_zoo.build(family, "grouped_mm"))  # as onnx_coverage.py does
    lowered = moecompile.optimize(model)
    for module in lowered.modules():
        if isinstance(module, FusedMoE):
            module.lowering = onnx_lowering.StandardLowering()
    inputs = hf_zoo.example_inputs(model)
    args = tuple(inputs.values())
    original = onnx_backend._Outputs(model.eval(), 0, list(inputs), True).eval()
    wrapper = onnx_backend._Outputs(lowered.eval(), 0, list(inputs), True).eval()
    dynamic = (tuple(onnx_backend._dynamic_dims(t) for t in args),)
    program = torch.export.export(wrapper, args, dynamic_shapes=dynamic, strict=False)
    lengths = {n: torch.randint(0, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(n))
               for n in (9, 14)}
    with torch.no_grad():
        want = {n: original(ids) for n, ids in lengths.items()}
        for n, ids in lengths.items():
            print(f"{family} length {n}: lowered eager {rel(wrapper(ids), want[n]):.1e}, "
                  f"exported program {rel(program.module()(ids), want[n]):.1e}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
            torch.onnx.export(program, args, dynamo=True, input_names=list(inputs), output_names=["output"],
                              opset_version=18, optimize=True, report=False).save(str(path))
        for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
            options = ort.SessionOptions()
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for n, ids in lengths.items():
                got = torch.from_numpy(session.run(None, {"input_ids": ids.numpy()})[0])
                print(f"{family} length {n}: onnxruntime ({level}) {rel(got, want[n]):.1e}")


if __name__ == "__main__":
    main(sys.argv[1])
