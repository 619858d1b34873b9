"""The MoC layer: router → dispatch → IRL experts → combine [N, K, D] → mediator + fusion → o_proj.

Legend: N tokens, K slots, E experts, P = N·K rows, D hidden size.
A Megatron-core MLP submodule: `forward(hidden_states [s, b, D]) -> (output, None)`, built
from `MoCSubmodules` through a ModuleSpec (model/specs.py picks the parts per model kind).

Aux losses and routing diagnostics of the last forward are left on the layer as device
tensors (`last_aux_loss`, `last_stats`): the model sums the aux losses into its loss through
autograd (model/gpt.py), the trainer reads the stats at log time. The forward itself never
reads anything back to the host (except, with expert parallelism, the all-to-all split sizes:
parallel/expert_parallel.py).

Parallelism: with EP > 1 the experts of this rank are E / EP of them and the kept rows reach
them by all-to-all (parallel/expert_parallel.py). Under tensor + sequence parallelism the layer
gathers the micro-batch's tokens and runs whole on each TP rank (the TP ranks repeat the MoC
work: simple and exact; MoC models at 1-2B rarely need TP), then keeps its own s/TP slice.

Research variant "Gate entropy regularization" (MOC_MATH.md): with moc_gate_entropy_coeff > 0
the aux loss gets −β·(H of the step gates over kept pairs + H of the round gate over tokens);
β is `gate_entropy_beta`, set by the trainer each step through `set_train_progress`.
"""

from dataclasses import dataclass
from typing import Union

import torch
from megatron.core.tensor_parallel.mappings import (gather_from_sequence_parallel_region,
                                                    scatter_to_sequence_parallel_region)
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from megatron_moc.moc.adaptive import gate_entropy_beta
from megatron_moc.moc.dispatch import dispatch, plan_dispatch


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
    step_gate_entropy: torch.Tensor   # mean H(q) of the IRL step gates over kept pairs
    round_gate_entropy: torch.Tensor  # mean H(q) of the round gate over tokens
    gate_entropy_beta: torch.Tensor   # β of the gate entropy term (0: off)


