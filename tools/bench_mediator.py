"""Benchmark of the mediator rounds (MOC_MATH.md §4) on one GPU: plain torch compiled by
inductor against the fused Triton kernels (kernels/mediator_round.py), forward and
forward+backward, plus the bf16 error of each against an fp32 run of the torch path.

    python tools/bench_mediator.py                    # the 1B config: N 16384, K 2, D 1024, R 2
    python tools/bench_mediator.py --tokens 16384 --hidden 768
    OUT=/some/dir python tools/bench_mediator.py      # also writes $OUT/bench_mediator.json

What runs is `MediatorCombiner.round` R times, compiled as the model compiles its combiner
(`torch.compile`, static shapes), on random states with 10% of the pairs dropped and soft
round activities. Times are triton.testing.do_bench medians. --smoke runs it once on the
CPU (TRITON_INTERPRET=1, fp32) to check the script, not to time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(args, backend: str, dtype, device):
    from megatron_moc.config import MoCConfig
    from megatron_moc.moc.mediator import MediatorCombiner

    cfg = MoCConfig(num_layers=1, hidden_size=args.hidden, num_attention_heads=8,
                    vocab_size=128, moc_model_kind="moc", moc_collab_rounds=args.rounds,
                    moe_router_topk=args.top_k, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                    moc_mediator_backend=backend)
    torch.manual_seed(0)
    return MediatorCombiner(cfg).to(device)


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


def measure(args, backend, device, dtype, ref=None):
    torch._dynamo.reset()
    combiner = build(args, backend, dtype, device)
    fn = torch.compile(rounds_fn(combiner), dynamic=False) if device == "cuda" else rounds_fn(combiner)
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shape, untimed")
    args = p.parse_args(argv)
    device = "cuda"
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.tokens, args.hidden, device = 64, 32, "cpu"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    _, ref = measure(args, "torch", device, torch.float32)
    rows = [measure(args, b, device, dtype, ref)[0] for b in ("torch", "triton")]
    print(f"mediator rounds: N {args.tokens}, K {args.top_k}, D {args.hidden}, R {args.rounds}, "
          f"{dtype}, {device}")
    for row in rows:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in row["rel_err_vs_fp32"].items())
        print(f"  {row['backend']:>6}: forward {row['fwd_ms']:.3f} ms, forward+backward "
              f"{row['fwd_bwd_ms']:.3f} ms; rel. error vs fp32 torch: {errs}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_mediator.json"), "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
