"""One whole training step — forward and backward of each micro-batch, gradient clipping,
optimizer step — captured once as a CUDA graph and replayed.

One idea: a MoC step launches thousands of small kernels (ten layers of router, IRL steps,
mediator rounds, each fwd + bwd), and on one H100 the Python and launch work of an eager or
partly compiled step takes longer than the GPU work itself (docs/benchmarks.md: the GPU sat
idle for a third of the step). The MoC layer keeps every shape static and never reads back to
the host (capacity from the token count, device-side expert offsets, compaction in hard mode
by a device sort), so the whole step can be recorded once and replayed with one launch.

    step = GraphedTrainStep(loss_fn, params, optimizer, (ids, labels), max_grad_norm=1.0,
                            grad_accum_steps=4)     # ids, labels: [4, micro, seq]
    for ids, labels in batches:
        loss = step(ids, labels)          # copies into the captured inputs, replays

Gradient accumulation (`accumulated_step`, eager or captured): every input carries the
step's N micro-batches on a leading dim [N, ...]; micro-batch i runs loss_fn on the i-th
slices and backpropagates loss_i / N, so the gradients add up to those of the mean loss, as
DeepSpeed scales each micro-batch's loss by 1 / gradient_accumulation_steps in the trainer
(training/pretrain.py `train_step`); then one clip and one optimizer step. The step returns
the mean loss over the micro-batches.

Requirements (checked where cheap): a CUDA device; an optimizer built with `capturable=True`
(torch AdamW, fused or not); the same input shapes every step; no host syncs in `loss_fn`
(with expert parallelism the all-to-all reads split sizes on the host: not capturable); a
constant learning rate inside the graph (a schedule must update a tensor lr in place). The
gradients live in the graph's memory: the first micro-batch's backward writes them (they are
None when the graph is captured) and the others add to them, on every replay. This is for
single-process runs and benchmarks (tools/bench_throughput.py --cuda-graph); the DeepSpeed
trainer's engine step runs Python between micro-batches (gradient buckets, ZeRO partitioning)
and is not captured.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch


def accumulated_step(loss_fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                     params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
                     max_grad_norm: float = 0.0) -> torch.Tensor:
    """One optimizer step over N = inputs[0].shape[0] micro-batches (module docstring).

    Args: loss_fn(*micro_inputs) -> scalar loss; inputs: tensors [N, ...], micro-batch i is
        (x[i] for x in inputs); params: the parameters to clip; max_grad_norm: 0 = no clip.
        The gradients must be None or zero on entry (the caller zeroes them after the step).
    Returns: the mean of the N losses (detached, on the device; no host sync)."""
    num_micro = inputs[0].shape[0]
    if any(x.shape[0] != num_micro for x in inputs):
        raise ValueError(f"every input needs the same leading micro-batch dim, got "
                         f"{[tuple(x.shape) for x in inputs]}")
    total = None
    for i in range(num_micro):
        loss = loss_fn(*(x[i] for x in inputs))
        (loss / num_micro).backward()
        total = loss.detach() if total is None else total + loss.detach()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return total / num_micro


class GraphedTrainStep:
    def __init__(self, loss_fn: Callable[..., torch.Tensor], params: Iterable[torch.Tensor],
                 optimizer: torch.optim.Optimizer, example_inputs: Sequence[torch.Tensor],
                 max_grad_norm: float = 0.0, warmup: int = 3, grad_accum_steps: int = 1):
        """Runs `warmup` eager steps (compilation, autotuning, lazy inits happen there; they
        train like any step), then captures one step. Args: loss_fn(*micro_inputs) -> scalar
        loss; params: the parameters to clip (all trained ones); optimizer: built with
        capturable=True; example_inputs: device tensors [grad_accum_steps, ...] of the
        step's input shapes (copied: the caller may reuse them); max_grad_norm: 0 = no
        clipping; grad_accum_steps: micro-batches per optimizer step, all in the graph."""
        if not torch.cuda.is_available():
            raise ValueError("GraphedTrainStep needs a CUDA device")
        if not all(g.get("capturable", False) for g in optimizer.param_groups):
            raise ValueError("the optimizer must be built with capturable=True "
                             "(e.g. torch.optim.AdamW(..., fused=True, capturable=True))")
        if any(x.shape[0] != grad_accum_steps for x in example_inputs):
            raise ValueError(f"example_inputs must be [grad_accum_steps={grad_accum_steps}, "
                             f"...], got {[tuple(x.shape) for x in example_inputs]}")
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
        return accumulated_step(self.loss_fn, self.inputs, self.params, self.optimizer,
                                self.max_grad_norm)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Copy `inputs` ([grad_accum_steps, ...] each) into the captured ones and replay;
        returns the (captured) mean loss tensor, valid until the next call."""
        for dst, src in zip(self.inputs, inputs):
            if src is not dst:
                dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.loss
