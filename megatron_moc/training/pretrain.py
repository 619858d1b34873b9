"""Pretraining entry point: a YAML recipe in, a trained, checkpointed MoC model out.

    python -m megatron_moc.training.pretrain --config launchers/configs/tiny.yaml
    torchrun --nproc_per_node 8 -m megatron_moc.training.pretrain --config X.yaml train.lr=1e-3
    deepspeed megatron_moc/training/pretrain.py --config X.yaml          # --local_rank is ignored
    python -m megatron_moc.training.pretrain --config X.yaml --dry-run   # config + param counts

A recipe has a `model:` section (MoCConfig fields) and a `train:` section (`TrainArgs`).
Trailing `section.key=value` arguments override it (values read as YAML). Everything is
checked before step 1: unknown keys, data paths and token ids, the ds_config batch sizes
against the world size; each failure is one line naming the culprit.

Order of work (`pretrain`): groups → tokenizer + data → model → DeepSpeed engine → resume →
loop (micro-batches through DeepSpeed's gradient accumulation, eval, logs, checkpoints) →
final checkpoint. SIGTERM makes the loop save and exit at the next step boundary. Re-running
the same command resumes from the newest checkpoint that verifies; a NaN/Inf step makes no
update and `train.max_consecutive_nonfinite` of them in a row stop the run
(docs/reliability.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

if os.environ.get("DS_ACCELERATOR") == "cpu":
    # A CPU run asked for explicitly (quickstart, tests): hide GPUs before torch looks, since
    # the deepspeed launcher sets CUDA_VISIBLE_DEVICES=0,1,... for its ranks regardless.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch

from megatron_moc.training.atomic_checkpoint import CheckpointError


@dataclass
class TrainArgs:
    """The `train:` section of a recipe."""

    data_path: List[Any] = field(default_factory=list)  # [w1, p1, w2, p2, ...] or [p1, ...]
    split: str = "98,2,0"
    tokenizer: str = ""
    seq_length: int = 1024
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 1000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_iters: int = 100
    lr_decay_iters: Optional[int] = None  # default: train_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    eval_interval: int = 100
    eval_iters: int = 10
    save: str = "runs/default"
    save_interval: int = 500
    load: Optional[str] = None  # default: resume from `save` when it has a checkpoint
    # Start (step 0, fresh optimizer) from the weights of a model directory, e.g. one written
    # by tools/convert_from_hf.py; a checkpoint in `load`/`save` still resumes instead.
    init_from: Optional[str] = None
    exit_interval: Optional[int] = None  # stop (after saving) once step % exit_interval == 0
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None  # default: <save>/tensorboard
    wandb_project: Optional[str] = None
    wandb_mode: str = "offline"
    seed: int = 1234
    ds_config: str = "ds_configs/zero2.json"
    tensor_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    make_vocab_size_divisible_by: int = 128
    peak_tflops: Optional[float] = None  # MFU denominator; default: from the device name
    num_workers: int = 0
    # Stage II, gate-only training (training/stage2.py): from `stage2_start_step` completed
    # steps on (0: the whole run), only the adaptive gates train, at constant `stage2_lr`;
    # `stage2_from` starts such a run from another run's checkpoint (weights only).
    stage2_start_step: Optional[int] = None
    stage2_lr: float = 1e-3
    stage2_from: Optional[str] = None
    # Fault tolerance (docs/reliability.md): checkpoint rotation, background commit, and how
    # many non-finite steps in a row (each skipped without an update) stop the run.
    keep_last: int = 0  # keep the newest N checkpoints; 0 keeps all
    async_save: bool = False  # fsync / checksum / commit of a save in a background thread
    max_consecutive_nonfinite: int = 10
    # Fault injection, for the reliability tests only; never set these in a recipe.
    debug_nan_grad_steps: List[int] = field(default_factory=list)  # rank 0: one NaN gradient
    debug_inf_loss_steps: List[int] = field(default_factory=list)  # last rank: loss + inf
    debug_enospc_save_step: Optional[int] = None  # rank 0's save at this step: disk full


# ----------------------------------------------------------------------------- recipe
def _parse_override(text: str):
    import yaml

    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ValueError(f"override {text!r}: expected section.key=value, e.g. train.lr=1e-3")
    key, value = text.split("=", 1)
    section, name = key.split(".", 1)
    return section, name, yaml.safe_load(value)


def load_recipe(path: str, overrides: Sequence[str] = ()) -> Dict[str, Dict[str, Any]]:
    """Read the recipe YAML, apply overrides, refuse unknown sections and train keys."""
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"config not found: {path}")
    with open(path) as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: expected a mapping with 'model:' and 'train:' sections")
    unknown = sorted(set(recipe) - {"model", "train"})
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; a recipe has 'model:' and "
                         "'train:'")
    recipe = {"model": dict(recipe.get("model") or {}), "train": dict(recipe.get("train") or {})}
    for text in overrides:
        section, name, value = _parse_override(text)
        if section not in recipe:
            raise ValueError(f"override {text!r}: unknown section {section!r} (model or train)")
        recipe[section][name] = value
    known = {f.name for f in dataclasses.fields(TrainArgs)}
    for key in recipe["train"]:
        if key not in known:
            raise ValueError(f"{path}: unknown train key {key!r}; known keys: {sorted(known)}")
    from megatron_moc.config import MoCConfig

    defaults = {"train": {f.name: f.default for f in dataclasses.fields(TrainArgs)},
                "model": {f.name: f.default for f in dataclasses.fields(MoCConfig)}}
    for section, values in recipe.items():
        for key, value in values.items():
            values[key] = _coerce(f"{section}.{key}", value, defaults[section].get(key))
    return recipe


def _coerce(name: str, value, default):
    """YAML 1.1 reads `1e-3` (no dot) as a string: turn such strings into the field's number."""
    if not isinstance(value, str) or isinstance(default, bool) or default is None:
        return value
    if isinstance(default, (int, float)):
        try:
            return type(default)(float(value)) if isinstance(default, int) else float(value)
        except ValueError:
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
    return value


