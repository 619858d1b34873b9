"""Training-step throughput (tokens/s, MFU, peak memory) of dense / MoE / MoC models on one GPU.

    python tools/bench_throughput.py --preset 500m --kinds moe moc moc_hard --backend triton

One training step = `lm_loss` forward, backward, fused AdamW step, on a bf16 model (bf16
parameters and activations; router, gates, softmaxes and losses in fp32 inside the layer).
MFU = tokens/s × model_flops_per_token (megatron_moc/training/metrics.py, the one formula:
6 × matmul parameters a token touches with each IRL step and mediator round counted, plus
the attention score and value products) / the GPU's dense bf16 peak (989 TFLOP/s, H100 SXM).
Timed with CUDA events over `--steps` steps after `--warmup` steps; random tokens.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = {
    # the research's 500M config (seed results card)
    "500m": dict(num_layers=10, hidden_size=768, num_attention_heads=12, vocab_size=65536),
}
KINDS = {
    "dense": dict(moc_model_kind="dense", moc_irl_steps=1),
    "moe": dict(moc_model_kind="moe", moc_irl_steps=1),
    "moc": dict(moc_model_kind="moc", moc_irl_steps=2, moc_collab_rounds=2),
    "moc_hard": dict(moc_model_kind="moc", moc_irl_steps=2, moc_collab_rounds=2,
                     moc_adaptive_mode="hard"),
}


def bench(kind: str, preset: str, micro_batch: int, seq: int, steps: int, warmup: int,
          backend: str, peak_tflops: float) -> dict:
    from megatron_moc.config import MoCConfig
    from megatron_moc.model.gpt import build_model
    from megatron_moc.model.params import count_model_parameters
    from megatron_moc.training.metrics import model_flops_per_token

    cfg = MoCConfig(**PRESETS[preset], **KINDS[kind], max_position_embeddings=seq,
                    params_dtype=torch.bfloat16, bf16=True, moc_expert_backend=backend)
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    counts = count_model_parameters(model, cfg.num_moe_experts or 0,
                                    cfg.moe_router_topk if cfg.has_experts else 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq), device="cuda")
    labels = torch.roll(ids, -1, 1)
    torch.cuda.reset_peak_memory_stats()

    def step():
        total, _, _ = model.lm_loss(ids, labels)
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / steps
    tokens_per_s = micro_batch * seq / seconds
    flops = model_flops_per_token(cfg, seq)
    result = dict(kind=kind, preset=preset, backend=backend, micro_batch=micro_batch, seq=seq,
                  total_params_m=counts.total / 1e6, active_params_m=counts.active / 1e6,
                  step_ms=seconds * 1e3, tokens_per_s=tokens_per_s,
                  mfu=tokens_per_s * flops / (peak_tflops * 1e12),
                  peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30, loss=float(loss))
    del model, opt
    torch.cuda.empty_cache()
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="500m", choices=sorted(PRESETS))
    p.add_argument("--kinds", nargs="+", default=["moe", "moc", "moc_hard"], choices=sorted(KINDS))
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "grouped_mm"])
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM)")
    args = p.parse_args(argv)
    from megatron_moc.parallel.cpu_compat import seed_everything
    from megatron_moc.parallel.groups import init_single_process

    init_single_process(backend="nccl")
    seed_everything(0)  # also seeds Megatron's CUDA RNG tracker (GPU weight init needs it)
    rows = []
    for kind in args.kinds:
        t = time.time()
        row = bench(kind, args.preset, args.micro_batch, args.seq, args.steps, args.warmup,
                    args.backend, args.peak_tflops)
        row["wall_s"] = time.time() - t
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'kind':10} {'backend':10} {'tok/s':>10} {'MFU':>6} {'step ms':>8} {'GiB':>6}")
    for r in rows:
        print(f"{r['kind']:10} {r['backend']:10} {r['tokens_per_s']:10.0f} {r['mfu']:6.1%} "
              f"{r['step_ms']:8.1f} {r['peak_mem_gib']:6.1f}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"throughput_{args.preset}_{args.backend}.json"), "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
