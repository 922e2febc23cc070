"""MoE blocks in the FX graphs dynamo hands the torch.compile backend: find them at the op level, read them with the
core's passes, and replace each with one call of the fused op.

Place in the pipeline: the torch.compile path (backends/dynamo.py calls `rewrite_graph`). The eager path works on
nn.Modules; here there are only graph nodes, so:

1. Router nodes: a linear-like op (F.linear, matmul, mm, addmm, @) whose weight is a graph input of shape [E, H] with
   E >= 2, and whose result reaches top-k, softmax, sigmoid or ReLU within a few ops.
2. The block around a router: the innermost module (dynamo records each node's `nn_module_stack`) whose nodes hold
   the router and also use a parameter with E rows leading (stacked experts) or E modules' parameters (a list of
   experts). Its nodes form the region; the region must take one activation tensor (plus parameters) and give one
   tensor back (or that tensor and the router logits).
3. The region becomes a `RegionBlock`: an nn.Module holding the region's parameters at their paths relative to the
   block, whose forward runs the region's ops. The core's detect, describe and confirm read it exactly as they read
   an eager block: structure proposes, execution on random inputs decides, and a block no description reproduces is
   left as it was, with the reason in the pass log.
4. The region's nodes are replaced by one call that rebuilds the canonical weights from the graph's own parameter
   inputs (so training updates and gradients reach the model's parameters) and runs FusedMoE's computation.
"""

from __future__ import annotations

import operator
import re
import weakref
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.stateless import _reparametrize_module

from ..fused import run_block
from ..passes.describe import KEEP_AUTOGRAD, Description
from ..passes.log import BlockRecord, Report
from ..passes.manager import ANALYSIS_PASSES, ConfirmPass, DetectPass, PassContext, PassManager
from ..state import kept
from .graph_capacity import baked_capacity, lift, with_capacity

LINEAR_OPS = {F.linear, torch.matmul, torch.mm, torch.addmm, operator.matmul}
SELECT_OPS = {torch.topk, torch.softmax, F.softmax, torch.sigmoid, F.sigmoid, torch.relu, F.relu}
SELECT_METHODS = {"topk", "softmax", "sigmoid", "relu"}
ROUTER_REACH = 4  # ops between the router GEMM and the scoring/selection op


@dataclass
class Region:
    path: str  # the block's module path, relative to the compiled frame's module ("model.layers.0.mlp")
    module_type: str
    nodes: list[fx.Node]
    activation: fx.Node  # the one non-parameter input
    params: dict[str, fx.Node]  # relative parameter path -> placeholder
    outputs: list[fx.Node]  # region nodes used after it
    extra_inputs: list[fx.Node] = field(default_factory=list)
    num_experts: int = 0  # the router's output width


def _param_path(placeholder: fx.Node) -> str | None:
    """'L_self_modules_model_modules_layers_modules_0_modules_mlp_parameters_weight_' -> 'model.layers.0.mlp.weight'
    (dynamo's names for lifted parameters and buffers); None for other inputs."""
    name = str(placeholder.target)
    if "_parameters_" not in name and "_buffers_" not in name:
        return None
    parts = re.split(r"(?:^|_)(modules|parameters|buffers)_", name.rstrip("_"))
    names = [parts[i + 1] for i in range(1, len(parts) - 1, 2)]
    return ".".join(names) if names else None


def _module_path(stack_path: str) -> str:
    """"L['self'].model.layers[0].mlp" -> "model.layers.0.mlp"."""
    path = re.sub(r"\[(\d+)\]", r".\1", stack_path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"^L\['[^']+'\]\.?", "", path)
    return path.lstrip(".")


def _example(node: fx.Node):
    return node.meta.get("example_value")


def _hint(size) -> int:
    """A size as an int: a symbolic size (a graph recompiled with dynamic shapes) by the value it was traced with."""
    return int(size.node.hint) if isinstance(size, torch.SymInt) else int(size)


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(_hint(d) for d in _example(node).shape)


