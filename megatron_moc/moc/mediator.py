"""Collaboration through a mediator, and the gated fusion (MOC_MATH.md §4, §5).

Legend: N tokens, K slots, D hidden size, R rounds.

Two combiners turn each token's K expert states into one vector (before o_proj):
- `WeightedSumCombiner`: ws = Σ_k w_k·e_k, w_k = p_k·m_k / Σ p_k·m_k. The MoE baseline, and
  any model with R = 0 (the research code skips the mediator and γ when R = 0).
- `MediatorCombiner`: R rounds of O(K) attention from a per-token mediator to the K states,
  gated feedback to the states, adaptive rounds, then fused = γ·mediator + (1−γ)·ws.
Both take the experts' rows h_PD in dispatch order with the DispatchPlan and build the
token states themselves (`token_states`: dispatch.combine, dropped pairs zeroed); tokens whose
every pair was dropped output x (`keep_tokens_without_pairs`). That gather and those masks sit
on the combiners' side so that, compiled (model/compile.py), they fuse into the neighbouring
kernels instead of costing eager passes over [N, K, D] and [N, D], forward and backward
(1B MoE, micro 8, one H100: ~0.7 ms per layer of gathers, index_copy, products and wheres).
Softmaxes and gates run in fp32. A round's work over the [N, K, D] states (expert norm,
scores, β, pooling; feedback gate and update) runs in fused Triton kernels on the GPU, or in
their plain-torch twins (`moc_mediator_backend`, kernels/mediator_round.py).
"""

import importlib.util
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_moc.model.norm import RMSNorm
from megatron_moc.moc.adaptive import gate_entropy, step_activity
from megatron_moc.moc.dispatch import DispatchPlan, combine
from megatron_moc.moc.logits import fp32_logits
from kernels.mediator_round import attend_reference, feedback_reference, scalar_gate
from kernels.mediator_round_op import mediator_attend, mediator_feedback

_HAS_TRITON = importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class CombineResult:
    fused_ND: torch.Tensor       # in x's dtype; x itself for tokens with no kept pair
    aux_loss: torch.Tensor       # round penalty (0-dim)
    avg_rounds: torch.Tensor     # E[rounds] averaged over tokens (diagnostic)
    mean_gamma: torch.Tensor     # mean γ over tokens (diagnostic; 0 without fusion)


def fusion_weights(probs_NK: torch.Tensor, keep_NK: torch.Tensor) -> torch.Tensor:
    """w_k = p_k·m_k / Σ_k p_k·m_k (fp32), 0 for a token with no kept pair."""
    masked = probs_NK * keep_NK.to(probs_NK.dtype)
    denom = masked.sum(-1, keepdim=True)
    return torch.where(denom > 0, masked / torch.where(denom > 0, denom, 1), 0)


def mask_dropped(states_NKD: torch.Tensor, keep_NK: torch.Tensor) -> torch.Tensor:
    """Zero the states of dropped pairs (a where, not a product: no NaN from 0·inf)."""
    return torch.where(keep_NK.unsqueeze(-1), states_NKD, 0)


def token_states(h_PD: torch.Tensor, plan: DispatchPlan, keep_NK: torch.Tensor) -> torch.Tensor:
    """states_NKD: each token's K expert states, zero for dropped pairs (MOC_MATH.md §4)."""
    return mask_dropped(combine(h_PD, plan), keep_NK)


def keep_tokens_without_pairs(fused_ND: torch.Tensor, x_ND: torch.Tensor,
                              keep_NK: torch.Tensor) -> torch.Tensor:
    """A token whose every pair was dropped outputs x (MOC_MATH.md §2), in x's dtype."""
    return torch.where(keep_NK.any(-1, keepdim=True), fused_ND.to(x_ND.dtype), x_ND)


