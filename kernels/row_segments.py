"""Which rows each expert owns in a grouped GEMM: contiguous offsets, or offsets with active ends.

Legend: P rows, E experts.

Two forms, both int64 on the rows' device, never read back to the host on the hot path:
    offsets [E+1]       expert e owns rows [offsets[e], offsets[e+1]) (the dispatch order)
    segments [2, E+1]   row 0 is such offsets, row 1 the active ends: expert e owns rows
                        [offsets[e], ends[e]), ends[e] <= offsets[e+1], and ends[E] =
                        offsets[E]. The rows [ends[e], offsets[e+1]) are a *gap*.

Segments are hard IRL mode's layout (moc/experts.py): the dispatch sorts each expert's rows
by their step count, highest first, so the rows that still run step s are a prefix of each
expert's rows, and step s runs on [offsets[e], ends_s[e]) with no row moved. Rows outside
every segment (the gaps and the tail [offsets[E], P)) are treated alike by every kernel:
zeros with zero_tail, else left unwritten, and never read for a result.

The kernels read expert e's first row at offsets[e] and its end at `flat[e + end_shift]`
(end_shift 1 for offsets, E + 1 for segments), so one compiled kernel serves both (Triton
specializes the value 1, so the contiguous case compiles as before).
"""

from __future__ import annotations

import torch


def check(offsets: torch.Tensor, num_experts: int, device: torch.device) -> None:
    """ValueError naming what is wrong, unless `offsets` is one of the two forms for E."""
    ok = (offsets.dtype == torch.int64
          and offsets.shape in ((num_experts + 1,), (2, num_experts + 1))
          and offsets.is_contiguous())
    if not ok:
        raise ValueError(f"offsets must be contiguous int64 [E+1] = [{num_experts + 1}] or "
                         f"segments [2, E+1] = [2, {num_experts + 1}], got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")
    if offsets.device != device:
        raise ValueError("offsets must live on the device of x (no host copies)")


def num_experts(offsets: torch.Tensor) -> int:
    return offsets.shape[-1] - 1


def is_segments(offsets: torch.Tensor) -> bool:
    return offsets.dim() == 2


def starts(offsets: torch.Tensor) -> torch.Tensor:
    """The plain offsets [E+1] (row 0 of segments)."""
    return offsets[0] if offsets.dim() == 2 else offsets


def kept_end(offsets: torch.Tensor) -> torch.Tensor:
    """offsets[E] as an int64 [1] device tensor: where the tail starts."""
    return starts(offsets)[-1:]


def end_shift(offsets: torch.Tensor) -> int:
    """Distance in the flat tensor from expert e's first row to its end row."""
    return offsets.shape[-1] if offsets.dim() == 2 else 1


def with_active_ends(offsets_E1: torch.Tensor, active_E: torch.Tensor) -> torch.Tensor:
    """segments [2, E+1]: each expert's first active_E[e] rows (int64 [E], on the device)."""
    ends = torch.cat([offsets_E1[:-1] + active_E, offsets_E1[-1:]])
    return torch.stack([offsets_E1, ends])


def row_mask(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """bool [P]: rows inside some expert's segment (device ops only, no host sync)."""
    rows = torch.arange(num_rows, device=offsets.device)
    off = starts(offsets)
    if offsets.dim() == 1:
        return rows < off[-1]
    expert = torch.searchsorted(off[1:], rows, right=True).clamp_max(off.shape[0] - 2)
    return (rows < offsets[1].index_select(0, expert)) & (rows < off[-1])


def host_bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    """[(first row, end row)] per expert, read back to the host (loop / reference only)."""
    off = starts(offsets).tolist()
    ends = offsets[1].tolist() if offsets.dim() == 2 else off[1:]
    return [(off[e], ends[e]) for e in range(len(off) - 1)]
