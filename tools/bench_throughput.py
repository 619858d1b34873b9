"""Training-step throughput (tokens/s, MFU, peak memory) of dense / MoE / MoC models on one GPU,
ours and the research code's side by side.

    python tools/bench_throughput.py --preset 500m --kinds moe moc moc_hard --compile --cuda-graph
    python tools/bench_throughput.py --impl research --preset 500m --kinds moe moc moc_hard
    python tools/bench_throughput.py --preset 1b --kinds moe moc --compile --cuda-graph --micro-batch 4 8
    python tools/bench_throughput.py --preset 1b --kinds moe --compile --cuda-graph \
        --micro-batch 8 --grad-accum 4

One training step = forward and backward of `--grad-accum` N micro-batches (each its own random
tokens; loss_i / N backpropagated, gradients accumulated, as the trainer does with DeepSpeed:
the 1B recipe's global batch 256 is micro 8 × 32 on one GPU), then gradient clipping (max norm 1)
and one fused AdamW step (megatron_moc/training/cuda_graph.py `accumulated_step`; with
`--cuda-graph` all N micro-batches and the optimizer step are in the one graph). tok/s and
MFU count the N × micro × seq tokens of a step.
- ours (`--impl ours`): `lm_loss` of a bf16 model (bf16 parameters and activations; router,
  gates, softmaxes and losses in fp32 inside the layer). `--compile` sets `moc_compile`
  (model/compile.py), `--recompute` sets `moc_recompute`, `--cuda-graph` captures the whole
  step as one CUDA graph after the warm-up (megatron_moc/training/cuda_graph.py; capturable
  AdamW).
- research (`--impl research`): the research code (github.com/Auren-Research/lunaris, kept
  git-ignored under third_party/lunaris; never committed), built at the same config, fp32
  parameters under bf16 autocast as its train script runs it, its own AdamW param groups,
  eager (its `torch.compile` gained nothing: docs/benchmarks.md). `--research-ckpt` picks its
  gradient-checkpoint policy ("none" = off, its fastest; "ffn" = its config default).
Each implementation runs in its own process (the research module sets global TF32 flags).

MFU = tokens/s × model_flops_per_token (megatron_moc/training/metrics.py, the one formula:
6 × matmul parameters a token touches with each IRL step and mediator round counted, plus the
attention score and value products) / the GPU's dense bf16 peak (989 TFLOP/s, H100 SXM);
the research model is charged the same FLOPs as ours at the same config.
Timed with CUDA events over `--steps` steps after `--warmup` steps (compile and autotuning
happen there); random tokens. `--profile DIR` also records one step with the torch profiler:
a Chrome trace (gzip) and a table of the top kernels by GPU time, per kind; without
`--cuda-graph`, also that time by compiled graph / eager op (tools/trace_attribution.py).
Results print as JSON lines and a table; with $OUT set they are appended to
$OUT/throughput.jsonl.
"""

import argparse
import gc
import gzip
import json
import os
import shutil
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESEARCH_DIR = os.path.join(ROOT, "third_party", "lunaris")

# Shared by both implementations: the backbone of each preset (MoCConfig field names).
PRESETS = {
    # the research's 500M config (seed results card)
    "500m": dict(num_layers=10, hidden_size=768, num_attention_heads=12, vocab_size=65536,
                 moc_ffn_mult=4.0, moc_multiple_of=256),
    # launchers/configs/moc_1b.yaml and moe_1b.yaml (the MoE baseline's wider experts give it
    # MoC's active parameters); the vocabulary of the 500M run
    "1b": dict(num_layers=16, hidden_size=1024, num_attention_heads=16, vocab_size=65536,
               moc_ffn_mult=3.0, moc_multiple_of=256),
    # CPU smoke test of this tool
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=512,
                 moc_ffn_mult=4.0, moc_multiple_of=16),
}
KINDS = {
    "dense": dict(moc_model_kind="dense", moc_irl_steps=1),
    "moe": dict(moc_model_kind="moe", moc_irl_steps=1, moc_collab_rounds=0),
    "moc": dict(moc_model_kind="moc", moc_irl_steps=2, moc_collab_rounds=2),
    "moc_hard": dict(moc_model_kind="moc", moc_irl_steps=2, moc_collab_rounds=2,
                     moc_adaptive_mode="hard"),
}
PRESET_KIND_OVERRIDES = {("1b", "moe"): dict(moc_ffn_mult=4.6, moc_multiple_of=128)}


