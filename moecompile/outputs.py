"""What a fused block returns: its hidden states alone, with one extra output, or in the structure the original
block returned (MoESpec.outputs: `(out, (counts, loss))`, `(out, loss, counts)`).

Place in the pipeline: the last step of fused.run_block, after the reference or the kernels computed y, the router
logits and the [T, k] combine weights. Extras that need the routing's choices (tokens per expert, the experts'
output biases) recompute it in PyTorch from the logits' inputs (a [T, E] computation) when the kernels ran.
"""

from __future__ import annotations

import torch

from .reference import Routing, aux_loss, expert_bias_term, expert_counts, route
from .spec import MoESpec, MoEWeights


class _Computed:
    """The block's outputs by name, each computed when first asked for."""

    def __init__(self, spec: MoESpec, weights: MoEWeights, x: torch.Tensor, seq_len: int | None, y: torch.Tensor,
                 logits: torch.Tensor, slot_weights: torch.Tensor | None, routing: Routing | None, dtype):
        self.spec, self.weights, self.x, self.seq_len = spec, weights, x, seq_len
        self.y, self.logits, self.slot_weights, self._routing, self.dtype = y, logits, slot_weights, routing, dtype

    def routing(self) -> Routing:
        if self._routing is None:
            self._routing = route(self.spec.router, self.weights, self.x, self.seq_len)
        return self._routing

    def __getitem__(self, name: str):
        if name == "y":
            return self.y
        if name == "router_logits":
            return self.logits.to(self.dtype)
        if name == "aux_loss":
            return aux_loss(self.spec, self.logits)
        if name == "expert_counts":
            return expert_counts(self.spec, self.routing())
        if name == "topk_weights":
            return self.slot_weights.to(self.dtype)
        raise KeyError(name)

    def tree(self, structure):
        return tuple(self.tree(item) if isinstance(item, tuple) else self[item] for item in structure)


def block_outputs(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, seq_len: int | None, y: torch.Tensor,
                  logits: torch.Tensor, slot_weights: torch.Tensor | None, routing: Routing | None,
                  dtype: torch.dtype) -> torch.Tensor | tuple:
    """y (already in the block's output shape), or the tuple the block returns. `routing`: the reference's, when it
    computed the block, else None; `dtype`: the input's, for the logits and weights returned."""
    if spec.outputs is None and spec.extra_output == "none":
        return y
    computed = _Computed(spec, weights, x, seq_len, y, logits, slot_weights, routing, dtype)
    if spec.outputs is not None:
        return computed.tree(spec.outputs)
    if spec.extra_output == "expert_bias":  # y returned without the experts' output biases, their sum apart
        term = expert_bias_term(spec, weights, computed.routing()).to(y.dtype)
        term = term if spec.flat_output else term.reshape(y.shape)
        return y - term, term
    return y, computed[spec.extra_output]
