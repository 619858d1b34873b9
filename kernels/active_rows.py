"""Hard IRL mode's row moves, reading only the rows that carry data (Triton), with their twin.

One idea: hard mode runs step s of the experts on its active rows only, compacted per expert
in front (megatron_moc.moc.dispatch.compact_active: a permutation `order`, its `inverse`, and
offsets whose last entry n = offsets[E], on the device, counts the active rows). Moving the
rows there and back with plain permutation gathers reads and writes all P rows, forward and
backward, though only n of them carry data (half at the issue's hard-mode bar). Each move
here is a gather that reads a source row only where it carries data and writes zeros for the
rest, with n read on the device (no host sync, static shapes):

    compact   (by_source=False): out[r] = x[order[r]]   if r < n          else 0
    uncompact (by_source=True):  out[p] = y[inverse[p]] if inverse[p] < n else 0

Each is the other's backward (dispatch.compact_rows / uncompact_rows). At n = P/2 a move
reads P/2 rows and writes P, against P and P for the permutation gather.

Shape legend: R output rows (the index's length), S source rows, D row width.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_ROWS, BLOCK_COLS = 16, 256   # 16 x 256 bf16 = 8 KiB per tile; memory bound


def masked_row_gather_reference(x_SD: torch.Tensor, index_R: torch.Tensor, count_1: torch.Tensor,
                                by_source: bool) -> torch.Tensor:
    """The twin: a full gather, then zeros where the row carries no data (any dtype, device)."""
    rows = torch.arange(index_R.shape[0], device=index_R.device)
    live = (index_R if by_source else rows) < count_1
    return torch.where(live[:, None], x_SD.index_select(0, index_R), x_SD.new_zeros(()))


if triton is not None:
    @triton.jit
    def _masked_row_gather_kernel(x_ptr, index_ptr, count_ptr, out_ptr, R, D, stride_xm,
                                  stride_om, BY_SOURCE: tl.constexpr, BLOCK_R: tl.constexpr,
                                  BLOCK_C: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_rows = rows < R
        src = tl.load(index_ptr + rows, mask=in_rows, other=0).to(tl.int64)
        count = tl.load(count_ptr)
        live = in_rows & ((src if BY_SOURCE else rows) < count)
        cmask = (cols < D)[None, :]
        # masked lanes issue no load: the rows that carry no data are never read
        vals = tl.load(x_ptr + src[:, None] * stride_xm + cols[None, :],
                       mask=live[:, None] & cmask, other=0.0)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], vals,
                 mask=in_rows[:, None] & cmask)


def masked_row_gather(x_SD: torch.Tensor, index_R: torch.Tensor, count_1: torch.Tensor,
                      by_source: bool) -> torch.Tensor:
    """out [R, D]: out[r] = x[index[r]] where the row carries data (module docstring), else 0.

    Args: x_SD with unit column stride; index_R int64 on x's device, values in [0, S);
        count_1 int64 [1] on the device (n); by_source: a row carries data when index[r] < n
        (True) or when r < n (False)."""
    if index_R.dtype != torch.int64 or count_1.dtype != torch.int64 or count_1.numel() != 1:
        raise ValueError(f"masked_row_gather: index and count must be int64 (count [1]), got "
                         f"{index_R.dtype} / {count_1.dtype} {tuple(count_1.shape)}")
    if x_SD.dim() != 2 or index_R.dim() != 1:
        raise ValueError(f"masked_row_gather: x must be [S, D] and index [R], got "
                         f"{tuple(x_SD.shape)} and {tuple(index_R.shape)}")
    if x_SD.stride(1) != 1:
        x_SD = x_SD.contiguous()
    r, d = index_R.shape[0], x_SD.shape[1]
    out = torch.empty((r, d), dtype=x_SD.dtype, device=x_SD.device)   # poisoned in tests
    if r == 0 or d == 0:
        return out
    grid = (triton.cdiv(r, BLOCK_ROWS), triton.cdiv(d, BLOCK_COLS))
    _masked_row_gather_kernel[grid](x_SD, index_R, count_1, out, r, d, x_SD.stride(0),
                                    out.stride(0), BY_SOURCE=by_source, BLOCK_R=BLOCK_ROWS,
                                    BLOCK_C=BLOCK_COLS)
    return out
