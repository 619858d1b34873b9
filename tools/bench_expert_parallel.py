"""Expert-parallel scaling benchmark: tokens/s per GPU, MFU, share of step time in the expert
all-to-all, peak memory, for a recipe's model at EP = 1, 2, 4, 8.

    torchrun --nproc_per_node 8 tools/bench_expert_parallel.py --recipe moc_1b --ep 8 \
        --micro-batch 4 --seq 2048                         # weak scaling: tokens per GPU fixed
    torchrun --nproc_per_node 8 tools/bench_expert_parallel.py --recipe moc_1b --ep 8 \
        --global-batch 32 --seq 2048                       # strong scaling: global batch fixed
    python tools/bench_expert_parallel.py --recipe moc_1b --ep 1   # one GPU today

One step = the trainer's step: the recipe's model (bf16), DeepSpeed ZeRO-2
(ds_configs/zero2.json) with the expert parameter groups, random tokens. Steps are timed with
CUDA events after warmup; then `--profile-steps` more run under torch.profiler, and the share
of step time in all-to-all is the device time of the all-to-all kernels of those steps over
their wall time (NCCL all-to-all is a send/recv kernel family: names matching
`--a2a-pattern`). MFU uses metrics.model_flops_per_token (the one formula). Rank 0 prints a
Markdown row and writes JSON (`--out`). On CPU (gloo) it runs too, for a smoke test.
Multi-GPU runs must keep NVLink multicast off (NCCL_NVLS_ENABLE=0; launchers/env/h100.sh).
"""

import argparse
import json
import os
import re
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="moc_1b", help="launchers/configs/<recipe>.yaml")
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=4, help="per GPU (weak scaling)")
    ap.add_argument("--global-batch", type=int, default=None,
                    help="fixed global batch (strong scaling): micro = global / DP")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--a2a-pattern", default=r"(?i)all_?to_?all|alltoall|SendRecv|gloo:all_to_all")
    ap.add_argument("--override", nargs="*", default=[], help="model.key=value (recipe style)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--out", default=None, help="JSON results (rank 0)")
    return ap.parse_args(argv)


def build(args):
    from megatron_moc.model.gpt import build_model
    from megatron_moc.parallel.cpu_compat import enable_cpu_compat, seed_everything
    from megatron_moc.parallel.groups import build_groups, free_port
    from megatron_moc.training.engine import load_ds_config, setup_engine
    from megatron_moc.training.pretrain import load_recipe, model_config_from_recipe
    from megatron.core import parallel_state as ps

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        enable_cpu_compat()
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    build_groups(args.tp, args.ep)
    seed_everything(1234)
    recipe = load_recipe(os.path.join(ROOT, "launchers", "configs", f"{args.recipe}.yaml"),
                         args.override)
    model_section = dict(recipe["model"], max_position_embeddings=max(
        args.seq, recipe["model"].get("max_position_embeddings", args.seq)))
    vocab = model_section.get("vocab_size", 65536)
    cfg = model_config_from_recipe(model_section, vocab, cuda, args.recipe, parallel=dict(
        tensor_model_parallel_size=args.tp, expert_model_parallel_size=args.ep,
        sequence_parallel=args.tp > 1))
    dp = ps.get_data_parallel_world_size()
    micro = args.micro_batch
    if args.global_batch is not None:
        if args.global_batch % dp:
            raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of DP {dp}")
        micro = args.global_batch // dp
    ds_path = os.path.join(ROOT, "ds_configs", "zero2.json" if cuda else "zero2_cpu.json")
    ds_config, _ = load_ds_config(ds_path, micro, micro * dp, dp, 1.0)
    model = build_model(cfg)
    if cuda:
        model = model.cuda()
    engine = setup_engine(model, ds_config, 1e-4, 1e-5, 10, 1000, 0.1)
    return cfg, engine, micro, dp


def step(engine, tokens):
    total, _, _ = engine.module.lm_loss(tokens[:, :-1], tokens[:, 1:])
    engine.backward(total)
    engine.step()


def main(argv=None) -> None:
    from megatron_moc.training.metrics import model_flops_per_token, peak_flops_per_device

    args = parse_args(argv)
    cfg, engine, micro, dp = build(args)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    g = torch.Generator(device="cpu").manual_seed(dist.get_rank())
    tokens = torch.randint(0, cfg.vocab_size, (micro, args.seq + 1), generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step(engine, tokens)
    sync()
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(engine, tokens)
    sync()
    elapsed = time.perf_counter() - t0
    step_s = elapsed / args.steps

    a2a_share = None
    if args.ep > 1 and args.profile_steps > 0:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            t1 = time.perf_counter()
            for _ in range(args.profile_steps):
                step(engine, tokens)
            sync()
            wall_us = (time.perf_counter() - t1) * 1e6
        pattern = re.compile(args.a2a_pattern)
        attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        a2a_us = sum(getattr(e, attr) for e in prof.key_averages() if pattern.search(e.key))
        a2a_share = a2a_us / wall_us

    tokens_per_gpu = micro * args.seq / step_s
    flops = model_flops_per_token(cfg, args.seq)
    peak = peak_flops_per_device(args.peak_tflops)
    result = {
        "recipe": args.recipe, "world": dist.get_world_size(), "ep": args.ep, "tp": args.tp,
        "dp": dp, "micro_batch": micro, "seq": args.seq, "step_ms": step_s * 1e3,
        "tokens_per_s_per_gpu": tokens_per_gpu,
        "mfu": tokens_per_gpu * flops / peak if peak else None,
        "a2a_share": a2a_share,
        "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30
                         if device.type == "cuda" else None),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, result["tokens_per_s_per_gpu"])
    result["tokens_per_s_per_gpu_min"] = min(per_rank)
    if dist.get_rank() == 0:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print("| recipe | GPUs | EP | TP | DP | micro | tok/s/GPU | MFU | all-to-all | peak GiB |")
        print(f"| {args.recipe} | {result['world']} | {args.ep} | {args.tp} | {dp} | {micro} | "
              f"{tokens_per_gpu:,.0f} | {fmt(result['mfu'], '.1%')} | "
              f"{fmt(a2a_share, '.1%')} | {fmt(result['peak_mem_gib'], '.1f')} |", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
