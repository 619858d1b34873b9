"""The expert SwiGLU MLP as two torch.library custom ops, so torch.compile sees it as one node.

One idea: `torch.compile` cannot trace our Triton launchers (autotuning, Python grids) and
breaks the graph around them; a graph break inside the IRL step loop makes Dynamo give up on
the whole frame. Wrapped as opaque custom ops (forward and backward, with fake shapes) the
grouped MLP sits inside a compiled region like a matmul, and inductor fuses the RMSNorm, gates
and residuals around it. MOC_MATH.md §3 (one IRL step's expert MLP).

Shape legend: P dispatched rows, T source rows, E experts, D hidden size, F ffn size.

    expert_swiglu_mlp_op(x, w13, w2, offsets, gather_index=None, backend="triton",
                         wgrad_chain=None, zero_tail=True) -> y [P, D], or (y, next chain)

Same contract as kernels.expert_mlp.expert_swiglu_mlp (whose twin is the reference there);
kernels.expert_mlp.expert_swiglu_mlp routes here by itself while torch.compile traces and
whenever it is given a wgrad_chain.

**The S IRL steps' weight gradients, one fp32 sum (`wgrad_chain`).** The steps reuse w13 and
w2; their dW should be summed in fp32 inside the wgrad kernel and rounded once (autograd and
F.grouped_mm would round each step's dW to bf16 before the sum). An object collecting the
sums between backward calls would keep Python state, which Dynamo cannot trace, so the sum
travels along autograd edges instead: each
step but the last also returns a *link* per weight (an fp32 [E, K, N] placeholder with zero
strides, no memory), and the next step takes it as an input. Backward runs the steps in
reverse. The last step's backward writes its dW in fp32 and returns it as the gradient of its
input link. That gradient reaches the step before, whose wgrad kernel adds its own dW into it
(a new fp32 tensor, the addend untouched). The first step writes the sum in the weight's dtype
as the weight's gradient. The later steps return no gradient for the weights. It is
functional, so it traces, and it runs under activation checkpointing too.

    chain = wgrad_chain(S)
    for s in range(S): y, chain = expert_swiglu_mlp_op(x_s, w13, w2, off_s, wgrad_chain=chain)

This module is not reloaded by the kernel tests' conftest (an op name can be registered once
per process); the ops look the launchers up at call time, so a reloaded kernels.grouped_gemm
is the one that runs.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

_NS = "moc_kernels"


def _prims(backend: str, x: torch.Tensor):
    from kernels import grouped_gemm   # at call time: see the module docstring

    return grouped_gemm.primitives(backend, x)


class WgradChain(NamedTuple):
    """The weight-gradient chain of the S IRL steps (module docstring): `uses` steps are
    still to come, this one included; link13 / link2 are the previous step's links, or None
    before the first step."""
    uses: int
    link13: Optional[torch.Tensor] = None
    link2: Optional[torch.Tensor] = None


def wgrad_chain(steps: int) -> WgradChain:
    """The chain to hand the first of `steps` uses of the same w13 and w2."""
    if steps < 1:
        raise ValueError(f"wgrad_chain: steps must be >= 1, got {steps}")
    return WgradChain(steps)


def _link(w: torch.Tensor) -> torch.Tensor:
    """An fp32 placeholder of w's shape that holds no memory (all strides zero)."""
    return w.new_empty(1, dtype=torch.float32).expand(w.shape)


