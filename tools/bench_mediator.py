"""Benchmark of the mediator rounds (MOC_MATH.md §4) on one GPU: plain torch compiled by
inductor against the fused Triton kernels (kernels/mediator_round.py), forward and
forward+backward, plus the bf16 error of each against an fp32 run of the torch path.

    python tools/bench_mediator.py                    # the 1B config: N 16384, K 2, D 1024, R 2
    python tools/bench_mediator.py --tokens 16384 --hidden 768
    OUT=/some/dir python tools/bench_mediator.py      # also writes $OUT/bench_mediator.json

    python tools/bench_mediator.py --sweep            # + each kernel alone over its configs

What runs is `MediatorCombiner.round` R times, compiled as the model compiles its combiner
(`torch.compile`, static shapes), on random states with 10% of the pairs dropped and soft
round activities; both backends load the same weights. Times are triton.testing.do_bench
medians: eager (each launch's host work included) and replayed as one CUDA graph (as the
model's train step runs), plus the GPU kernel time by kernel from the torch profiler.
--sweep times each fused kernel alone for (BLOCK_T, num_warps[, programs per SM]) and prints
its bandwidth over the bytes it must move. --smoke runs once on the CPU (TRITON_INTERPRET=1,
fp32) to check the script, not to time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(args, backend: str, dtype, device, state=None):
    from megatron_moc.config import MoCConfig
    from megatron_moc.moc.mediator import MediatorCombiner

    cfg = MoCConfig(num_layers=1, hidden_size=args.hidden, num_attention_heads=8,
                    vocab_size=128, moc_model_kind="moc", moc_collab_rounds=args.rounds,
                    moe_router_topk=args.top_k, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                    moc_mediator_backend=backend)
    torch.manual_seed(0)
    combiner = MediatorCombiner(cfg)
    if state is not None:   # the same weights for every backend and dtype
        combiner.load_state_dict(state)
    return combiner.to(device)


def inputs(args, dtype, device):
    g = torch.Generator().manual_seed(1)
    n, k, d = args.tokens, args.top_k, args.hidden
    keep = torch.rand(n, k, generator=g) > 0.1
    states = torch.where(keep.unsqueeze(-1), torch.randn(n, k, d, generator=g), 0)
    mediator = torch.randn(n, d, generator=g)
    activity = torch.rand(n, args.rounds, generator=g)
    return [t.to(device) for t in (mediator.to(dtype), states.to(dtype), keep, activity)]


def rounds_fn(combiner):
    def run(mediator, states, keep, activity):
        for r in range(combiner.rounds):
            mediator, states = combiner.round(mediator, states, keep, activity[:, r])
        return mediator, states
    return run


def timed(fn, device, rep=100):
    if device == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def kernel_times(fn, top=8):
    """GPU time by kernel (ms per call) of fn, from the torch profiler (5 calls)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 5e3) for e in prof.key_averages()
            if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    return dict(total_ms=sum(t for _, t in rows), top=[(k[:60], t) for k, t in rows[:top]])


def measure(args, backend, device, dtype, ref=None, state=None):
    torch._dynamo.reset()
    combiner = build(args, backend, dtype, device, state)
    fn = rounds_fn(combiner)
    if device == "cuda":
        fn = torch.compile(fn, dynamic=False)
    m, s, keep, act = inputs(args, dtype, device)
    act.requires_grad_(True)
    leaves = [m.requires_grad_(True), s.requires_grad_(True)]
    gm, gs = torch.randn_like(m), torch.randn_like(s)

    def fwd():
        with torch.no_grad():
            fn(m, s, keep, act)

    def fwd_bwd():
        out_m, out_s = fn(m, s, keep, act)
        torch.autograd.backward([out_m, out_s], [gm, gs])
        for t in leaves + [act] + list(combiner.parameters()):
            t.grad = None

    fwd_bwd()   # compile
    row = dict(backend=backend, fwd_ms=timed(fwd, device), fwd_bwd_ms=timed(fwd_bwd, device))
    if device == "cuda":
        from tools.bench_grouped_gemm import graphed

        row["fwd_bwd_graph_ms"] = timed(graphed(fwd_bwd, leaves + [act]), device)
        row["kernels"] = kernel_times(fwd_bwd)
    out_m, out_s = fn(m, s, keep, act)
    torch.autograd.backward([out_m, out_s], [gm, gs])
    result = dict(m=out_m.detach().float(), s=out_s.detach().float(),
                  dm=m.grad.float(), ds=s.grad.float(), dact=act.grad.float(),
                  dw={n: p.grad.float() for n, p in combiner.named_parameters()
                      if p.grad is not None})
    if ref is not None:
        def err(a, b):
            return float((a - b).norm() / b.norm().clamp_min(1e-30))
        row["rel_err_vs_fp32"] = {k: err(result[k], ref[k]) for k in ("m", "s", "dm", "ds", "dact")}
        row["rel_err_vs_fp32"]["worst_weight_grad"] = max(
            err(result["dw"][n], ref["dw"][n]) for n in ref["dw"])
    return row, result


