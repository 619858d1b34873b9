"""Fixed-config sweeps of the expert GEMM kernels, each config timed inside a CUDA graph.

Called by tools/bench_grouped_gemm.py (`--parts sweep` for the TMA kernel's forward-kernel
GEMMs, `--parts wssweep` for the warp-specialized kernel); the numbers and what they decided
are in docs/benchmarks.md (sessions 6, 8 and 12). `--parts wgradpairs` times the wgrad
kernels' configs (TMA and warp-specialized, with their L2 group sizes) against grouped_mm
in turns (tools/interleaved_gemm_timing.py), session 23.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import grouped_gemm as gg
from kernels import grouped_gemm_tma as tma
from kernels import grouped_gemm_ws as ws
from kernels import grouped_gemm_ws_wgrad as wsw
from tools import bench_grouped_gemm as bench
from tools import interleaved_gemm_timing as interleaved

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


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, consumers, (mma, load registers)[, GROUP_M])
WS_SWEEP = ([c + ((232, 40),) for c in ws.CONFIGS]
            + [(128, 128, 64, 4, 2, (240, 24)), (128, 128, 64, 5, 1, (232, 40)),
               (128, 128, 32, 8, 1, (232, 40)), (256, 128, 32, 6, ws.COOP, (232, 40))]
            + [c + ((232, 40), g) for c in ((128, 128, 64, 4, 2), (128, 256, 64, 3, ws.COOP),
                                            (128, 256, 32, 6, ws.COOP)) for g in (4, 16, 32)])
# (BLOCK_K, BLOCK_N, BLOCK_R, stages, consumers[, GROUP_K])
WS_WGRAD_SWEEP = (wsw.CONFIGS + [(128, 256, 64, 4, ws.COOP), (256, 128, 64, 4, ws.COOP),
                                 (256, 128, 64, 3, ws.COOP),
                                 (128, 256, 32, 8, ws.COOP), (256, 128, 32, 8, ws.COOP),
                                 (256, 128, 128, 2, ws.COOP)]
                  + [c + (g,) for c in ((128, 128, 64, 4, 2), (128, 128, 64, 5, 2))
                     for g in (4, 16, 32)])


GEMMS = ("w13_fwd", "w13_dgrad", "w2_fwd", "w2_dgrad", "w13_wgrad", "w2_wgrad")


def _ws_fixed(name, flops, run, configs, rep, label):
    """Time run(cfg)(i) for each config in a CUDA graph: [(TFLOP/s, config)], best first."""
    res = []
    for cfg in configs:
        try:
            res.append((flops / bench.graph_time(run(cfg), rep=rep) * 1e-9, cfg))
        except Exception as err:   # out of resources
            print(f"  ws sweep {label} {name} {cfg}: {type(err).__name__}", flush=True)
    return sorted(res, key=lambda r: -r[0])


def sweep_ws(shape, p, rep, gemms=None):
    """The six GEMMs (or those named in `gemms`) on the warp-specialized kernels over fixed
    configs (WS_SWEEP for fwd / dgrad, WS_WGRAD_SWEEP for the wgrads), each in a CUDA graph,
    against the autotuned pick, the TMA kernel's and F.grouped_mm (the issue's per-GEMM bar),
    all timed in this call."""
    unknown = set(gemms or ()) - set(GEMMS)
    if unknown:
        raise ValueError(f"sweep_ws: unknown GEMMs {sorted(unknown)}; known: {list(GEMMS)}")
    e, d, f = shape
    offsets, _ = bench.routing(p, e, "balanced")
    offs32 = offsets[1:].to(torch.int32)
    bf = dict(device=bench.DEV, dtype=torch.bfloat16)
    w13, w2 = torch.randn(e, d, 2 * f, **bf), torch.randn(e, f, d, **bf)
    x, h, dy, dgu = [[torch.randn(p, n, **bf) for _ in range(bench.ROT)]
                     for n in (d, f, d, 2 * f)]
    pb = 1 << (p - 1).bit_length()
    kb = 1 << (p // e - 1).bit_length()
    nprog = tma.num_programs(x[0].device)
    cases = {"w13_fwd": (x, w13, 2 * f, d, False), "w13_dgrad": (dgu, w13, d, 2 * f, True),
             "w2_fwd": (h, w2, d, f, False), "w2_dgrad": (dy, w2, f, d, True),
             "w13_wgrad": (x, dgu, d, 2 * f, None), "w2_wgrad": (h, dy, f, d, None)}
    out = []
    for name, (a, w, n, k, trans) in cases.items():
        if gemms and name not in gemms:
            continue
        flops = 2.0 * p * n * k
        if trans is None:                      # wgrad: a [P, n] and w (= dY) [P, k]
            outs = [torch.empty(e, n, k, **bf) for _ in range(bench.ROT)]
            call = lambda i: gg.launch_wgrad(a[i], w[i], offsets)   # noqa: E731
            gmm = lambda i: F.grouped_mm(a[i].t(), w[i], offs=offs32)   # noqa: E731
            run = lambda cfg: lambda i: wsw.launch_wgrad_ws(   # noqa: E731
                a[i], w[i], outs[i], offsets, None, kb, nprog, cfg=wsw.config(*cfg))
            configs = WS_WGRAD_SWEEP
        else:
            outs = [torch.empty(p, n, **bf) for _ in range(bench.ROT)]
            call = lambda i: gg.launch_gmm(a[i], w, offsets, trans_w=trans)   # noqa: E731
            wt = w.transpose(1, 2) if trans else w
            gmm = lambda i: F.grouped_mm(a[i], wt, offs=offs32)   # noqa: E731
            w2d = tma.weights_2d(w)
            run = lambda cfg: lambda i: ws.launch_gmm_ws(   # noqa: E731
                a[i], w2d, outs[i], offsets, n, k, e, trans, pb, nprog,
                cfg=ws.config(*cfg[:5], *cfg[5], *cfg[6:]))
            configs = WS_SWEEP
        tuned = flops / bench.graph_time(call, rep=rep) * 1e-9
        tma_t = flops / bench.graph_time(bench.tma_only(call), rep=rep) * 1e-9
        gmm_t = flops / bench.graph_time(gmm, rep=rep) * 1e-9
        res = _ws_fixed(name, flops, run, configs, rep, shape)
        row = dict(part="ws_sweep", E=e, d=d, f=f, gemm=name, tuned=tuned, tma=tma_t,
                   grouped_mm=gmm_t, top=res[:6])
        print(f"  ws sweep {shape} {name}: grouped_mm {gmm_t:.0f}, autotuned {tuned:.0f}, "
              f"tma kernel {tma_t:.0f}, fixed: " + ", ".join(f"{t:.0f} {c}" for t, c in res),
              flush=True)
        out.append(row)
    return out


# (BLOCK_K, BLOCK_N, BLOCK_M = rows a step, warps, stages, GROUP_M) of the TMA wgrad kernel.
# GROUP_M: dW row tiles that share their dY chunks in L2. At (8, 2048, 5632)'s W13 wgrad a
# wave of 132 tiles spans 8 of the 16 row tiles at GROUP_M 8, so each expert's dY (92 MB,
# more than the 50 MB L2) is read from DRAM twice; at 16 once, for ~22% fewer DRAM bytes.
# Measured (session 23, H100): it made no difference there; the gap was the epilogue.
TMA_WGRAD_PAIRS = ([(bk, bn, 64, 8, s, g) for bk, bn in ((128, 256), (256, 128))
                    for s in (3, 4) for g in (8, 16, 32)]
                   + [(128, 128, 64, 4, s, g) for s in (2, 3) for g in (8, 16)])
# Warp-specialized wgrad configs (grouped_gemm_ws_wgrad.config's arguments).
WS_WGRAD_PAIRS = ([(128, 256, 64, 3, ws.COOP, g) for g in (8, 16, 32)]
                  + [(128, 128, 64, 5, 2, g) for g in (8, 16, 32)])


def tma_wgrad_config(bk, bn, bm, warps, stages, group):
    """A fixed-config dict of grouped_gemm_tma's wgrad kernel (launch_wgrad_tma's config)."""
    return dict(BLOCK_K=bk, BLOCK_N=bn, BLOCK_M=bm, GROUP_M=group, num_warps=warps,
                num_stages=stages)


def sweep_wgrad_pairs(shape, p, gemms=("w13_wgrad", "w2_wgrad"), reps=None, on_gpu=True,
                      tma_configs=None, ws_configs=None):
    """The wgrads at `shape`: grouped_mm, our autotuned pick and each fixed config, all timed
    in turns (interleaved_gemm_timing), so every config is compared with grouped_mm in the
    same power state. One row per GEMM; `top` lists (ours / grouped_mm speed, TFLOP/s,
    config label), best first."""
    e, d, f = shape
    offsets, _ = bench.routing(p, e, "balanced")
    offs32 = offsets[1:].to(torch.int32)
    bf = dict(device=bench.DEV, dtype=torch.bfloat16)
    x, h, dy, dgu = [[torch.randn(p, n, **bf) for _ in range(bench.ROT)]
                     for n in (d, f, d, 2 * f)]
    kb = 1 << (p // e - 1).bit_length()
    nprog = tma.num_programs(x[0].device)
    prec = gg._prec(torch.bfloat16)
    cases = {"w13_wgrad": (x, dgu), "w2_wgrad": (h, dy)}
    unknown = set(gemms) - set(cases)
    if unknown:
        raise ValueError(f"sweep_wgrad_pairs: unknown GEMMs {sorted(unknown)}; known: "
                         f"{list(cases)}")
    tma_configs = TMA_WGRAD_PAIRS if tma_configs is None else tma_configs
    ws_configs = (WS_WGRAD_PAIRS if ws.gluon is not None else []) if ws_configs is None \
        else ws_configs
    out = []
    for name in gemms:
        a, g = cases[name]
        k, n = a[0].shape[1], g[0].shape[1]
        flops = 2.0 * p * k * n
        outs = [torch.empty(e, k, n, **bf) for _ in range(bench.ROT)]
        fns = {"grouped_mm": lambda i: F.grouped_mm(a[i].t(), g[i], offs=offs32),
               "autotuned": lambda i: gg.launch_wgrad(a[i], g[i], offsets)}
        for c in tma_configs:
            fns[f"tma{c}"] = lambda i, cfg=tma_wgrad_config(*c): tma.launch_wgrad_tma(
                a[i], g[i], outs[i], offsets, None, None, kb, prec, config=cfg)
        for c in ws_configs:
            fns[f"ws{c}"] = lambda i, cfg=wsw.config(*c): wsw.launch_wgrad_ws(
                a[i], g[i], outs[i], offsets, None, kb, nprog, cfg=cfg)
        for label in list(fns):   # drop what does not compile here (shared memory, registers)
            try:
                fns[label](0)
            except Exception as err:
                print(f"  wgrad pairs {shape} {name} {label}: {type(err).__name__}", flush=True)
                del fns[label]
        times = interleaved.interleaved_times(fns, bench.ROT, reps=reps or max(20, len(fns)),
                                              on_gpu=on_gpu)
        speed = interleaved.ratios_to("grouped_mm", times)   # t_gmm / t_label per round
        top = sorted(((interleaved.median(speed[m]),
                       flops / interleaved.median(times[m]) * 1e-9, m) for m in fns),
                     reverse=True)
        row = dict(part="wgrad_pairs", E=e, d=d, f=f, gemm=name, top=top)
        print(f"  wgrad pairs {shape} {name} (ours / grouped_mm, TFLOP/s): " + ", ".join(
            f"{m} {r:.3f} {t:.0f}" for r, t, m in top), flush=True)
        out.append(row)
    return out
