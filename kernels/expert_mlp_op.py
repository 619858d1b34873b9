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

**The last two steps' wgrads in one pass (OPERAND_LINKS).** Where the backend has a fused
pair wgrad (sm90: grouped_gemm.launch_wgrad_pair, the warp-specialized wgrad over two
segments of rows), the step before the last emits *operand links* instead: placeholders of
the last step's wgrad operands (x [P, D], d(gate|up) [P, 2F], h [P, F], dy [P, D], and its
offsets as float64 [E+1], since an integer tensor cannot be a gradient). The last step's
backward computes no wgrad and returns those operands as the links' gradients; the step
before sums both steps' dW in one fp32 accumulator, over both steps' rows. No fp32 partial
sum goes to memory and back (2 x 4 bytes x |W| per weight), and each output tile has one
epilogue. The cost: the last step's operands live until the step before's backward, in
place of the fp32 sums (at (8, 2048, 5632) with 32768 rows: 1.4 GB against 1.1 GB).
The link kind is chosen in the traced function (`_pair_fused`), so it is an argument of
the op and a compiled graph knows it; MOC_GMM_WGRAD_PAIR=off keeps the fp32 sums.

    chain = wgrad_chain(S)
    for s in range(S): y, chain = expert_swiglu_mlp_op(x_s, w13, w2, off_s, wgrad_chain=chain)

(with operand links, the last step must have the step before's P rows and E experts: the
MoC experts' steps all run on the layer's P dispatched rows).

This module is not reloaded by the kernel tests' conftest (an op name can be registered once
per process); the ops look the launchers up at call time, so a reloaded kernels.grouped_gemm
is the one that runs.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

_NS = "moc_kernels"


def _prims(backend: str, x: torch.Tensor):
    from kernels import grouped_gemm   # at call time: see the module docstring

    return grouped_gemm.primitives(backend, x)


class WgradChain(NamedTuple):
    """The weight-gradient chain of the S IRL steps (module docstring): `uses` steps are
    still to come, this one included; links: the previous step's five link outputs, or
    None before the first step."""
    uses: int
    links: Optional[tuple] = None


def wgrad_chain(steps: int) -> WgradChain:
    """The chain to hand the first of `steps` uses of the same w13 and w2."""
    if steps < 1:
        raise ValueError(f"wgrad_chain: steps must be >= 1, got {steps}")
    return WgradChain(steps)


# What a step's links carry back (the gradient the next step's backward gives them):
NO_LINKS, SUM_LINKS, OPERAND_LINKS = 0, 1, 2
# MOC_GMM_WGRAD_PAIR=off: operand links never (every step's wgrads on its own, summed
# through fp32 links), for measuring the fused pair against them.
PAIR = os.environ.get("MOC_GMM_WGRAD_PAIR", "on") != "off"


def _placeholder(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A tensor of `shape` that holds no memory (all strides zero)."""
    return like.new_empty(1, dtype=dtype).expand(shape)


def _links(kind, x, w13, w2, offsets, gather_index):
    """The five link outputs of a step that emits `kind` (empty [0] tensors where unused):
    SUM_LINKS: (fp32 [E, D, 2F], fp32 [E, F, D], -, -, -), the next step's fp32 dW sums;
    OPERAND_LINKS: ([P, D], [P, 2F], [P, F], [P, D], float64 [E+1]), the next step's wgrad
    operands (its x, d(gate|up), h, dy and offsets: an int64 cannot be a gradient, and
    float64 holds these counts exactly)."""
    def empty():   # one per slot: a custom op's outputs may not alias one another
        return x.new_empty(0)

    if kind == SUM_LINKS:
        f32 = torch.float32
        return (_placeholder(w13.shape, x, f32), _placeholder(w2.shape, x, f32),
                empty(), empty(), empty())
    if kind == OPERAND_LINKS:
        p = x.shape[0] if gather_index is None else gather_index.shape[0]
        d, f2 = w13.shape[1], w13.shape[2]
        return (_placeholder((p, d), x), _placeholder((p, f2), x), _placeholder((p, f2 // 2), x),
                _placeholder((p, d), x), _placeholder(offsets.shape, x, torch.float64))
    return empty(), empty(), empty(), empty(), empty()


def _link_kind(links) -> int:
    """What a step's input links are (None: the chain's first step, or no chain)."""
    if links[0] is None or links[0].numel() == 0:
        return NO_LINKS
    return OPERAND_LINKS if links[4] is not None and links[4].numel() > 0 else SUM_LINKS


@torch.compiler.assume_constant_result    # traced as its value: a Python-level choice
def _pair_fused(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this backend sums two steps' wgrads in one fused pass for operands of this
    device and dtype (TritonPrimitives.pair_fused: sm90). Then the chain's last step hands the
    step before its wgrad operands (OPERAND_LINKS) instead of fp32 sums. Decided here, in the
    traced function, so the link kind is an argument of the op: a compiled graph (and
    inductor's cache of it) then knows which links it holds."""
    prims = _prims(backend, torch.empty(0, device=device, dtype=dtype))
    return bool(getattr(prims, "pair_fused", lambda dev, dt: False)(device, dtype))