@torch.library.custom_op(f"{_NS}::expert_mlp_fwd", mutates_args=())
def _fwd(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor,
         gather_index: Optional[torch.Tensor], backend: str, save: bool,
         link13: Optional[torch.Tensor] = None, link2: Optional[torch.Tensor] = None,
         emit: bool = False, zero_tail: bool = True
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [P, D], pre [P, 2F], h [P, F], link13, link2); pre and h are empty [0] when not
    `save`, the links (for the next step) empty [0] when not `emit`. The input links only
    carry the chain's gradient: forward does not read them. zero_tail=False: y's rows
    [offsets[E], P) may be left unwritten (expert_swiglu_mlp_op)."""
    prims = _prims(backend, x)
    h, pre = prims.gmm_swiglu(x, w13, offsets, gather_index, store_pre=save, zero_tail=False)
    y = prims.gmm(h, w2, offsets, zero_tail=zero_tail)
    out13, out2 = (_link(w13), _link(w2)) if emit else (x.new_empty(0), x.new_empty(0))
    if not save:
        return y, x.new_empty(0), x.new_empty(0), out13, out2
    return y, pre, h, out13, out2


@_fwd.register_fake
def _fwd_fake(x, w13, w2, offsets, gather_index, backend, save, link13=None, link2=None,
              emit=False, zero_tail=True):
    p = x.shape[0] if gather_index is None else gather_index.shape[0]
    f2 = w13.shape[2]
    links = (_link(w13), _link(w2)) if emit else (x.new_empty(0), x.new_empty(0))
    if not save:
        return x.new_empty(p, w2.shape[2]), x.new_empty(0), x.new_empty(0), *links
    return x.new_empty(p, w2.shape[2]), x.new_empty(p, f2), x.new_empty(p, f2 // 2), *links


@torch.library.custom_op(f"{_NS}::expert_mlp_bwd", mutates_args=())
def _bwd(dy: torch.Tensor, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
         offsets: torch.Tensor, gather_index: Optional[torch.Tensor], pre: torch.Tensor,
         h: torch.Tensor, backend: str, acc13: Optional[torch.Tensor] = None,
         acc2: Optional[torch.Tensor] = None, final: bool = True, zero_tail: bool = True
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [T, D], dw13 [E, D, 2F], dw2 [E, F, D]): the backward of kernels.expert_mlp.
    acc13 / acc2: fp32 weight-gradient sums of the later steps to add (wgrad_chain), or None;
    final: dW in the weights' dtype (the chain's end), else the fp32 sum for the step before;
    zero_tail=False: dx's rows [offsets[E], P) may be left unwritten (not with a gather,
    whose scatter adds every row into dx)."""
    from kernels.grouped_gemm import scatter_rows

    prims = _prims(backend, x)
    dy = dy.contiguous()
    dgu = prims.gmm_swiglu_bwd(dy, w2, offsets, pre)                         # [P, 2F]

    def wgrad(a, d, gidx, acc, w):
        acc = None if acc is None else acc.contiguous()
        return prims.wgrad(a, d, offsets, gidx, accumulate_into=acc,
                           out_dtype=w.dtype if final else torch.float32, out_of_place=True)

    dw2 = wgrad(h, dy, None, acc2, w2)
    dw13 = wgrad(x, dgu, gather_index, acc13, w13)
    dxp = prims.gmm(dgu, w13, offsets, trans_w=True,
                    zero_tail=zero_tail or gather_index is not None)
    dx = scatter_rows(dxp, gather_index, x.shape[0])
    return dx, dw13, dw2


@_bwd.register_fake
def _bwd_fake(dy, x, w13, w2, offsets, gather_index, pre, h, backend, acc13=None, acc2=None,
              final=True, zero_tail=True):
    dt = None if final else torch.float32
    return (torch.empty_like(x), torch.empty_like(w13, dtype=dt),
            torch.empty_like(w2, dtype=dt))


def _setup_context(ctx, inputs, output):
    x, w13, w2, offsets, gather_index, backend, save, link13, _, emit, zero_tail = inputs
    _, pre, h, _, _ = output
    ctx.save_for_backward(x, w13, w2, offsets, gather_index, pre, h)
    ctx.backend, ctx.emit, ctx.chained = backend, emit, link13 is not None
    ctx.zero_tail = zero_tail
    # pre and h are outputs for saving only, and a link may get no gradient: no zeros of
    # their shapes ([P, 2F], [E, K, N] fp32) built for grads that never come
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dpre, _dh, dlink13, dlink2):
    """A chained step hands its fp32 partial sum to the step before as its input links'
    gradient, and none to the weights; the first step (no input link) ends the chain."""
    x, w13, w2, offsets, gather_index, pre, h = ctx.saved_tensors
    if dy is None:   # only the link reached the loss
        dy = x.new_zeros(pre.shape[0], w2.shape[2])
    acc13, acc2 = (dlink13, dlink2) if ctx.emit else (None, None)
    dx, dw13, dw2 = _bwd(dy, x, w13, w2, offsets, gather_index, pre, h, ctx.backend, acc13, acc2,
                         not ctx.chained, ctx.zero_tail)
    if ctx.chained:
        return dx, None, None, None, None, None, None, dw13, dw2, None, None
    return dx, dw13, dw2, None, None, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def expert_swiglu_mlp_op(x, w13, w2, offsets, gather_index=None, backend="triton",
                         wgrad_chain: Optional[WgradChain] = None, zero_tail: bool = True):
    """y [P, D] of the expert SwiGLU MLP through the custom ops (see the module docstring).

    Args: x [T, D]; w13 [E, D, 2F]; w2 [E, F, D]; offsets int64 [E+1] on x's device;
        gather_index int64 [P] or None; backend: "triton", "grouped_mm", "loop" or "auto";
        wgrad_chain: this use's place in a chain of uses of the same weights (`wgrad_chain`,
        or what the previous use returned), or None for a use on its own;
        zero_tail: False when nothing reads rows [offsets[E], P) of y or of x's gradient
            (hard IRL mode's compacted rows): those are then left unwritten, saving two
            [tail, D] writes per step.
    Returns: y [P, D] in x.dtype, zeros in rows [offsets[E], P) (unwritten with
        zero_tail=False); with a chain, (y, the chain for the next use: None after the last)."""
    save = torch.is_grad_enabled() and (x.requires_grad or w13.requires_grad
                                        or w2.requires_grad)
    chain = wgrad_chain if save else None   # no backward, no chain
    emit = chain is not None and chain.uses > 1
    link13, link2 = (None, None) if chain is None else (chain.link13, chain.link2)
    y, _, _, out13, out2 = _fwd(x, w13, w2, offsets, gather_index, backend or "auto", save,
                                link13, link2, emit, zero_tail)
    if wgrad_chain is None:
        return y
    return y, (WgradChain(chain.uses - 1, out13, out2) if emit else None)
