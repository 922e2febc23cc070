"""What moecompile keeps between calls, process-wide, and `reset()` to forget it.

Place in the pipeline: below every other module. Each module that keeps something between calls creates it through
`kept(...)`, which records it here with what it holds, so the whole state is listed in one place (`kept_state()`)
and `moecompile.reset()` clears it. What is kept, and why:
- optimize's reports by model (pipeline.py): `moecompile.report(model)` after optimize;
- the torch.compile backend's report per compiled graph (backends/dynamo.py): `moecompile.report(compiled)`;
- descriptions read from compiled graph regions (backends/graph_blocks.py): layers with the same ops, and recompiles
  for another token count, reuse a description instead of reading it again;
- router-tap classes (router_tap.py): one generated subclass per HF router class;
- the ONNX standard form's If branches (backends/onnx_if.py): exported once per block description;
- CUDA graphs of decode-size kernel launches and their memory pools (kernels/graphs.py), side streams for shared
  experts (kernels/launch.py), Triton TTIR builds for traced launches (kernels/traced.py).
Pure memos of spec parsing (functools caches) are not listed: they hold no tensors and change no result.

reset() drops all of it: reports, reused descriptions and CUDA graphs are built again on the next call. Call it
between unrelated models in a long-lived process, or after torch._dynamo.reset().
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class Kept:
    name: str  # "module: what it holds"
    container: Any  # a dict, list or weak dictionary; cleared by reset()


_KEPT: list[Kept] = []


def kept(name: str, container: T) -> T:
    """Record `container` (module-level state of the caller) under `name` and return it."""
    _KEPT.append(Kept(name, container))
    return container


def kept_state() -> dict[str, int]:
    """{name: entries held now} for every piece of state moecompile keeps between calls."""
    return {k.name: len(k.container) for k in _KEPT}


def reset() -> None:
    """Forget everything kept between calls (see the module docstring)."""
    for k in _KEPT:
        k.container.clear()
