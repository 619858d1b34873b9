"""SwiGLU backward as one elementwise pass (Triton), with its torch twin.

One idea: from the saved pre-activation [P, 2F] (gate | up) and dh [P, F], write
d(gate | up) [P, 2F] in one read of each input and one write, fp32 math in registers.
It follows a plain dgrad GEMM (dh = dY @ W2^T); doing it in that GEMM's epilogue measured
slower (docs/kernels_notes.md). Rows past `rows_end` (the experts' zero tail, where hard IRL
mode parks its inactive rows) get zeros without their inputs being read, or, for callers
that read rows before `rows_end` only (the expert MLP's backward), are not written at all.
MOC_MATH.md, "Experts".

Shape legend: P rows, F ffn size.
    h = silu(g) * u;  du = dh * silu(g);  dg = dh * u * sig(g) * (1 + g * (1 - sig(g)))
"""
from __future__ import annotations

import torch

from kernels.gmm_backend import swiglu_bwd_math

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_ROWS, BLOCK_COLS = 8, 256   # 8 x 256 bf16 = 4 KiB per input tile; memory bound

if triton is not None:
    @triton.jit
    def _swiglu_bwd_kernel(pre_ptr, dh_ptr, out_ptr, end_ptr, seg_ptr, E, P, F, stride_pm,
                           stride_dm, stride_om, HAS_END: tl.constexpr,
                           SEGMENTS: tl.constexpr, E_POW2: tl.constexpr,
                           STORE_TAIL: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_C: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows < P)[:, None] & (cols < F)[None, :]
        live = mask                      # rows whose inputs are read; the rest write zeros
        if HAS_END:
            live = mask & (rows < tl.load(end_ptr))[:, None]
        if SEGMENTS:                     # and not in a gap [ends[e], offsets[e+1])
            idx = tl.arange(0, E_POW2)
            first = tl.load(seg_ptr + idx, mask=idx < E, other=0)
            end = tl.load(seg_ptr + idx + E + 1, mask=idx < E, other=0)
            inside = (rows[:, None] >= first[None, :]) & (rows[:, None] < end[None, :])
            live = live & (tl.max(inside.to(tl.int32), 1) > 0)[:, None]
        p_ptrs = pre_ptr + rows[:, None] * stride_pm + cols[None, :]
        g = tl.load(p_ptrs, mask=live, other=0.0).to(tl.float32)
        u = tl.load(p_ptrs + F, mask=live, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + rows[:, None] * stride_dm + cols[None, :], mask=live,
                     other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        o_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
        out_mask = mask if STORE_TAIL else live
        tl.store(o_ptrs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(out_ptr.dtype.element_ty),
                 mask=out_mask)
        tl.store(o_ptrs + F, (dh * g * sig).to(out_ptr.dtype.element_ty), mask=out_mask)


def launch_swiglu_bwd(pre: torch.Tensor, dh: torch.Tensor,
                      rows_end: torch.Tensor | None = None, zero_tail: bool = True,
                      segments: torch.Tensor | None = None) -> torch.Tensor:
    """d(gate | up) [P, 2F] from pre [P, 2F] and dh [P, F] (same dtype, unit column stride).
    rows_end: int64 [1] on the device (offsets[E:]); rows from it on come out as zeros, or
    unwritten with zero_tail=False. segments: int64 [2, E+1] (kernels/row_segments.py); the
    rows in its gaps are treated as those past rows_end."""
    p, f = dh.shape
    if pre.shape != (p, 2 * f) or pre.dtype != dh.dtype:
        raise ValueError(f"pre must be [P, 2F] = [{p}, {2 * f}] in {dh.dtype}, got "
                         f"{pre.dtype} {tuple(pre.shape)}")
    pre = pre if pre.stride(1) == 1 else pre.contiguous()
    dh = dh if dh.stride(1) == 1 else dh.contiguous()
    out = torch.empty(p, 2 * f, dtype=pre.dtype, device=pre.device)
    grid = (triton.cdiv(p, BLOCK_ROWS), triton.cdiv(f, BLOCK_COLS))
    e = 0 if segments is None else segments.shape[-1] - 1
    _swiglu_bwd_kernel[grid](pre, dh, out, pre if rows_end is None else rows_end,
                             pre if segments is None else segments, e, p, f,
                             pre.stride(0), dh.stride(0), out.stride(0),
                             HAS_END=rows_end is not None, SEGMENTS=segments is not None,
                             E_POW2=triton.next_power_of_2(e + 1),
                             STORE_TAIL=zero_tail or (rows_end is None and segments is None),
                             BLOCK_R=BLOCK_ROWS,
                             BLOCK_C=BLOCK_COLS, num_warps=4)
    return out


def swiglu_bwd_reference(pre: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """Plain-torch twin (fp32 math, fp64 for fp64 input)."""
    if pre.dtype == torch.float64:
        f = dh.shape[-1]
        g, u = pre[:, :f], pre[:, f:]
        sig = torch.sigmoid(g)
        return torch.cat([dh * u * sig * (1 + g * (1 - sig)), dh * g * sig], dim=1)
    return swiglu_bwd_math(pre, dh)
