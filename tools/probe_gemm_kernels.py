"""Probe: which device kernel each of the expert MLP's six GEMMs runs, ours and the baselines'.

    python3 tools/probe_gemm_kernels.py --shapes "8,768,2048"   # GPU; OUT=dir writes JSON too
    python3 tools/probe_gemm_kernels.py --smoke                 # tiny shape: the script runs

For every GEMM (W13 / W2 x forward / dgrad / wgrad, balanced routing) the torch profiler
records a few back-to-back calls of our launch path (kernels/grouped_gemm.py), F.grouped_mm
and a dense mm of the same shape; the table gives each call's kernels with their mean device
time. cuBLAS / CUTLASS kernel names carry their tile and cluster shapes and schedule
(for example `..._128x256x64_2x1x1_..._warpspecialized_cooperative`), which is what a
kernel of ours needs to be compared with when it trails grouped_mm (docs/kernels_notes.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import grouped_gemm as gg   # noqa: E402


def cases(shape, p, dev, dtype):
    """name -> (ours, grouped_mm, dense mm) zero-argument calls, and the GEMM's FLOPs."""
    e, d, f = shape
    counts = torch.full((e,), p // e, dtype=torch.int64)
    counts[: p - int(counts.sum())] += 1
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(dev)
    offs32 = offsets[1:].to(torch.int32)
    kw = dict(device=dev, dtype=dtype)
    w13, w2 = torch.randn(e, d, 2 * f, **kw), torch.randn(e, f, d, **kw)
    x, h, dy, dgu = (torch.randn(p, n, **kw) for n in (d, f, d, 2 * f))
    out = {}
    for name, a, w, n, k, trans in (("w13_fwd", x, w13, 2 * f, d, False),
                                    ("w13_dgrad", dgu, w13, d, 2 * f, True),
                                    ("w2_fwd", h, w2, d, f, False),
                                    ("w2_dgrad", dy, w2, f, d, True)):
        wt = w.transpose(1, 2) if trans else w
        dense = torch.randn(k, n, **kw)
        out[name] = (lambda a=a, w=w, trans=trans: gg.launch_gmm(a, w, offsets, trans_w=trans),
                     lambda a=a, wt=wt: F.grouped_mm(a, wt, offs=offs32),
                     lambda a=a, dense=dense: a @ dense, 2.0 * p * n * k)
    for name, a, g in (("w13_wgrad", x, dgu), ("w2_wgrad", h, dy)):
        out[name] = (lambda a=a, g=g: gg.launch_wgrad(a, g, offsets),
                     lambda a=a, g=g: F.grouped_mm(a.t(), g, offs=offs32),
                     lambda a=a, g=g: a.t() @ g, 2.0 * p * a.shape[1] * g.shape[1])
    return out


def kernels_of(fn, dev, calls):
    """[(kernel name, mean device us per call)] of `calls` back-to-back calls of fn."""
    for _ in range(3):
        fn()   # autotuning and cuBLAS heuristics happen here, outside the profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        if dev == "cuda":
            torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = ev.device_time_total if dev == "cuda" else ev.cpu_time_total
        if dev == "cuda" and ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if t > 0:
            rows.append((ev.key, t / calls))
    return sorted(rows, key=lambda r: -r[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="8,768,2048;8,2048,5632", help="E,d,f;E,d,f")
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny fp32 shape: the script runs")
    args = ap.parse_args(argv)
    # --smoke: on the GPU where there is one (the kernels run on CPU tensors only under
    # TRITON_INTERPRET=1), else on the CPU
    dev = "cuda" if not args.smoke or torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shapes = [(2, 16, 32)] if args.smoke else [
        tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    rows = 64 if args.smoke else args.rows
    report = []
    for shape in shapes:
        for name, (ours, gmm, dense, flops) in cases(shape, rows, dev, dtype).items():
            for method, fn in (("ours", ours), ("grouped_mm", gmm), ("mm", dense)):
                ks = kernels_of(fn, dev, 2 if args.smoke else args.calls)
                if not ks:
                    raise RuntimeError(f"probe_gemm_kernels: the profiler recorded no kernel "
                                       f"for {name} {method} on {dev}")
                total = sum(t for _, t in ks)
                print(f"{shape} {name:10s} {method:10s} {total:8.1f} us "
                      f"{flops / max(total, 1e-9) * 1e-6:6.0f} TFLOP/s", flush=True)
                for key, t in ks[:4]:
                    print(f"    {t:8.1f} us  {key[:400]}", flush=True)
                report.append(dict(shape=shape, gemm=name, method=method, us=total,
                                   kernels=[dict(name=k, us=t) for k, t in ks]))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "probe_gemm_kernels.json"), "w") as fh:
            json.dump(report, fh, indent=1)
    return report


if __name__ == "__main__":
    main()
