"""The standard form's decode-size If: over the used experts' gathered weights when few experts are used, over
every expert's weights otherwise. Built beside torch.export, not through it.

Place in the pipeline: onnx_lowering.standard_block calls routed_experts, the op `moecompile::experts_if`, which
torch.onnx turns into a placeholder node (domain moecompile.placeholder). After torch.onnx has written the file,
export_onnx calls splice_file: each placeholder becomes an ONNX If whose branches are onnx_grouped.used_experts
(then: at most a third of the experts used) and onnx_grouped.all_experts (else), exported on their own, once per
block description and weight shapes (Branches), and wired to the block's values. Top-k and ReLU routing alike.

Why not torch.cond: torch.export traces a cond's branches several times with data-dependent sizes and torch.onnx
traces them again, ~7 s a block on 2 CPU cores; here the two branches cost one small export per distinct block
(~3 s), whatever the number of layers. (torch.onnx's re-trace of a cond also failed on GLM-5-Next, and cond took no
operands of a data-dependent size: ReLU routing's pairs.) An If that only selects the weights is no way out:
onnxruntime copies a branch's output that is an outer-scope value (256 MB: 24 ms).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from ..reference import Routing
from ..spec import MoESpec, MoEWeights
from ..state import kept
from .onnx_grouped import all_experts, used_experts

PLACEHOLDER_DOMAIN = "moecompile.placeholder"
# Gathering the used experts' weights reads and writes them once more before the MatMuls read them: it costs less
# than reading every expert's weights when at most a third of the experts are used (decode-sized inputs).
GATHER_WHEN_USED_AT_MOST = 1 / 3


@dataclasses.dataclass(frozen=True)
class Branches:
    """What the two branches of one If depend on: the block's description, k, and its tensors' dtypes and shapes."""

    spec: MoESpec
    top_k: int | None  # None: a variable number of pairs per token (ReLU routing)
    x_dtype: torch.dtype
    hidden: int
    pair_weight_dtype: torch.dtype
    weights: tuple  # (shape, dtype) of w1, b1, w2, b2; None for an absent bias

    def present(self) -> list[bool]:
        return [w is not None for w in self.weights]


_KEYS: dict[Branches, str] = kept("backends.onnx_if: If-branch keys by description", {})
_BY_KEY: dict[str, Branches] = kept("backends.onnx_if: descriptions by If-branch key", {})
# (key, opset) -> the two branches' ONNX model, serialized
_EXPORTED: dict[tuple[str, int], bytes] = kept("backends.onnx_if: exported If branches", {})


def _key(branches: Branches) -> str:
    if branches not in _KEYS:
        _KEYS[branches] = f"b{len(_KEYS)}"
        _BY_KEY[_KEYS[branches]] = branches
    return _KEYS[branches]


@torch.library.custom_op("moecompile::experts_if", mutates_args=())
def experts_if(few: torch.Tensor, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor,
               used: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
               b2: torch.Tensor | None, branches: str) -> torch.Tensor:
    """The If in PyTorch: used_experts when `few`, else all_experts ([T, H] in fp32 at least)."""
    b = _BY_KEY[branches]
    weights = [w1, b1, w2, b2]
    if bool(few):
        return used_experts(b.spec, weights, x, token, expert, weight, b.top_k, used)
    return all_experts(b.spec, weights, x, token, expert, weight, b.top_k)


@experts_if.register_fake
def _(few, x, token, expert, weight, used, w1, b1, w2, b2, branches):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, torch.float32))


def routed_experts(spec: MoESpec, weights: MoEWeights, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """[T, H] fp32: the routed experts of the standard form, through experts_if."""
    weight_list = [weights.w1, weights.b1, weights.w2, weights.b2]
    expert = routing.expert_index
    E = spec.num_experts
    used = torch.zeros(E, dtype=torch.int64, device=x.device).scatter(0, expert, torch.ones_like(expert))
    few = used.sum() <= int(E * GATHER_WHEN_USED_AT_MOST)
    key = _key(Branches(spec, routing.top_k, x.dtype, x.shape[1], routing.weight.dtype,
                        tuple(None if t is None else (tuple(t.shape), t.dtype) for t in weight_list)))
    return torch.ops.moecompile.experts_if(few, x, routing.token_index, expert, routing.weight, used, *weight_list,
                                           key)


# ---------------------------------------------------------------- torch.onnx: the placeholder

@lru_cache(maxsize=1)
def _placeholder_schema():
    """The placeholder's signature for the exporter's tracer: experts_if's tensors, the key as an attribute."""
    from onnx.defs import OpSchema

    P = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    names = ["few", "x", "token", "expert", "weight", "used", "w1", "b1", "w2", "b2"]
    inputs = [P(n, f"T{i}", param_option=optional if n in ("b1", "b2") else OpSchema.FormalParameterOption.Single)
              for i, n in enumerate(names)]
    types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)", "tensor(int64)",
             "tensor(bool)"]
    constraints = [(f"T{i}", types, "") for i in range(len(names) + 1)]
    attribute = OpSchema.Attribute("branches", OpSchema.AttrType.STRING, "", required=False)
    return OpSchema("ExpertsIf", PLACEHOLDER_DOMAIN, 1, inputs=inputs, outputs=[P("out", f"T{len(names)}")],
                    type_constraints=constraints, attributes=[attribute])


