"""Detect, step 1: propose MoE block candidates from module structure alone (no execution).

Place in the pipeline: capture -> **detect (propose)** -> describe (read the spec) -> confirm -> fuse.

A candidate is the smallest module holding both
  - experts: a ModuleList of E structurally identical MLP-like modules, or 3-D tensors with a common leading E held by
    one module and its direct children (HF `*Experts` classes, hand-written einsum/bmm forms), and
  - a router: a 2-D tensor of shape [E, H] (or [H, E]) outside the experts, where H is a dimension of the experts.
Its other MLP-like children are shared-expert candidates; a [1, H] linear child is a shared-expert gate candidate.
A linear into top-k with no experts beside it (pooling, retrieval, sampling heads) is never proposed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize


def expert_view(tensor: torch.Tensor, split_experts: int) -> torch.Tensor:
    """`tensor` itself, or its [E, X, Y] view when it stores E experts flattened as [E*X, Y], or its [E, H] view when
    it is a router flattened to one dimension [E*H] (OLMo-core)."""
    if not split_experts:
        return tensor
    return tensor.view(split_experts, -1) if tensor.dim() == 1 else tensor.view(split_experts, -1, tensor.shape[-1])


@dataclass
class TensorRef:
    """A parameter or buffer of the model, by owning module and attribute name."""

    owner: nn.Module
    owner_path: str
    name: str
    split_experts: int = 0  # E when the source stores E experts flattened as [E*X, Y] (DBRX): seen as [E, X, Y]
    # (or a router as [E*H]: seen as [E, H])

    @property
    def raw(self) -> torch.Tensor:
        return getattr(self.owner, self.name)

    @property
    def tensor(self) -> torch.Tensor:
        return expert_view(self.raw, self.split_experts)

    @property
    def qualname(self) -> str:
        return f"{self.owner_path}.{self.name}" if self.owner_path else self.name


@dataclass
class Candidate:
    """A proposed MoE block; describe reads it into an MoESpec or says why it cannot."""

    path: str
    module: nn.Module
    num_experts: int
    hidden_size: int
    router: list[TensorRef]  # [E, H] / [H, E] tensors outside the experts, most likely first
    experts_list: nn.ModuleList | nn.ModuleDict | None = None
    experts_list_path: str = ""
    stacked: list[TensorRef] = field(default_factory=list)  # 3-D tensors with leading E
    stacked_owner: nn.Module | None = None  # the module holding most of them (an HF *Experts module)
    vectors: list[TensorRef] = field(default_factory=list)  # [E] tensors: router or correction bias candidates
    shared: list[tuple[str, nn.Module]] = field(default_factory=list)
    shared_gate: tuple[str, nn.Module] | None = None
    output_bias: TensorRef | None = None  # an [H] vector the block itself owns (JetMoE adds it to its output)


def _own_tensors(module: nn.Module):
    yield from module.named_parameters(recurse=False)
    yield from ((n, b) for n, b in module.named_buffers(recurse=False) if b is not None)


def effective_parameters(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(qualified name, tensor) for the parameters of `module` and its submodules as forward sees them: a
    parametrized tensor (weight norm, nn.utils.parametrize) by its own name, computed, instead of its originals."""
    for name, sub in module.named_modules():
        if "parametrizations" in name.split("."):
            continue
        own = dict(sub.named_parameters(recurse=False))
        if parametrize.is_parametrized(sub):
            own.update({pname: getattr(sub, pname) for pname in sub.parametrizations})
        for pname, p in own.items():
            yield (f"{name}.{pname}" if name else pname), p


def has_parametrized_weights(module: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in module.modules())


def _matrices(module: nn.Module) -> list[torch.Tensor]:
    return [p for _, p in effective_parameters(module) if p.dim() == 2]


def is_mlp_like(module: nn.Module) -> bool:
    """Two or three weight matrices, only 1-D tensors besides, no nested module lists: an expert-shaped MLP."""
    if any(isinstance(m, (nn.ModuleList, nn.ModuleDict)) and "parametrizations" not in name.split(".")
           for name, m in module.named_modules()):
        return False
    tensors = [p for _, p in effective_parameters(module)]
    mats = [p for p in tensors if p.dim() == 2]
    return 2 <= len(mats) <= 3 and all(p.dim() in (1, 2) for p in tensors) and min(min(m.shape) for m in mats) > 1


