"""Expert SwiGLU MLP on the grouped GEMM, with SwiGLU fused into the W13 GEMM's epilogue.

One idea: an expert is y = (silu(x·Wg) * (x·Wu)) · W2 on the rows it owns; the two grouped
GEMMs run on kernels/grouped_gemm.py's kernel, whose W13 epilogue applies SwiGLU (forward).
The backward's SwiGLU derivative is one elementwise pass after the W2 dgrad (kernels/swiglu.py):
fusing it into that GEMM's epilogue measured slower (docs/kernels_notes.md).
MOC_MATH.md, "Experts" (one IRL step's expert MLP).

Shape legend: P dispatched rows (sorted by expert), T source rows (x before a gather),
E experts, D hidden size, F ffn size. w13 [E, D, 2F] (columns [0, F) gate, [F, 2F) up),
w2 [E, F, D]. offsets int64 [E+1] on the device, as in grouped_gemm.

Public API
    grouped_swiglu(x, w13, offsets, gather_index=None, *, backend=None)
        -> h [P, F] = silu(X·Wg) * (X·Wu) per expert. Saves the pre-activation [P, 2F]
        (written by the same kernel's epilogue); backward does the SwiGLU derivative in torch
        (fp32) and reuses the GEMM kernels for dX and dW13.
    expert_swiglu_mlp(x, w13, w2, offsets, gather_index=None, *, wgrad_chain=None, backend=None,
                      zero_tail=True)
        -> y [P, D] (with a wgrad_chain: (y, the chain for the next use)). Forward: fused
        W13+SwiGLU kernel, then the W2 grouped GEMM. Saves x,
        the pre-activation [P, 2F] and h [P, F] (h feeds the W2 weight gradient; the
        unfused grouped_mm path keeps the same tensors). Backward: dh = dY·W2^T, then the
        SwiGLU backward -> d(gate|up) [P, 2F]; wgrad for W2 and W13; dX = d(gate|up)·W13^T,
        scattered back through gather_index (index_add, see grouped_gemm). zero_tail=False
        leaves y's and dX's rows past offsets[E] unwritten, for callers that never read them.
    grouped_swiglu_reference / expert_swiglu_mlp_reference: same signatures, fp32 (fp64)
        per-expert loop, differentiable by autograd.
    wgrad_chain: the S IRL steps' uses of the same w13 and w2 give one fp32 weight-gradient
        sum, rounded once (kernels.expert_mlp_op.wgrad_chain(S) for the first use, then what
        each use returns); such uses run as the custom ops of kernels/expert_mlp_op.py.
    Under torch.compile, expert_swiglu_mlp runs as those custom ops too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.expert_mlp_op import expert_swiglu_mlp_op
from kernels.gmm_backend import swiglu_bwd_math
from kernels.grouped_gemm import grouped_gemm_reference, primitives, scatter_rows


class _GroupedSwiglu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w13, offsets, gather_index, prims):
        h, pre = prims.gmm_swiglu(x, w13, offsets, gather_index, store_pre=True)
        ctx.save_for_backward(x, w13, offsets, gather_index, pre)
        ctx.prims = prims
        return h

    @staticmethod
    def backward(ctx, dh):
        x, w13, offsets, gather_index, pre = ctx.saved_tensors
        dgu = swiglu_bwd_math(pre, dh)                      # [P, 2F], fp32 math
        dx = dw13 = None
        if ctx.needs_input_grad[0]:
            dxp = ctx.prims.gmm(dgu, w13, offsets, trans_w=True)
            dx = scatter_rows(dxp, gather_index, x.shape[0])
        if ctx.needs_input_grad[1]:
            dw13 = ctx.prims.wgrad(x, dgu, offsets, gather_index, out_dtype=w13.dtype)
        return dx, dw13, None, None, None


def grouped_swiglu(x, w13, offsets, gather_index=None, *, backend=None):
    """h [P, F] = silu(X[rows_e]·W13[e][:, :F]) * (X[rows_e]·W13[e][:, F:]).

    Args: x [T, D]; w13 [E, D, 2F]; offsets int64 [E+1]; gather_index int64 [P] or None;
        backend: see gmm_backend.
    Returns: h [P, F] in x.dtype; zeros in rows [offsets[E], P)."""
    prims = primitives(backend, x)
    if not (torch.is_grad_enabled() and (x.requires_grad or w13.requires_grad)):
        return prims.gmm_swiglu(x, w13, offsets, gather_index, store_pre=False)[0]
    return _GroupedSwiglu.apply(x, w13, offsets, gather_index, prims)


class _ExpertSwigluMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w13, w2, offsets, gather_index, prims, zero_tail):
        # h is internal (W2's input, saved for its wgrad): both stop at offsets[E]
        h, pre = prims.gmm_swiglu(x, w13, offsets, gather_index, store_pre=True, zero_tail=False)
        y = prims.gmm(h, w2, offsets, zero_tail=zero_tail)
        ctx.save_for_backward(x, w13, w2, offsets, gather_index, pre, h)
        ctx.prims, ctx.zero_tail = prims, zero_tail
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w13, w2, offsets, gather_index, pre, h = ctx.saved_tensors
        prims = ctx.prims
        dy = dy.contiguous()     # a stride-0 grad (from .sum()) breaks grouped_mm's kernels
        dgu = prims.gmm_swiglu_bwd(dy, w2, offsets, pre)    # [P, 2F]
        dx = dw13 = dw2 = None
        if ctx.needs_input_grad[2]:
            dw2 = prims.wgrad(h, dy, offsets, out_dtype=w2.dtype)
        if ctx.needs_input_grad[1]:
            dw13 = prims.wgrad(x, dgu, offsets, gather_index, out_dtype=w13.dtype)
        if ctx.needs_input_grad[0]:
            dxp = prims.gmm(dgu, w13, offsets, trans_w=True,
                            zero_tail=ctx.zero_tail or gather_index is not None)
            dx = scatter_rows(dxp, gather_index, x.shape[0])
        return dx, dw13, dw2, None, None, None, None


def expert_swiglu_mlp(x, w13, w2, offsets, gather_index=None, *, wgrad_chain=None,
                      backend=None, zero_tail=True):
    """y [P, D] = grouped_gemm(grouped_swiglu(x, w13, ...), w2, ...), fused (module docstring).

    Args: x [T, D]; w13 [E, D, 2F]; w2 [E, F, D]; offsets int64 [E+1] on x's device;
        gather_index int64 [P] or None (row p reads x[gather_index[p]]);
        wgrad_chain: this use's place among the S uses of w13 and w2 whose weight gradients
            add up in fp32 (kernels.expert_mlp_op.wgrad_chain), or None;
        backend: None/"auto", "triton", "grouped_mm", "loop";
        zero_tail: False when nothing reads rows [offsets[E], P) of y or of x's gradient
            (hard IRL mode): they may then be left unwritten.
    Returns: y [P, D] in x.dtype, zeros in rows [offsets[E], P) (maybe unwritten with
        zero_tail=False); with a wgrad_chain, (y, the chain for the next use: None after
        the last)."""
    if w2.shape[0] != w13.shape[0] or 2 * w2.shape[1] != w13.shape[2]:
        raise ValueError(f"w2 must be [E, F, D] = [{w13.shape[0]}, {w13.shape[2] // 2}, "
                         f"{w13.shape[1]}], got {tuple(w2.shape)}")
    if wgrad_chain is not None or torch.compiler.is_compiling():
        # The same MLP as opaque custom ops (kernels/expert_mlp_op.py): torch.compile does not
        # break its graph here, and the chain's fp32 sum travels along autograd edges.
        return expert_swiglu_mlp_op(x, w13, w2, offsets, gather_index, backend,
                                    wgrad_chain=wgrad_chain, zero_tail=zero_tail)
    prims = primitives(backend, x)
    if not (torch.is_grad_enabled() and (x.requires_grad or w13.requires_grad
                                         or w2.requires_grad)):
        h, _ = prims.gmm_swiglu(x, w13, offsets, gather_index, store_pre=False,
                                zero_tail=False)
        return prims.gmm(h, w2, offsets, zero_tail=zero_tail)   # inference: save nothing
    return _ExpertSwigluMLP.apply(x, w13, w2, offsets, gather_index, prims, zero_tail)


def grouped_swiglu_reference(x, w13, offsets, gather_index=None, *, backend=None):
    """Plain-torch twin of grouped_swiglu (fp32, fp64 for fp64 input)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    pre = grouped_gemm_reference(x.to(ct), w13.to(ct), offsets, gather_index)
    f = w13.shape[-1] // 2
    return (F.silu(pre[:, :f]) * pre[:, f:]).to(x.dtype)


def expert_swiglu_mlp_reference(x, w13, w2, offsets, gather_index=None, *, backend=None):
    """Plain-torch twin of expert_swiglu_mlp (fp32, fp64 for fp64 input)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = grouped_swiglu_reference(x.to(ct), w13.to(ct), offsets, gather_index)
    return grouped_gemm_reference(h, w2.to(ct), offsets).to(x.dtype)