def placeholder_translation(few, x, token, expert, weight, used, w1, b1, w2, b2, branches):
    """torch.onnx translation of experts_if: a placeholder node that splice_file replaces by the If."""
    import onnxscript

    node = onnxscript.values.Op(onnxscript.values.Opset(PLACEHOLDER_DOMAIN, 1), "ExpertsIf", _placeholder_schema())
    return node(few, x, token, expert, weight, used, w1, b1, w2, b2, branches=branches)


# ---------------------------------------------------------------- the branches, exported on their own

class _BothBranches(nn.Module):
    """(all_experts, used_experts) of one Branches, on (x, token, expert, weight, used, *present weights)."""

    def __init__(self, branches: Branches):
        super().__init__()
        self.branches = branches

    def forward(self, *inputs):  # one varargs, as export_onnx's wrapper takes them
        b = self.branches
        x, token, expert, weight, used = inputs[:5]
        given = iter(inputs[5:])
        weights = [next(given) if has else None for has in b.present()]
        return (all_experts(b.spec, weights, x, token, expert, weight, b.top_k),
                used_experts(b.spec, weights, x, token, expert, weight, b.top_k, used))


def _branches_model(key: str, opset: int, export):
    """The ONNX model of both branches (outputs: all_experts, used_experts), exported once per key and opset with
    `export` (backends/onnx._torch_onnx_export); tokens and pairs dynamic."""
    import onnx

    if (key, opset) not in _EXPORTED:
        b = _BY_KEY[key]
        E, k, tokens = b.spec.num_experts, b.top_k, 5
        gen = torch.Generator().manual_seed(0)
        T = torch.export.Dim("tokens")
        if k is None:  # pairs in any number, unrelated to the tokens
            token, expert = torch.tensor([0, 0, 1, 3, 4, 4, 4]), torch.randint(0, E, (7,), generator=gen)
            pairs = torch.export.Dim("pairs")
        else:  # token-major, k per token
            token = torch.arange(tokens).repeat_interleave(k)
            expert = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(tokens)]).flatten()
            pairs = T if k == 1 else k * T
        inputs = (torch.randn(tokens, b.hidden, generator=gen).to(b.x_dtype), token, expert,
                  torch.rand(len(token), generator=gen).to(b.pair_weight_dtype),
                  torch.zeros(E, dtype=torch.int64).scatter(0, expert, 1),
                  *(torch.zeros(shape, dtype=dtype) for shape, dtype in filter(None, b.weights)))  # traced only
        dynamic = ({0: T}, {0: pairs}, {0: pairs}, {0: pairs}) + (None,) * (len(inputs) - 4)
        names = ["x", "token", "expert", "weight", "used"] + [n for n, has in zip(("w1", "b1", "w2", "b2"),
                                                                                  b.present()) if has]
        program = export(_BothBranches(b).eval(), inputs, names, (dynamic,), opset)
        _EXPORTED[key, opset] = program.model_proto.SerializeToString()
    return onnx.load_from_string(_EXPORTED[key, opset])


