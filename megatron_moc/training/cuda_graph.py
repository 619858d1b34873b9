"""One whole training step — forward, backward, gradient clipping, optimizer step — captured
once as a CUDA graph and replayed.

One idea: a MoC step launches thousands of small kernels (ten layers of router, IRL steps,
mediator rounds, each fwd + bwd), and on one H100 the Python and launch work of an eager or
partly compiled step takes longer than the GPU work itself (docs/benchmarks.md: the GPU sat
idle for a third of the step). The MoC layer keeps every shape static and never reads back to
the host (capacity from the token count, device-side expert offsets, compaction in hard mode
by a device sort), so the whole step can be recorded once and replayed with one launch.

    step = GraphedTrainStep(loss_fn, params, optimizer, (ids, labels), max_grad_norm=1.0)
    for ids, labels in batches:
        loss = step(ids, labels)          # copies into the captured inputs, replays

Requirements (checked where cheap): a CUDA device; an optimizer built with `capturable=True`
(torch AdamW, fused or not); the same input shapes every step; no host syncs in `loss_fn`
(with expert parallelism the all-to-all reads split sizes on the host: not capturable); a
constant learning rate inside the graph (a schedule must update a tensor lr in place). The
gradients live in the graph's memory and are overwritten by each replay (one micro-batch per
optimizer step). This is for single-process runs and benchmarks (tools/bench_throughput.py
--cuda-graph); the DeepSpeed trainer's engine step runs Python between micro-batches
(gradient buckets, ZeRO partitioning) and is not captured.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch


class GraphedTrainStep:
    def __init__(self, loss_fn: Callable[..., torch.Tensor], params: Iterable[torch.Tensor],
                 optimizer: torch.optim.Optimizer, example_inputs: Sequence[torch.Tensor],
                 max_grad_norm: float = 0.0, warmup: int = 3):
        """Runs `warmup` eager steps (compilation, autotuning, lazy inits happen there; they
        train like any step), then captures one step. Args: loss_fn(*inputs) -> scalar loss;
        params: the parameters to clip (all trained ones); optimizer: built with
        capturable=True; example_inputs: device tensors of the step's input shapes (copied:
        the caller may reuse them); max_grad_norm: 0 = no clipping."""
        if not torch.cuda.is_available():
            raise ValueError("GraphedTrainStep needs a CUDA device")
        if not all(g.get("capturable", False) for g in optimizer.param_groups):
            raise ValueError("the optimizer must be built with capturable=True "
                             "(e.g. torch.optim.AdamW(..., fused=True, capturable=True))")
        self.loss_fn, self.optimizer = loss_fn, optimizer
        self.params = [p for p in params if p.requires_grad]
        self.max_grad_norm = max_grad_norm
        self.inputs = [x.detach().clone() for x in example_inputs]

        side = torch.cuda.Stream()   # warm up off the default stream, as capture wants
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._step()
                self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

        self.optimizer.zero_grad(set_to_none=True)   # backward allocates .grad in the pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._step()

    def _step(self) -> torch.Tensor:
        loss = self.loss_fn(*self.inputs)
        loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        return loss.detach()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Copy `inputs` into the captured ones and replay; returns the (captured) loss
        tensor, valid until the next call."""
        for dst, src in zip(self.inputs, inputs):
            if src is not dst:
                dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.loss