def serves_hidden_size(module: nn.Module, H: int) -> bool:
    """Every weight matrix of the MLP-like `module` has H as its input or output dimension."""
    return all(H in p.shape for p in _matrices(module))


def _same_structure(modules: list[nn.Module]) -> bool:
    def signature(m: nn.Module):
        return [(n, tuple(p.shape)) for n, p in effective_parameters(m)]
    first = signature(modules[0])
    return all(signature(m) == first for m in modules[1:])


def _expert_groups(module: nn.Module, path: str):
    """(kind, E, payload) for expert collections held directly by `module`."""
    for name, child in _container_descendants(module):
        members = expert_members(child)
        if members and all(is_mlp_like(m) for m in members) and _same_structure(members):
            yield "list", len(members), (name, child)
    stacked: dict[int, list[TensorRef]] = {}
    holders = [(path, module)] + [(f"{path}.{n}" if path else n, c) for n, c in module.named_children()]
    for holder_path, holder in holders:
        for name, tensor in _own_tensors(holder):
            if tensor.dim() == 3:
                stacked.setdefault(tensor.shape[0], []).append(TensorRef(holder, holder_path, name))
    for E, refs in stacked.items():
        if len(refs) >= 2:
            yield "stacked", E, refs
    yield from _flattened_experts(module, path)


CONTAINER_DEPTH = 3  # an expert list may sit this many modules down, under modules that hold no tensors


def _container_descendants(module: nn.Module):
    """(relative path, module) for the children of `module`, and their descendants reached through modules that
    hold no tensors of their own and are no expert list themselves (DeepSpeed's `Experts`, Megatron's local experts
    container)."""
    frontier = [("", module)]
    for _ in range(CONTAINER_DEPTH):
        next_frontier = []
        for prefix, parent in frontier:
            for name, child in parent.named_children():
                path = f"{prefix}.{name}" if prefix else name
                yield path, child
                if not expert_members(child) and next(_own_tensors(child), None) is None:
                    next_frontier.append((path, child))
        frontier = next_frontier


EXPERT_COUNT_ATTRS = ("num_experts", "moe_num_experts", "num_local_experts")


def _flattened_experts(module: nn.Module, path: str):
    """Experts stored as 2-D [E*X, Y] matrices (DBRX), in a child or grandchild that declares E as an attribute."""
    def join(prefix: str, name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    levels = [(module, join(path, n), c) for n, c in module.named_children()]
    levels += [(child, join(child_path, n), g) for _, child_path, child in levels for n, g in child.named_children()]
    for parent, holder_path, holder in levels:
        counts = [getattr(m, a, None) for m in (holder, parent) for a in EXPERT_COUNT_ATTRS]
        E = next((c for c in counts if isinstance(c, int) and c > 1), None)
        if E is None:
            continue
        refs = [TensorRef(holder, holder_path, name, split_experts=E) for name, t in _own_tensors(holder)
                if t.dim() == 2 and t.shape[0] % E == 0 and t.shape[0] > E]
        if len(refs) >= 2:
            yield "stacked", E, refs


def expert_members(container: nn.Module) -> list[nn.Module]:
    """The experts of a ModuleList, or of a ModuleDict in insertion order (Switch Transformers keys them expert_i)."""
    if isinstance(container, nn.ModuleList):
        return list(container)
    if isinstance(container, nn.ModuleDict):
        return list(container.values())
    return []


def _expert_dims(kind: str, payload) -> set[int]:
    if kind == "list":
        return {d for p in _matrices(expert_members(payload[1])[0]) for d in p.shape}
    return {d for ref in payload for d in ref.tensor.shape[1:]}


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots if r)