def model_fields(preset: str, kind: str) -> dict:
    fields = dict(PRESETS[preset], **KINDS[kind])
    fields.update(PRESET_KIND_OVERRIDES.get((preset, kind), {}))
    return fields


def moc_config(preset: str, kind: str, seq: int, backend: str = "auto", compile_: bool = False,
               recompute: str = "none", dtype=torch.bfloat16, mediator_backend: str = "auto"):
    from megatron_moc.config import MoCConfig

    return MoCConfig(**model_fields(preset, kind), max_position_embeddings=seq,
                     params_dtype=dtype, bf16=dtype == torch.bfloat16,
                     moc_expert_backend=backend, moc_compile=compile_, moc_recompute=recompute,
                     moc_mediator_backend=mediator_backend)


# ----------------------------------------------------------------------------- models
def build_ours(args, kind):
    from megatron_moc.model.gpt import build_model

    cfg = moc_config(args.preset, kind, args.seq, args.backend, args.compile, args.recompute,
                     torch.bfloat16 if args.device == "cuda" else torch.float32,
                     args.mediator_backend)
    model = build_model(cfg).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device == "cuda",
                            capturable=args.cuda_graph)

    def loss_fn(ids, labels):
        return model.lm_loss(ids, labels)[0]

    return cfg, model, opt, loss_fn, None


def research_config(preset: str, kind: str, seq: int, ckpt: str):
    """The research code's LunarisCodexConfig at the same config as ours."""
    sys.path.insert(0, RESEARCH_DIR)
    from model_moc import LunarisCodexConfig

    f = model_fields(preset, kind)
    moc = f["moc_model_kind"] == "moc"
    dense = f["moc_model_kind"] == "dense"
    return LunarisCodexConfig(
        d_model=f["hidden_size"], n_layers=f["num_layers"], n_heads=f["num_attention_heads"],
        n_kv_heads=f["num_attention_heads"], vocab_size=f["vocab_size"],
        multiple_of=f["moc_multiple_of"], ffn_hidden_multiplier=f["moc_ffn_mult"],
        max_seq_len=seq, n_experts=None if dense else 8, top_k=2,
        n_reasoning_steps=f["moc_irl_steps"], moc_collab_steps=f.get("moc_collab_rounds", 2),
        use_moc_collab=moc, use_simple_collab=not moc,
        adaptive_compute_mode=f.get("moc_adaptive_mode", "soft"),
        use_gradient_checkpointing=ckpt != "none", grad_ckpt_policy=ckpt if ckpt != "none" else "ffn")


def build_research(args, kind):
    if not os.path.exists(os.path.join(RESEARCH_DIR, "model_moc.py")):
        raise SystemExit(f"research code not found in {RESEARCH_DIR}: export "
                         "github.com/Auren-Research/lunaris there (git-ignored, never committed)")
    sys.path.insert(0, RESEARCH_DIR)
    from model_moc import LunarisCodex

    rcfg = research_config(args.preset, kind, args.seq, args.research_ckpt)
    model = LunarisCodex(rcfg).to(args.device)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-4, betas=(0.9, 0.95),
                                     device_type=args.device)
    autocast = torch.autocast(device_type=args.device, dtype=torch.bfloat16)

    def loss_fn(ids, labels):
        with autocast:
            _, (total, _, _), _, _ = model(ids, targets=labels)
        return total

    # FLOPs are charged by our formula at the same config (module docstring).
    cfg = moc_config(args.preset, kind, args.seq)
    return cfg, model, opt, loss_fn, rcfg


