"""Expert parallelism: a fused MoE block's routed experts split over the ranks of a torch.distributed process group.

Place in the pipeline: after the fuse pass. `shard_experts(model, group)` (or `optimize(model,
expert_parallel=group)`) replaces every FusedMoE with an ExpertParallelMoE that keeps the experts of its rank: E / W
consecutive experts (rank r: r*E/W .. (r+1)*E/W - 1, W the group's size). The router, the shared experts, the input
norm and the biases stay replicated. Each rank calls the model on its own tokens (data parallel outside the
experts), and every rank must call every block, with or without tokens, since each block exchanges with all ranks.

One block's forward on a rank:
1. route its tokens (reference.route: every router form moecompile describes, differentiable);
2. sort its (token, expert) pairs by the rank holding the expert; exchange the counts (all_to_all_single), then the
   pairs' rows and their experts' local ids;
3. run the rows it received through its experts: the Triton kernels (kernels/launch.forward_routed) for inference on
   CUDA, PyTorch expert by expert where gradients are needed or off CUDA;
4. send the results back and combine them with the routing weights on the token's own rank, so the router's gradient
   is computed where its weights are.
The exchanges are torch's functional collectives with autograd (all_to_all_single_autograd): gradients flow back
through them to the experts' and the router's weights. The counts are host integers (the split sizes): on a GPU that
is one synchronisation per block. Under torch.compile the graph breaks there (unless
torch._dynamo.config.capture_scalar_outputs is set, when the exchange is traced with symbolic sizes) and around the
local experts, which run eagerly (the kernels, or a loop over the experts present).

Loading only a rank's experts from disk is ep_checkpoint.py's (`ExpertParallelMoE.from_local`). Not done here: a
pair sent once per (token, rank) rather than once per (token, expert).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from .errors import MoECompileError
from .fused import FusedMoE, run_block
from .kernels import moe as kernel_moe
from .kernels.launch import forward_routed, pairs_per_expert
from .reference import Routing, route, routed_experts, shared_experts
from .spec import MoESpec, MoEWeights, RouterSpec

EXPERT_TENSORS = ("w1", "w2", "b1", "b2")  # [E, ...]: split over the ranks; every other tensor is replicated


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every FusedMoE of `model` (in place) by an ExpertParallelMoE keeping this rank's experts of `group`
    (None: the default group). Returns the model (the replacement itself when the model is one FusedMoE). Nothing is
    changed if any block cannot be split."""
    check_group(group)
    start = time.perf_counter()
    blocks = [(path, m) for path, m in model.named_modules() if isinstance(m, FusedMoE)]
    if not blocks:
        raise MoECompileError(f"shard_experts: {type(model).__name__} has no fused MoE block; call "
                              "moecompile.optimize(model) first (moecompile.report(model) says why blocks were left)")
    replacements = [(path, ExpertParallelMoE(block, group)) for path, block in blocks]  # raises before any swap
    for path, sharded in replacements:
        if path == "":
            model = sharded
        else:
            model.set_submodule(path, sharded)
    _record(model, replacements, time.perf_counter() - start)
    return model


def check_group(group) -> int:
    """The group's size; raises if torch.distributed is not set up or `group` is not a process group."""
    if not dist.is_available() or not dist.is_initialized():
        raise MoECompileError("expert parallelism: torch.distributed is not initialised; call "
                              "torch.distributed.init_process_group (nccl on GPUs, gloo on CPUs) in every process "
                              "first, e.g. by starting them with torchrun")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise MoECompileError(f"expert parallelism: expected a torch.distributed ProcessGroup (or None for the "
                              f"default group), got {type(group).__name__}")
    return dist.get_world_size(group if group is not None else dist.group.WORLD)


def unshardable_reason(spec: MoESpec, world: int) -> str | None:
    """Why a block of `spec` cannot be split over `world` ranks, or None."""
    if spec.num_experts % world:
        return (f"it has {spec.num_experts} experts, not divisible by the group's {world} ranks; use a group whose "
                f"size divides {spec.num_experts}")
    if spec.autocast is not None:
        return "it opens its own autocast region, which expert parallelism does not take"
    if spec.extra_output == "expert_bias":
        return "it returns its experts' output biases apart, which expert parallelism does not take"
    return None