def _parallel_sizes(args: "TrainArgs") -> Dict[str, Any]:
    """The model's parallel layout comes from the `train:` section (one place to set it)."""
    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    return dict(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                sequence_parallel=tp > 1)


def model_config_from_recipe(model: Dict[str, Any], vocab_size: Optional[int], bf16: bool,
                             source: str, parallel: Optional[Dict[str, Any]] = None):
    """MoCConfig of the `model:` section. Without `vocab_size` there, the tokenizer's,
    padded (`vocab_size` argument). Unknown fields fail in MoCConfig.from_dict. `parallel`:
    TP / EP / sequence-parallel sizes (from `train:`), which the model section may not set."""
    from megatron_moc.config import MoCConfig

    values = dict(model)
    if "vocab_size" not in values and vocab_size is not None:
        values["vocab_size"] = vocab_size
    allowed = set(MoCConfig.yaml_fields())
    unknown = sorted(k for k in values if k not in allowed)
    if unknown:
        raise ValueError(f"{source}: unknown model key {unknown[0]!r}; known fields: "
                         "MoCConfig.yaml_fields()")
    values["bf16"] = bf16
    for key, value in (parallel or {}).items():
        if key in model and model[key] != value:
            raise ValueError(f"{source}: model.{key} is set by train.{key} (sequence_parallel: "
                             "on with TP > 1); remove it from the model section")
        values[key] = value
    return MoCConfig(**values, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                     use_cpu_initialization=not torch.cuda.is_available())


def padded_vocab(size: int, multiple: int) -> int:
    return int(math.ceil(size / multiple) * multiple) if multiple > 1 else size


