"""A block's structure: everything its behaviour can depend on besides the values of its floating-point tensors.

Place in the pipeline: describe reads a block on redrawn weights, and confirm's re-randomised checks redraw them too,
so both give the same answer for two blocks of one structure (the layers of a model). describe reads each structure
once and gives later blocks that description; confirm runs its re-randomised checks once per structure and
description. Every block is still checked on its own weights by confirm.

The key holds: each submodule's path and class, every tensor's name, shape, dtype and device type, the content of
tensors that are not floating point or not registered (an index table, a mask: describe copies them as they are), and
every setting a submodule holds (`top_k`, `norm_topk_prob`, ...). A setting that is not a plain value (a number, a
string, a dtype, or a tuple/list/dict of these) is keyed by the object itself, so two blocks share a key only if
they hold the same one (a config object shared by all layers).
"""

from __future__ import annotations

import enum
import hashlib
import itertools

import torch
from torch import nn

_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"training"}
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum)


def structure_key(module: nn.Module) -> tuple:
    """A hashable key equal for two blocks only where they differ in no more than their floating tensors' values."""
    tensors = tuple(_tensor_key(name, t) for name, t in itertools.chain(
        module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)))
    settings = tuple(
        (path, type(sub).__module__, type(sub).__qualname__,
         tuple(sorted((k, _setting_key(v)) for k, v in vars(sub).items() if k not in _MODULE_INTERNALS)))
        for path, sub in module.named_modules(remove_duplicate=False))
    return tensors, settings


def _tensor_key(name: str, tensor: torch.Tensor) -> tuple:
    content = None if tensor.is_floating_point() else _digest(tensor)
    return name, tuple(tensor.shape), str(tensor.dtype), tensor.device.type, content


def _digest(tensor: torch.Tensor):
    if tensor.device.type == "meta":
        return ("object", id(tensor))
    data = tensor.detach().cpu().contiguous()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()


def _setting_key(value, depth: int = 0):
    if isinstance(value, _PLAIN):
        return type(value).__name__, value
    if isinstance(value, torch.Tensor):  # not registered: copied as it is, so its content counts
        return "tensor", tuple(value.shape), str(value.dtype), _digest(value)
    if depth < 4 and isinstance(value, (tuple, list)):
        return type(value).__name__, tuple(_setting_key(v, depth + 1) for v in value)
    if depth < 4 and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return "dict", tuple(sorted((k, _setting_key(v, depth + 1)) for k, v in value.items()))
    return "object", id(value)  # the same object or not; it is alive while the model is, so ids are not reused
