"""Probe: the host's cost per call of our grouped-GEMM launches, beside the GPU time.

    python3 tools/probe_launch_overhead.py              # GPU: (8, 768, 2048), 32768 rows, bf16
    python3 tools/probe_launch_overhead.py --cprofile   # also each launch's top functions
    OUT=/some/dir python3 tools/probe_launch_overhead.py   # also $OUT/probe_launch_overhead.json
    TRITON_INTERPRET=1 python3 tools/probe_launch_overhead.py --smoke   # CPU: checks the script

Why: eager per-GEMM timings (tools/bench_grouped_gemm.py) were host-bound for small GEMMs
(0.17 ms of GPU work ran at 0.33 ms per call). For each GEMM of the expert MLP, the calls of
bench_grouped_gemm's per-GEMM part (gemm_fns: ours, F.grouped_mm and torch.mm; triton_swiglu
of w2_dgrad is launch_gmm_swiglu_bwd, a GEMM and an elementwise pass), after a warm-up that
autotunes: host us per call = perf_counter around --calls back-to-back calls, no synchronize
inside; GPU ms per call = CUDA events around the same calls. When host >= GPU the GPU waited
for the launches, so the event time is the host's pace, not the kernels'. (Keep --calls well
under the ~1000 launches the GPU queue holds, or the host blocks on the GPU and looks slow.)
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools import bench_grouped_gemm as bgg   # noqa: E402

METHODS = ("triton", "triton_swiglu", "grouped_mm", "mm")   # ours first, then the references


def sync():
    if bgg.DEV == "cuda":
        torch.cuda.synchronize()


def run_calls(fn, calls):
    for j in range(calls):
        fn(j % bgg.ROT)   # rotate the inputs as the benchmark does


def host_and_gpu(fn, calls):
    """(host us per call, GPU ms per call or None on the CPU) over `calls` calls."""
    sync()
    if bgg.DEV == "cuda":
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
    t0 = time.perf_counter()
    run_calls(fn, calls)
    host_us = (time.perf_counter() - t0) / calls * 1e6
    if bgg.DEV != "cuda":
        return host_us, None
    end.record()
    end.synchronize()
    return host_us, start.elapsed_time(end) / calls


def profile(fn, calls, top=15):
    """The `top` functions by own time (tottime) over `calls` calls, as pstats prints them."""
    prof = cProfile.Profile()
    prof.enable()
    run_calls(fn, calls)
    prof.disable()
    sync()   # outside the profile: only the host's launch work is in it
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def probe(shape, p, calls, warmup, cprofile=False):
    """One row per (GEMM, method): host us and GPU ms per call, and the profile text."""
    rows = []
    for gemm, (_, fns) in bgg.gemm_fns(shape, p).items():
        for method in (m for m in METHODS if m in fns):
            fn = fns[method]
            run_calls(fn, warmup)   # the first call autotunes; later ones hit the cache
            sync()
            host_us, gpu_ms = host_and_gpu(fn, calls)
            row = dict(gemm=gemm, method=method, host_us=host_us, gpu_ms=gpu_ms)
            gpu = f"{gpu_ms:8.3f} ms" if gpu_ms is not None else "     (cpu)"
            print(f"  {gemm:10s} {method:14s} host {host_us:8.1f} us  GPU {gpu}", flush=True)
            if cprofile and method.startswith("triton"):
                row["cprofile"] = profile(fn, calls)
                print(f"\ncProfile, {gemm} {method}, {calls} calls:\n{row['cprofile']}",
                      flush=True)
            rows.append(row)
    return rows


def table(rows, shape, p, calls):
    out = ["", f"per call, E,d,f {shape}, {p} rows, bf16, {calls} calls back to back "
           "(host/GPU near 1 or above: host-bound)",
           f"{'gemm':11s}{'method':15s}{'host us':>9s}{'GPU us':>9s}{'host/GPU':>10s}"]
    for r in rows:
        gpu_us = r["gpu_ms"] * 1e3 if r["gpu_ms"] is not None else float("nan")
        out.append(f"{r['gemm']:11s}{r['method']:15s}{r['host_us']:9.1f}{gpu_us:9.1f}"
                   f"{r['host_us'] / gpu_us:10.2f}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="8,768,2048", help="E,d,f")
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--calls", type=int, default=200, help="back-to-back calls per timing")
    ap.add_argument("--warmup", type=int, default=3, help="calls before timing (autotunes)")
    ap.add_argument("--cprofile", action="store_true",
                    help="also profile --calls calls of each of our launches")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shape on the CPU (needs TRITON_INTERPRET=1): checks the script")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.smoke:   # the interpreter takes ~1 s a launch: as few calls as will do
        bgg.DEV, shape, args.rows, args.calls, args.warmup = "cpu", (4, 64, 96), 256, 2, 1
    device = torch.cuda.get_device_name() if bgg.DEV == "cuda" else "cpu"
    print(f"device {device}  torch {torch.__version__}", flush=True)
    rows = probe(shape, args.rows, args.calls, args.warmup, args.cprofile)
    print(table(rows, shape, args.rows, args.calls))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "probe_launch_overhead.json"), "w") as fh:
            json.dump(dict(device=device, shape=shape, rows_per_call=args.rows,
                           calls=args.calls, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