# ----------------------------------------------------------------------------- timing
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def bench(args, kind: str, micro_batch: int) -> dict:
    from megatron_moc.model.params import count_parameters
    from megatron_moc.training.cuda_graph import accumulated_step
    from megatron_moc.training.metrics import model_flops_per_token

    torch.manual_seed(0)
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    build = build_research if args.impl == "research" else build_ours
    t_build = time.time()
    cfg, model, opt, loss_fn, _ = build(args, kind)
    model.train()
    params = list(model.parameters())
    accum = args.grad_accum   # micro-batches per step, each with its own tokens
    ids = torch.randint(0, cfg.vocab_size, (accum, micro_batch, args.seq), device=args.device)
    labels = torch.roll(ids, -1, -1)

    def step():
        loss = accumulated_step(loss_fn, (ids, labels), params, opt, max_grad_norm=1.0)
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.time()
    if args.cuda_graph:   # warmup steps run inside, then one step is captured
        from megatron_moc.training.cuda_graph import GraphedTrainStep

        graphed = GraphedTrainStep(loss_fn, params, opt, (ids, labels), max_grad_norm=1.0,
                                   warmup=args.warmup, grad_accum_steps=accum)
        step = lambda: graphed(ids, labels)  # noqa: E731
    else:
        for _ in range(args.warmup):
            step()
    _sync(args.device)
    warmup_s = time.time() - t0
    if args.device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.time()
    for _ in range(args.steps):
        loss = step()
    if args.device == "cuda":
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / args.steps
    else:
        seconds = (time.time() - t0) / args.steps
    tokens_per_s = accum * micro_batch * args.seq / seconds
    flops = model_flops_per_token(cfg, args.seq)
    counts = count_parameters(cfg)
    row = dict(impl=args.impl, kind=kind, preset=args.preset, micro_batch=micro_batch,
               grad_accum=accum, seq=args.seq, compile=bool(args.compile and args.impl == "ours"),
               cuda_graph=bool(args.cuda_graph),
               recompute=args.recompute if args.impl == "ours" else None,
               research_ckpt=args.research_ckpt if args.impl == "research" else None,
               backend=args.backend if args.impl == "ours" else None,
               mediator_backend=args.mediator_backend if args.impl == "ours" else None,
               total_params_m=counts.total / 1e6, active_params_m=counts.active / 1e6,
               flops_per_token=flops, step_ms=seconds * 1e3, tokens_per_s=tokens_per_s,
               mfu=tokens_per_s * flops / (args.peak_tflops * 1e12),
               warmup_s=warmup_s, build_s=t0 - t_build - warmup_s, loss=float(loss))
    if args.device == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        row["device"] = torch.cuda.get_device_name()
    if args.profile:
        row["profile"] = profile_step(args, step, kind, micro_batch)
    del model, opt, params
    return row