@dataclass
class SymbolicSizes:
    """How a region traced with symbolic sizes gets them from its input: the symbol of each symbolic dim of the
    activation, and each extra size input as an expression in those symbols."""

    dims: dict  # sympy symbol -> activation dim
    exprs: list  # sympy expression per extra input, in order

    def values(self, shape: tuple[int, ...]) -> list[int]:
        subs = {sym: shape[d] for sym, d in self.dims.items()}
        return [int(e.subs(subs)) for e in self.exprs]


def _symbolic_sizes(region: Region) -> SymbolicSizes | None:
    dims = {}
    for i, d in enumerate(_example(region.activation).shape):
        if isinstance(d, torch.SymInt):
            if not d.node.expr.is_Symbol:
                return None
            dims[d.node.expr] = i
    exprs = []
    for node in region.extra_inputs:
        value = _example(node)
        if not isinstance(value, torch.SymInt) or not value.node.expr.free_symbols <= set(dims):
            return None
        exprs.append(value.node.expr)
    return SymbolicSizes(dims, exprs)


CAST_METHODS = {"to", "type", "float", "half", "bfloat16", "t", "contiguous", "view", "reshape"}


def _through_casts(arg) -> fx.Node | None:
    """The parameter input behind `arg`, through dtype casts, transposes and views (DeepSeek computes its router in
    fp32; OLMo-core keeps it flat, [E*H], and views it [E, H])."""
    while isinstance(arg, fx.Node):
        if arg.op == "placeholder":
            return arg if _param_path(arg) is not None else None
        if arg.op == "call_method" and arg.target in CAST_METHODS or (
                arg.op == "call_function" and arg.target in (torch.t, torch.Tensor.to, torch.reshape)):
            arg = arg.args[0]
            continue
        return None
    return None