@torch.library.custom_op(f"{_NS}::expert_mlp_fwd", mutates_args=())
def _fwd(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor,
         gather_index: Optional[torch.Tensor], backend: str, save: bool,
         l0: Optional[torch.Tensor] = None, l1: Optional[torch.Tensor] = None,
         l2: Optional[torch.Tensor] = None, l3: Optional[torch.Tensor] = None,
         l4: Optional[torch.Tensor] = None, emit: int = 0, zero_tail: bool = True
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                    torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [P, D], pre [P, 2F], h [P, F], five links for the next step); pre and h are empty
    [0] when not `save`, the links as `_links` (emit: their kind, NO_LINKS, SUM_LINKS or
    OPERAND_LINKS). The input links l0..l4
    only carry the chain's gradient: forward does not read them. zero_tail=False: y's rows
    [offsets[E], P) may be left unwritten (expert_swiglu_mlp_op)."""
    prims = _prims(backend, x)
    h, pre = prims.gmm_swiglu(x, w13, offsets, gather_index, store_pre=save, zero_tail=False)
    y = prims.gmm(h, w2, offsets, zero_tail=zero_tail)
    links = _links(emit, x, w13, w2, offsets, gather_index)
    if not save:
        return y, x.new_empty(0), x.new_empty(0), *links
    return y, pre, h, *links


@_fwd.register_fake
def _fwd_fake(x, w13, w2, offsets, gather_index, backend, save, l0=None, l1=None, l2=None,
              l3=None, l4=None, emit=0, zero_tail=True):
    p = x.shape[0] if gather_index is None else gather_index.shape[0]
    f2 = w13.shape[2]
    links = _links(emit, x, w13, w2, offsets, gather_index)
    if not save:
        return x.new_empty(p, w2.shape[2]), x.new_empty(0), x.new_empty(0), *links
    return x.new_empty(p, w2.shape[2]), x.new_empty(p, f2), x.new_empty(p, f2 // 2), *links


@torch.library.custom_op(f"{_NS}::expert_mlp_bwd", mutates_args=())
def _bwd(dy: torch.Tensor, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
         offsets: torch.Tensor, gather_index: Optional[torch.Tensor], pre: torch.Tensor,
         h: torch.Tensor, backend: str, acc13: Optional[torch.Tensor] = None,
         acc2: Optional[torch.Tensor] = None, final: bool = True, zero_tail: bool = True,
         next_x: Optional[torch.Tensor] = None, next_dgu: Optional[torch.Tensor] = None,
         next_h: Optional[torch.Tensor] = None, next_dy: Optional[torch.Tensor] = None,
         next_offsets: Optional[torch.Tensor] = None, defer: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [T, D], dw13 [E, D, 2F], dw2 [E, F, D]): the backward of kernels.expert_mlp.
    acc13 / acc2: fp32 weight-gradient sums of the later steps to add (wgrad_chain), or None;
    next_*: the next step's wgrad operands (OPERAND_LINKS), whose dW go into the same sums,
    one pass over both steps' rows (prims.wgrad_pair); final: dW in the weights' dtype (the
    chain's end), else the fp32 sum for the step before; zero_tail=False: dx's rows
    [offsets[E], P) may be left unwritten (not with a gather, whose scatter adds every row
    into dx); defer: no wgrads, (dx, d(gate|up) [P, 2F], empty): the chain's last step,
    whose wgrads the step before computes."""
    from kernels.grouped_gemm import scatter_rows

    prims = _prims(backend, x)
    dy = dy.contiguous()
    dgu = prims.gmm_swiglu_bwd(dy, w2, offsets, pre)                         # [P, 2F]
    if defer:
        dw13, dw2 = dgu, x.new_empty(0)
    elif next_x is not None:
        nxt = next_offsets.to(torch.int64)
        dt13, dt2 = (w13.dtype, w2.dtype) if final else (torch.float32, torch.float32)
        dw2 = prims.wgrad_pair(h, dy, offsets, None, (next_h, next_dy, nxt), _cont(acc2), dt2)
        dw13 = prims.wgrad_pair(x, dgu, offsets, gather_index, (next_x, next_dgu, nxt),
                                _cont(acc13), dt13)
    else:
        def wgrad(a, d, gidx, acc, w):
            return prims.wgrad(a, d, offsets, gidx, accumulate_into=_cont(acc),
                               out_dtype=w.dtype if final else torch.float32,
                               out_of_place=True)

        dw2 = wgrad(h, dy, None, acc2, w2)
        dw13 = wgrad(x, dgu, gather_index, acc13, w13)
    dxp = prims.gmm(dgu, w13, offsets, trans_w=True,
                    zero_tail=zero_tail or gather_index is not None)
    dx = scatter_rows(dxp, gather_index, x.shape[0])
    return dx, dw13, dw2


