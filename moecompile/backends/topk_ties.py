"""PyTorch with ONNX TopK's tie order, for export verify (backends/onnx.py).

Place in the pipeline: export verify only. ONNX TopK breaks exact ties by the lower index first; torch.topk leaves
the order of ties unspecified (its CPU and CUDA kernels differ). A model whose own top-k meets exact ties (the
DeepSeek sparse-attention indexer scores keys through a ReLU, so many keys score exactly 0) then selects other
elements in onnxruntime than in PyTorch, though the file computes what the model does. Under `onnx_topk_ties()`,
torch.topk selects as ONNX does, so verify can tell such a tie from a wrong translation.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


def topk_lower_index_first(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk, ties broken by the lower index first (a stable sort keeps equal elements in index order)."""
    values, indices = torch.sort(x, dim=dim, descending=largest, stable=True)
    return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))


class onnx_topk_ties(TorchFunctionMode):
    """Within this context, torch.topk and Tensor.topk break ties as ONNX TopK does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.topk, torch.Tensor.topk) and kwargs.get("out") is None:
            return topk_lower_index_first(*args, **kwargs)
        return func(*args, **kwargs)
