"""Traced launches' compile cost: one TTIR build per kernel specialisation, not one per launch.

Place in the pipeline: compiled graphs that hold the kernels' launches (launch.py's TRACED_LAUNCHES, through
torch.library.wrap_triton). For each such launch, torch's Triton mutation analysis builds the kernel's TTIR (a Triton
front-end compile, ~70 ms on the device host) to read which arguments it stores to, and it does so again at each
stage (functionalization, Inductor's lowering): a 4-layer Qwen3 decode step built it 48 times, 9 s of a 29 s compile
under cProfile (tools/profile_compile.py). Every layer launches the same specialisations, so the builds repeat.

`install()` puts a memo in front of torch's `generate_ttir`, for moecompile's kernels only. The key is what that
function itself reads from the call: the kernel's code, each tensor argument's dtype (it replaces tensors by
`torch.empty(2, dtype)`), each symbolic size as such (it replaces them by 2), every other argument's value, and the
rest of the call (TMA metadata). Its callers hand it a fresh dict each time, so a hit need not repeat what the
function does to that dict. Kernels of other code, and calls whose arguments cannot be keyed, go straight to
torch's function.

Why a process-wide patch rather than a scoped one: torch's callers look `generate_ttir` up on its module at each
call, from inside Inductor's lowering, where no context of ours is active; and the memo changes nothing for any
other kernel (they reach torch's function untouched). It is installed on the first traced launch, not at import.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from ..state import kept

_LOCK = threading.Lock()
_CACHE: dict = kept("kernels.traced: Triton TTIR builds for traced launches", {})
_INSTALLED = False


def _jit_function(kernel):
    """The jit function behind a launched kernel (an Autotuner, or another wrapper, holds it as .fn)."""
    while not hasattr(kernel, "arg_names") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def _kernel_identity(kernel) -> tuple | None:
    """What names one of moecompile's kernels' code within this process: its module and name (and Triton's hash of
    its source and the jit functions it calls, where it has one); None for other code's kernels. Not the object:
    the stages do not hand over the same one."""
    jit = _jit_function(kernel)
    fn = getattr(jit, "fn", None)
    if not (getattr(fn, "__module__", None) or "").startswith("moecompile."):
        return None
    # an Autotuner's first config takes part in the build: keep it apart from its bare jit function
    return (type(kernel).__name__, fn.__module__, fn.__qualname__, getattr(jit, "cache_key", None))


def _arg_key(value):
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym",)
    if isinstance(value, torch.Tensor) or type(value).__name__ == "TensorBox":  # fake tensors are Tensors
        dtype = value.dtype if isinstance(value, torch.Tensor) else value.get_dtype()
        return ("tensor", dtype)
    if type(value).__module__.startswith("sympy"):
        return ("sym",)
    hash(value)  # a value that cannot be keyed raises TypeError: no cache for this call
    return (type(value).__name__, value)


def key(kernel: Callable, kernel_args: dict, rest: tuple) -> tuple | None:
    """The memo's key for generate_ttir(kernel, kernel_args, *rest), or None where the call is not cached."""
    identity = _kernel_identity(kernel)
    if identity is None or not isinstance(kernel_args, dict):
        return None
    try:
        return identity, tuple(sorted((name, _arg_key(value)) for name, value in kernel_args.items())), repr(rest)
    except (TypeError, AttributeError):
        return None


def _memoized(original):
    def generate_ttir(kernel, kernel_args, *rest, **kwargs):
        cache_key = key(kernel, kernel_args, rest) if not kwargs else None
        if cache_key is None:
            return original(kernel, kernel_args, *rest, **kwargs)
        with _LOCK:
            hit = _CACHE.get(cache_key)
        if hit is None:
            module, arg_names = original(kernel, kernel_args, *rest)
            hit = (module, list(arg_names))
            with _LOCK:
                _CACHE[cache_key] = hit
        return hit[0], list(hit[1])

    generate_ttir.__wrapped__ = original
    generate_ttir.moecompile_memo = True
    return generate_ttir


def install() -> bool:
    """Put the memo in front of torch's generate_ttir (once); False where this torch has no such function."""
    global _INSTALLED
    if _INSTALLED:
        return True
    try:
        from torch._higher_order_ops import triton_kernel_wrap
    except ImportError:
        return False
    original = getattr(triton_kernel_wrap, "generate_ttir", None)
    if original is None:
        return False
    if not getattr(original, "moecompile_memo", False):
        triton_kernel_wrap.generate_ttir = _memoized(original)
    _INSTALLED = True
    return True
