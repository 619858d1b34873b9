"""Probe: what fusing the IRL update or RMSNorm_e into the expert GEMMs could save at most.

    python3 tools/probe_irl_fusions.py                      # GPU: (8, 768, 2048), (8, 2048, 5632)
    python3 tools/probe_irl_fusions.py --shapes "8,1024,2048" --rows 40960   # moc_1b's experts
    OUT=/some/dir python3 tools/probe_irl_fusions.py        # also $OUT/probe_irl_fusions.json
    TRITON_INTERPRET=1 python3 tools/probe_irl_fusions.py --smoke    # CPU: checks the script

Why: issue 3 lists two more fusions, each to stay only if it earns its keep: the IRL update
h += a·α·out in the W2 GEMM's epilogue, and the per-row RMSNorm_e in the W13 GEMM's
prologue. Either can remove at most the kernels that run between the expert GEMMs: the norm
(h + x, its mean square, the weight), the update (a·α·y + h), and their backward. This runs
S soft IRL steps exactly as megatron_moc/moc/experts.py does (soft activity a requiring grad,
per-row norm weights, the Triton expert MLP), forward and backward, eager and under
torch.compile (how the trainer runs them, `moc_compile`), and charges every GPU kernel either
to the expert MLP (our kernels) or to the work around it. The second share is the upper bound
of both fusions together; a fusion also adds work to its GEMM (the epilogue reads h, the
prologue scales A through registers), so it saves less than that.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.expert_mlp_op import wgrad_chain                 # noqa: E402
from megatron_moc.moc.experts import IRLExperts, step_segments, swiglu_mlp_triton  # noqa: E402
from tools import bench_grouped_gemm as bgg                    # noqa: E402
from tools.probe_hard_mode import kernel_times                 # noqa: E402

# our kernels (kernels/): the GEMMs, their zero tails and the SwiGLU backward pass
OURS = ("_gmm_kernel", "_wgrad_kernel", "_gmm_tma_kernel", "_wgrad_tma_kernel",
        "_zero_tail_kernel", "_gmm_ws_kernel", "_wgrad_ws_kernel", "_swiglu_bwd_kernel",
        "_masked_row_gather_kernel")
EPS = 1e-6


def irl_steps(x, norm_w, activity, w13, w2, offsets, steps, hard=False, expert=None):
    """h after `steps` IRL steps (MOC_MATH.md §3), each the model's own
    `IRLExperts._soft_step` on the Triton MLP, the steps' weight gradients summed in fp32
    through the wgrad chain as the model does (kernels/expert_mlp_op.py).
    hard: rows with activity 0 skipped, as in the model's hard mode: "segments" (the layer's
    path: each expert's active rows first, `expert` int64 [P] given; each step on its row
    segments, experts.step_segments) or "compact" (`IRLExperts._hard_step`, the compaction
    of expert parallelism's path)."""
    alpha = 1.0 / math.sqrt(steps)
    chain = wgrad_chain(steps) if steps > 1 else None
    h = x
    for s in range(steps):
        a = (activity[:, s:s + 1] * alpha).to(x.dtype)
        if hard == "compact":
            update, chain = IRLExperts._hard_step(swiglu_mlp_triton, w13, w2, h, x, norm_w, a,
                                                  chain, activity[:, s], offsets, EPS)
        else:
            rows = (step_segments(activity[:, s], expert, offsets) if hard == "segments"
                    else offsets)
            update, chain = IRLExperts._soft_step(swiglu_mlp_triton, w13, w2, h, x, norm_w, a,
                                                  chain, rows, EPS)
        h = h + update
    return h


def setup(shape, p, steps):
    """Leaves and a fwd+bwd closure per mode ("eager", "compiled")."""
    e, d, f = shape
    offsets, _ = bgg.routing(p, e, "balanced")
    bf = dict(device=bgg.DEV, dtype=torch.bfloat16)
    w13 = (torch.randn(e, d, 2 * f, **bf) / d ** 0.5).requires_grad_()
    w2 = (torch.randn(e, f, d, **bf) / f ** 0.5).requires_grad_()
    x = torch.randn(p, d, **bf).requires_grad_()
    norm_w = (1 + 0.1 * torch.randn(p, d, **bf)).requires_grad_()   # rows_of(norm_weight)
    activity = torch.rand(p, steps, device=bgg.DEV).requires_grad_()  # soft a_s, fp32
    dout = torch.randn(p, d, **bf)
    leaves = [x, norm_w, activity, w13, w2]
    fns = {"eager": irl_steps, "compiled": torch.compile(irl_steps, dynamic=False)}

    def run(mode):
        out = fns[mode](x, norm_w, activity, w13, w2, offsets, steps)
        out.backward(dout)

    return run, leaves


def probe(shape, p, steps, iters, modes):
    run, leaves = setup(shape, p, steps)
    result = dict(E=shape[0], d=shape[1], f=shape[2], rows=p, steps=steps, modes={})
    for mode in modes:
        fn = lambda: run(mode)        # noqa: E731
        for _ in range(2):            # compile, autotune, warm up
            fn()
        if bgg.DEV == "cuda":
            fn = bgg.graphed(fn, leaves)
        wall = bgg.bench(fn, grad_to_none=None if bgg.DEV == "cuda" else leaves)
        times = kernel_times(fn, iters)
        ours = sum(us for k, (_, us) in times.items() if k in OURS)
        around = sum(us for k, (_, us) in times.items() if k not in OURS)
        total = ours + around
        print(f"\nshape {shape}, {p} rows, S = {steps}, {mode}: wall {wall * 1e3:.0f} us per "
              f"fwd+bwd; kernels: expert MLP {ours:.0f} us, around it {around:.0f} us "
              f"({100 * around / max(total, 1e-9):.1f}% of {total:.0f} us)", flush=True)
        print(f"  {'kernel':60s} {'calls':>5s} {'us':>8s}  part")
        for k, (n, us) in sorted(times.items(), key=lambda kv: -kv[1][1]):
            print(f"  {k:60s} {n:5.1f} {us:8.1f}  {'expert MLP' if k in OURS else 'around'}")
        if not times:
            print("  (no GPU kernels: kernel times need CUDA)")
        result["modes"][mode] = dict(wall_ms=wall, expert_us=ours, around_us=around,
                                     kernels={k: v for k, v in times.items()})
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="8,768,2048;8,2048,5632", help="E,d,f;E,d,f")
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=2, help="IRL steps S")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shape on the CPU (needs TRITON_INTERPRET=1): checks the script")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in ("eager", "compiled")]
    if bad:
        ap.error(f"--modes: unknown mode(s) {bad}; choose from eager, compiled")
    if args.smoke:
        bgg.DEV, shapes, args.rows, args.iters = "cpu", [(4, 32, 48)], 96, 1
    out = [probe(s, args.rows, args.steps, args.iters, modes) for s in shapes]
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "probe_irl_fusions.json"), "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
