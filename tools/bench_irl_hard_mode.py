"""Benchmark: hard against soft IRL mode as the model runs it, S = 2, half the rows stopping.

    python3 tools/bench_irl_hard_mode.py                       # GPU: (8, 768, 2048), (8, 2048, 5632)
    python3 tools/bench_irl_hard_mode.py --kernels             # also a kernel table per mode
    OUT=/some/dir python3 tools/bench_irl_hard_mode.py         # also $OUT/bench_irl_hard_mode.json
    TRITON_INTERPRET=1 python3 tools/bench_irl_hard_mode.py --smoke   # CPU: checks the script

Why: issue 3's hard-mode bar (expert forward+backward time >= 20% under soft mode when half
the rows stop after step 1 of S = 2) is timed by `bench_grouped_gemm.py --parts hard` on the
expert MLP alone, with the compaction's permutes as bare eager gathers. The model runs more
than that, and runs it compiled: each step is `IRLExperts._soft_step` (RMSNorm_e of h + x,
the Triton MLP through the weight-gradient chain, the update a·α·y; in hard mode on the
step's row segments, their counts from a compare on the device), or `_hard_step` (the
compaction of expert parallelism's path: prefix sum, offsets, row moves in and out), inside one
torch.compile region (`moc_compile`), the train step replayed as a CUDA graph. Here both
modes run those very functions on the same 0/1 step activity (hard mode's, from the step
gate's argmax: step 1 on every row, step 2 on the first half of each expert's rows, as the
dispatch sorts them),
eager and compiled, each replayed in a CUDA graph; soft mode computes the stopped rows and
multiplies their update by 0, hard mode skips them. Both modes must give the same h and
the same gradients (checked first); then the time per forward + backward of the S steps,
and the reduction (ideal: 25% of the part that scales with the rows).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_moc.moc.experts import rows_of                  # noqa: E402
from tools import bench_grouped_gemm as bgg                    # noqa: E402
from tools.probe_hard_mode import kernel_times, side_by_side   # noqa: E402
from tools.probe_irl_fusions import irl_steps                  # noqa: E402

MODES = ("soft", "hard", "hard_compact")
HARD = {"soft": False, "hard": "segments", "hard_compact": "compact"}   # irl_steps' `hard`


def setup(shape, p, steps, dtype):
    """(run, leaves): run(mode, fn) does one forward + backward of the S steps through fn
    (irl_steps or its compiled twin) in `mode` ("soft" / "hard")."""
    e, d, f = shape
    offsets, counts = bgg.routing(p, e, "balanced")
    expert = torch.repeat_interleave(torch.arange(e, device=bgg.DEV),
                                     torch.tensor(counts, device=bgg.DEV))
    mk = dict(device=bgg.DEV, dtype=dtype)
    w13 = (torch.randn(e, d, 2 * f, **mk) / d ** 0.5).requires_grad_()
    w2 = (torch.randn(e, f, d, **mk) / f ** 0.5).requires_grad_()
    norm_weight = (1 + 0.1 * torch.randn(e, d, **mk)).requires_grad_()
    x = torch.randn(p, d, **mk).requires_grad_()
    # fp32 0/1, as hard mode's gate: the second half of each expert's rows stops after
    # step 1 (the dispatch sorts each expert's rows by step count, highest first)
    activity = torch.ones(p, steps, device=bgg.DEV)
    for lo, c in zip(offsets[:-1].tolist(), counts):
        activity[lo + c // 2:lo + c, 1:] = 0.0
    dout = torch.randn(p, d, **mk)

    def run(mode, fn):
        # the model's forward builds the rows' norm weights once, for either mode
        out = fn(x, rows_of(norm_weight, expert), activity, w13, w2, offsets, steps,
                 hard=HARD[mode], expert=expert)
        out.backward(dout)
        return out

    return run, [x, norm_weight, w13, w2]


def check(run, leaves, fn, dtype):
    """Soft and hard mode on the same 0/1 activity: the same h, the same gradients. Returns
    the largest relative error (norm of the difference over the norm of soft's)."""
    got = {}
    for mode in MODES:
        for t in leaves:
            t.grad = None
        out = run(mode, fn).detach().float()
        got[mode] = [out] + [t.grad.detach().float() for t in leaves]
    for t in leaves:
        t.grad = None
    names = ("h", "dx", "dnorm_weight", "dw13", "dw2")
    errs = {f"{mode} {n}": float((a - b).norm() / b.norm().clamp_min(1e-30))
            for mode in MODES[1:] for n, a, b in zip(names, got[mode], got["soft"])}
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    bad = {n: v for n, v in errs.items() if not v <= tol}
    if bad:
        raise RuntimeError(f"hard mode disagrees with soft mode on the same 0/1 activity "
                           f"(relative error > {tol}): {bad}")
    return max(errs.values())


def bench_shape(shape, p, steps, rep, kernels, smoke):
    dtype = torch.float32 if smoke else torch.bfloat16   # the CPU interpreter: fp32 only
    run, leaves = setup(shape, p, steps, dtype)
    fns = {"eager": irl_steps, "compiled": torch.compile(irl_steps, dynamic=False)}
    res = dict(E=shape[0], d=shape[1], f=shape[2], rows=p, steps=steps)
    for how, fn in fns.items():
        res[f"{how}_max_rel_err"] = check(run, leaves, fn, dtype)
        calls, times = {}, {}
        for mode in MODES:
            call = lambda mode=mode: run(mode, fn)    # noqa: E731
            if bgg.DEV == "cuda":
                call = bgg.graphed(call, leaves)
                times[mode] = bgg.bench(call, rep=rep)
            else:
                times[mode] = bgg.bench(call, grad_to_none=leaves)
            calls[mode] = call
        red = 1 - times["hard"] / times["soft"]
        red_c = 1 - times["hard_compact"] / times["soft"]
        res.update({f"{how}_{m}_ms": t for m, t in times.items()}, **{f"{how}_reduction": red},
                   **{f"{how}_reduction_compact": red_c})
        print(f"IRL experts {shape}, {p} rows, S = {steps}, {how}"
              f"{' (CUDA graph)' if bgg.DEV == 'cuda' else ''}: soft {times['soft']:.3f} ms  "
              f"hard {times['hard']:.3f} ms  reduction {100 * red:.1f}%; with the compaction "
              f"{times['hard_compact']:.3f} ms ({100 * red_c:.1f}%)  (hard vs soft max rel err "
              f"{res[f'{how}_max_rel_err']:.1e})", flush=True)
        if kernels:
            table = {m: kernel_times(calls[m], 10) for m in MODES}
            res[f"{how}_kernels"] = side_by_side(table, f"  kernels, {how}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="8,768,2048;8,2048,5632", help="E,d,f;E,d,f")
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=2, help="IRL steps S (>= 2)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench time budget, ms")
    ap.add_argument("--kernels", action="store_true", help="also a kernel table per mode")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny fp32 shape (CPU: needs TRITON_INTERPRET=1): checks the script")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error(f"--steps: hard mode skips rows from step 2 on, so S >= 2; got {args.steps}")
    torch.manual_seed(0)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    if args.smoke:
        # on the GPU where there is one: the kernels run on CPU tensors only when
        # TRITON_INTERPRET=1 decorated them, which a GPU machine's tests do not set
        bgg.DEV = "cuda" if torch.cuda.is_available() else "cpu"
        shapes, args.rows = [(3, 32, 48)], 90
    out = [bench_shape(s, args.rows, args.steps, args.rep, args.kernels, args.smoke)
           for s in shapes]
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_irl_hard_mode.json"), "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
