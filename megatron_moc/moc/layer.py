"""The MoC layer: router → dispatch → IRL experts → combine [N, K, D] → mediator + fusion → o_proj.

Legend: N tokens, K slots, E experts, P = N·K rows, D hidden size.
A Megatron-core MLP submodule: `forward(hidden_states [s, b, D]) -> (output, None)`, built
from `MoCSubmodules` through a ModuleSpec (model/specs.py picks the parts per model kind).

Aux losses and routing diagnostics of the last forward are left on the layer as device
tensors (`last_aux_loss`, `last_stats`): the model sums the aux losses into its loss through
autograd (model/gpt.py), the trainer reads the stats at log time. The forward itself never
reads anything back to the host.
"""

from dataclasses import dataclass
from typing import Union

import torch
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from megatron_moc.moc.dispatch import combine, dispatch, plan_dispatch


@dataclass
class MoCSubmodules:
    router: Union[ModuleSpec, type]
    experts: Union[ModuleSpec, type]
    combiner: Union[ModuleSpec, type]


@dataclass(frozen=True)
class RoutingStats:
    """Per-layer diagnostics of one forward (detached device tensors, fp32)."""

    requested_hist: torch.Tensor   # [E] pairs routed to each expert
    kept_hist: torch.Tensor        # [E] pairs kept after capacity
    drop_rate: torch.Tensor        # dropped pairs / (N·K)
    capacity: int                  # per-expert capacity, -1 = dropless
    router_entropy: torch.Tensor   # mean_n H(P_n)
    avg_steps: torch.Tensor        # E[IRL steps] over kept pairs
    avg_rounds: torch.Tensor       # E[rounds] over tokens
    mean_gamma: torch.Tensor       # mean fusion gate γ


class MoCLayer(nn.Module):
    def __init__(self, config, submodules: MoCSubmodules, **kwargs):
        super().__init__()
        self.config = config
        self.num_experts = config.num_moe_experts
        self.router = build_module(submodules.router, config=config)
        self.experts = build_module(submodules.experts, config=config, num_experts=self.num_experts)
        self.combiner = build_module(submodules.combiner, config=config)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False,
                                dtype=config.params_dtype)
        config.output_layer_init_method(self.o_proj.weight)  # N(0, 0.02/sqrt(2L)), as specified
        self.last_aux_loss = None
        self.last_stats = None

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        shape = hidden_states.shape
        x_ND = hidden_states.reshape(-1, shape[-1])
        routing = self.router(x_ND)
        plan = plan_dispatch(routing.experts_NK, routing.keep_NK, self.num_experts)
        h_PD, expected_steps_P = self.experts(dispatch(x_ND, plan), plan.expert_P, plan.offsets_E1)
        states_NKD = combine(h_PD, plan, routing.keep_NK)
        result = self.combiner(x_ND, states_NKD, routing.probs_NK, routing.keep_NK)
        fused = torch.where(routing.keep_NK.any(-1, keepdim=True), result.fused_ND.to(x_ND.dtype), x_ND)
        out = self.o_proj(fused)

        # IRL step statistics over kept pairs (rows before offsets[E]).
        kept_rows = (torch.arange(h_PD.shape[0], device=x_ND.device) < plan.offsets_E1[-1])
        num_kept = kept_rows.sum().clamp_min(1)
        avg_steps = (expected_steps_P * kept_rows).sum() / num_kept
        step_penalty = self.config.moc_step_penalty_coeff * avg_steps / self.experts.steps
        self.last_aux_loss = routing.aux_loss + step_penalty + result.aux_loss
        self.last_stats = self._stats(routing, plan, avg_steps, result)
        return out.view(shape), None

    @torch.no_grad()
    def _stats(self, routing, plan, avg_steps, result) -> RoutingStats:
        E = self.num_experts
        experts = routing.experts_NK.reshape(-1)
        ones = torch.ones_like(experts, dtype=torch.float32)
        requested = torch.zeros(E, device=experts.device).scatter_add_(0, experts, ones)
        kept = torch.zeros(E, device=experts.device).scatter_add_(
            0, experts, routing.keep_NK.reshape(-1).float())
        probs = routing.probs_NE
        entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()
        return RoutingStats(
            requested_hist=requested, kept_hist=kept,
            drop_rate=1 - kept.sum() / max(1, experts.numel()), capacity=routing.capacity,
            router_entropy=entropy.float(), avg_steps=avg_steps.detach().float(),
            avg_rounds=result.avg_rounds.detach().float(), mean_gamma=result.mean_gamma)