def weighted_sum(states_NKD: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    return (states_NKD * w_NK.to(states_NKD.dtype).unsqueeze(-1)).sum(1)


class WeightedSumCombiner(nn.Module):
    def __init__(self, config, **kwargs):
        super().__init__()

    def forward(self, x_ND, h_PD, plan: DispatchPlan, probs_NK, keep_NK) -> CombineResult:
        zero = x_ND.new_zeros((), dtype=torch.float32)
        ws = weighted_sum(token_states(h_PD, plan, keep_NK), fusion_weights(probs_NK, keep_NK))
        return CombineResult(fused_ND=keep_tokens_without_pairs(ws, x_ND, keep_NK),
                             aux_loss=zero, avg_rounds=zero, mean_gamma=zero)

    def gate_entropy(self, x_ND):
        """No round gate: 0 (the gate entropy term of a non-adaptive gate)."""
        return x_ND.new_zeros((), dtype=torch.float64 if x_ND.dtype == torch.float64 else torch.float32)


def _scalar_gate(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x) for a D -> 1 linear (the fusion gate) as a product and a sum over D
    (kernels.mediator_round.scalar_gate says why)."""
    return scalar_gate(x, linear.weight, linear.bias)


def _use_kernels(backend: str, states_NKD: torch.Tensor) -> bool:
    """The one place that maps `moc_mediator_backend` to the fused kernels or plain torch.
    (No import lookups per call: torch.compile traces this.)"""
    if backend == "auto":
        return (states_NKD.is_cuda and _HAS_TRITON
                and states_NKD.dtype in (torch.bfloat16, torch.float16, torch.float32))
    if backend == "triton" and not (_HAS_TRITON and (
            states_NKD.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")):
        raise ValueError(f"moc_mediator_backend='triton' needs Triton and CUDA tensors (or "
                         f"TRITON_INTERPRET=1 for tests); got {states_NKD.device} tensors, "
                         f"Triton {'found' if _HAS_TRITON else 'missing'}. Use 'auto' or 'torch'.")
    return backend == "triton"


def _linear(config, d_in: int, d_out: int, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=bias, dtype=config.params_dtype)
    config.init_method(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class MediatorCombiner(nn.Module):
    """Mediator rounds + feedback + γ fusion. Parameter names follow the research code's."""

    def __init__(self, config, **kwargs):
        super().__init__()
        self.config = config
        D, R = config.hidden_size, config.moc_collab_rounds
        eps = config.layernorm_epsilon
        self.rounds = R
        if config.moc_mediator_vector:
            self.mediator = nn.Parameter(torch.empty(1, D, dtype=config.params_dtype))
            config.init_method(self.mediator)
        else:
            self.mediator = None
        self.med_context = _linear(config, D, D)
        self.mediator_norm = RMSNorm(config, D, eps)
        self.expert_norm = RMSNorm(config, D, eps)
        self.med_q = _linear(config, D, D)
        self.exp_k = _linear(config, D, D)
        rank = config.moc_value_rank
        if 0 < rank < D:  # low-rank values W_v = W_up·W_down
            self.exp_v = nn.Sequential(_linear(config, D, rank), _linear(config, rank, D))
        else:
            self.exp_v = _linear(config, D, D)
        self.med_mlp = nn.Sequential(_linear(config, D, D), RMSNorm(config, D, eps), nn.SiLU(),
                                     _linear(config, D, D))
        if config.moc_feedback:
            self.med_to_exp = _linear(config, D, D)
            self.exp_feedback_e = _linear(config, D, 1, bias=True)
            self.exp_feedback_m = _linear(config, D, 1)
        else:
            self.med_to_exp = None
        if config.adaptive_rounds_on:
            self.collab_step_gate = _linear(config, D, R + 1, bias=True)
        else:
            self.collab_step_gate = None
        self.fuse_gate = _linear(config, D, 1, bias=True)

    def round(self, mediator_ND, states_NKD, keep_NK, activity_N):
        """One mediator round and its update with the round's activity c (soft, or 0/1):
        returns (mediator + c·(mediator' − mediator), states + c·(states' − states))."""
        fused = _use_kernels(self.config.moc_mediator_backend, states_NKD)
        m_norm = self.mediator_norm(mediator_ND)
        q_ND = self.med_q(m_norm)
        # The keys and values are linear and bias-free, so q·k_k = (W_kᵀq)·e_k and
        # Σ_k β_k W_v e_k = W_v(Σ_k β_k e_k): two [N, D] products instead of two [N·K, D]
        # ones, and k, v [N, K, D] are never built. Same math (the fp64 oracle tests hold);
        # training/metrics.py counts these products as executed (K = 1 for W_k and W_v).
        qk_ND = q_ND @ self.exp_k.weight
        # pooled = Σ_k β_k·RMSNorm_exp(e_k), β the softmax over kept experts (fp32)
        attend = mediator_attend if fused else attend_reference
        pooled_ND = attend(states_NKD, keep_NK, self.expert_norm.weight, qk_ND,
                           self.expert_norm.eps)
        new_mediator = mediator_ND + self.med_mlp(m_norm + self.exp_v(pooled_ND))
        c_N = activity_N.to(mediator_ND.dtype).unsqueeze(-1)
        mediator_ND = mediator_ND + c_N * (new_mediator - mediator_ND)
        if self.med_to_exp is None:
            return mediator_ND, states_NKD
        feedback_ND = self.med_to_exp(self.mediator_norm(new_mediator))
        update = mediator_feedback if fused else feedback_reference
        states_NKD = update(states_NKD, keep_NK, feedback_ND, new_mediator, activity_N,
                            self.exp_feedback_e.weight, self.exp_feedback_e.bias,
                            self.exp_feedback_m.weight)
        return mediator_ND, states_NKD

    def gate_entropy(self, x_ND):
        """Mean over all N tokens (the rows the gate sees, as the round penalty) of H(q) of
        the round gate, fp32 0-dim; 0 without an adaptive round gate (MOC_MATH.md "Gate
        entropy regularization": one term per layer)."""
        dt = torch.float64 if x_ND.dtype == torch.float64 else torch.float32
        if self.collab_step_gate is None:
            return x_ND.new_zeros((), dtype=dt)
        logits = fp32_logits(x_ND, self.collab_step_gate.weight, self.collab_step_gate.bias)
        return gate_entropy(logits, self.config.moc_round_gate_temperature).mean()

    def round_activity(self, x_ND, any_kept_N):
        """c_r [N, R] and E[rounds] [N] (fp32); c_r = 0 for tokens with nothing kept."""
        cfg, N, R = self.config, x_ND.shape[0], self.rounds
        dt = torch.float64 if x_ND.dtype == torch.float64 else torch.float32
        if self.collab_step_gate is None:
            activity, expected = x_ND.new_ones(N, R, dtype=dt), x_ND.new_full((N,), float(R), dtype=dt)
        else:
            logits = fp32_logits(x_ND, self.collab_step_gate.weight, self.collab_step_gate.bias)
            activity, expected = step_activity(logits, cfg.moc_round_gate_temperature,
                                               cfg.moc_adaptive_mode)
        return activity * any_kept_N.unsqueeze(-1).to(dt), expected

    def forward(self, x_ND, h_PD, plan: DispatchPlan, probs_NK, keep_NK) -> CombineResult:
        cfg = self.config
        states_NKD = token_states(h_PD, plan, keep_NK)
        w_NK = fusion_weights(probs_NK, keep_NK)
        any_kept = keep_NK.any(-1)
        context = self.med_context(x_ND.to(states_NKD.dtype))
        if self.mediator is not None:
            mediator = self.mediator.to(states_NKD.dtype) + context
        else:
            mediator = weighted_sum(states_NKD, w_NK) + context
        activity_NR, expected_N = self.round_activity(x_ND, any_kept)
        # moc_recompute: keep each round's inputs only and rerun the round in backward.
        recompute = cfg.moc_recompute in ("mediator", "all") and torch.is_grad_enabled()
        for r in range(self.rounds):
            args = (mediator, states_NKD, keep_NK, activity_NR[:, r])
            if recompute:
                mediator, states_NKD = checkpoint(self.round, *args, use_reentrant=False)
            else:
                mediator, states_NKD = self.round(*args)
        ws = weighted_sum(states_NKD * keep_NK.unsqueeze(-1).to(states_NKD.dtype), w_NK)
        gamma_N1 = torch.sigmoid(_scalar_gate(self.fuse_gate, x_ND.to(ws.dtype)))
        fused = gamma_N1 * mediator + (1 - gamma_N1) * ws
        penalty = x_ND.new_zeros((), dtype=expected_N.dtype)
        if cfg.moc_round_penalty_coeff > 0:
            penalty = cfg.moc_round_penalty_coeff * expected_N.mean() / self.rounds
        return CombineResult(fused_ND=keep_tokens_without_pairs(fused, x_ND, keep_NK),
                             aux_loss=penalty, avg_rounds=expected_N.mean(),
                             mean_gamma=gamma_N1.detach().float().mean())
