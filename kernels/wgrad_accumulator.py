"""fp32 weight-gradient accumulation over the S reuses of one weight (the IRL steps).

One idea: the S IRL steps of an expert layer reuse w13 and w2, so their weight gradients add
up. Rounding each step's dW to bf16 before the sum (what autograd and F.grouped_mm do) loses
precision; this object collects them in one fp32 buffer per weight, filled by the wgrad
kernel itself, and rounds once. MOC_MATH.md §3 (shared weights); kernels/grouped_gemm.py
(`wgrad_into`, the ops' side of the protocol).

    acc = WeightGradAccumulator()
    w13_t, w2_t = acc.track(w13, w2)        # identity in forward
    for s in range(S): y = expert_swiglu_mlp(x_s, w13_t, w2_t, off_s, wgrad_acc=acc)
    # backward: every step's wgrad kernel adds into one fp32 [E, K, N] buffer per weight
    # (the first one writes it); the track node runs last and casts each sum once to the
    # weight dtype, so w13.grad / w2.grad get exactly one bf16 rounding.

Eager only: it keeps Python state between backward calls, which Dynamo cannot trace. It
serves the autograd Functions of the kernel API (grouped_gemm, expert_mlp: benchmarks, tests,
other callers); the MoC experts use the custom op's weight-gradient chain, which does the
same sum functionally, eager and under torch.compile (kernels/expert_mlp_op.py).
"""
from __future__ import annotations

import torch



class _Track(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acc, *weights):
        ctx.acc = acc
        ctx.set_materialize_grads(False)   # the ops return None for tracked weights
        return tuple(w.view_as(w) for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.acc._finish(grads))


class WeightGradAccumulator:
    """Collects the weight gradients of several uses of the same weights in fp32.

    `track(*weights)` returns identity views to use in the ops (pass `wgrad_acc=self`). Each
    op's backward sends its dW into one fp32 [E, K, N] buffer per weight (the first backward
    writes it, the later ones accumulate in the wgrad kernel); the track node runs after all
    of them (autograd orders it last) and returns each sum in the weight's dtype, rounded
    once. The uses are counted in forward (`slot`), so the last use's wgrad adds the buffer
    and writes the weight's dtype itself (no separate fp32 read-modify-write and cast pass;
    a weight used once never gets an fp32 buffer). Gradients that reach the views by other
    paths are added at the end. Make one per forward pass: it keeps its buffers only until
    that backward ends."""

    def __init__(self):
        self._slots: dict[int, int] = {}
        self._views: list[torch.Tensor] = []
        self._bufs: list[torch.Tensor | None] = []
        self._uses: list[int] = []     # ops that took the view in forward
        self._added: list[int] = []    # of those, wgrads received so far

    def track(self, *weights: torch.Tensor):
        views = _Track.apply(self, *weights)
        for v in views:
            self._slots[id(v)] = len(self._views)
            self._views.append(v)           # keeps the id valid while we live
            self._bufs.append(None)
            self._uses.append(0)
            self._added.append(0)
        return views

    def slot(self, w: torch.Tensor) -> int:
        if id(w) not in self._slots:
            raise ValueError("wgrad_acc was given a weight it does not track: pass the views "
                             "returned by WeightGradAccumulator.track()")
        slot = self._slots[id(w)]
        self._uses[slot] += 1     # one forward use: one wgrad to come
        return slot

    def add(self, slot: int, wgrad_fn):
        """wgrad_fn(accumulate_into, out_dtype) -> [E, K, N]: accumulate_into is None on the
        first call; out_dtype is fp32 until the last expected use, then the weight's."""
        self._added[slot] += 1
        buf = self._bufs[slot]
        if buf is not None and buf.dtype != torch.float32:
            buf = buf.float()    # a use beyond the count (a recomputed forward): back to fp32
        last = self._added[slot] >= self._uses[slot]
        self._bufs[slot] = wgrad_fn(buf, self._views[slot].dtype if last else torch.float32)

    def _finish(self, grads):
        out = []
        for buf, g, v in zip(self._bufs, grads, self._views):
            if buf is None:
                out.append(g)
            elif buf.dtype == torch.float32 and v.dtype != torch.float32:
                out.append((buf if g is None else buf.add_(g)).to(v.dtype))
            else:        # already in the weight's dtype (the last use wrote it)
                out.append(buf if g is None else buf + g)
        self._bufs = [None] * len(self._bufs)
        # The views' grad_fn holds this object: drop them, or the cycle keeps the autograd
        # graph (and the weights' AccumulateGrad nodes) alive until the next gc pass.
        self._views, self._slots = [], {}
        return out