# ----------------------------------------------------------------------------- helpers
class _Sigterm:
    """Remember a SIGTERM; the loop saves and exits at the next step boundary."""

    def __init__(self):
        self.received = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def any_rank(self) -> bool:
        """One tiny all-reduce (and host sync) per step, so all ranks stop at the same step."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_device(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    dev = _device()
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def _iter_keeping_rng(loader):
    """iter(DataLoader) draws a base seed from torch's default generator; a resumed run makes
    its iterator at another point of the RNG stream than the uninterrupted run did, so the
    draw is undone to keep resume exact."""
    state = torch.get_rng_state()
    it = iter(loader)
    torch.set_rng_state(state)
    return it


def _rank0() -> bool:
    return torch.distributed.get_rank() == 0


def _print0(*args) -> None:
    if _rank0():
        print(*args, flush=True)


def _init_distributed(args: TrainArgs) -> None:
    from megatron_moc.parallel.cpu_compat import enable_cpu_compat
    from megatron_moc.parallel.groups import build_groups, free_port

    if not torch.cuda.is_available():
        enable_cpu_compat()
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" not in os.environ:  # plain `python -m ...`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and \
            not torch.distributed.is_initialized():
        _init_process_group_per_attempt()
    build_groups(args.tensor_model_parallel_size, args.expert_model_parallel_size)


def _init_process_group_per_attempt() -> None:
    """torchrun --max-restarts: with its default (static) rendezvous every attempt's workers
    get the agent's TCPStore with no per-attempt prefix (torch 2.13), so a restarted worker
    can read the dead attempt's gloo / NCCL addresses and fail to connect ("Connection
    refused"). Each attempt gets its own key space; the groups made later inherit it."""
    from datetime import timedelta

    world = int(os.environ["WORLD_SIZE"])
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                       world, is_master=False, timeout=timedelta(minutes=30))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = torch.distributed.PrefixStore(f"megatron_moc/attempt_{attempt}/", store)
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                         store=store, rank=int(os.environ["RANK"]),
                                         world_size=world)


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row (train.max_consecutive_nonfinite)."""


class _Faults:
    """Fault injection for the reliability tests (docs/reliability.md), from the
    `train.debug_*` keys; testing only. `step` is the step being computed (1-based)."""

    def __init__(self, args: "TrainArgs"):
        self.nan_grad_steps = {int(s) for s in args.debug_nan_grad_steps or ()}
        self.inf_loss_steps = {int(s) for s in args.debug_inf_loss_steps or ()}
        self.enospc_step = args.debug_enospc_save_step
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        self.step = 0

    @classmethod
    def from_args(cls, args: "TrainArgs") -> Optional["_Faults"]:
        wanted = (args.debug_nan_grad_steps or args.debug_inf_loss_steps
                  or args.debug_enospc_save_step is not None)
        return cls(args) if wanted else None

    def loss(self, total: torch.Tensor) -> torch.Tensor:
        """Last rank, listed steps: an infinite loss whose gradient is still finite."""
        if self.step in self.inf_loss_steps and self.rank == self.world - 1:
            return total + float("inf")
        return total

    def poison_grad(self, model):
        """Rank 0, listed steps: one NaN in the first parameter's gradient (the loss stays
        finite). Returns the hook handle to remove after backward, or None."""
        if self.step not in self.nan_grad_steps or self.rank != 0:
            return None

        def hook(grad):
            grad = grad.clone()
            grad.view(-1)[0] = float("nan")
            return grad

        return next(p for p in model.parameters() if p.requires_grad).register_hook(hook)

    def before_save(self, engine, step: int) -> None:
        """Rank 0, the listed step: DeepSpeed's first shard is cut to half its size and the
        write fails with ENOSPC, as on a full disk."""
        if step != self.enospc_step or self.rank != 0:
            return
        import errno

        writer = engine.checkpoint_engine
        original = writer.save

        def save(state_dict, path):
            original(state_dict, path)
            os.truncate(path, os.path.getsize(path) // 2)
            writer.save = original
            raise OSError(errno.ENOSPC, "No space left on device (injected by "
                          "train.debug_enospc_save_step)", path)

        writer.save = save


# ----------------------------------------------------------------------------- steps
def train_step(engine, data_iter, grad_accum_steps: int, monitor,
               faults: Optional[_Faults] = None) -> Dict[str, torch.Tensor]:
    """One optimizer step: `grad_accum_steps` micro-batches through DeepSpeed (it scales the
    loss by 1/GAS in backward and steps the optimizer at the accumulation boundary).
    Returns device tensors (mean total / ce / aux over the micro-batches); no host sync.

    A step whose loss or gradient norm is not finite makes no update: ZeRO-1/2 computes the
    global gradient norm (all-reduced over DP and TP) before stepping and, when it is NaN/Inf,
    zeroes the gradients, leaves weights, optimizer state and LR schedule alone and counts
    `engine.skipped_steps` (load_ds_config refuses the settings that would turn this off)."""
    model = engine.module
    sums = torch.zeros(3, device=_device())
    for micro in range(grad_accum_steps):
        batch = _to_device(next(data_iter))
        # engine.module directly: DeepSpeed's forward only adds autocast (unused) for ZeRO-1/2.
        total, ce, aux = model.lm_loss(batch["tokens"], batch["labels"], batch["loss_mask"],
                                       batch["position_ids"])
        if faults is not None:
            total = faults.loss(total)
        # A non-finite loss must make no update even where its gradient is finite (an inf
        # constant term): ×NaN makes every gradient it reaches NaN (NaN·0 = NaN), which the
        # gradient-norm check above then skips on every rank. ×1.0 otherwise: the same
        # gradients bit for bit, and no host sync.
        guard = torch.where(torch.isfinite(total.detach()), 1.0, float("nan"))
        hook = faults.poison_grad(model) if faults is not None else None
        engine.backward(total * guard)
        if hook is not None:
            hook.remove()
        # DeepSpeed counts micro-steps itself; ours must agree or the optimizer steps early.
        assert engine.is_gradient_accumulation_boundary() == (micro == grad_accum_steps - 1)
        engine.step()
        sums += torch.stack([total.detach(), ce.detach(), aux.detach()]).float()
        if monitor is not None:
            monitor.update(model.routing_stats())
    return sums / grad_accum_steps


@torch.no_grad()
def evaluate(engine, valid_dataset, args: TrainArgs, dp_rank: int, dp_size: int,
             plan) -> float:
    """Mean CE over the first `eval_iters` global batches of the validation split (the same
    batches at every evaluation, so the numbers compare), averaged over DP."""
    from megatron_moc.training.data import build_data_loader

    model = engine.module
    model.eval()
    loader = build_data_loader(valid_dataset, 0, args.global_batch_size, args.micro_batch_size,
                               dp_rank, dp_size)
    total = torch.zeros(2, device=_device())
    for i, batch in enumerate(_iter_keeping_rng(loader)):
        if i >= args.eval_iters * plan.grad_accum_steps:
            break
        batch = _to_device(batch)
        _, ce, _ = model.lm_loss(batch["tokens"], batch["labels"], batch["loss_mask"],
                                 batch["position_ids"])
        total += torch.stack([ce.float(), torch.ones((), device=ce.device)])
    model.train()
    torch.distributed.all_reduce(total, group=_dp_group())
    return float(total[0] / total[1].clamp_min(1))


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


# ----------------------------------------------------------------------------- main
def dry_run(recipe: Dict[str, Dict[str, Any]], source: str) -> None:
    """Print the resolved config and the total / active parameter counts (no GPU, no data)."""
    import yaml

    from megatron_moc.model.params import count_parameters
    from megatron_moc.parallel.cpu_compat import enable_cpu_compat
    from megatron_moc.parallel.groups import init_single_process

    args = TrainArgs(**recipe["train"])
    enable_cpu_compat()
    init_single_process()
    vocab = 32000  # without the tokenizer file, a typical size; with it, the real one
    if args.tokenizer and os.path.isfile(args.tokenizer):
        from megatron_moc.training.tokenizer import build_tokenizer

        vocab = padded_vocab(build_tokenizer(args.tokenizer).vocab_size,
                             args.make_vocab_size_divisible_by)
    cfg = model_config_from_recipe(recipe["model"], vocab, False, source)
    print(yaml.safe_dump({"model": cfg.to_dict(), "train": dataclasses.asdict(args)},
                         sort_keys=False))
    print(f"parameters: {count_parameters(cfg)}")


def pretrain(recipe: Dict[str, Dict[str, Any]], source: str = "config") -> Dict[str, Any]:
    """Run the recipe. Returns {'step', 'valid_loss'} of the end of training (rank-local)."""
    import json

    import yaml

    from megatron_moc.model.gpt import build_model
    from megatron_moc.parallel.cpu_compat import seed_everything
    from megatron_moc.training import checkpoint as ckpt
    from megatron_moc.training.data import build_data_loader, build_datasets
    from megatron_moc.training.engine import load_ds_config, setup_engine
    from megatron_moc.training.metrics import (RoutingMonitor, TrainLogger,
                                               model_flops_per_token, peak_flops_per_device)
    from megatron_moc.training.tokenizer import build_tokenizer
    from megatron.core import parallel_state as ps

    args = TrainArgs(**recipe["train"])
    _init_distributed(args)
    seed_everything(args.seed)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

    # ---- checks before anything heavy: ds_config, tokenizer, data paths
    ds_config, plan = load_ds_config(args.ds_config, args.micro_batch_size,
                                     args.global_batch_size, dp_size, args.clip_grad)
    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
    if not args.data_path:
        raise ValueError(f"{source}: train.data_path is empty: give dataset prefixes")
    tokenizer = build_tokenizer(args.tokenizer)
    vocab = padded_vocab(tokenizer.vocab_size, args.make_vocab_size_divisible_by)
    cfg = model_config_from_recipe(recipe["model"], vocab, bf16, source,
                                   parallel=_parallel_sizes(args))
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"{source}: model.vocab_size {cfg.vocab_size} < tokenizer "
                         f"{args.tokenizer} vocabulary {tokenizer.vocab_size}")
    if args.seq_length > cfg.max_position_embeddings:
        raise ValueError(f"{source}: train.seq_length {args.seq_length} > "
                         f"model.max_position_embeddings {cfg.max_position_embeddings}")
    from megatron_moc.training.data import parse_blend

    for prefix in parse_blend(args.data_path)[0]:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ValueError(f"train.data_path: dataset file not found: {prefix + ext}")
    os.makedirs(args.save, exist_ok=True)
    datasets = build_datasets(args.data_path, args.split, args.seq_length, args.seed, tokenizer,
                              args.train_iters, args.global_batch_size, args.eval_iters,
                              args.eval_interval, args.save)

    # ---- model and engine (or, in Stage II, the gate-only engine: training/stage2.py)
    from megatron_moc.training import stage2

    stage2.check_args(args, cfg, source)
    gate_only, stage2_weights, stage2_resume = stage2.engine_plan(args, args.load or args.save)
    if gate_only:
        engine = stage2.build_gate_only_engine(cfg, ds_config, args, weights_from=stage2_weights)
    else:
        model = build_model(cfg)
        if args.init_from:  # before the engine: DeepSpeed copies the weights it is given
            from megatron_moc.training.checkpoint_reader import load_init_weights

            load_init_weights(model, cfg, args.init_from)
        if torch.cuda.is_available():
            model = model.cuda()
        engine = setup_engine(model, ds_config, args.lr, args.min_lr, args.warmup_iters,
                              args.lr_decay_iters or args.train_iters, args.weight_decay,
                              betas=(args.adam_beta1, args.adam_beta2))
    resolved = {"model": cfg.to_dict(), "train": dataclasses.asdict(args)}

    # ---- resume
    step = 0
    load_dir = args.load or args.save
    if args.load and not ckpt.atomic.candidate_tags(args.load):
        raise ValueError(f"train.load: no checkpoint in {args.load}")
    if stage2_resume:  # this run's full-model checkpoint at the Stage II start: weights taken
        state = stage2.load_trainer_state(stage2_weights)
    else:
        # Auto-resume: the newest checkpoint that verifies; damaged ones are named and skipped.
        state = ckpt.load_checkpoint(engine, load_dir, cfg)
    nonfinite_total = nonfinite_run = 0
    if state is not None:
        step = int(state["step"])
        nonfinite_total = int(state.get("nonfinite_steps", 0))
        nonfinite_run = int(state.get("nonfinite_in_a_row", 0))
        _print0(f"resumed from {load_dir} at step {step}"
                + (f" ({state['tag']})" if "tag" in state else ""))

    # ---- logs
    tb_dir = args.tensorboard_dir or os.path.join(args.save, "tensorboard")
    logger = TrainLogger(args.save, tb_dir, resolved, args.train_iters, args.wandb_project,
                         args.wandb_mode, enabled=_rank0())
    monitor = RoutingMonitor() if cfg.has_experts else None
    flops_per_token = model_flops_per_token(cfg, args.seq_length)
    peak = peak_flops_per_device(args.peak_tflops)
    tokens_per_step = args.global_batch_size * args.seq_length
    world = torch.distributed.get_world_size()
    from megatron_moc.model.params import count_model_parameters

    counts = count_model_parameters(engine.module, cfg.num_moe_experts or 0,
                                    cfg.experts_per_token)
    _print0(f"model {cfg.moc_model_kind}: {counts}; {flops_per_token / 1e9:.3f} GFLOPs/token; "
            f"world {world} (DP {dp_size}, TP {args.tensor_model_parallel_size}), micro "
            f"{plan.micro_batch_size} × grad accum {plan.grad_accum_steps} × DP {dp_size} = "
            f"global {plan.global_batch_size}")

    if step >= args.train_iters:
        _print0(f"{load_dir} is already at step {step} >= train_iters {args.train_iters}: "
                "nothing to do (raise train.train_iters to continue)")
        logger.close()
        return {"step": step, "valid_loss": None}
    sigterm = _Sigterm()
    loader = build_data_loader(datasets.train, step, args.global_batch_size,
                               args.micro_batch_size, dp_rank, dp_size, args.num_workers)
    data_iter = _iter_keeping_rng(loader)
    engine.train()
    logger.start(step)
    valid_loss = None
    saved_at = None
    faults = _Faults.from_args(args)

    def save_kwargs():
        return {"keep_last": args.keep_last, "async_save": args.async_save,
                "trainer_extra": {"nonfinite_steps": nonfinite_total,
                                  "nonfinite_in_a_row": nonfinite_run}}

    while step < args.train_iters:
        if not gate_only and stage2.active(args, step):
            engine, gate_only = stage2.enter(engine, cfg, ds_config, args), True
            _print0(f"Stage II from step {step + 1}: only the adaptive gates train, "
                    f"lr {args.stage2_lr}")
        engine.module.set_train_progress(step + 1, args.train_iters)  # gate entropy β
        if faults is not None:
            faults.step = step + 1
        skipped_before = engine.skipped_steps
        means = train_step(engine, data_iter, plan.grad_accum_steps, monitor, faults)
        step += 1
        if engine.skipped_steps != skipped_before:  # a Python int: no extra host sync
            nonfinite_total, nonfinite_run = nonfinite_total + 1, nonfinite_run + 1
            _print0(f"step {step}: non-finite loss or gradient norm (loss {float(means[0]):.4g} "
                    f"on rank 0, grad norm {engine.get_global_grad_norm()}): no optimizer "
                    f"update; {nonfinite_run} in a row, {nonfinite_total} in all")
        else:
            nonfinite_run = 0
        if step % args.log_interval == 0 or step == args.train_iters:
            torch.distributed.all_reduce(means, group=_dp_group())
            means = (means / dp_size).tolist()
            grad_norm = engine.get_global_grad_norm()
            values = {"loss": means[0], "ce": means[1], "aux": means[2],
                      "lr": engine.get_lr()[0],
                      "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                      "consumed_samples": step * args.global_batch_size,
                      "skipped_steps": nonfinite_total}
            routing = monitor.read(_dp_group()) if monitor is not None else []
            logger.log_train(step, values, tokens_per_step, flops_per_token, peak, world,
                             routing)
        if nonfinite_run >= args.max_consecutive_nonfinite:
            ckpt.wait_for_pending_save()
            logger.close()
            raise NonFiniteError(
                f"{nonfinite_run} non-finite steps in a row (steps {step - nonfinite_run + 1}.."
                f"{step}, train.max_consecutive_nonfinite={args.max_consecutive_nonfinite}): "
                f"stopping without saving; checkpoint {ckpt.latest_tag(args.save)!r} in "
                f"{args.save} is untouched")
        if args.eval_interval > 0 and (step % args.eval_interval == 0
                                       or step == args.train_iters) and datasets.valid is not None:
            valid_loss = evaluate(engine, datasets.valid, args, dp_rank, dp_size, plan)
            logger.log_eval(step, valid_loss)
        stop = sigterm.any_rank()
        exit_now = bool(args.exit_interval) and step % args.exit_interval == 0
        if stop or exit_now or step % args.save_interval == 0 or step == args.train_iters:
            if faults is not None:
                faults.before_save(engine, step)
            path = ckpt.save_checkpoint(engine, args.save, step, step * args.global_batch_size,
                                        cfg, resolved, **save_kwargs())
            saved_at = step
            _print0(f"saved checkpoint {path}"
                    + (" (committing in the background)" if args.async_save else ""))
        if stop or exit_now:
            _print0(f"{'SIGTERM' if stop else 'exit_interval'}: stopping at step {step}")
            break
    if saved_at != step:
        ckpt.save_checkpoint(engine, args.save, step, step * args.global_batch_size, cfg, resolved,
                             **save_kwargs())
    ckpt.wait_for_pending_save()
    logger.close()
    if _rank0():
        print(f"done at step {step}. checkpoints: {os.path.abspath(args.save)} | "
              f"TensorBoard: tensorboard --logdir {os.path.abspath(tb_dir)}", flush=True)
        with open(os.path.join(args.save, "summary.json"), "w") as f:
            json.dump({"step": step, "valid_loss": valid_loss}, f)
    return {"step": step, "valid_loss": valid_loss}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="run recipe YAML (model: + train:)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and parameter counts, then exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-3")
    parser.add_argument("--overrides", dest="more_overrides", nargs="*", default=[],
                        metavar="SECTION.KEY=VALUE", help="same as the trailing arguments")
    ns = parser.parse_args(argv)
    ns.overrides = list(ns.overrides) + list(ns.more_overrides)
    try:
        recipe = load_recipe(ns.config, ns.overrides)
        if ns.dry_run:
            dry_run(recipe, ns.config)
            return
        pretrain(recipe, ns.config)
    except ValueError as err:  # user input: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (NonFiniteError, CheckpointError) as err:  # a fault the run stops on, said in one line
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