def propose(model: nn.Module) -> list[Candidate]:
    """All candidates in `model`, in module order. Where candidates nest, the innermost wins: an outer module that
    holds a block's tensors through a child (a decoder layer around a hand-written block) is not the block."""
    from ..fused import FusedMoE

    found: list[Candidate] = []
    fused = [path for path, module in model.named_modules() if isinstance(module, FusedMoE)]
    for path, module in model.named_modules():
        if any(path == f or path.startswith(f + ".") for f in fused):  # already fused: see already_fused()
            continue
        for kind, E, payload in _expert_groups(module, path):
            candidate = _find_router(module, path, kind, E, payload)
            if candidate is not None:
                found.append(candidate)
                break
    paths = [c.path for c in found] + fused  # a module around a fused block is not a block either
    return [c for c in found
            if not any(other != c.path and (c.path == "" or other.startswith(c.path + ".")) for other in paths)]


def already_fused(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The FusedMoE modules of `model` (an optimized model optimized again): kept as they are, never re-read."""
    from ..fused import FusedMoE

    return [(path, m) for path, m in model.named_modules() if isinstance(m, FusedMoE)]


def _find_router(module: nn.Module, path: str, kind: str, E: int, payload) -> Candidate | None:
    expert_dims = _expert_dims(kind, payload)
    experts_roots = []
    if kind == "list":
        experts_roots.append(f"{path}.{payload[0]}" if path else payload[0])
    stacked_ids = {id(r.raw) for r in payload} if kind == "stacked" else set()
    routers: list[TensorRef] = []
    vectors: list[TensorRef] = []
    for sub_path, sub in module.named_modules(prefix=path):
        if _inside(sub_path, experts_roots):
            continue
        for name, tensor in _own_tensors(sub):
            if id(tensor) in stacked_ids:
                continue
            ref = TensorRef(sub, sub_path, name)
            if tensor.numel() == E and max(tensor.shape) == E and tensor.dim() <= 2:
                vectors.append(ref)  # [E] or [1, E] (Ernie 4.5 keeps its correction bias as [1, E])
            elif tensor.dim() == 1 and tensor.numel() % E == 0 and tensor.numel() // E in expert_dims - {1}:
                routers.append(TensorRef(sub, sub_path, name, split_experts=E))  # [E*H]: a flattened router
            elif tensor.dim() == 2 and "bias" in name.lower():
                continue  # per-expert biases [E, X] sit beside the stacked weights; a router is a weight
            elif tensor.dim() == 2 and tensor.shape[0] == E and tensor.shape[1] in expert_dims:
                routers.append(ref)
            elif tensor.dim() == 2 and tensor.shape[1] == E and tensor.shape[0] in expert_dims and E not in expert_dims:
                routers.append(ref)
    if not routers:
        return None
    # Prefer a tensor named like a router, then the first found.
    routers.sort(key=lambda r: 0 if any(w in r.qualname.lower() for w in ("gate", "router", "route")) else 1)
    router_weight = routers[0].tensor
    H = router_weight.shape[1] if router_weight.shape[0] == E else router_weight.shape[0]
    candidate = Candidate(path=path, module=module, num_experts=E, hidden_size=H, router=routers, vectors=vectors)
    if kind == "list":
        candidate.experts_list_path, candidate.experts_list = experts_roots[0], payload[1]
    else:
        candidate.stacked = payload
        owners = {id(r.owner): r.owner for r in payload}
        candidate.stacked_owner = max(owners.values(), key=lambda o: sum(r.owner is o for r in payload))
    router_owners = {id(r.owner) for r in routers}
    own_vectors = [name for name, t in _own_tensors(module) if t is not None and t.dim() == 1 and t.numel() == H]
    if len(own_vectors) == 1:
        candidate.output_bias = TensorRef(module, path, own_vectors[0])
    for name, child in module.named_children():
        child_path = f"{path}.{name}" if path else name
        holds_experts = any(m is candidate.experts_list or m is candidate.stacked_owner for m in child.modules())
        if holds_experts or id(child) in router_owners:
            continue
        if isinstance(child, nn.Linear) and tuple(child.weight.shape) == (1, H):
            candidate.shared_gate = (child_path, child)
        elif is_mlp_like(child) and serves_hidden_size(child, H):
            candidate.shared.append((child_path, child))
    return candidate