def _branch_graph(sub, output_index: int, outer: dict, prefix: str):
    """The nodes of `sub` that compute its output `output_index`, as an If branch: sub's inputs renamed to the
    outer values they stand for, every other name prefixed (names must be unique across the graph's scopes)."""
    import onnx
    from onnx import helper

    producer = {out: node for node in sub.graph.node for out in node.output}
    constants = {t.name: t for t in sub.graph.initializer}
    wanted, keep, keep_constants = [sub.graph.output[output_index].name], set(), set()
    while wanted:
        name = wanted.pop()
        if name in producer and id(producer[name]) not in keep:
            keep.add(id(producer[name]))
            wanted.extend(i for i in producer[name].input if i)
        elif name in constants:
            keep_constants.add(name)

    def rename(name: str) -> str:
        return outer.get(name, prefix + name) if name else ""

    nodes = []
    for node in sub.graph.node:  # in the file's (topological) order
        if id(node) not in keep:
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise NotImplementedError(f"a {node.op_type} with subgraphs in an If branch")  # none in onnx_grouped
        copied = onnx.NodeProto()
        copied.CopyFrom(node)
        copied.name = prefix + node.name
        copied.input[:] = [rename(i) for i in node.input]
        copied.output[:] = [rename(o) for o in node.output]
        nodes.append(copied)
    initializers = []
    for name in sorted(keep_constants):
        tensor = onnx.TensorProto()
        tensor.CopyFrom(constants[name])
        tensor.name = rename(name)
        initializers.append(tensor)
    out = sub.graph.output[output_index]
    elem = out.type.tensor_type.elem_type
    rank = len(out.type.tensor_type.shape.dim)
    return helper.make_graph(nodes, prefix.rstrip("/"), [], [helper.make_tensor_value_info(rename(out.name), elem,
                                                                                         [None] * rank)],
                             initializer=initializers)


def has_placeholders(program: torch.onnx.ONNXProgram) -> bool:
    """Whether torch.onnx's program (before it is saved) has a placeholder to splice: only then is the file read
    back (a file without external data holds its weights)."""
    return any(node.domain == PLACEHOLDER_DOMAIN for node in program.model.graph)


def splice_file(path: Path, opset: int, export: Callable) -> int:
    """Replace every placeholder of the ONNX file at `path` by its If (in place); returns how many. External data,
    if any, stays where it is."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    nodes, spliced, sub_opsets = [], 0, {}
    for node in model.graph.node:
        if node.domain != PLACEHOLDER_DOMAIN:
            nodes.append(node)
            continue
        key = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "branches").decode()
        sub = _branches_model(key, opset, export)
        given = [name for name in node.input[1:] if name]  # the absent biases are "" or left off the end
        inputs = [i.name for i in sub.graph.input]
        assert len(given) == len(inputs), (given, inputs)
        outer = dict(zip(inputs, given))
        prefix = f"{node.output[0]}/"
        nodes.append(helper.make_node("If", [node.input[0]], list(node.output), name=node.name or prefix + "If",
                                      then_branch=_branch_graph(sub, 1, outer, prefix + "used/"),
                                      else_branch=_branch_graph(sub, 0, outer, prefix + "all/")))
        sub_opsets.update({o.domain: o.version for o in sub.opset_import})
        spliced += 1
    if not spliced:
        return 0
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    opsets = {o.domain: o.version for o in model.opset_import if o.domain != PLACEHOLDER_DOMAIN}
    opsets = {**sub_opsets, **opsets}
    model.ClearField("opset_import")
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in opsets.items())
    onnx.save(model, str(path))
    return spliced
