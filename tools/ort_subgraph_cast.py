"""Does onnxruntime's CPU provider cast an fp16 weight to fp32 on every call when the MatMul that reads it sits in
an If branch? (On x86 CPUs it inserts a Cast to fp32 before each fp16 MatMul; in the main graph that
Cast of an initializer is folded at load.) Explains the Cast share in results/onnx.md's profile of the standard form.

Run: `python tools/ort_subgraph_cast.py` -> kernel ms by op type over 10 calls, one fp16 MatMul [4, 2048] x
[2048, 2048] in the main graph and the same inside an If. The If's own time is left out (its node's time counts
its subgraph's again).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx.helper as h
import onnx.numpy_helper as nh
import onnxruntime as ort
from onnx import TensorProto

CALLS = 10


def kernel_ms(model, feeds: dict) -> dict[str, float]:
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(CALLS):
        session.run(None, feeds)
    trace_file = Path(session.end_profiling())
    trace = json.loads(trace_file.read_text())
    trace_file.unlink()
    ms: dict[str, float] = {}
    for event in trace:
        op = event.get("args", {}).get("op_name")
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and op != "If":
            ms[op] = ms.get(op, 0.0) + event["dur"] / 1e3
    return {op: round(v, 2) for op, v in sorted(ms.items())}


def main() -> None:
    weight = nh.from_array(np.random.default_rng(0).random((2048, 2048)).astype(np.float16), "W")
    x = h.make_tensor_value_info("x", TensorProto.FLOAT16, [4, 2048])
    y = h.make_tensor_value_info("y", TensorProto.FLOAT16, None)
    feeds = {"x": np.ones((4, 2048), np.float16)}
    opset = [h.make_opsetid("", 18)]

    main_graph = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"])], "main", [x], [y], [weight])
    print("MatMul in the main graph:", kernel_ms(h.make_model(main_graph, opset_imports=opset), feeds))

    then = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y1"])], "then", [],
                        [h.make_tensor_value_info("y1", TensorProto.FLOAT16, None)])
    other = h.make_graph([h.make_node("Identity", ["x"], ["y2"])], "else", [],
                         [h.make_tensor_value_info("y2", TensorProto.FLOAT16, None)])
    cond = h.make_tensor_value_info("c", TensorProto.BOOL, [])
    if_graph = h.make_graph([h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "if", [cond, x],
                            [y], [weight])
    print("MatMul inside an If:", kernel_ms(h.make_model(if_graph, opset_imports=opset), dict(feeds, c=np.array(True))))


if __name__ == "__main__":
    main()
