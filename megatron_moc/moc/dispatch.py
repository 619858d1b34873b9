"""Dispatch (token, expert) pairs to expert-sorted rows, and combine them back *unmerged*.

Legend: N tokens, K slots, E experts, P = N·K dispatched rows, D hidden size.

Standard MoE sums the K expert outputs of a token while combining; MoC must not: the mediator
needs each token's K states, so `combine` returns [N, K, D] (MOC_MATH.md §4, ARCHITECTURE.md).

Rows are ordered kept-pairs-first, grouped by expert, and the dropped pairs last. With that
order every shape is static (P = N·K rows, known on the host), the per-expert row ranges are
device-side `offsets` a grouped GEMM consumes directly, and dropped rows sit past
`offsets[E]` where the expert kernels write zeros. Nothing here reads back to the host.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DispatchPlan:
    pair_P: torch.Tensor      # int64 [P]: flat pair index n·K + k of each dispatched row
    token_P: torch.Tensor     # int64 [P]: token of each row
    expert_P: torch.Tensor    # int64 [P]: expert of each row
    offsets_E1: torch.Tensor  # int64 [E+1]: kept rows of expert e are offsets[e]:offsets[e+1]
    num_slots: int            # K


def plan_dispatch(experts_NK: torch.Tensor, keep_NK: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Order pairs by (dropped, expert), stable; count kept pairs per expert on the device."""
    num_slots = experts_NK.shape[1]
    experts = experts_NK.reshape(-1)
    keep = keep_NK.reshape(-1)
    key = experts + num_experts * (~keep).long()
    pair_P = torch.argsort(key, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=experts.device)
    counts.scatter_add_(0, experts, keep.long())
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return DispatchPlan(pair_P=pair_P, token_P=pair_P // num_slots, expert_P=experts[pair_P],
                        offsets_E1=offsets, num_slots=num_slots)


def dispatch(x_ND: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """x_ND → x_PD, row p = x[token_P[p]] (a gather; its backward sums the K copies)."""
    return x_ND.index_select(0, plan.token_P)


def combine(h_PD: torch.Tensor, plan: DispatchPlan, keep_NK: torch.Tensor) -> torch.Tensor:
    """h_PD → states_NKD in token order, zero for dropped pairs. No reduction over K."""
    num_pairs, dim = h_PD.shape
    states = h_PD.new_zeros(num_pairs, dim).index_copy(0, plan.pair_P, h_PD)
    states_NKD = states.view(-1, plan.num_slots, dim)
    return states_NKD * keep_NK.unsqueeze(-1).to(h_PD.dtype)
