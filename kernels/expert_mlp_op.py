"""The expert SwiGLU MLP as two torch.library custom ops, so torch.compile sees it as one node.

One idea: `torch.compile` cannot trace our Triton launchers (autotuning, Python grids) and
breaks the graph around them; a graph break inside the IRL step loop makes Dynamo give up on
the whole frame. Wrapped as opaque custom ops (forward and backward, with fake shapes) the
grouped MLP sits inside a compiled region like a matmul, and inductor fuses the RMSNorm, gates
and residuals around it. MOC_MATH.md §3 (one IRL step's expert MLP).

Shape legend: P dispatched rows, T source rows, E experts, D hidden size, F ffn size.

    expert_swiglu_mlp_op(x, w13, w2, offsets, gather_index=None, backend="triton") -> y [P, D]

Same contract as kernels.expert_mlp.expert_swiglu_mlp (whose twin is the reference there),
except that the S IRL steps' weight gradients are not accumulated in one fp32 buffer: each
step's dW leaves the wgrad kernel in the weight dtype and autograd sums them (under compile,
inductor adds them in fp32 and rounds once). kernels.expert_mlp.expert_swiglu_mlp routes here
by itself while torch.compile traces.

This module is not reloaded by the kernel tests' conftest (an op name can be registered once
per process); the ops look the launchers up at call time, so a reloaded kernels.grouped_gemm
is the one that runs.
"""
from __future__ import annotations

from typing import Optional

import torch

_NS = "moc_kernels"


def _prims(backend: str, x: torch.Tensor):
    from kernels import grouped_gemm   # at call time: see the module docstring

    return grouped_gemm.primitives(backend, x)


@torch.library.custom_op(f"{_NS}::expert_mlp_fwd", mutates_args=())
def _fwd(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor,
         gather_index: Optional[torch.Tensor], backend: str, save: bool
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [P, D], pre [P, 2F], h [P, F]); pre and h are empty [0] when not `save`."""
    prims = _prims(backend, x)
    h, pre = prims.gmm_swiglu(x, w13, offsets, gather_index, store_pre=save, zero_tail=False)
    y = prims.gmm(h, w2, offsets)
    if not save:
        return y, x.new_empty(0), x.new_empty(0)
    return y, pre, h


@_fwd.register_fake
def _fwd_fake(x, w13, w2, offsets, gather_index, backend, save):
    p = x.shape[0] if gather_index is None else gather_index.shape[0]
    f2 = w13.shape[2]
    if not save:
        return x.new_empty(p, w2.shape[2]), x.new_empty(0), x.new_empty(0)
    return x.new_empty(p, w2.shape[2]), x.new_empty(p, f2), x.new_empty(p, f2 // 2)


@torch.library.custom_op(f"{_NS}::expert_mlp_bwd", mutates_args=())
def _bwd(dy: torch.Tensor, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
         offsets: torch.Tensor, gather_index: Optional[torch.Tensor], pre: torch.Tensor,
         h: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [T, D], dw13 [E, D, 2F], dw2 [E, F, D]): the backward of kernels.expert_mlp."""
    from kernels.grouped_gemm import scatter_rows

    prims = _prims(backend, x)
    dy = dy.contiguous()
    dgu = prims.gmm_swiglu_bwd(dy, w2, offsets, pre)                         # [P, 2F]
    dw2 = prims.wgrad(h, dy, offsets, None, out_dtype=w2.dtype)
    dw13 = prims.wgrad(x, dgu, offsets, gather_index, out_dtype=w13.dtype)
    dx = scatter_rows(prims.gmm(dgu, w13, offsets, trans_w=True), gather_index, x.shape[0])
    return dx, dw13, dw2


@_bwd.register_fake
def _bwd_fake(dy, x, w13, w2, offsets, gather_index, pre, h, backend):
    return torch.empty_like(x), torch.empty_like(w13), torch.empty_like(w2)


def _setup_context(ctx, inputs, output):
    x, w13, w2, offsets, gather_index, backend, save = inputs
    _, pre, h = output
    ctx.save_for_backward(x, w13, w2, offsets, gather_index, pre, h)
    ctx.backend = backend


def _backward(ctx, dy, _dpre, _dh):
    x, w13, w2, offsets, gather_index, pre, h = ctx.saved_tensors
    dx, dw13, dw2 = _bwd(dy, x, w13, w2, offsets, gather_index, pre, h, ctx.backend)
    return dx, dw13, dw2, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def expert_swiglu_mlp_op(x, w13, w2, offsets, gather_index=None, backend="triton"):
    """y [P, D] of the expert SwiGLU MLP through the custom ops (see the module docstring).

    Args: x [T, D]; w13 [E, D, 2F]; w2 [E, F, D]; offsets int64 [E+1] on x's device;
        gather_index int64 [P] or None; backend: "triton", "grouped_mm", "loop" or "auto".
    Returns: y [P, D] in x.dtype; zeros in rows [offsets[E], P)."""
    save = torch.is_grad_enabled() and (x.requires_grad or w13.requires_grad
                                        or w2.requires_grad)
    return _fwd(x, w13, w2, offsets, gather_index, backend or "auto", save)[0]
