"""Per-GEMM timing with the methods interleaved, so each sees the GPU in the same power state.

The per-GEMM part of tools/bench_grouped_gemm.py times one method for a few hundred ms, then
the next. On an H100 these GEMMs hold the board at its 700 W cap (session 22: SM clock
1365-1515 MHz against 1980 MHz). So a column's number depends on what ran just before it:
idle, a compile, or minutes at the cap. In one session's sweep, the same kernel and config
timed 16-21% apart. That is more than the ±2% that decides "never slower than grouped_mm".

This part captures one CUDA graph per method (`calls` calls each, inputs rotated, by
`capture_graph`, as `bench_grouped_gemm.graph_time` does). It replays them in turns for
`warmup_s`, to reach the steady power state. Then it times `reps` rounds, with one CUDA
event pair around every replay, and the order rotated each round so that every method takes
every position.
What it reports, per method:
- the median ms per call;
- the median over rounds of `t_ref / t_method`: the speed ratio against the reference
  (`triton`, ours) inside one round, tens of ms apart.

    python tools/bench_grouped_gemm.py --parts pairs --gemm-shapes "8,2048,5632;8,768,2048"
"""
from __future__ import annotations

import time

import torch

PAIR_METHODS = ("triton", "grouped_mm", "mm")   # ours first: the reference of the ratios
WARMUP_S = 3.0


def rotations(names, reps):
    """The order of every round: round k starts at names[k % len(names)]."""
    n = len(names)
    return [[names[(k + j) % n] for j in range(n)] for k in range(reps)]


def ratios_to(ref, times):
    """{method: [t_ref / t_method per round]} from {method: [ms per round]}: > 1 means that
    method is faster than the reference in that round."""
    return {m: [r / t for r, t in zip(times[ref], ts)] for m, ts in times.items()}


def median(vals):
    vals = sorted(vals)
    return vals[len(vals) // 2] if vals else float("nan")


def capture_graph(fn, calls, rot):
    """A CUDA graph of `calls` calls of fn(i), i cycling over `rot` input sets, captured
    after two warm-up calls on a side stream (they also autotune)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for j in range(2):
            fn(j % rot)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(calls):
            fn(j % rot)
    return graph


def interleaved_times(fns, rot, calls=10, reps=40, warmup_s=WARMUP_S, on_gpu=True):
    """{method: [ms per call, one value per round]} for {method: fn(i)}, timed in turns
    (module docstring). on_gpu False (CPU tensors, --smoke): each fn runs once per round and
    wall time is taken, which only checks the script."""
    names = list(fns)
    times = {m: [] for m in names}
    if not on_gpu:
        for order in rotations(names, reps):
            for m in order:
                t = time.perf_counter()
                fns[m](0)
                times[m].append((time.perf_counter() - t) * 1e3)
        return times
    graphs = {m: capture_graph(fns[m], calls, rot) for m in names}
    times = interleaved_replays({m: g.replay for m, g in graphs.items()}, reps, warmup_s,
                                calls)
    del graphs
    torch.cuda.empty_cache()
    return times


def interleaved_replays(replays, reps=40, warmup_s=WARMUP_S, calls=1):
    """{method: [ms per call, one value per round]} for {method: replay()} (a captured CUDA
    graph's replay holding `calls` calls): replayed in turns for warmup_s, then `reps`
    rounds in rotated order, one CUDA event pair around every replay."""
    names = list(replays)
    times = {m: [] for m in names}
    t_end = time.perf_counter() + warmup_s
    while time.perf_counter() < t_end:
        for m in names:
            replays[m]()
        torch.cuda.synchronize()
    events = []
    for order in rotations(names, reps):
        for m in order:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            replays[m]()
            stop.record()
            events.append((m, start, stop))
    torch.cuda.synchronize()
    for m, start, stop in events:
        times[m].append(start.elapsed_time(stop) / calls)
    return times


def bench_pairs(gemm_fns, shape, p, rot, reps=40, methods=PAIR_METHODS, on_gpu=True):
    """One row per GEMM of the expert MLP: TFLOP/s (from the median ms) of each method, and
    each method's median speed ratio against ours (`ratio_<method>`: > 1 is faster than ours,
    so "never slower than grouped_mm" is ratio_grouped_mm <= 1)."""
    e, d, f = shape
    rows = []
    for name, (flops, fns) in gemm_fns(shape, p).items():
        times = interleaved_times({m: fns[m] for m in methods}, rot, reps=reps, on_gpu=on_gpu)
        ratios = ratios_to(methods[0], times)
        row = dict(part="gemm_pairs", E=e, d=d, f=f, gemm=name, reps=reps)
        for m in methods:
            row[m] = flops / median(times[m]) * 1e-9
            row[f"ratio_{m}"] = median(ratios[m])
        rows.append(row)
        print(f"  pairs {shape} {name:10s} " + "  ".join(
            f"{m} {row[m]:6.1f}" for m in methods) + "  ours / " + "  ".join(
            f"{m} {1 / row[f'ratio_{m}']:.3f}" for m in methods[1:])
            + f"  (TFLOP/s; medians of {reps} interleaved rounds)", flush=True)
    return rows
