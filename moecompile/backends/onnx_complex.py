"""Complex-valued operations torch.onnx cannot translate, rewritten in the exported program before it is translated.

Place in the pipeline: export_onnx (backends/onnx.py), between torch.export and torch.onnx. torch.onnx carries a
complex tensor as a real one with a trailing axis of 2 and translates only the operations its library marks as
complex-aware; `aten.unsqueeze` is not one of them, so rotary embeddings written with complex numbers
(DeepSeek-V2 and Llama 4: `freqs_cis.unsqueeze(1)`, `freqs_cis[:, :, None, :]`) stop the export. Here such an
unsqueeze becomes view_as_real -> unsqueeze of the real view -> view_as_complex, which torch.onnx translates and which
computes the same tensor. Custom translations cannot do this: torch.onnx registers them for real inputs only.
"""

from __future__ import annotations

import torch

_UNSQUEEZE = torch.ops.aten.unsqueeze.default


def _is_complex(node) -> bool:
    value = getattr(node, "meta", {}).get("val")
    return isinstance(value, torch.Tensor) and value.is_complex()


def rewrite_complex_unsqueeze(program: torch.export.ExportedProgram) -> int:
    """In place: every unsqueeze of a complex tensor in `program` through its real view; returns how many."""
    graph = program.graph_module.graph
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _UNSQUEEZE or not _is_complex(node.args[0]):
            continue
        source, dim = node.args[0], node.args[1]
        rank = source.meta["val"].dim()
        dim = dim + rank + 1 if dim < 0 else dim  # an axis of the complex tensor, so before the real view's last
        with graph.inserting_before(node):
            real = graph.call_function(torch.ops.aten.view_as_real.default, (source,))
            real.meta["val"] = torch.view_as_real(source.meta["val"])
            unsqueezed = graph.call_function(_UNSQUEEZE, (real, dim))
            unsqueezed.meta["val"] = real.meta["val"].unsqueeze(dim)
            complex_ = graph.call_function(torch.ops.aten.view_as_complex.default, (unsqueezed,))
            complex_.meta.update(node.meta)
        node.replace_all_uses_with(complex_)
        graph.erase_node(node)
        rewritten += 1
    if rewritten:
        program.graph_module.recompile()
    return rewritten
