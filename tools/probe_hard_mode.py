"""Probe: where hard IRL mode's time goes, kernel by kernel, against soft mode.

    python3 tools/probe_hard_mode.py                         # GPU: (8, 768, 2048), 32768 rows
    python3 tools/probe_hard_mode.py --shapes "8,2048,5632"
    OUT=/some/dir python3 tools/probe_hard_mode.py           # also $OUT/probe_hard_mode.json
    TRITON_INTERPRET=1 python3 tools/probe_hard_mode.py --smoke   # CPU: checks the script

Why: the hard-mode target (bench_grouped_gemm --parts hard: step 2 of S = 2 on half the rows,
expert fwd+bwd time >= 20% under soft mode) fell short at the small shape in session 9
(18.8% in a CUDA graph). The bench gives one number per mode; this gives the GPU time of
each kernel per step (torch.profiler over replays of the same CUDA graph the bench times),
grouped by kernel name, soft and hard side by side, so the costs that do not shrink with the
rows (permutes, zero tails, fp32 wgrad traffic, per-launch tails) show by name. The sum of
kernel times beside the replay's wall time shows the gaps between kernels.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools import bench_grouped_gemm as bgg   # noqa: E402
from tools import bench_hard_mode_mlp as hard_mlp   # noqa: E402

MODES = ("soft", "hard")


def short_name(name: str) -> str:
    """A kernel's name without template arguments and launch-config suffixes."""
    name = re.sub(r"<.*", "", name)           # C++ templates
    name = re.sub(r"\(.*", "", name)          # argument lists
    return name.split("::")[-1][:60]


def kernel_times(run, iters, host_table=False, sequence=None):
    """{kernel: (calls per iter, us per iter)} from torch.profiler over `iters` calls;
    host_table: also print the host-side ops by self CPU time (syncs, copies, launches);
    sequence: a list that gets one iteration's kernels in launch order as (name, us averaged
    over the iterations), so two launches of one kernel (an S-step's fp32 wgrad and the
    other step's) show apart."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bgg.DEV == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(iters):
            run()
        if bgg.DEV == "cuda":
            torch.cuda.synchronize()
    if host_table:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    agg = collections.defaultdict(lambda: [0, 0.0])
    kernels = []
    for ev in prof.events():
        if bgg.DEV == "cuda" and ev.device_type == torch.autograd.DeviceType.CUDA:
            us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time
            a = agg[short_name(ev.name)]
            a[0] += 1
            a[1] += us
            kernels.append((ev.time_range.start, short_name(ev.name), us))
    if sequence is not None and kernels and len(kernels) % iters == 0:
        kernels.sort()
        n = len(kernels) // iters
        for i in range(n):
            sequence.append((kernels[i][1], sum(k[2] for k in kernels[i::n]) / iters))
    return {k: (c / iters, us / iters) for k, (c, us) in agg.items()}


def probe(shape, p, iters, eager=False):
    step2, leaves = hard_mlp.hard_mode_steps(shape, p)
    res, wall = {}, {}
    for mode in MODES:
        if eager and bgg.DEV == "cuda":   # as the bench's eager column: grads reset per call
            def run(mode=mode):
                for t in leaves:
                    t.grad = None
                step2(mode)
            wall[mode] = bgg.bench(run, rep=100)
        elif bgg.DEV == "cuda":
            run = bgg.graphed(lambda: step2(mode), leaves)
            wall[mode] = bgg.bench(run, rep=100)
        else:
            run = lambda: step2(mode)         # noqa: E731 (the smoke run: eager, CPU)
            wall[mode] = bgg.bench(run)
        seq = []
        res[mode] = kernel_times(run, iters, host_table=eager, sequence=seq)
        if seq:
            print(f"\n{mode} {shape}: one fwd+bwd's kernels in launch order (us)")
            for name, us in seq:
                print(f"  {us:8.1f}  {name}")
    how = "eager" if eager else "graph replay"
    table = side_by_side(res, f"\nshape {shape}, {p} rows: GPU us per fwd+bwd ({how} wall: "
                              f"soft {wall['soft'] * 1e3:.0f} us, hard {wall['hard'] * 1e3:.0f} us)")
    return dict(E=shape[0], d=shape[1], f=shape[2], wall_ms=wall, **table)


def side_by_side(res, title):
    """Print {mode: {kernel: (calls, us)}} for soft and hard as one table under `title`,
    largest first; returns dict(rows=[...], kernel_sum_us={mode: us})."""
    names = sorted(set(res["soft"]) | set(res["hard"]),
                   key=lambda k: -max(res["soft"].get(k, (0, 0))[1], res["hard"].get(k, (0, 0))[1]))
    print(title)
    print(f"{'kernel':60s} {'soft n':>6s} {'soft us':>8s} {'hard n':>6s} {'hard us':>8s} "
          f"{'hard/soft':>9s}")
    rows = []
    for k in names:
        (sn, su), (hn, hu) = res["soft"].get(k, (0, 0.0)), res["hard"].get(k, (0, 0.0))
        ratio = hu / su if su else float("inf")
        print(f"{k:60s} {sn:6.1f} {su:8.1f} {hn:6.1f} {hu:8.1f} {ratio:9.2f}")
        rows.append(dict(kernel=k, soft_calls=sn, soft_us=su, hard_calls=hn, hard_us=hu))
    tot = {m: sum(v[1] for v in res[m].values()) for m in MODES}
    print(f"{'sum of kernels':60s} {'':6s} {tot['soft']:8.1f} {'':6s} {tot['hard']:8.1f} "
          f"{tot['hard'] / max(tot['soft'], 1e-9):9.2f}", flush=True)
    return dict(rows=rows, kernel_sum_us=tot)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="8,768,2048", help="E,d,f;E,d,f")
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--eager", action="store_true",
                    help="profile the eager calls instead of CUDA-graph replays (a gap between "
                         "the wall and the kernel sum is host time the GPU waited for)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shape on the CPU (needs TRITON_INTERPRET=1): checks the script")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    if args.smoke:
        bgg.DEV, shapes, args.rows, args.iters = "cpu", [(2, 32, 48)], 64, 1
    out = [probe(s, args.rows, args.iters, args.eager) for s in shapes]
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "probe_hard_mode.json"), "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