def _record(model: nn.Module, replacements: list, seconds: float) -> None:
    from .passes.log import PassRun
    from .pipeline import _REPORTS

    report = _REPORTS.get(model)
    if report is None:
        return
    report.passes.append(PassRun("expert_parallel", seconds, True,
                                 pass_note(len(replacements), replacements[0][1])))


def pass_note(blocks: int, block: ExpertParallelMoE) -> str:
    """The expert_parallel pass's line in the report: which experts of each block this rank keeps."""
    return (f"{blocks} blocks: rank {block.rank} of {block.world} keeps experts {block.first}.."
            f"{block.first + block.local - 1} of each")


class ExpertParallelMoE(nn.Module):
    """A FusedMoE whose routed experts are split over the ranks of `group`; see the module docstring."""

    def __init__(self, fused: FusedMoE, group: dist.ProcessGroup | None = None):
        super().__init__()
        where = fused.source_path or "<block>"
        if fused.lowering is not None or fused.eval_only_reason is not None:
            raise MoECompileError(f"shard_experts: block {where} is fused for ONNX export or eval mode only; "
                                  "shard a model fresh from moecompile.optimize")
        self._setup(fused.spec, fused.weights().items(), group, fused.source_path, local_given=False)
        self.router_tap = fused.router_tap
        self.train(fused.training)

    @classmethod
    def from_local(cls, spec: MoESpec, tensors: dict[str, torch.Tensor], group: dist.ProcessGroup | None = None,
                   source_path: str = "") -> ExpertParallelMoE:
        """A block built from this rank's tensors alone (ep_checkpoint.py's loading): w1/w2/b1/b2 hold its experts
        only ([E / W, ...]), every other tensor is whole."""
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block._setup(spec, tensors.items(), group, source_path, local_given=True)
        block.router_tap = None
        return block

    def _setup(self, spec: MoESpec, tensors, group, source_path: str, local_given: bool) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        reason = unshardable_reason(spec, self.world)
        if reason is not None:
            raise MoECompileError(f"shard_experts: block {source_path or '<block>'}: {reason}; nothing was sharded")
        self.spec, self.source_path = spec, source_path
        self.local = spec.num_experts // self.world
        self.first = self.rank * self.local
        self.local_spec = MoESpec(router=RouterSpec(num_experts=self.local, top_k=1), experts=spec.experts)
        self._weight_names: list[str] = []
        for name, tensor in tensors:
            if tensor is None:
                continue
            if name in EXPERT_TENSORS:
                if local_given:
                    if tensor.shape[0] != self.local:
                        raise MoECompileError(f"expert parallelism: block {source_path or '<block>'}: {name} holds "
                                              f"{tensor.shape[0]} experts, rank {self.rank} of {self.world} keeps "
                                              f"{self.local}")
                else:  # a copy of this rank's slice: the whole tensor can be freed
                    mine = tensor.detach()[self.first:self.first + self.local].clone()
                    tensor = nn.Parameter(mine, requires_grad=tensor.requires_grad) if isinstance(
                        tensor, nn.Parameter) else mine
            if isinstance(tensor, nn.Parameter):
                self.register_parameter(name, tensor)
            else:
                self.register_buffer(name, tensor)
            self._weight_names.append(name)

    def extra_repr(self) -> str:
        return (f"{self.spec.summary()} | experts {self.first}..{self.first + self.local - 1} on rank {self.rank} of "
                f"{self.world}")

    def weights(self) -> MoEWeights:
        """This rank's tensors: w1/w2/b1/b2 hold its experts only."""
        return MoEWeights(**{name: getattr(self, name) for name in self._weight_names})

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | tuple:
        # run_block's frame (input norm, autocast casts, residual, router tap, outputs) around the exchange
        return run_block(self.spec, self.weights(), hidden_states, backend="reference", router_tap=self.router_tap,
                         source_path=self.source_path, compute=self._core)

    def _core(self, spec: MoESpec, weights: MoEWeights, x: torch.Tensor, seq_len: int | None) -> tuple:
        """The block without norm and residual (run_block's `compute`): (y, logits, slot weights, routing)."""
        routing = route(spec.router, weights, x, seq_len)
        y = self._exchange(x, weights, routing)
        if spec.shared is not None:
            y = y + shared_experts(spec, weights, x)
        if spec.has_output_bias:
            y = y + weights.output_bias.to(y.dtype)
        slot_weights = None if spec.router.is_variable_k else routing.topk_weights()
        return y.to(x.dtype), routing.logits, slot_weights, routing

    def _exchange(self, x: torch.Tensor, weights: MoEWeights, routing: Routing) -> torch.Tensor:
        """Steps 2-4 of the module docstring: sum over each token's experts, wherever they are; [T, H] in at least
        fp32, as reference.routed_experts returns."""
        acc = torch.promote_types(x.dtype, torch.float32)
        dest = torch.div(routing.expert_index, self.local, rounding_mode="floor")
        order = torch.argsort(dest, stable=True)
        tokens, weight = routing.token_index[order], routing.weight[order]
        local_ids = routing.expert_index[order] - dest[order] * self.local
        send = pairs_per_expert(dest, self.world)  # pairs per rank: [W] whatever the ids, no host sync
        rows = x[tokens]
        on_input = self.spec.router.weight_on_input
        if on_input:
            rows = (rows.to(acc) * weight[:, None]).to(x.dtype)
        # the split sizes are host integers: one synchronisation per block (symbolic under capture_scalar_outputs)
        recv_sizes = funcol.wait_tensor(funcol.all_to_all_single(send, None, None, self.group)).tolist()
        send_sizes = send.tolist()
        recv_rows = funcol.wait_tensor(funcol.all_to_all_single_autograd(rows, recv_sizes, send_sizes, self.group))
        recv_ids = funcol.wait_tensor(funcol.all_to_all_single(local_ids, recv_sizes, send_sizes, self.group))
        # an eager loop over the experts present, or the kernels: a graph break under torch.compile (disable is
        # applied here, not as a decorator, so that importing moecompile does not import dynamo)
        local_experts = torch.compiler.disable(self._local_experts) if torch.compiler.is_compiling() \
            else self._local_experts
        out_rows = local_experts(weights, recv_rows, recv_ids)
        back = funcol.wait_tensor(funcol.all_to_all_single_autograd(out_rows, send_sizes, recv_sizes, self.group))
        contribution = back.to(acc) if on_input else back.to(acc) * weight[:, None]
        out = torch.zeros(x.shape[0], x.shape[1], dtype=acc, device=x.device)
        return out.index_add(0, tokens, contribution)

    def _local_experts(self, weights: MoEWeights, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each received row through its (local) expert, unweighted: [N, H] in the rows' dtype."""
        local = MoEWeights(router_weight=weights.router_weight[:self.local], w1=weights.w1, w2=weights.w2,
                           b1=weights.b1, b2=weights.b2)
        needs_grad = torch.is_grad_enabled() and (rows.requires_grad or any(
            t is not None and t.requires_grad for t in (local.w1, local.w2, local.b1, local.b2)))
        if rows.is_cuda and not needs_grad and kernel_moe.unsupported_reason(self.local_spec, local, rows) is None:
            ones = torch.ones(rows.shape[0], 1, device=rows.device, dtype=torch.float32)
            return forward_routed(self.local_spec, local, rows, ids[:, None], ones)
        n = rows.shape[0]
        pairs = Routing(logits=rows.new_empty(n, 0), token_index=torch.arange(n, device=rows.device),
                        expert_index=ids, weight=torch.ones(n, device=rows.device), top_k=1)
        return routed_experts(self.local_spec, local, rows, pairs).to(rows.dtype)


def sharded_blocks(model: nn.Module) -> list[tuple[str, ExpertParallelMoE]]:
    """(path, block) for every expert-parallel block of `model`."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, ExpertParallelMoE)]


def expert_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The parameters each rank holds alone (its experts'): what FSDP2's fully_shard must leave out
    (`ignored_params`), the rest being the replicated part it may shard."""
    return {getattr(block, name) for _, block in sharded_blocks(model) for name in EXPERT_TENSORS
            if isinstance(getattr(block, name, None), nn.Parameter)}