class MoCLayer(nn.Module):
    def __init__(self, config, submodules: MoCSubmodules, **kwargs):
        super().__init__()
        self.config = config
        self.num_experts = config.num_moe_experts
        self.router = build_module(submodules.router, config=config)
        self.sequence_parallel = config.sequence_parallel and config.tensor_model_parallel_size > 1
        self.expert_parallel = ep = config.expert_model_parallel_size
        self.experts = build_module(submodules.experts, config=config, num_experts=self.num_experts,
                                    expert_parallel=ep)
        if ep > 1:  # this rank holds E / EP experts; rows reach them by all-to-all
            from megatron_moc.parallel.expert_parallel import DeepSpeedExpertGroup
            from megatron_moc.parallel.groups import expert_group_name, expert_parallel_group

            self.ep_group = expert_parallel_group(ep)
            self.deepspeed_expert_group = DeepSpeedExpertGroup(
                self.num_experts, ep, expert_group_name(ep))
        self.combiner = build_module(submodules.combiner, config=config)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False,
                                dtype=config.params_dtype)
        config.output_layer_init_method(self.o_proj.weight)  # N(0, 0.02/sqrt(2L)), as specified
        for p in self.parameters():
            # The layer runs on the gathered micro-batch on every TP rank (see forward): its
            # gradients are whole on each TP rank, never to be summed over TP.
            p.sequence_parallel = False
        self.last_aux_loss = None
        self.last_stats = None
        # β of the gate entropy term (research variant): the trainer sets it every step
        # through `set_train_progress` (the schedule needs the step); β_0 until then.
        self.gate_entropy_beta = float(config.moc_gate_entropy_coeff)

    def set_train_progress(self, step: int, total_steps: int) -> None:
        """Set β of the gate entropy schedule for optimizer step `step` of `total_steps`."""
        cfg = self.config
        self.gate_entropy_beta = gate_entropy_beta(
            cfg.moc_gate_entropy_coeff, cfg.moc_gate_entropy_final,
            cfg.moc_gate_entropy_warmup_frac, step, total_steps)

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        if self.sequence_parallel:
            # Each TP rank holds s/TP tokens; the layer runs on the whole micro-batch on every
            # TP rank (identical work), so routing, capacity and the aux losses are those of one
            # process. Gather's backward splits (no reduce): the TP copies are identical.
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False)
        out, _ = self._forward(hidden_states)
        if self.sequence_parallel:
            out = scatter_to_sequence_parallel_region(out)
        return out, None

    def _forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x_ND = hidden_states.reshape(-1, shape[-1])
        routing = self.router(x_ND)
        sorted_activity = None
        if getattr(self.experts, "sorts_by_depth", False):   # False under EP (experts.py)
            # hard mode: each expert's rows by step count (its first rows run every step)
            act_NKS, expected_NK, steps_NK = self.experts.depth_sorted_activity(
                x_ND, routing.experts_NK)
            plan = plan_dispatch(routing.experts_NK, routing.keep_NK, self.num_experts,
                                 steps_NK, self.experts.steps)
            pair_P = plan.pair_P
            sorted_activity = (act_NKS.reshape(pair_P.shape[0], -1).index_select(0, pair_P),
                               expected_NK.reshape(-1).index_select(0, pair_P))
        else:
            plan = plan_dispatch(routing.experts_NK, routing.keep_NK, self.num_experts)
        if self.expert_parallel > 1:
            from megatron_moc.parallel.expert_parallel import run_experts_all_to_all

            h_PD, expected_steps_P, gate_entropy_P = run_experts_all_to_all(
                self.experts, dispatch(x_ND, plan), plan.offsets_E1, self.ep_group,
                gate_entropy=self.config.gate_entropy_on)
        else:
            h_PD, expected_steps_P = self.experts(dispatch(x_ND, plan), plan.expert_P,
                                                  plan.offsets_E1, activity=sorted_activity)
        # combine [N, K, D] (dropped pairs zeroed, tokens without a kept pair fall back to x)
        # happens inside the combiner (mediator.py): compiled, those passes fuse there.
        result = self.combiner(x_ND, h_PD, plan, routing.probs_NK, routing.keep_NK)
        out = self.o_proj(result.fused_ND)

        # IRL step statistics over kept pairs (rows before offsets[E]).
        kept_rows = (torch.arange(h_PD.shape[0], device=x_ND.device) < plan.offsets_E1[-1])
        num_kept = plan.offsets_E1[-1].clamp_min(1)
        avg_steps = (expected_steps_P * kept_rows).sum() / num_kept
        step_penalty = self.config.moc_step_penalty_coeff * avg_steps / self.experts.steps
        self.last_aux_loss = routing.aux_loss + step_penalty + result.aux_loss
        gate_h = None
        if self.config.gate_entropy_on:  # research variant; off: nothing built or added
            # aux -= β·(H of the step gates, kept pairs weighted as the step penalty
            #          + H of the round gate over tokens)
            if self.expert_parallel == 1:  # (with EP it came back with the expert rows)
                gate_entropy_P = self.experts.gate_entropy(dispatch(x_ND, plan), plan.expert_P)
            h_steps = (gate_entropy_P * kept_rows).sum() / num_kept
            gate_h = (h_steps, self.combiner.gate_entropy(x_ND))
            self.last_aux_loss = self.last_aux_loss - self.gate_entropy_beta * (gate_h[0] + gate_h[1])
        self.last_stats = self._stats(routing, plan, avg_steps, result, gate_h)
        return out.view(shape), None

    @torch.no_grad()
    def _stats(self, routing, plan, avg_steps, result, gate_h=None) -> RoutingStats:
        E = self.num_experts
        experts = routing.experts_NK.reshape(-1)
        # Counts without scatter_add_ (float atomics, all N·K pairs contending for E bins):
        # a one-hot sum, and the kept counts the plan already holds as offsets.
        experts_E = torch.arange(E, device=experts.device)
        requested = (experts.unsqueeze(1) == experts_E).sum(0).float()
        kept = plan.offsets_E1.diff().float()
        probs = routing.probs_NE
        entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()
        zero = torch.zeros((), device=experts.device)
        return RoutingStats(
            requested_hist=requested, kept_hist=kept,
            drop_rate=1 - kept.sum() / max(1, experts.numel()), capacity=routing.capacity,
            router_entropy=entropy.float(), avg_steps=avg_steps.detach().float(),
            avg_rounds=result.avg_rounds.detach().float(), mean_gamma=result.mean_gamma,
            step_gate_entropy=(gate_h[0] if gate_h else zero).detach().float(),
            round_gate_entropy=(gate_h[1] if gate_h else zero).detach().float(),
            gate_entropy_beta=zero + (self.gate_entropy_beta if gate_h else 0.0))
