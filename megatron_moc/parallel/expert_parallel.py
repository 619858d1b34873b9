"""Expert parallelism: the kept rows travel to the EP rank holding their expert and back.

Legend: P dispatched rows of this rank (kept first, sorted by global expert), E experts,
L = E / EP local experts, R rows this rank receives, D hidden size.

    rows of this rank ──all-to-all──▶ rows for my L experts, grouped (source rank, expert)
                                      ──stable sort by expert──▶ IRL experts (all S steps)
    rows back in order ◀──all-to-all── unsort ◀─────────────────┘

Why the whole IRL loop runs on the expert's rank: the S steps reuse the expert's weights, so
the rows cross the network once each way per layer, not once per step. What comes back is
each row's own state h (and its expected step count for the step penalty); `combine` then puts
them in [N, K, D] unmerged, as the mediator needs (MOC_MATH.md §4).

The row counts are exchanged first (an all-to-all of [E] counts), and the split sizes of the
variable all-to-all must be known on the host: one device→host copy of 2·EP integers per layer
forward, as Megatron's all-to-all token dispatcher does; the backward reuses them. Ranks and
experts that receive no rows are ordinary (zero-size splits, empty expert groups).
The autograd all-to-all is megatron-core's (`tensor_parallel.mappings.all_to_all`).
"""

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import all_to_all
from torch import nn

try:  # DeepSpeed is a training dependency; the model itself runs without it (EP = 1).
    from deepspeed.moe.layer import MoE as _DeepSpeedMoE
except ImportError:  # pragma: no cover
    _DeepSpeedMoE = nn.Module


class DeepSpeedExpertGroup(_DeepSpeedMoE):
    """Marks a MoC layer as expert-parallel for DeepSpeed's engine, which looks for instances
    of its `MoE` class to switch on expert-data-parallel gradient reduction and ZeRO's expert
    parameter groups. It holds no parameters and never runs: the experts are `IRLExperts`.
    `num_local_experts = 0` keeps DeepSpeed from writing/reading its per-expert checkpoint
    files (it only knows its own expert modules); our experts are saved once per global index
    by parallel/expert_checkpoint.py."""

    def __init__(self, num_experts: int, expert_parallel: int, group_name: str):
        nn.Module.__init__(self)  # not MoE.__init__: that builds DeepSpeed's own experts
        self.num_experts = num_experts
        self.ep_size = expert_parallel
        self.expert_group_name = group_name
        self.num_local_experts = 0

    def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
        """DeepSpeed calls this to create the expert groups; parallel/groups.py already did
        (same DeepSpeed function, before the model was built)."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("DeepSpeedExpertGroup is a marker for DeepSpeed; it never runs")


def exchange_counts(counts_E: torch.Tensor, group) -> torch.Tensor:
    """counts_E [E] rows this rank sends to each global expert → [EP, L]: rows each source
    rank sends to each of my local experts."""
    ep = dist.get_world_size(group)
    received = torch.empty_like(counts_E)
    dist.all_to_all_single(received, counts_E.contiguous(), group=group)
    return received.view(ep, -1)


def run_experts_all_to_all(experts, x_PD: torch.Tensor, offsets_E1: torch.Tensor, group,
                           gate_entropy: bool = False
                           ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Run `experts` (this rank's L experts) on the kept rows of every rank in the EP group.

    x_PD: rows sorted by global expert, kept rows first (dispatch.plan_dispatch order);
    offsets_E1: int64 [E+1] kept-row offsets per global expert.
    Returns (h_PD, expected_steps_P, gate_entropy_P or None) in x_PD's row order, zeros on
    the dropped rows. `gate_entropy`: also each row's step-gate entropy (research variant),
    computed where the row's expert (and its gate) lives."""
    ep = dist.get_world_size(group)
    num_local = experts.num_experts
    counts_E = offsets_E1[1:] - offsets_E1[:-1]
    recv_EL = exchange_counts(counts_E, group)
    # The one host sync: split sizes for the variable all-to-all.
    sizes = torch.cat([counts_E.view(ep, num_local).sum(1), recv_EL.reshape(-1)]).cpu()
    send_splits = sizes[:ep].tolist()
    recv_EL_host = sizes[ep:].view(ep, num_local)
    recv_splits = recv_EL_host.sum(1).tolist()
    num_kept = sum(send_splits)

    x_recv = all_to_all(group, x_PD[:num_kept], recv_splits, send_splits)
    # Received rows are grouped by (source rank, local expert); the experts want them grouped
    # by expert: a stable sort on the local expert id, undone before the way back.
    expert_R = torch.repeat_interleave(
        torch.arange(num_local, device=x_PD.device).repeat(ep),
        recv_EL.reshape(-1), output_size=x_recv.shape[0])
    order_R = torch.argsort(expert_R, stable=True)
    local_counts = recv_EL.sum(0)
    local_offsets = torch.cat([local_counts.new_zeros(1), torch.cumsum(local_counts, 0)])
    x_local, expert_local = x_recv.index_select(0, order_R), expert_R.index_select(0, order_R)
    h_local, steps_local = experts(x_local, expert_local, local_offsets)
    per_row = [steps_local]
    if gate_entropy:
        per_row.append(experts.gate_entropy(x_local, expert_local))
    unorder_R = torch.empty_like(order_R)  # the inverse permutation, without a second sort
    unorder_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
    num_dropped = x_PD.shape[0] - num_kept

    def send_back(t_R):
        back = all_to_all(group, t_R.index_select(0, unorder_R), send_splits, recv_splits)
        return torch.cat([back, back.new_zeros(num_dropped, *back.shape[1:])])

    h_PD = send_back(h_local)
    # The per-row fp32 values travel as the columns of one [R, 1 or 2] tensor.
    rows = send_back(torch.stack(per_row, dim=-1))
    return h_PD, rows[:, 0], (rows[:, 1] if gate_entropy else None)
