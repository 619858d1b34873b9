"""Top-k router with balance, z- and drop losses and capacity (MOC_MATH.md §1, §2).

Legend: N tokens, K slots per token, E experts, D hidden size.

Everything here runs in fp32 (fp64 when the input is fp64, for the tests): router logits,
softmaxes and losses are where bf16 rounding changes which expert wins. Capacity is computed
from the host-known token count, and the ranking that decides drops is done with two stable
sorts on the device: no host sync.
"""

from dataclasses import dataclass

import torch
from torch import nn

from megatron_moc.moc.logits import fp32_logits


@dataclass(frozen=True)
class Routing:
    """What the router hands to dispatch, experts and the mediator."""

    experts_NK: torch.Tensor      # int64, chosen expert per slot (top-k order)
    probs_NK: torch.Tensor        # fp32, p_k = softmax over the K chosen logits
    keep_NK: torch.Tensor         # bool, pair survives capacity
    logits_NK: torch.Tensor       # fp32, router logit of each chosen pair (drop ranking key)
    probs_NE: torch.Tensor        # fp32, P = softmax over all E (losses, diagnostics)
    capacity: int                 # per-expert capacity, -1 = dropless
    aux_loss: torch.Tensor        # fp32 scalar: w_bal·balance + w_z·z + w_drop·drop fraction


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def capacity_keep_mask(experts_NK: torch.Tensor, logits_NK: torch.Tensor, num_experts: int,
                       capacity: int) -> torch.Tensor:
    """Keep mask of MOC_MATH.md §2: inside each expert rank pairs by router logit, highest
    first, ties in original (token-major, then slot) order; keep the first `capacity`.

    Args:
        experts_NK: int64 [N, K]; logits_NK: float [N, K]; capacity: -1 means keep all.
    Returns:
        bool [N, K].
    """
    if capacity < 0:
        return torch.ones_like(experts_NK, dtype=torch.bool)
    experts = experts_NK.reshape(-1)
    by_logit = torch.argsort(logits_NK.reshape(-1), descending=True, stable=True)
    by_expert = torch.argsort(experts[by_logit], stable=True)
    order = by_logit[by_expert]                      # pairs grouped by expert, best first
    counts = torch.zeros(num_experts, dtype=torch.long, device=experts.device)
    counts.scatter_add_(0, experts, torch.ones_like(experts))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=experts.device) - starts[experts[order]]
    keep = torch.empty_like(experts, dtype=torch.bool)
    keep[order] = rank < capacity
    return keep.view_as(experts_NK)


class TopKRouter(nn.Module):
    """logits = x·W_gate^T in fp32, top-k, p_k, losses, capacity keep-mask."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_experts = config.num_moe_experts
        self.top_k = config.moe_router_topk
        # Stored in params_dtype like every weight; always *used* in fp32 (see forward).
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size,
                                               dtype=config.params_dtype))
        config.init_method(self.weight)

    def forward(self, x_ND: torch.Tensor) -> Routing:
        cfg = self.config
        dt = _compute_dtype(x_ND)
        logits_NE = fp32_logits(x_ND, self.weight)
        if self.training and cfg.moc_router_noise_std > 0:
            logits_NE = logits_NE + torch.randn_like(logits_NE) * cfg.moc_router_noise_std
        logits_NK, experts_NK = torch.topk(logits_NE, self.top_k, dim=-1)
        probs_NK = torch.softmax(logits_NK, dim=-1)
        probs_NE = torch.softmax(logits_NE, dim=-1)

        num_tokens = x_ND.shape[0]
        capacity = cfg.capacity(num_tokens)
        keep_NK = capacity_keep_mask(experts_NK, logits_NK, self.num_experts, capacity)

        # Balance: E · Σ_e mean_n P[n,e] · mean_n A[n,e], A = p_k scattered to chosen experts.
        assign_NE = torch.zeros_like(probs_NE).scatter_add_(1, experts_NK, probs_NK)
        balance = self.num_experts * (probs_NE.mean(0) * assign_NE.mean(0)).sum()
        z_loss = torch.logsumexp(logits_NE, dim=-1).pow(2).mean()
        dropped = (~keep_NK).sum().to(dt) / max(1, keep_NK.numel())
        aux = (cfg.moe_aux_loss_coeff * balance + (cfg.moe_z_loss_coeff or 0.0) * z_loss
               + cfg.moc_drop_loss_coeff * dropped)
        return Routing(experts_NK=experts_NK, probs_NK=probs_NK, keep_NK=keep_NK,
                       logits_NK=logits_NK, probs_NE=probs_NE, capacity=capacity, aux_loss=aux)