def _cont(t):
    return None if t is None else t.contiguous()


@_bwd.register_fake
def _bwd_fake(dy, x, w13, w2, offsets, gather_index, pre, h, backend, acc13=None, acc2=None,
              final=True, zero_tail=True, next_x=None, next_dgu=None, next_h=None,
              next_dy=None, next_offsets=None, defer=False):
    if defer:
        return torch.empty_like(x), pre.new_empty(pre.shape), x.new_empty(0)
    dt = None if final else torch.float32
    return (torch.empty_like(x), torch.empty_like(w13, dtype=dt),
            torch.empty_like(w2, dtype=dt))


def _setup_context(ctx, inputs, output):
    x, w13, w2, offsets, gather_index, backend, save, *links, _, zero_tail = inputs
    _, pre, h, *out_links = output
    ctx.save_for_backward(x, w13, w2, offsets, gather_index, pre, h)
    ctx.backend, ctx.zero_tail = backend, zero_tail
    ctx.in_kind, ctx.out_kind = _link_kind(links), _link_kind(out_links)
    # pre and h are outputs for saving only, and a link may get no gradient: no zeros of
    # their shapes ([P, 2F], [E, K, N] fp32) built for grads that never come
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dpre, _dh, *dlinks):
    """A chained step hands the step before, as its input links' gradient, its fp32 partial
    sum, or (the chain's last step, OPERAND_LINKS) its own wgrad operands; it returns no
    gradient for the weights. The first step (no input link) ends the chain."""
    x, w13, w2, offsets, gather_index, pre, h = ctx.saved_tensors
    if dy is None:   # only the link reached the loss
        dy = x.new_zeros(pre.shape[0], w2.shape[2])
    none7 = (None,) * 7
    if ctx.in_kind == OPERAND_LINKS:
        dx, dgu, _ = _bwd(dy, x, w13, w2, offsets, gather_index, pre, h, ctx.backend, None,
                          None, False, ctx.zero_tail, *(None,) * 5, True)    # defer
        xa = x if gather_index is None else x.index_select(0, gather_index)
        return (dx, *(None,) * 6, xa, dgu, h, dy, offsets.to(torch.float64), None, None)
    acc13, acc2 = dlinks[:2] if ctx.out_kind == SUM_LINKS else (None, None)
    nxt = dlinks if ctx.out_kind == OPERAND_LINKS and dlinks[0] is not None else (None,) * 5
    dx, dw13, dw2 = _bwd(dy, x, w13, w2, offsets, gather_index, pre, h, ctx.backend, acc13,
                         acc2, ctx.in_kind == NO_LINKS, ctx.zero_tail, *nxt)
    if ctx.in_kind == SUM_LINKS:
        return (dx, *(None,) * 6, dw13, dw2, None, None, None, None, None)
    return (dx, dw13, dw2, *none7[:4], *none7)


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
    backend = backend or "auto"
    emit = NO_LINKS if chain is None or chain.uses <= 1 else SUM_LINKS
    if emit and chain.uses == 2 and PAIR and _pair_fused(backend, x.device, x.dtype):
        emit = OPERAND_LINKS   # the next step is the last: its operands come back
    links = (None,) * 5 if chain is None or chain.links is None else chain.links
    if _link_kind(links) == OPERAND_LINKS:
        p = x.shape[0] if gather_index is None else gather_index.shape[0]
        if links[0].shape != (p, x.shape[1]) or links[4].shape != offsets.shape:
            raise ValueError(
                f"wgrad_chain: the chain's last use must have the rows and experts of the one "
                f"before ([{links[0].shape[0]}, {links[0].shape[1]}] rows, "
                f"offsets {tuple(links[4].shape)}), got [{p}, {x.shape[1]}] and "
                f"{tuple(offsets.shape)}")
    y, _, _, *out = _fwd(x, w13, w2, offsets, gather_index, backend, save, *links, emit,
                         zero_tail)
    if wgrad_chain is None:
        return y
    return y, (WgradChain(chain.uses - 1, tuple(out)) if emit else None)