def _router_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, int]]:
    """(node, E) for each linear-like op on an [E, H] parameter that feeds a scoring or selection op."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_OPS:
            continue
        position, weight = next(((i, w) for i, w in enumerate(map(_through_casts, node.args)) if w is not None),
                                (None, None))
        value = _example(node.args[position]) if weight is not None else None  # as used: after any view
        if value is None or value.dim() != 2:
            continue
        E = _experts_of_router(node, position, value)
        if E < 2:
            continue
        frontier, seen = [node], 0
        while frontier and seen < ROUTER_REACH:
            frontier = [u for n in frontier for u in n.users]
            seen += 1
            if any((u.op == "call_function" and u.target in SELECT_OPS) or
                   (u.op == "call_method" and u.target in SELECT_METHODS) for u in frontier):
                found.append((node, E))
                break
    return found


def _experts_of_router(node: fx.Node, position: int, value: torch.Tensor) -> int:
    """E for a router parameter at argument `position` of a linear-like op: F.linear takes [E, H]; a matmul's right
    operand (x @ W, mm(x, W), addmm(b, x, W)) is [H, E] (Llama 4's reference router) unless transposed on the way,
    which _through_casts follows: then the op's own output width is E."""
    if node.target is F.linear:
        return value.shape[0]
    out = _example(node)
    if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[-1] in value.shape:
        return int(out.shape[-1])
    right = position == (2 if node.target is torch.addmm else 1)
    return value.shape[1] if right else value.shape[0]


def _regions(gm: fx.GraphModule) -> tuple[list[Region], dict[str, Region], list[str]]:
    """The MoE block regions, the regions of their submodules that map one tensor to one tensor (by path), and why
    each other router found was not read (its experts not in this graph, or its block not a one-tensor map). A graph
    without a router op costs one pass over its nodes. Paths are relative to the frame dynamo traced (a block's own
    forward, after a break)."""
    routers = _router_nodes(gm)
    if not routers:
        return [], {}, []
    by_module: dict[str, list[fx.Node]] = {}
    types: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        for _key, (stack_path, cls) in node.meta.get("nn_module_stack", {}).items():
            by_module.setdefault(stack_path, []).append(node)
            types[stack_path] = getattr(cls, "__name__", str(cls))
    # the compiled module's own forward has no stack entry: the whole graph is its region
    by_module[""] = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    types[""] = "compiled module"
    regions, used, lone = [], set(), []
    for router, E in routers:
        stack = list(router.meta.get("nn_module_stack", {}).values())
        for stack_path in [p for p, _ in reversed(stack)] + [""]:  # innermost first
            nodes = by_module[stack_path]
            params = _region_params(nodes)
            if _has_experts(params, E):
                region = None if stack_path in used else _make_region(
                    gm, _module_path(stack_path), types[stack_path], nodes, params)
                if region is not None:
                    region.num_experts = E
                    regions.append(region)
                    used.add(stack_path)
                elif stack_path not in used:
                    tensors, _, outputs = _boundary(nodes, params)
                    lone.append(f"`{_module_path(stack_path) or '(the compiled module)'}` ({types[stack_path]}), {E} "
                                f"experts: in this graph the block maps {len(tensors)} tensor input(s) to "
                                f"{len(outputs)} tensor output(s), not its hidden states to one tensor (with dynamic "
                                "shapes, a size it computes may be used after it: torch.compile(..., dynamic=False) "
                                "may read it)")
                    used.add(stack_path)
                break
        else:
            owner = stack[-1][0] if stack else ""
            lone.append(f"router `{_module_path(owner) or '(the compiled module)'}` ({types.get(owner, 'module')}), "
                        f"{E} experts: its experts are not in this graph (a graph break splits the block, e.g. a "
                        "per-expert loop over data-dependent expert ids; torch._dynamo.explain(model)(x) lists the "
                        "breaks)")
    inside = {r.path: r for r in regions}
    for stack_path, nodes in by_module.items():  # submodules of the blocks, which the core may call alone
        path = _module_path(stack_path)
        if path not in inside and any(r.path == "" or path.startswith(r.path + ".") for r in regions):
            sub = _make_region(gm, path, types[stack_path], nodes, _region_params(nodes))
            if sub is not None:
                inside[path] = sub
    return regions, inside, lone


def _region_params(nodes: list[fx.Node]) -> dict[str, fx.Node]:
    params = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg.op == "placeholder" and _param_path(arg) is not None:
                params[_param_path(arg)] = arg
    return params


def _has_experts(params: dict[str, fx.Node], E: int) -> bool:
    stacked = any(_example(p) is not None and _example(p).dim() >= 3 and _example(p).shape[0] == E
                  for p in params.values())
    groups: dict[str, set[str]] = {}  # "experts" -> {"0", "1", ...}: modules of a list, by the list's path
    for path in params:
        parts = path.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit():
                groups.setdefault(".".join(parts[:i]), set()).add(part)
    listed = max((len(v) for v in groups.values()), default=0) >= E
    return stacked or listed


def _boundary(nodes, params) -> tuple[list[fx.Node], list[fx.Node], list[fx.Node]]:
    """(tensor inputs besides parameters, other inputs, tensor outputs) of a module's nodes."""
    members = set(nodes)
    inputs = {a for n in nodes for a in n.all_input_nodes if a not in members}
    param_nodes = set(params.values())
    others = [a for a in inputs if a not in param_nodes]
    tensors = [a for a in others if isinstance(_example(a), torch.Tensor)]
    # tensor outputs; a size the region computes and later code reuses (dynamo shares them) stays in the graph
    outputs = [n for n in nodes if any(u not in members for u in n.users) and isinstance(_example(n), torch.Tensor)]
    return tensors, others, outputs


def _make_region(gm, path, module_type, nodes, params) -> Region | None:
    tensors, others, outputs = _boundary(nodes, params)
    if len(tensors) != 1 or len(outputs) != 1:
        return None  # a block that is not one hidden-states -> one tensor map (e.g. its router logits are kept)
    prefix = path + "." if path else ""
    rel = {p[len(prefix):] if p.startswith(prefix) else p: node for p, node in params.items()}
    return Region(path, module_type, nodes, tensors[0], rel, outputs,
                  [a for a in others if a is not tensors[0]])


class RegionBlock(nn.Module):
    """A graph region as a module: the region's parameters at their relative paths, forward = the region's ops
    (hidden states in, the block's output out). Submodules that are regions of their own (a shared expert, an
    expert of a list) are RegionBlocks too, so the core can call them alone as it calls an eager block's."""

    def __init__(self, region: Region, value_of: dict[fx.Node, torch.Tensor], graph_module: fx.GraphModule,
                 regions: dict[str, Region]):
        super().__init__()
        prefix = region.path + "." if region.path else ""
        inside = sorted(p[len(prefix):] for p in regions if p.startswith(prefix) and p != region.path)
        children = [c for c in inside if not any(c.startswith(o + ".") for o in inside if o != c)]
        for child in children:
            sub = regions[prefix + child]
            module = (_linear(sub, value_of) if sub.module_type == "Linear" else None) or RegionBlock(
                sub, value_of, graph_module, regions)
            self._container(child.rsplit(".", 1)[0] if "." in child else "").add_module(child.rsplit(".", 1)[-1],
                                                                                        module)
        for rel_path, node in region.params.items():
            if any(rel_path.startswith(c + ".") for c in children):
                continue  # held by the child region
            parent, _, leaf = rel_path.rpartition(".")
            value = value_of[node]
            owner = self._container(parent)
            if isinstance(value, nn.Parameter):
                owner.register_parameter(leaf, value)
            else:
                owner.register_buffer(leaf, value)
        _listify(self)
        self._rel_paths = list(region.params)
        self._native = _region_graph(region, graph_module, fp32=False)  # as captured (confirm's native check)
        self._fp32 = _region_graph(region, graph_module, fp32=True)
        self._shape = _shape(region.activation)
        self._sizes = _symbolic_sizes(region) if region.extra_inputs else None
        self._sym_dims = set(self._sizes.dims.values()) if self._sizes else set()
        for name, value in _selection_constants(region).items():  # what an eager block keeps as attributes
            setattr(self, name, value)

    def _container(self, path: str) -> nn.Module:
        owner = self
        for name in filter(None, path.split(".")):
            if not hasattr(owner, name):
                owner.add_module(name, nn.Module())
            owner = getattr(owner, name)
        return owner

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple:
        """Dynamo specialises a graph to its input's shape (sizes become constants in views and aranges), so the
        region runs on chunks of exactly that shape: x's tokens in order, the last chunk padded with zeros."""
        params = [self.get_parameter(p) if _is_param(self, p) else self.get_buffer(p) for p in self._rel_paths]
        graph = self._fp32 if x.dtype == torch.float32 else self._native
        shape = self._shape
        if tuple(x.shape) == shape and not self._sizes:
            return graph(x, *params)[0]
        flat = x.reshape(-1, x.shape[-1])
        n = flat.shape[0]
        if self._sizes:  # traced with symbolic sizes: one call, every token in the last symbolic dim
            last = max(self._sym_dims)
            static = int(torch.Size([d for i, d in enumerate(shape[:-1]) if i not in self._sym_dims]).numel())
            chunk_shape = [1 if i in self._sym_dims else d for i, d in enumerate(shape)]
            chunk_shape[last] = max(1, -(-n // static))
            per_chunk = int(torch.Size(chunk_shape[:-1]).numel())
        else:
            chunk_shape, per_chunk = list(shape), max(1, int(torch.Size(shape[:-1]).numel()))
        sizes = self._sizes.values(chunk_shape) if self._sizes else []
        pad = (-n) % per_chunk
        padded = torch.cat([flat, flat.new_zeros(pad, flat.shape[1])]) if pad else flat
        outs = [graph(chunk.reshape(chunk_shape), *params, *sizes)[0].reshape(per_chunk, -1)
                for chunk in padded.split(per_chunk)] if n else []
        out = torch.cat(outs)[:n] if outs else flat.new_zeros(0, shape[-1])
        return out.reshape(*x.shape[:-1], -1)


def _linear(region: Region, value_of) -> nn.Linear | None:
    """A Linear region as a real nn.Linear (detect recognises a shared-expert gate by its type)."""
    if set(region.params) - {"weight", "bias"} or "weight" not in region.params:
        return None
    weight = value_of[region.params["weight"]]
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = weight.shape[1], weight.shape[0]
    linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    bias = value_of[region.params["bias"]] if "bias" in region.params else None
    linear.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    return linear


def _topk_calls(region: Region) -> list[tuple[tuple, int]]:
    """(input shape, k) of each top-k in the region, in order."""
    calls = []
    for node in region.nodes:
        if (node.op == "call_function" and node.target is torch.topk) or (node.op == "call_method" and
                                                                           node.target == "topk"):
            source = node.args[0]
            k = node.args[1] if len(node.args) > 1 else node.kwargs.get("k")
            if isinstance(source, fx.Node) and isinstance(k, int) and _example(source) is not None:
                calls.append((_shape(source), k))
    return calls


def _selection_constants(region: Region) -> dict[str, int]:
    """k and the expert groups, read from the graph's top-k calls (dynamo bakes them in as constants): the last
    top-k over E scores gives top_k; a top-k over [..., G, E/G] gives n_group = G; one over [..., G], topk_group."""
    router_rows = [_example(p).shape[0] for p in region.params.values()
                   if _example(p) is not None and _example(p).dim() == 2]
    out: dict[str, int] = {}
    for shape, k in _topk_calls(region):
        if len(shape) >= 2 and shape[-1] in router_rows:
            out["top_k"] = k
        elif len(shape) >= 3 and any(shape[-1] * shape[-2] == E for E in router_rows):
            out["n_group"] = shape[-2]
        elif "n_group" in out and shape[-1] == out["n_group"]:
            out["topk_group"] = k
    return out


def _listify(module: nn.Module) -> None:
    """Plain containers whose children are named 0..n-1 become ModuleLists, as the eager block had them."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Module and child._modules and not child._parameters and not child._buffers and \
                sorted(child._modules) == sorted(str(i) for i in range(len(child._modules))):
            setattr(module, name, nn.ModuleList(child._modules[str(i)] for i in range(len(child._modules))))
        elif type(child) is nn.Module:
            _listify(child)


def _is_param(module: nn.Module, path: str) -> bool:
    parent, _, leaf = path.rpartition(".")
    return leaf in (module.get_submodule(parent) if parent else module)._parameters


def _region_graph(region: Region, gm: fx.GraphModule, fp32: bool) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {region.activation: graph.placeholder("x")}
    for i, node in enumerate(region.params.values()):
        env[node] = graph.placeholder(f"p{i}")
    for i, node in enumerate(region.extra_inputs):  # symbolic sizes (dynamic-shape graphs)
        env[node] = graph.placeholder(f"size{i}")
    for node in region.nodes:
        copy = graph.node_copy(node, lambda n: env[n])
        if fp32:
            # the core reads a block on a float32 copy: 16-bit dtypes the capture baked in become float32, and
            # grouped GEMMs (16-bit only on some GPUs) take any dtype
            copy.args, copy.kwargs = _to_fp32(copy.args), _to_fp32(copy.kwargs)
            if copy.op == "call_function" and copy.target is getattr(torch, "_grouped_mm", None):
                copy.target = _grouped_mm_any_dtype
        env[node] = copy
    graph.output(tuple(env[n] for n in region.outputs))
    return fx.GraphModule(gm, graph)


def _to_fp32(value):
    if value in (torch.bfloat16, torch.float16):
        return torch.float32
    if isinstance(value, (tuple, list)):
        return type(value)(_to_fp32(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_fp32(v) for k, v in value.items()}
    return value


def _grouped_mm_any_dtype(a, b, offs=None, bias=None, out_dtype=None):
    """torch._grouped_mm for 2-D a [N, K] grouped by offs against b [G, K, M] (or 3-D a against 3-D b), any dtype."""
    if offs is None:
        out = torch.bmm(a, b)
    else:
        ends = offs.tolist()
        starts = [0] + ends[:-1]
        out = torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(zip(starts, ends))] + [a.new_zeros(
            a.shape[0] - (ends[-1] if ends else 0), b.shape[-1])])
    if bias is not None:
        out = out + bias
    return out if out_dtype is None else out.to(out_dtype)


@dataclass
class GraphBlock:
    record: BlockRecord
    region: Region
    template: nn.Module | None = None  # the RegionBlock the description was read from
    description: Description | None = None
    described: _Described | None = None  # kept alive by the fused call (see _DESCRIBED)


@dataclass(frozen=True)
class Signature:
    """A region's program (`_signature`): its ops with every int constant lifted out into `ints`, and the number of
    tokens it was traced for. Dynamo bakes token counts into views and aranges, so the same block traced for prefill
    and for decode differs only in ints proportional to `tokens`."""

    skeleton: tuple
    ints: tuple[int, ...]
    tokens: int

    @property
    def key(self) -> tuple:
        """The exact program (token counts included): _DESCRIBED's key."""
        return self.skeleton, self.ints

    def same_up_to_tokens(self, other: Signature) -> bool:
        """Same ops, and each int equal or the same multiple of each side's token count."""
        if self.skeleton != other.skeleton or len(self.ints) != len(other.ints):
            return False
        return all(a == b or (a % self.tokens == 0 and b % other.tokens == 0
                              and a // self.tokens == b // other.tokens) for a, b in zip(self.ints, other.ints))


class _Described:
    """A description read from one region, for every region with the same ops: layers of one model (the same
    signature), and the same blocks in the graphs dynamo compiles later (decode after prefill: the same signature
    up to the token count). `confirmed` holds the records of regions whose weights were confirmed too, by the
    weights' identity."""

    def __init__(self, description: Description, first_path: str, signature: Signature):
        self.description, self.first_path, self.signature = description, first_path, signature
        self.confirmed: dict[tuple, BlockRecord] = {}


# (skeleton, ints) -> _Described. Weak: an entry lives as long as a compiled graph's fused call holds it, so it goes
# when dynamo drops the graphs (torch._dynamo.reset(), the model freed) and keeps no weights alive beyond them.
_DESCRIBED: weakref.WeakValueDictionary = kept("backends.graph_blocks: descriptions of graph regions by program",
                                               weakref.WeakValueDictionary())


def _lookup(signature: Signature) -> tuple[_Described | None, bool]:
    """The description for this signature, and whether it was read from exactly this program (else from the same
    one at another token count)."""
    exact = _DESCRIBED.get(signature.key)
    if exact is not None:
        return exact, True
    for described in list(_DESCRIBED.values()):
        if described.signature.same_up_to_tokens(signature):
            return described, False
    return None, False


def _signature(region: Region, value_of: dict) -> Signature:
    """The region's program: each op with its arguments, nodes named by position, parameters by relative path,
    shape and dtype. Two regions with one signature compute the same function of (hidden states, parameters), so a
    description read from one holds for the other."""
    index = {node: i for i, node in enumerate(region.nodes)}
    named = {node: ("param", rel) for rel, node in region.params.items()}
    named[region.activation] = ("x", _example(region.activation).dim(), _example(region.activation).dtype)
    named.update({node: ("size", i) for i, node in enumerate(region.extra_inputs)})
    ints: list[int] = []

    def norm(arg):
        if isinstance(arg, fx.Node):
            return ("node", index[arg]) if arg in index else named.get(arg, ("outside", arg.name))
        if isinstance(arg, (tuple, list)):
            return (type(arg).__name__, *map(norm, arg))
        if isinstance(arg, dict):
            return ("dict", *sorted((k, norm(v)) for k, v in arg.items()))
        if isinstance(arg, slice):
            return ("slice", norm(arg.start), norm(arg.stop), norm(arg.step))
        if type(arg) is int:
            ints.append(arg)
            return ("int",)
        return ("const", type(arg).__name__, repr(arg))

    ops = tuple((n.op, n.target, norm(n.args), norm(n.kwargs)) for n in region.nodes)
    params = tuple((rel, tuple(value_of[node].shape), value_of[node].dtype) for rel, node in region.params.items())
    tokens = max(1, int(torch.Size(_shape(region.activation)[:-1]).numel()))
    return Signature((region.module_type, ops, params, tuple(index[o] for o in region.outputs)), tuple(ints), tokens)


def _weights_key(region: Region, value_of: dict) -> tuple:
    """The region's parameters by identity (the model's own tensor objects, alive as long as the entry holding the
    key: the template RegionBlock holds them)."""
    return tuple((rel, id(value_of[node])) for rel, node in region.params.items())


class _ReuseDescription:
    """Stands in for the describe pass: the description of an earlier region with the same ops."""

    name = "describe (same ops as an earlier block)"

    def __init__(self, described: _Described, note: str):
        self.described, self.note = described, note

    def run(self, ctx: PassContext) -> bool:
        description = self.described.description
        for record in ctx.pending():
            ctx.descriptions[record.path] = description
            record.spec, record.spec_summary = description.spec.to_dict(), description.spec.summary()
            record.method = (f"{description.method}; same ops as {self.described.first_path} (described "
                             f"there){self.note}")
        return False


def find_blocks(gm: fx.GraphModule, example_inputs: list, report: Report, verify: bool = True, seed: int = 0
                ) -> list[GraphBlock]:
    """Find and read every MoE block in `gm`; each gets a record in `report` (fused candidates stay "pending").
    A region whose ops are those of one read before takes that description instead of describing again:
    - the same program (another layer): confirmed on its own weights (not re-randomised ones);
    - the same program on the same weights (a recompile): confirmed already, not rerun;
    - the same program at another token count on the same weights (decode after prefill): one spot check of the
      region against the description on its own shape (a decode-shaped region runs one token a call, so the full
      confirmation would take hundreds of calls).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    value_of = dict(zip(placeholders, example_inputs))
    regions, all_regions, unread = _regions(gm)
    if unread:
        report.message = ("; ".join(dict.fromkeys(unread)) + ". Fix: run moecompile.optimize(model) before "
                          "torch.compile, which fuses the block before dynamo traces it")
    blocks = []
    for region in regions:
        record, block = _read_region(region, value_of, gm, all_regions, verify, seed)
        report.blocks.append(record)
        if block is not None:
            blocks.append(block)
    return blocks


def _read_region(region: Region, value_of: dict, gm: fx.GraphModule, all_regions, verify: bool, seed: int
                 ) -> tuple[BlockRecord, GraphBlock | None]:
    """One region's record, and its GraphBlock unless it was left before reading."""
    record = BlockRecord(path=region.path, module_type=region.module_type)
    if region.extra_inputs and _symbolic_sizes(region) is None:
        record.leave(f"the block takes inputs besides its hidden states ({[n.name for n in region.extra_inputs]})"
                     "; moecompile fuses blocks that map hidden states alone")
        return record, None
    signature = _signature(region, value_of)
    weights_key = _weights_key(region, value_of)
    # a capacity baked in for this token count (graph_capacity.py): read afresh at each token count
    capacity = baked_capacity(region.nodes)
    described, exact = _lookup(signature) if verify and capacity is None else (None, False)
    block = RegionBlock(region, value_of, gm, all_regions)
    reading = block
    if capacity is not None:
        reading = RegionBlock(region, value_of, gm, all_regions)
        too_large = lift(reading, capacity, signature.tokens, region.num_experts)
        if too_large:
            record.leave(f"its expert capacity is a constant in this graph ({capacity} at {signature.tokens} "
                         f"tokens); {too_large}. Fix: run moecompile.optimize(model) before torch.compile (the "
                         "eager block keeps its capacity factor)")
            return record, None
    earlier = described.confirmed.get(weights_key) if described is not None else None
    if earlier is not None and exact:
        record = replace(earlier, path=region.path, seconds=0.0, confirm_tokens=list(earlier.confirm_tokens))
        record.method += "; these weights confirmed when an earlier graph compiled"
        return record, GraphBlock(record, region, block, described.description, described)
    ctx = PassContext(model=reading, report=Report(model_type=region.module_type), verify=verify, seed=seed)
    PassManager(_region_passes(described, exact, earlier, signature)).run(ctx)
    inner = next((b for b in ctx.report.blocks if b.path == ""), None)
    if inner is None:
        record.leave("a router feeding experts was found in the graph, but the core reads no MoE block in it: "
                     + (ctx.report.blocks[0].reason if ctx.report.blocks else "no router beside experts"))
    else:
        inner.path, inner.module_type = region.path, region.module_type
        record = inner
    if capacity is not None:
        _add_capacity(record, ctx, block, capacity, region, signature, seed)
    description = ctx.descriptions.get("")
    if described is None and description is not None and record.decision == "pending" and verify \
            and capacity is None:
        described = _Described(description, region.path, signature)  # confirmed with re-randomised weights too
        _DESCRIBED[signature.key] = described
    if described is not None and record.decision == "pending" and earlier is None:
        described.confirmed[weights_key] = replace(record, confirm_tokens=list(record.confirm_tokens))
    return record, GraphBlock(record, region, block, description, described)


def _region_passes(described: _Described | None, exact: bool, earlier: BlockRecord | None,
                   signature: Signature) -> tuple:
    """The passes a region gets: all of the analysis for a new program; for one read before, its description
    reused and a confirmation narrowed to what differs (these weights at another token count: one spot check)."""
    if described is None:
        return ANALYSIS_PASSES
    note = "" if exact else " up to the token count"
    narrowed = dict(rerandomized=False)
    if earlier is not None:  # these weights, confirmed at another token count
        note += f"; these weights confirmed at {described.signature.tokens} tokens, spot-checked at {signature.tokens}"
        narrowed.update(shapes=((1, signature.tokens),), kernels=False)
    return (DetectPass, _ReuseDescription(described, note), ConfirmPass(**narrowed))


def _add_capacity(record: BlockRecord, ctx: PassContext, block: RegionBlock, capacity: int, region: Region,
                  signature: Signature, seed: int) -> None:
    """The baked capacity put back into a region read as plain top-k (graph_capacity.with_capacity), or the
    record left saying why."""
    if record.decision == "pending":
        capped, note = with_capacity(block, ctx.descriptions[""], capacity, _shape(region.activation), seed)
        if capped is not None:
            ctx.descriptions[""] = capped
            record.spec, record.spec_summary, record.method = (capped.spec.to_dict(), capped.spec.summary(),
                                                               record.method + note)
        else:
            record.leave(note)
    if record.decision == "left":
        record.reason = (
            f"its expert capacity is a constant in this graph ({capacity} at {signature.tokens} tokens), read "
            f"apart from the rest of the block, which failed: {record.reason}. Fix: run moecompile.optimize(model) "
            "before torch.compile (the eager block keeps its capacity factor)")


def _fused_call(description: Description, rel_paths: list[str], path: str, template: nn.Module,
                described: _Described | None):
    """The graph's replacement for a region: the canonical weights are rebuilt from the graph's own parameter
    inputs (swapped into the template RegionBlock for the recipe to read), then the block runs through the op.
    Holding `described` keeps its _DESCRIBED entry for graphs compiled later."""
    spec, spec_json = description.spec, description.spec.to_json()

    def moecompile_fused_block(x, *params):
        token = KEEP_AUTOGRAD.set(True)
        try:
            with _reparametrize_module(template, dict(zip(rel_paths, params))):
                weights = description.extract(template)
        finally:
            KEEP_AUTOGRAD.reset(token)
        return run_block(spec, weights, x, spec_json=spec_json, source_path=path, through_op=True)

    moecompile_fused_block.described = described
    return moecompile_fused_block


def rewrite_graph(gm: fx.GraphModule, blocks: list[GraphBlock]) -> int:
    """Replace each confirmed block's region with one call of the fused computation; returns how many."""
    done = 0
    replaced: dict[fx.Node, fx.Node] = {}  # a block's output -> its fused call (the next block's input, if chained)
    for block in blocks:
        if block.record.decision != "pending" or block.description is None:
            continue
        region = block.region
        fn = _fused_call(block.description, list(region.params), region.path, block.template, block.described)
        (out,) = region.outputs
        with gm.graph.inserting_after(out):
            call = gm.graph.call_function(fn, (replaced.get(region.activation, region.activation),
                                               *region.params.values()))
        call.meta = dict(out.meta)
        replaced[out] = call
        members = set(region.nodes)
        out.replace_all_uses_with(call, delete_user_cb=lambda user, call=call, members=members:
                                  user is not call and user not in members)
        for node in reversed(region.nodes):
            if not node.users:
                gm.graph.erase_node(node)
        block.record.decision = "fused"
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
