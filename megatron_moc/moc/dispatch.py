"""Dispatch (token, expert) pairs to expert-sorted rows, and combine them back *unmerged*.

Legend: N tokens, K slots, E experts, P = N·K dispatched rows, D hidden size.

Standard MoE sums the K expert outputs of a token while combining; MoC must not: the mediator
needs each token's K states, so `combine` returns [N, K, D] (MOC_MATH.md §4, ARCHITECTURE.md).

Rows are ordered kept-pairs-first, grouped by expert, and the dropped pairs last. With that
order every shape is static (P = N·K rows, known on the host), the per-expert row ranges are
device-side `offsets` a grouped GEMM consumes directly, and dropped rows sit past
`offsets[E]` where the expert kernels write zeros. Nothing here reads back to the host.

Every pair, dropped or not, owns exactly one row, so the plan is a permutation of the N·K
pairs and both directions are plain gathers: `pair_P` (row -> pair) and its inverse `row_NK`
(pair -> row). Their backwards are gathers too, never an atomic scatter-add (index_select's
own backward is index_add_ into zeros: one bf16 atomic add per element, measured 0.30 ms per
layer on the 1B MoE at micro 8 on one H100, where a gather moves the same bytes in ~0.04 ms).
"""

from dataclasses import dataclass
from typing import Optional

import torch

from kernels.active_rows import masked_row_gather_reference


@dataclass(frozen=True)
class DispatchPlan:
    pair_P: torch.Tensor      # int64 [P]: flat pair index n·K + k of each dispatched row
    token_P: torch.Tensor     # int64 [P]: token of each row
    expert_P: torch.Tensor    # int64 [P]: expert of each row
    offsets_E1: torch.Tensor  # int64 [E+1]: kept rows of expert e are offsets[e]:offsets[e+1]
    num_slots: int            # K
    row_NK: torch.Tensor      # int64 [N, K]: dispatched row of each pair (inverse of pair_P)


def plan_dispatch(experts_NK: torch.Tensor, keep_NK: torch.Tensor, num_experts: int,
                  steps_NK: Optional[torch.Tensor] = None, max_steps: int = 0) -> DispatchPlan:
    """Order pairs by (dropped, expert), stable; count kept pairs per expert on the device.
    steps_NK: int64 [N, K] in 0..max_steps, each pair's IRL step count in hard mode
    (experts.depth_sorted_activity): each expert's rows then come highest count first, so
    the rows that run step s are a prefix of the expert's rows (kernels/row_segments.py)."""
    num_slots = experts_NK.shape[1]
    experts = experts_NK.reshape(-1)
    keep = keep_NK.reshape(-1)
    if steps_NK is None:
        key = experts + num_experts * (~keep).long()
    else:
        levels = max_steps + 1
        key = ((experts + num_experts * (~keep).long()) * levels
               + (max_steps - steps_NK.reshape(-1)))
    pair_P = torch.argsort(key, stable=True)
    row_of_pair = torch.empty_like(pair_P).scatter_(
        0, pair_P, torch.arange(pair_P.numel(), device=pair_P.device))
    counts = torch.zeros(num_experts, dtype=torch.long, device=experts.device)
    counts.scatter_add_(0, experts, keep.long())
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return DispatchPlan(pair_P=pair_P, token_P=pair_P // num_slots, expert_P=experts[pair_P],
                        offsets_E1=offsets, num_slots=num_slots,
                        row_NK=row_of_pair.view_as(experts_NK))


def sum_slot_rows(rows_PD: torch.Tensor, row_NK: torch.Tensor) -> torch.Tensor:
    """out[n] = Σ_k rows[row_NK[n, k]] [N, D]: a gather, then a sum over K that ATen
    accumulates in fp32 for bf16 / fp16 and rounds once (deterministic, unlike index_add_).
    model/compile.py swaps in a compiled twin (one kernel: the [P, D] gather never lands in
    memory); callers look this name up at call time."""
    num_tokens, num_slots = row_NK.shape
    return rows_PD.index_select(0, row_NK.reshape(-1)).view(num_tokens, num_slots, -1).sum(1)


class _DispatchRows(torch.autograd.Function):
    """x_PD = x[token_P]; backward dx[n] = Σ_k dx_PD[row_NK[n, k]] (sum_slot_rows)."""

    @staticmethod
    def forward(ctx, x_ND, token_P, row_NK):
        ctx.save_for_backward(row_NK)
        return x_ND.index_select(0, token_P)

    @staticmethod
    def backward(ctx, grad_PD):
        row_NK, = ctx.saved_tensors
        return sum_slot_rows(grad_PD, row_NK), None, None


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        inverse, = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x_PD: torch.Tensor, perm_P: torch.Tensor, inverse_P: torch.Tensor):
    """x[perm] for a permutation `perm` of the rows (`inverse` its inverse). Its backward is
    the gather grad[inverse], where index_select's is a scatter-add with atomics (the
    hard-mode compaction's gathers and scatter, fwd + bwd)."""
    return _PermuteRows.apply(x_PD, perm_P, inverse_P)


