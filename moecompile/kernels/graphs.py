"""CUDA graphs for small calls: a FusedMoE call or a compiled graph's op call with few tokens replays the kernels'
launches from a captured graph instead of launching them one by one from Python.

Place in the pipeline: kernels/launch.py sends CUDA calls of at most MAX_TOKENS tokens here, from eager FusedMoE calls
and from the op's implementation (what a torch.compile graph runs), and so does the experts op behind transformers'
router (hf_experts.py), whose inputs are the tokens, their expert ids and their combine weights. At
decode sizes the GPU work of one block takes tens of microseconds, while the host needs several times that to
allocate the buffers and launch seven kernels from Python (tools/profile_moe.py measures both), so an eager
decode step is bound by the host. A graph replay costs one launch.

A graph is captured the second time a key is seen (a one-off shape is not worth a capture) and replayed after that.
The key holds everything the launches depend on: the block's description, the input's shape, dtype, device and
stream, seq_len, and the addresses of the weights (a graph reads the weights in place, so in-place updates are seen;
a weight moved elsewhere gives a new key). Each replay copies the inputs into the graph's static inputs and returns
copies of its outputs, so no call's result is overwritten by a later one. All graphs of a (device, stream) share
one memory pool: their buffers are only read during their own replay and the copies after it, on that stream.

Not used while compiling (torch.compile traces the op's fake implementation instead), while the caller captures its
own graph (mode="reduce-overhead" graphs the whole model), or when MOECOMPILE_CUDA_GRAPHS=0.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..state import kept

MAX_TOKENS = 64
MAX_GRAPHS = 512  # least recently used graphs beyond this are released


def enabled() -> bool:
    return os.environ.get("MOECOMPILE_CUDA_GRAPHS", "1") != "0"


@dataclass
class _Entry:
    calls: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    static_inputs: tuple[torch.Tensor, ...] = ()
    outputs: tuple[torch.Tensor, ...] = ()


_ENTRIES: OrderedDict[tuple, _Entry] = kept("kernels.graphs: CUDA graphs of decode-size launches", OrderedDict())
_POOLS: dict[tuple[int, int], tuple] = kept("kernels.graphs: their memory pools", {})


def applies(x: torch.Tensor) -> bool:
    # deterministic mode is read at launch; a graph captured outside it would replay its atomics
    return (x.is_cuda and 0 < x.shape[0] <= MAX_TOKENS and enabled()
            and not torch.cuda.is_current_stream_capturing() and not torch.are_deterministic_algorithms_enabled())


def call(key: tuple, forward: Callable[..., tuple[torch.Tensor, ...]], *inputs: torch.Tensor,
         copy_out: int) -> tuple[torch.Tensor, ...]:
    """forward(*inputs), from a graph once `key` has been seen before; from a replay, copies of the first `copy_out`
    outputs only. `forward` must launch only shape-static work (no host sync, allocations sized by shapes) and read
    nothing that changes between calls except `inputs` (the block's x; the experts op's x, ids and weights)."""
    device = inputs[0].device
    stream = torch.cuda.current_stream(device)
    key = (*key, *[(tuple(t.shape), t.dtype) for t in inputs], device, stream.cuda_stream)
    entry = _ENTRIES.get(key)
    if entry is None:
        entry = _ENTRIES[key] = _Entry()
        while len(_ENTRIES) > MAX_GRAPHS:
            _ENTRIES.popitem(last=False)
    _ENTRIES.move_to_end(key)
    entry.calls += 1
    if entry.graph is None:
        if entry.calls < 2:
            return forward(*inputs)  # also compiles the kernels, which must not happen during a capture
        _capture(entry, forward, inputs, stream)
    for static, t in zip(entry.static_inputs, inputs):
        static.copy_(t)
    entry.graph.replay()
    return tuple(t.clone() for t in entry.outputs[:copy_out])


def _capture(entry: _Entry, forward, inputs: tuple[torch.Tensor, ...], stream: torch.cuda.Stream) -> None:
    pool_key = (inputs[0].device.index, stream.cuda_stream)
    if pool_key not in _POOLS:
        _POOLS[pool_key] = torch.cuda.graph_pool_handle()
    static_inputs = tuple(t.detach().clone() for t in inputs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=_POOLS[pool_key], capture_error_mode="thread_local"):
        outputs = forward(*static_inputs)
    entry.graph, entry.static_inputs, entry.outputs = graph, static_inputs, tuple(outputs)


def clear() -> None:
    """Release every captured graph (their memory returns to the pool)."""
    _ENTRIES.clear()
