"""Fixed-config sweeps of the expert GEMM kernels, each config timed inside a CUDA graph.

Called by tools/bench_grouped_gemm.py (`--parts sweep` for the TMA kernel's forward-kernel
GEMMs, `--parts wssweep` for the warp-specialized kernel); the numbers and what they decided
are in docs/benchmarks.md (sessions 6 and 8).
"""
from __future__ import annotations

import torch

from kernels import grouped_gemm as gg
from kernels import grouped_gemm_tma as tma
from kernels import grouped_gemm_ws as ws
from tools import bench_grouped_gemm as bench

SWEEP_EXTRA = [(128, 128, 64, 8, 5), (128, 128, 64, 4, 6), (64, 256, 64, 4, 4),
               (256, 128, 64, 8, 4), (128, 256, 32, 8, 6), (64, 128, 64, 4, 6)]


def sweep_gemms(shape, p, rep):
    """Forward-kernel GEMMs (W13 fwd, W2 fwd, W2 dgrad) over fixed configs (the autotuner's
    list plus SWEEP_EXTRA, persistent or not), each in a CUDA graph; prints the best and the
    autotuner's pick (its time in the same way)."""
    e, d, f = shape
    offsets, _ = bench.routing(p, e, "balanced")
    bf = dict(device=bench.DEV, dtype=torch.bfloat16)
    w13, w2 = torch.randn(e, d, 2 * f, **bf), torch.randn(e, f, d, **bf)
    x, h, dy = [[torch.randn(p, n, **bf) for _ in range(bench.ROT)] for n in (d, f, d)]
    pb = 1 << (p - 1).bit_length()
    cases = {"w13_fwd": (x, w13, 2 * f, d, False), "w2_fwd": (h, w2, d, f, False),
             "w2_dgrad": (dy, w2, f, d, True)}
    shapes = {tuple(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + (
        c.num_warps, c.num_stages) for c in tma._GMM_CFG} | set(SWEEP_EXTRA)
    out = []
    for name, (a, w, n, k, trans) in cases.items():
        flops = 2.0 * p * n * k
        outs = [torch.empty(p, n, **bf) for _ in range(bench.ROT)]
        tuned = bench.graph_time(lambda i: gg.launch_gmm(a[i], w, offsets, trans_w=trans),
                                 rep=rep)
        res = []
        for bm, bn, bk, warps, stages in sorted(shapes):
            if stages * (bm * bk + bk * bn) * 2 > 227 * 1024:
                continue
            for pers in (True, False):
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, PERSISTENT=pers,
                           num_warps=warps, num_stages=stages)
                fn = lambda i, cfg=cfg: tma.launch_gmm_tma(   # noqa: E731
                    a[i], w, outs[i], None, offsets, None, n, k, 0, False, trans, pb, "ieee",
                    config=cfg)
                try:
                    t = bench.graph_time(fn, rep=rep)
                except Exception as err:   # out of resources
                    print(f"  sweep {shape} {name} {cfg}: {type(err).__name__}", flush=True)
                    continue
                res.append((flops / t * 1e-9, cfg))
        res.sort(key=lambda r: -r[0])
        row = dict(part="sweep", E=e, d=d, f=f, gemm=name, tuned=flops / tuned * 1e-9,
                   best=res[0][0], best_cfg=res[0][1], top=[(t, c) for t, c in res[:5]])
        print(f"  sweep {shape} {name}: autotuned {row['tuned']:.0f} TFLOP/s, best "
              f"{row['best']:.0f} {row['best_cfg']}", flush=True)
        out.append(row)
    return out


WS_SWEEP = ([c + ((232, 40),) for c in ws.CONFIGS]
            + [(128, 128, 64, 4, 2, (240, 24)), (128, 128, 64, 5, 1, (232, 40)),
               (128, 128, 32, 8, 1, (232, 40))])


def sweep_ws(shape, p, rep):
    """The fwd / dgrad GEMMs on the warp-specialized kernel over fixed configs (WS_SWEEP),
    each in a CUDA graph, against its autotuned pick and the TMA kernel's."""
    e, d, f = shape
    offsets, _ = bench.routing(p, e, "balanced")
    bf = dict(device=bench.DEV, dtype=torch.bfloat16)
    w13, w2 = torch.randn(e, d, 2 * f, **bf), torch.randn(e, f, d, **bf)
    x, h, dy, dgu = [[torch.randn(p, n, **bf) for _ in range(bench.ROT)]
                     for n in (d, f, d, 2 * f)]
    pb = 1 << (p - 1).bit_length()
    cases = {"w13_fwd": (x, w13, 2 * f, d, False), "w13_dgrad": (dgu, w13, d, 2 * f, True),
             "w2_fwd": (h, w2, d, f, False), "w2_dgrad": (dy, w2, f, d, True)}
    out = []
    for name, (a, w, n, k, trans) in cases.items():
        flops = 2.0 * p * n * k
        outs = [torch.empty(p, n, **bf) for _ in range(bench.ROT)]
        call = lambda i: gg.launch_gmm(a[i], w, offsets, trans_w=trans)   # noqa: E731
        tuned = flops / bench.graph_time(call, rep=rep) * 1e-9
        tma_t = flops / bench.graph_time(bench.tma_only(call), rep=rep) * 1e-9
        w2d = tma.weights_2d(w)
        res = []
        for bm, bn, bk, st, cons, regs in WS_SWEEP:
            cfg = ws.config(bm, bn, bk, st, cons, *regs)
            fn = lambda i, cfg=cfg: ws.launch_gmm_ws(   # noqa: E731
                a[i], w2d, outs[i], offsets, n, k, e, trans, pb, tma.num_programs(a[i].device),
                cfg=cfg)
            try:
                res.append((flops / bench.graph_time(fn, rep=rep) * 1e-9,
                            (bm, bn, bk, st, regs, cons)))
            except Exception as err:   # out of resources
                print(f"  ws sweep {shape} {name} {(bm, bn, bk, st, regs, cons)}: "
                      f"{type(err).__name__}", flush=True)
        res.sort(key=lambda r: -r[0])
        row = dict(part="ws_sweep", E=e, d=d, f=f, gemm=name, tuned=tuned, tma=tma_t,
                   top=res[:6])
        print(f"  ws sweep {shape} {name}: autotuned {tuned:.0f}, tma kernel {tma_t:.0f}, "
              f"fixed: " + ", ".join(f"{t:.0f} {c}" for t, c in res), flush=True)
        out.append(row)
    return out