def compact_active(active_P: torch.Tensor, offsets_E1: torch.Tensor):
    """Hard IRL mode's compaction (moc/experts.py `_hard_step`): a permutation of the rows
    that puts each expert's active rows first, expert by expert, and the rest after them.

    Args: active_P bool [P]; offsets_E1 int64 [E+1], the rows of expert e being
        offsets[e]:offsets[e+1] (sorted by expert, the dispatch order). Rows past offsets[E]
        (dropped pairs) count as inactive whatever active_P says.
    Returns (order_P, inverse_P, offsets_E1 of the active rows): row r of the compacted
        order is row order[r]; inverse is its inverse permutation.

    Because the rows are already grouped by expert, the stable sort on (inactive, expert)
    this stands for is a partition: an active row's place is the number of active rows
    before it (an exclusive prefix sum), an inactive row's the number of active rows plus the
    inactive rows before it. One scan over P int64 in place of a radix sort, and the new
    offsets are the same prefix sum read at the old ones. The inactive rows keep their input
    order (the sort would group them by expert); the expert kernels never read them."""
    P = active_P.shape[0]
    rows = torch.arange(P, device=active_P.device)
    act = (active_P & (rows < offsets_E1[-1])).long()
    before = torch.cumsum(act, 0) - act                       # active rows before each row
    total = before[-1:] + act[-1:]
    inverse = torch.where(act.bool(), before, total + rows - before)
    order = torch.empty_like(inverse).scatter_(0, inverse, rows)
    offsets = torch.cat([before, total]).index_select(0, offsets_E1)
    return order, inverse, offsets


@torch.library.custom_op("moc_kernels::masked_row_gather", mutates_args=())
def _masked_row_gather(x: torch.Tensor, index: torch.Tensor, count: torch.Tensor,
                       by_source: bool) -> torch.Tensor:
    """kernels/active_rows.py as an opaque op (torch.compile cannot trace a Triton launch):
    its Triton kernel on a GPU with Triton, its torch twin elsewhere."""
    from kernels import active_rows   # at call time: the kernel tests reload it

    if x.is_cuda and active_rows.triton is not None:
        return active_rows.masked_row_gather(x, index, count, by_source)
    return active_rows.masked_row_gather_reference(x, index, count, by_source)


@_masked_row_gather.register_fake
def _masked_row_gather_fake(x, index, count, by_source):
    return x.new_empty(index.shape[0], x.shape[1])


def _move_rows(x, index, count, by_source):
    """The Triton kernel (through the op) in eager mode; under torch.compile its torch twin,
    which inductor fuses into the RMSNorm before the move and the residual update after it.
    The opaque op there cost more than it saved. On one H100 (docs/benchmarks.md, session
    19), the compiled hard step's saving against soft mode at (8, 2048, 5632) was 16.2% with
    the op and 20.1% with the twin (18.0% with the permutation gathers before)."""
    if torch.compiler.is_compiling():
        return masked_row_gather_reference(x, index, count, by_source)
    return _masked_row_gather(x, index, count, by_source)


class _MoveActiveRows(torch.autograd.Function):
    """One of hard mode's two row moves; its backward is the other (kernels/active_rows.py)."""

    @staticmethod
    def forward(ctx, x, index, back_index, count, by_source):
        ctx.save_for_backward(back_index, count)
        ctx.by_source = by_source
        return _move_rows(x, index, count, by_source)

    @staticmethod
    def backward(ctx, grad):
        back_index, count = ctx.saved_tensors
        grad = _move_rows(grad.contiguous(), back_index, count, not ctx.by_source)
        return grad, None, None, None, None


def compact_rows(x_PD, order_P, inverse_P, count_1):
    """x[order] with the rows from count on (the inactive ones) as zeros, unread: the
    compaction of `compact_active` (its order, inverse, and offsets[-1:] as count)."""
    return _MoveActiveRows.apply(x_PD, order_P, inverse_P, count_1, False)


def uncompact_rows(y_PD, inverse_P, order_P, count_1):
    """compact_rows' inverse move: y[inverse] in dispatch order, zeros for the rows past
    count in y (the inactive ones), which are not read."""
    return _MoveActiveRows.apply(y_PD, inverse_P, order_P, count_1, True)


def dispatch(x_ND: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """x_ND → x_PD, row p = x[token_P[p]] (a gather; its backward sums the K copies)."""
    return _DispatchRows.apply(x_ND, plan.token_P, plan.row_NK)


def combine(h_PD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """h_PD → states_NKD in token order. No reduction over K, and no mask: a dropped pair
    holds its row as the experts left it (x plus zero updates). The combiners call this and
    zero dropped pairs (`mediator.token_states`) inside their compiled region, where the
    gather and the mask fuse into the first use instead of costing eager passes."""
    # row_NK and pair_P are inverse permutations: the backward is the gather by pair_P
    states = permute_rows(h_PD, plan.row_NK.reshape(-1), plan.pair_P)
    return states.view(*plan.row_NK.shape, h_PD.shape[-1])
