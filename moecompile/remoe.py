"""ReMoE's training controls for ReLU-routed models: the L1 penalty on the gates with its adaptive coefficient and
load-balancing weights (arXiv 2412.14711; ../shared/reference/remoe.md).

Place in the pipeline: used by a training loop on a model whose blocks routing="relu" rewrote. Logits hooks on the
ReLU FusedMoE blocks (FusedMoE.register_logits_hook) keep each block's gates R(x) = ReLU(x W_r^T + b), taken from
the block's own router logits: the penalty's gradient enters the block's backward through them, so the router GEMM
is neither run nor differentiated a second time. The loop adds `reg()` to its loss and calls `reg.step()` once per
optimizer step:

    reg = ReMoERegularizer(model, k=2)
    loss = lm_loss + reg()
    loss.backward(); opt.step(); reg.step()

    L_reg  = 1/(L*T) * sum_l sum_t sum_e f_le * R_l(x_t)_e,  f_le = E/(k*T) * #{t: R_l(x_t)_e > 0} (no gradient;
             1 without load balancing)
    lambda <- lambda * alpha ** sign(target - S),  S = share of zero gates this step, target = 1 - k/E
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MoECompileError
from .fused import FusedMoE


class ReMoERegularizer:
    """The adaptive L1 penalty on ReLU gates. `k` is the budget of active experts per token (target sparsity
    1 - k/E); paper defaults lambda_0 = 1e-8, alpha = 1.2."""

    def __init__(self, model: nn.Module, k: float, *, coefficient: float = 1e-8, alpha: float = 1.2,
                 load_balance: bool = True):
        self.blocks = [(p, m) for p, m in model.named_modules()
                       if isinstance(m, FusedMoE) and m.spec.router.is_variable_k]
        if not self.blocks:
            raise MoECompileError("ReMoERegularizer: the model has no ReLU-routed MoE block; convert it first with "
                                  "moecompile.optimize(model, routing='relu', ...)")
        num_experts = {m.spec.num_experts for _, m in self.blocks}
        if not all(0 < k <= E for E in num_experts):
            raise MoECompileError(f"ReMoERegularizer: k must be in (0, E] for every block (E = {sorted(num_experts)})"
                                  f", got {k}")
        if coefficient <= 0 or alpha <= 1:
            raise MoECompileError("ReMoERegularizer: coefficient must be > 0 and alpha > 1")
        self.k, self.coefficient, self.alpha, self.load_balance = k, coefficient, alpha, load_balance
        self._gates: dict[str, list[torch.Tensor]] = {p: [] for p, _ in self.blocks}
        self._hooks = [m.register_logits_hook(self._hook(p)) for p, m in self.blocks]
        self.sparsity: float | None = None  # of the last step
        self.layer_sparsity: dict[str, float] = {}
        self.expert_load: dict[str, list[float]] = {}  # share of positive gates per expert, last step

    def target_sparsity(self, num_experts: int) -> float:
        return 1 - self.k / num_experts

    def _hook(self, path: str):
        def record(logits: torch.Tensor) -> None:
            self._gates[path].append(F.relu(logits.float()))
        return record

    def __call__(self) -> torch.Tensor:
        """lambda * L_reg over the gates recorded since the last step()."""
        terms = []
        for path, _module in self.blocks:
            for gates in self._gates[path]:
                T, E = gates.shape
                if T == 0:
                    continue
                if self.load_balance:
                    f = (gates.detach() > 0).sum(dim=0).float() * E / (self.k * T)
                    terms.append((gates * f).sum() / T)
                else:
                    terms.append(gates.sum() / T)
        if not terms:
            raise MoECompileError("ReMoERegularizer: no gates recorded; call it after the model's forward and "
                                  "before step()")
        return self.coefficient * torch.stack(terms).sum() / len(terms)

    def step(self) -> None:
        """Measure this step's sparsity, move the coefficient toward the target, and forget the step's gates."""
        zeros = total = 0
        error = 0.0
        for path, _module in self.blocks:
            recorded = self._gates[path]
            if not recorded:
                continue
            gates = torch.cat([g.detach() for g in recorded])
            positive = gates > 0
            E = gates.shape[1]
            self.layer_sparsity[path] = 1 - positive.float().mean().item()
            load = positive.sum(dim=0).float()
            self.expert_load[path] = (load / load.sum().clamp(min=1)).tolist()
            zeros += (~positive).sum().item()
            total += positive.numel()
            error += (self.target_sparsity(E) - self.layer_sparsity[path]) * positive.numel()
            recorded.clear()
        if total == 0:
            return
        self.sparsity = zeros / total
        self.coefficient *= self.alpha ** math.copysign(1.0, error) if error != 0 else 1.0

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