def sweep(args, device):
    """Each fused kernel alone over (BLOCK_T, num_warps[, PROGRAMS_PER_SM]): ms and GB/s over
    the bytes it must read and write (states, [N, D] operands and outputs; bf16)."""
    from kernels import mediator_round as mr

    n, k, d = args.tokens, args.top_k, args.hidden
    dt = torch.bfloat16
    g = torch.Generator(device).manual_seed(2)

    def rnd(*shape, dtype=dt):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    keep = torch.rand(n, k, generator=g, device=device) > 0.1
    e, qk, dp, fb, m, dout = rnd(n, k, d), rnd(n, d), rnd(n, d), rnd(n, d), rnd(n, d), rnd(n, k, d)
    w, we, wm, be = rnd(d), rnd(1, d) * 0.1, rnd(1, d) * 0.1, rnd(1)
    c = torch.rand(n, generator=g, device=device)
    _, rstd, beta = mr.attend_fwd(e, keep, w, qk, 1e-6)
    _, gate = mr.feedback_fwd(e, keep, fb, m, c, we, be, wm)
    nkd, nd = n * k * d * 2, n * d * 2
    kernels = {
        "attend_fwd": (lambda cfg: mr.attend_fwd(e, keep, w, qk, 1e-6, config=cfg), nkd + 2 * nd),
        "attend_bwd": (lambda cfg: mr.attend_bwd(dp, e, w, qk, rstd, beta, config=cfg),
                       2 * nkd + 3 * nd),
        "feedback_fwd": (lambda cfg: mr.feedback_fwd(e, keep, fb, m, c, we, be, wm, config=cfg),
                         2 * nkd + 2 * nd),
        "feedback_bwd": (lambda cfg: mr.feedback_bwd(dout, e, keep, fb, c, we, gate, config=cfg),
                         3 * nkd + 2 * nd),
    }
    rows = []
    block_d = 1 << (d - 1).bit_length()
    for name, (fn, nbytes) in kernels.items():
        default = timed(lambda: fn(None), device)
        best = (default, "default")
        for bt in (1, 2, 4, 8):
            for warps in (2, 4, 8):
                if bt * block_d > 16384 or bt * block_d < 32 * warps:
                    continue
                for per_sm in ((8,) if name.endswith("fwd") else (4, 8, 16)):
                    cfg = dict(BLOCK_T=bt, num_warps=warps, PROGRAMS_PER_SM=per_sm)
                    try:
                        ms = timed(lambda: fn(dict(cfg)), device)
                    except Exception as err:   # e.g. out of registers / shared memory
                        print(f"  {name} {cfg}: {type(err).__name__}")
                        continue
                    rows.append(dict(kernel=name, **cfg, ms=ms, gbps=nbytes / ms / 1e6))
                    if ms < best[0]:
                        best = (ms, cfg)
        print(f"  {name}: default {default * 1e3:.1f} us ({nbytes / default / 1e6:.0f} GB/s); "
              f"best {best[0] * 1e3:.1f} us ({nbytes / best[0] / 1e6:.0f} GB/s) {best[1]}",
              flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sweep", action="store_true", help="also time each kernel over configs")
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shape, untimed")
    args = p.parse_args(argv)
    device = "cuda"
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.tokens, args.hidden, device = 64, 32, "cpu"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    state = build(args, "torch", torch.float32, "cpu").state_dict()
    _, ref = measure(args, "torch", device, torch.float32, state=state)
    rows = [measure(args, b, device, dtype, ref, state)[0] for b in ("torch", "triton")]
    print(f"mediator rounds: N {args.tokens}, K {args.top_k}, D {args.hidden}, R {args.rounds}, "
          f"{dtype}, {device}")
    for row in rows:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in row["rel_err_vs_fp32"].items())
        graph = f", in a CUDA graph {row['fwd_bwd_graph_ms']:.3f} ms" if "kernels" in row else ""
        print(f"  {row['backend']:>6}: forward {row['fwd_ms']:.3f} ms, forward+backward "
              f"{row['fwd_bwd_ms']:.3f} ms{graph}; rel. error vs fp32 torch: {errs}")
        if "kernels" in row:
            print(f"          GPU kernel time {row['kernels']['total_ms']:.3f} ms: " + "; ".join(
                f"{k} {t:.3f}" for k, t in row["kernels"]["top"]))
    sweep_rows = sweep(args, device) if args.sweep and device == "cuda" else []
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_mediator.json"), "w") as f:
            json.dump(dict(args=vars(args), rows=rows, sweep=sweep_rows), f, indent=1)


if __name__ == "__main__":
    main()
