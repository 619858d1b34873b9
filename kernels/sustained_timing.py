"""GPU time of a kernel launch as it runs in a train step: back to back, host work hidden.

`triton.testing.do_bench` times each call alone, between an L2 flush and a CUDA event pair;
the model replays its train step as one CUDA graph (training/cuda_graph.py), where a GEMM
runs right after the previous kernel with its launch's host work already done. The two
orders can disagree when two kernels are within a few percent: at W13 fwd (8, 2048, 5632) on
the H200, do_bench put the TMA kernel 3% ahead of the warp-specialized one, the graph the WS
kernel 1% ahead (docs/kernels_notes.md, v15). Capturing every candidate in a graph was tried
and reverted (v13: autotuning often starts on autograd's backward thread, where that failed).

So this times `calls` launches queued behind a spin kernel (`torch.cuda._sleep`) that holds
the stream until the host has enqueued them all: the events around them see GPU time only,
inputs as the caller left them (no flush), as a graph replay does. The spin's length is
calibrated once per device and sized from the host time of one call.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

# "sustained" (default): the sm90 autotuners and the WS-or-TMA choice time with this module;
# "flushed": with triton.testing.do_bench as is (the pre-session-13 behaviour, for A/B runs).
MODE = os.environ.get("MOC_GMM_TIMING", "sustained")
if MODE not in ("sustained", "flushed"):
    raise ValueError(f"MOC_GMM_TIMING must be 'sustained' or 'flushed', got {MODE!r}")
CALLS = 10     # launches per timed block
ROUNDS = 3     # timed blocks per candidate (medians)
_CYCLES_PER_MS: dict[int, float] = {}


def _cycles_per_ms(device: int) -> float:
    """torch.cuda._sleep's cycles per millisecond on this device, timed once."""
    if device not in _CYCLES_PER_MS:
        cycles = 2_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)   # the first launch loads the module
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _CYCLES_PER_MS[device] = cycles / max(start.elapsed_time(end), 1e-3)
    return _CYCLES_PER_MS[device]


class _Block:
    """One candidate's warm-up (compile, autotune) and its timed blocks of CALLS launches."""

    def __init__(self, fn, calls):
        if not torch.cuda.is_available():
            raise RuntimeError("sustained_timing needs a CUDA (or ROCm) device")
        self.fn, self.calls = fn, calls
        fn()                                   # compile / autotune outside any timing
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()                                   # the host time of one warm launch
        self.host_ms = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        self.samples: list[float] = []

    def time(self):
        # Twice the host time of the whole block, plus a margin for a slow launch.
        spin_ms = 2 * self.calls * self.host_ms + 0.5
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(spin_ms * _cycles_per_ms(torch.cuda.current_device())))
        start.record()
        for _ in range(self.calls):
            self.fn()
        end.record()
        end.synchronize()
        self.samples.append(start.elapsed_time(end) / self.calls)


def sustained_ms(fns, calls=CALLS, rounds=ROUNDS) -> list[float]:
    """Median ms per call of each fn in fns, timed in ABBA order (drift falls on all)."""
    blocks = [_Block(fn, calls) for fn in fns]
    for _ in range(rounds):
        for b in (*blocks, *blocks[::-1]):
            b.time()
    return [statistics.median(b.samples) for b in blocks]


def do_bench_sustained(fn, quantiles=None):
    """triton.autotune's `do_bench` hook: the median ms per launch of one config, 2 * ROUNDS
    blocks of CALLS launches (no ABBA: the autotuner times configs one after another); with
    quantiles, those quantiles of the blocks, in the order asked."""
    block = _Block(fn, CALLS)
    for _ in range(2 * ROUNDS):
        block.time()
    if quantiles is None:
        return statistics.median(block.samples)
    return torch.tensor(block.samples).quantile(torch.tensor(quantiles)).tolist()


def autotune_do_bench():
    """The `do_bench` argument of triton.autotune for the sm90 kernels: do_bench_sustained,
    or None (Triton's own) with MOC_GMM_TIMING=flushed or without a GPU (the interpreter's
    single-config lists never time)."""
    return do_bench_sustained if MODE == "sustained" and torch.cuda.is_available() else None