# ----------------------------------------------------------------------------- profiling
_CATEGORIES = (  # (category, substrings of a kernel name, first match wins)
    ("expert grouped GEMM (Triton)", ("_gmm_kernel", "_wgrad_kernel", "_swiglu_bwd",
                                      "_gmm_tma_kernel", "_wgrad_tma_kernel",
                                      "_zero_tail_kernel")),
    ("attention (flash / SDPA)", ("flash", "fmha", "attention", "sdpa")),
    ("GEMM (cuBLAS / CUTLASS)", ("gemm", "cutlass", "cublas", "sm90_xmma", "nvjet", "wgmma")),
    ("fused elementwise / reductions (inductor)", ("triton_",)),
    ("sort / scan / index", ("sort", "scan", "radix", "index", "gather", "scatter", "cumsum")),
    ("elementwise (eager)", ("elementwise", "vectorized", "unrolled", "reduce")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy / fill", ("copy", "fill", "memset", "memcpy")),
)


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_step(args, step, kind: str, micro_batch: int) -> dict:
    """Record one step; write a gzipped Chrome trace and a top-kernel table; return totals."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(args.profile, exist_ok=True)
    tag = (f"{args.impl}_{args.preset}_{kind}_mb{micro_batch}"
           f"{f'_ga{args.grad_accum}' if args.grad_accum > 1 else ''}"
           f"{'_compiled' if args.compile else ''}{'_graph' if args.cuda_graph else ''}")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        step()
        _sync(args.device)
    trace = os.path.join(args.profile, f"trace_{tag}.json")
    prof.export_chrome_trace(trace)
    with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(trace)
    kernels = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", 0) or getattr(evt, "cuda_time_total", 0)
        # (inductor's "## Call CompiledFxGraph ..." ranges also show on the GPU timeline:
        # they span kernels already counted)
        if (args.device == "cuda" and evt.device_type == torch.autograd.DeviceType.CUDA
                and t > 0 and not evt.key.startswith("## ")):
            kernels[evt.key] = kernels.get(evt.key, (0.0, 0))
            kernels[evt.key] = (kernels[evt.key][0] + t / 1e3, kernels[evt.key][1] + evt.count)
    total = sum(ms for ms, _ in kernels.values()) or 1.0
    cats = {}
    for name, (ms, _) in kernels.items():
        cats[_category(name)] = cats.get(_category(name), 0.0) + ms
    lines = [f"# {tag}: one step, GPU kernel time {total:.1f} ms", "",
             "| category | ms | share |", "|---|---:|---:|"]
    lines += [f"| {c} | {ms:.1f} | {ms / total:.0%} |"
              for c, ms in sorted(cats.items(), key=lambda kv: -kv[1])]
    lines += ["", "| kernel | calls | ms | share |", "|---|---:|---:|---:|"]
    for name, (ms, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:args.profile_top]:
        lines.append(f"| `{name[:90]}` | {n} | {ms:.2f} | {ms / total:.1%} |")
    with open(os.path.join(args.profile, f"kernels_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if not args.cuda_graph:   # kernels link to their launch scopes (tools/trace_attribution.py)
        from tools.trace_attribution import _load, attribute, format_table

        with open(os.path.join(args.profile, f"scopes_{tag}.md"), "w") as f:
            f.write(f"# {tag}: GPU time by launching scope\n\n"
                    + format_table(*attribute(_load(trace + ".gz")), top=args.profile_top))
    return dict(gpu_kernel_ms=total, categories_ms=cats)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", default="ours", choices=["ours", "research"])
    p.add_argument("--preset", default="500m", choices=sorted(PRESETS))
    p.add_argument("--kinds", nargs="+", default=["moe", "moc", "moc_hard"], choices=sorted(KINDS))
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "grouped_mm"])
    p.add_argument("--mediator-backend", default="auto", choices=["auto", "triton", "torch"],
                   help="moc_mediator_backend (ours only)")
    p.add_argument("--compile", action="store_true", help="moc_compile (ours only)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture the whole step as a CUDA graph (ours only; "
                        "megatron_moc/training/cuda_graph.py)")
    p.add_argument("--recompute", default="none", choices=["none", "mediator", "experts", "all"])
    p.add_argument("--research-ckpt", default="none", choices=["none", "ffn", "block"])
    p.add_argument("--micro-batch", type=int, nargs="+", default=[8],
                   help="one row per size; a size that runs out of memory is reported as such")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (gradient accumulation)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--profile", default=None, help="folder for traces and kernel tables")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM)")
    args = p.parse_args(argv)
    if args.grad_accum < 1:
        p.error("--grad-accum must be >= 1")
    if args.cuda_graph and (args.impl != "ours" or args.device != "cuda"):
        p.error("--cuda-graph: ours on CUDA only (the research code reads expert counts back "
                "to the host every layer)")
    from megatron_moc.parallel.cpu_compat import enable_cpu_compat, seed_everything
    from megatron_moc.parallel.groups import init_single_process

    if args.device == "cpu":
        enable_cpu_compat()
    init_single_process(backend="nccl" if args.device == "cuda" else "gloo")
    seed_everything(0)  # also seeds Megatron's CUDA RNG tracker (GPU weight init needs it)
    rows = []
    for kind in args.kinds:
        for mb in args.micro_batch:
            t = time.time()
            try:
                row = bench(args, kind, mb)
            except torch.cuda.OutOfMemoryError as e:
                row = dict(impl=args.impl, kind=kind, preset=args.preset, micro_batch=mb,
                           grad_accum=args.grad_accum, oom=str(e).split("\n")[0][:200])
            row["wall_s"] = time.time() - t
            rows.append(row)
            print(json.dumps(row), flush=True)
            if os.environ.get("OUT"):   # row by row: a run cut short keeps what it measured
                with open(os.path.join(os.environ["OUT"], "throughput.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
            torch._dynamo.reset()
            gc.collect()    # the captured graph and its memory pool go with the last step
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(f"\n{'impl':9} {'kind':9} {'mb':>3} {'acc':>3} {'tok/s':>9} {'MFU':>6} {'step ms':>8} "
          f"{'GiB':>6}")
    for r in rows:
        if "oom" in r:
            print(f"{r['impl']:9} {r['kind']:9} {r['micro_batch']:3d} {r['grad_accum']:3d}  "
                  "out of memory")
            continue
        print(f"{r['impl']:9} {r['kind']:9} {r['micro_batch']:3d} {r['grad_accum']:3d} "
              f"{r['tokens_per_s']:9.0f} "
              f"{r['mfu']:6.1%} {r['step_ms']:8.1f} {r.get('peak_mem_gib', 0):6.1f}")


if __name__ == "__main__":
    main()
