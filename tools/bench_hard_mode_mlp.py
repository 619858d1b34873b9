"""The expert MLP in hard IRL mode against soft mode (issue 3's hard-mode bar), on one GPU.

One idea: S = 2 steps of the expert SwiGLU MLP on shared weights, where half the rows stop
after step 1, timed against both steps on all rows (ideal: 25% less time). The parts of
tools/bench_grouped_gemm.py that time it live here: `--parts hard` (each mode on its own,
eager and in a CUDA graph), `--parts hardpairs` (both modes as CUDA graphs replayed in turns,
the reduction taken per round) and `--parts probe` (step 2's pieces on the compacted rows).
Hard mode is timed as the layer runs it (row segments) and as expert parallelism does (the
compaction, "hard_compact").
tools/probe_hard_mode.py gives the same steps' kernels by name.
"""
from __future__ import annotations

import torch

from kernels.expert_mlp import expert_swiglu_mlp
from kernels.expert_mlp_op import wgrad_chain
from tools import bench_grouped_gemm as bgg
from tools import interleaved_gemm_timing as interleaved


def hard_mode_steps(shape, p, dtype=torch.bfloat16):
    """S = 2 expert MLP steps on shared weights (one fp32 weight-gradient chain, as the MoC
    experts run them), half of each expert's rows stopping after step 1. Soft: both steps on
    all rows. Hard, as the MoC layer runs it (megatron_moc/moc/experts.py, rows sorted by
    step count in the dispatch): each step on its row segments (kernels/row_segments.py),
    step 2 on the first half of each expert's rows, nothing moved; the rows outside the
    segments come out as zeros. Also timed, "hard_compact": hard mode where the rows cannot
    be sorted (expert parallelism, `_hard_step`): step 2 moves the active rows to the front
    (dispatch.compact_rows: the inactive rows are not read and come out as zeros), runs the
    MLP on those offsets (its y and dX rows past them left unwritten, zero_tail=False), and
    moves them back (uncompact_rows); each move's backward is the other. With the chain,
    step 1's backward sums both steps' dW in one pass on sm90 (the wgrad pair,
    kernels/expert_mlp_op.py).

    Returns (step2, leaves): step2(mode) runs one forward + backward, mode "soft", "hard" or
    "hard_compact"; leaves are the tensors whose .grad it writes."""
    from kernels import row_segments
    from megatron_moc.moc.dispatch import compact_active, compact_rows, uncompact_rows
    e, d, f = shape
    offsets, counts = bgg.routing(p, e, "balanced")
    bf = dict(device=bgg.DEV, dtype=dtype)
    w13 = (torch.randn(e, d, 2 * f, **bf) / d ** 0.5).requires_grad_()
    w2 = (torch.randn(e, f, d, **bf) / f ** 0.5).requires_grad_()
    half = torch.tensor([c // 2 for c in counts], device=bgg.DEV)
    seg1 = row_segments.with_active_ends(offsets, offsets[1:] - offsets[:-1])
    seg2 = row_segments.with_active_ends(offsets, half)
    active = row_segments.row_mask(seg2, p)               # the same rows, for the compaction
    order, inverse, off2 = compact_active(active, offsets)
    count = off2[-1:]
    xs = [torch.randn(p, d, **bf).requires_grad_() for _ in range(bgg.ROT)]
    # Dense output gradients, as the model's backward delivers them (and as the MLP part
    # times): a .sum() would hand autograd stride-0 grads whose copies and gathers take other
    # kernels, and a reduction that is not the experts' work.
    dys = [(torch.randn(p, d, **bf), torch.randn(p, d, **bf)) for _ in range(bgg.ROT)]
    rot = bgg.Rot(list(zip(xs, dys)))

    def step2(mode):
        x, dy = rot.next()
        first = seg1 if mode == "hard" else offsets
        h1, chain = expert_swiglu_mlp(x, w13, w2, first, wgrad_chain=wgrad_chain(2))
        if mode == "soft":
            h2, _ = expert_swiglu_mlp(h1, w13, w2, offsets, wgrad_chain=chain)
        elif mode == "hard":
            h2, _ = expert_swiglu_mlp(h1, w13, w2, seg2, wgrad_chain=chain)
        else:
            y2, _ = expert_swiglu_mlp(compact_rows(h1, order, inverse, count), w13, w2, off2,
                                      wgrad_chain=chain, zero_tail=False)   # as _hard_step
            h2 = uncompact_rows(y2, inverse, order, count)
        torch.autograd.backward((h1, h2), dy)

    return step2, xs + [w13, w2]


def bench_hard_mode(shape, p, rep):
    """Soft against hard IRL mode, S = 2, eager and in a CUDA graph (hard_mode_steps)."""
    e, d, f = shape
    step2, leaves = hard_mode_steps(shape, p)
    modes = ("soft", "hard", "hard_compact")
    t = {m: bgg.bench(lambda: step2(m), grad_to_none=leaves, rep=rep) for m in modes}
    # The model replays the whole train step as one CUDA graph (training/cuda_graph.py), so
    # the per-launch host work (Python, autograd, TMA descriptors) that the eager timing
    # above includes is not paid there; the graphed timing is the GPU time it does pay.
    if bgg.DEV == "cuda":
        try:
            t.update({f"{m}_graph": bgg.bench(bgg.graphed(lambda: step2(m), leaves),
                                              rep=rep) for m in modes})
        except RuntimeError as err:   # keep the eager numbers
            print(f"  hard mode {shape}: CUDA-graph timing failed: {err}", flush=True)
    res = dict(part="hard_mode", E=e, d=d, f=f, **{f"{k}_ms": v for k, v in t.items()})
    for sfx, how in (("", "eager"), ("_graph", "CUDA graph")):
        if f"soft{sfx}_ms" not in res:
            continue
        soft = res[f"soft{sfx}_ms"]
        res[f"reduction{sfx}"] = 1 - res[f"hard{sfx}_ms"] / soft
        res[f"reduction_compact{sfx}"] = 1 - res[f"hard_compact{sfx}_ms"] / soft
        print(f"  hard mode {shape} {how}: soft {soft:.3f} ms  hard {res[f'hard{sfx}_ms']:.3f} "
              f"ms  reduction {100 * res[f'reduction{sfx}']:.1f}% (ideal 25%); with the "
              f"compaction: {res[f'hard_compact{sfx}_ms']:.3f} ms "
              f"({100 * res[f'reduction_compact{sfx}']:.1f}%)", flush=True)
    return res


def bench_hard_pairs(shape, p, pairs=(None,), reps=30):
    """Soft against hard IRL mode (hard_mode_steps), each captured as a CUDA graph and the
    graphs replayed in turns (interleaved_gemm_timing.interleaved_replays), so both see the
    same power state; the reduction is taken within each round (1 - hard / soft), and its
    median over rounds reported. pairs: wgrad-pair settings ("on" / "off", None: as
    kernels/expert_mlp_op.PAIR is), a soft and a hard graph each."""
    from kernels import expert_mlp_op
    e, d, f = shape
    step2, leaves = hard_mode_steps(shape, p)
    default, replays = expert_mlp_op.PAIR, {}
    try:
        for pair in pairs:
            expert_mlp_op.PAIR = default if pair is None else pair == "on"
            for mode in ("soft", "hard", "hard_compact"):   # pair chosen while capturing
                replays[f"{mode}_{pair or 'default'}"] = bgg.graphed(lambda m=mode: step2(m),
                                                                     leaves)
    finally:
        expert_mlp_op.PAIR = default
    times = interleaved.interleaved_replays(replays, reps=reps)
    res = dict(part="hard_pairs", E=e, d=d, f=f, reps=reps)
    for pair in pairs:
        tag = pair or "default"
        soft = times[f"soft_{tag}"]
        res[f"soft_{tag}_ms"] = interleaved.median(soft)
        for mode in ("hard", "hard_compact"):
            hard = times[f"{mode}_{tag}"]
            res[f"{mode}_{tag}_ms"] = interleaved.median(hard)
            reds = sorted(1 - h / s for s, h in zip(soft, hard))
            res[f"reduction_{mode}_{tag}"] = interleaved.median(reds)
            res[f"reduction_{mode}_{tag}_range"] = (reds[0], reds[-1])
            print(f"  {mode} {shape} interleaved graphs, wgrad pair {tag}: soft "
                  f"{res[f'soft_{tag}_ms']:.3f} ms  {mode} {res[f'{mode}_{tag}_ms']:.3f} ms  "
                  f"reduction {100 * interleaved.median(reds):.1f}% (median of {reps} rounds, "
                  f"range {100 * reds[0]:.1f}-{100 * reds[-1]:.1f}%; ideal 25%)", flush=True)
    return res


def probe_hard(shape, p, rep):
    """Where hard mode's step 2 spends its time: the pieces on the compacted half of the rows,
    with the gather (as hard mode runs them) and without (the same rows, already compact)."""
    e, d, f = shape
    offsets, counts = bgg.routing(p, e, "balanced")
    half = torch.tensor([c // 2 for c in counts])
    off2 = torch.zeros(e + 1, dtype=torch.int64)
    off2[1:] = half.cumsum(0)
    off2 = off2.to(bgg.DEV)
    keep = torch.cat([torch.arange(lo, lo + c, device=bgg.DEV) for lo, c in
                      zip(offsets[:-1].tolist(), half.tolist())])
    bf = dict(device=bgg.DEV, dtype=torch.bfloat16)
    x, xc = torch.randn(p, d, **bf), torch.randn(len(keep), d, **bf)
    w13, w2 = torch.randn(e, d, 2 * f, **bf), torch.randn(e, f, d, **bf)
    dgu = torch.randn(len(keep), 2 * f, **bf)
    buf = torch.zeros(e, d, 2 * f, device=bgg.DEV)
    res = {}
    parts = {
        "swiglu_fwd_gather": lambda: bgg.gg.launch_gmm_swiglu(x, w13, off2, keep),
        "swiglu_fwd_compact": lambda: bgg.gg.launch_gmm_swiglu(xc, w13, off2),
        "wgrad13_gather": lambda: bgg.gg.launch_wgrad(x, dgu, off2, keep),
        "wgrad13_compact": lambda: bgg.gg.launch_wgrad(xc, dgu, off2),
        "wgrad13_gather_acc": lambda: bgg.gg.launch_wgrad(x, dgu, off2, keep,
                                                          accumulate_into=buf),
        "wgrad13_compact_acc": lambda: bgg.gg.launch_wgrad(xc, dgu, off2,
                                                           accumulate_into=buf),
        "scatter_rows": lambda: bgg.gg.scatter_rows(xc, keep, p),
        "cast_fp32_grad": lambda: buf.to(torch.bfloat16),
    }
    for name, fn in parts.items():
        res[name] = bgg.bench(fn, rep=rep)
    print(f"  probe hard {shape}: " + "  ".join(f"{k} {v:.3f}ms" for k, v in res.items()),
          flush=True)
    return dict(part="probe_hard", E=e, d=d, f=f, **res)
