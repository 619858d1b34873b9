"""DeepSpeed engine setup around a Megatron-core model: mpu adapter, param groups, LR, ZeRO.

One short function, `setup_engine`, does it in order: read and check the DeepSpeed JSON
(batch sizes against the world, ZeRO stage), split the parameters into AdamW groups with and
without weight decay, make the warmup + cosine schedule, and call `deepspeed.initialize` with
a *torch* AdamW (an optimizer named in the JSON would make DeepSpeed JIT-build FusedAdam, which
needs a compiler and CUDA) and an `mpu` adapter over megatron.core.parallel_state
(ARCHITECTURE.md, "DeepSpeed with Megatron-core: what was checked").

Expert parallelism follows DeepSpeed's MoE conventions: expert parameters carry
`allreduce=False` and `group_name="ep_size_<EP>"` (moc/experts.py), `param_groups` splits them
into their own AdamW groups (`split_params_into_different_moe_groups_for_optimizer`), and the
MoC layer holds a `DeepSpeedExpertGroup` marker (parallel/expert_parallel.py) so the engine
hands ZeRO the expert-data-parallel groups. ZeRO-1/2 then reduces and partitions expert
gradients over those groups (sum over EDP / DP, the single-process mean) and the rest over DP.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
from megatron_moc.parallel.groups import MegatronMPU

# Parameters whose names contain one of these get no weight decay: gates are decisions, not
# feature maps, and decaying them pulls routing / step / round / fusion choices toward uniform.
NO_DECAY_NAME_PARTS = ("norm", "bias", "router", "step_gate", "fuse_gate", "exp_feedback",
                       "collab_step_gate")
NO_DECAY_EXACT_LEAF = ("mediator",)  # MediatorCombiner.mediator, the learned mediator vector


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int
    global_batch_size: int
    data_parallel_size: int
    grad_accum_steps: int


def _bad_batch(path: str, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}")


def load_ds_config(path: str, micro_batch_size: int, global_batch_size: int,
                   data_parallel_size: int, clip_grad: float) -> Tuple[Dict[str, Any], BatchPlan]:
    """Read a DeepSpeed JSON, check it against the run, and fill in the batch sizes.

    The recipe's micro / global batch sizes are the source of truth. Batch fields in the JSON
    may be absent or "auto"; a number there must satisfy
    train_batch_size = train_micro_batch_size_per_gpu × gradient_accumulation_steps × DP.

    Raises:
        ValueError: one line naming the file and the numbers that disagree, or ZeRO-3.
    """
    if not os.path.isfile(path):
        raise ValueError(f"ds_config not found: {path}")
    with open(path) as f:
        try:
            ds = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage >= 3:
        raise ValueError(f"{path}: ZeRO stage {stage} is not supported (MoC experts follow "
                         "DeepSpeed's MoE convention, which ZeRO-3 refuses); use ZeRO-1 or ZeRO-2")
    # Non-finite steps are skipped by ZeRO-1/2's gradient-norm check (pretrain.train_step);
    # refuse the settings under which DeepSpeed would apply a NaN/Inf update instead.
    if stage == 0:
        raise ValueError(f"{path}: ZeRO stage 0 is not supported (non-finite steps are skipped "
                         "by ZeRO-1/2's gradient-norm check); use ZeRO-1 or ZeRO-2")
    if ds.get("zero_optimization", {}).get("compute_grad_norm", True) is False:
        raise ValueError(f"{path}: zero_optimization.compute_grad_norm=false turns off the "
                         "check that skips non-finite steps; remove it")
    if ds.get("bf16", {}).get("check_grad_overflow", True) is False:
        raise ValueError(f"{path}: bf16.check_grad_overflow=false would apply NaN/Inf "
                         "updates; remove it")
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError(f"{path}: remove the 'optimizer'/'scheduler' sections; the trainer "
                         "builds AdamW and the LR schedule from the recipe's train: section")
    dp = data_parallel_size
    if global_batch_size % (micro_batch_size * dp):
        raise _bad_batch(path, f"global_batch_size {global_batch_size} is not a multiple of "
                         f"micro_batch_size {micro_batch_size} × data-parallel size {dp}")
    gas = global_batch_size // (micro_batch_size * dp)

    def num(key):
        v = ds.get(key, "auto")
        return None if v == "auto" else int(v)

    tbs, mbs, ds_gas = num("train_batch_size"), num("train_micro_batch_size_per_gpu"), \
        num("gradient_accumulation_steps")
    if mbs is not None and mbs != micro_batch_size:
        raise _bad_batch(path, f"train_micro_batch_size_per_gpu {mbs} != recipe micro_batch_size "
                         f"{micro_batch_size}")
    if tbs is not None and tbs != global_batch_size:
        given = [mbs or micro_batch_size, ds_gas or gas]
        raise _bad_batch(path, f"train_batch_size {tbs} != micro {given[0]} × grad accum "
                         f"{given[1]} × data-parallel size {dp} = {given[0] * given[1] * dp} "
                         f"(world size {torch.distributed.get_world_size()})")
    if ds_gas is not None and ds_gas != gas:
        raise _bad_batch(path, f"gradient_accumulation_steps {ds_gas}: micro {micro_batch_size} "
                         f"× {ds_gas} × data-parallel size {dp} = {micro_batch_size * ds_gas * dp}"
                         f", but global_batch_size is {global_batch_size}")
    ds = copy.deepcopy(ds)
    ds["train_batch_size"] = global_batch_size
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds["gradient_accumulation_steps"] = gas
    ds["gradient_clipping"] = float(clip_grad)
    ds.setdefault("steps_per_print", 10 ** 9)  # our own logger prints progress
    return ds, BatchPlan(micro_batch_size, global_batch_size, dp, gas)


# ----------------------------------------------------------------------------- optimizer
def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norms, biases and gates (router, IRL step gates, round gate, fusion gate, feedback
    gates, the mediator vector) and any 1-D parameter."""
    leaf = name.rsplit(".", 1)[-1]
    return (param.ndim <= 1 or leaf in NO_DECAY_EXACT_LEAF
            or any(part in name for part in NO_DECAY_NAME_PARTS))


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Two AdamW groups: decayed weights and the no-decay set of `no_weight_decay`."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    groups = [g for g in groups if g["params"]]
    if any(getattr(p, "allreduce", True) is False for g in groups for p in g["params"]):
        # Expert-parallel params get their own groups (name = their EP group) for ZeRO.
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = [g for g in split_params_into_different_moe_groups_for_optimizer(groups)
                  if g["params"]]
    return groups


def warmup_cosine(step: int, warmup_iters: int, decay_iters: int, lr: float,
                  min_lr: float) -> float:
    """Linear warmup from lr/warmup to lr over `warmup_iters`, then cosine to `min_lr` at
    `decay_iters`, then constant `min_lr`. `step` counts optimizer steps taken (0-based)."""
    if warmup_iters > 0 and step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def make_lr_scheduler(lr: float, min_lr: float, warmup_iters: int, decay_iters: int):
    """A callable DeepSpeed applies to its basic optimizer: LambdaLR with `warmup_cosine`.
    DeepSpeed steps it once per optimizer step and saves / loads it with the checkpoint."""
    def build(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,  # (lr = 0: a frozen run, factor 0 rather than 0 / 0)
            lambda s: warmup_cosine(s, warmup_iters, decay_iters, lr, min_lr) / lr if lr else 0.0)
    return build


def setup_engine(model: torch.nn.Module, ds_config: Dict[str, Any], lr: float, min_lr: float,
                 warmup_iters: int, decay_iters: int, weight_decay: float,
                 betas: Tuple[float, float] = (0.9, 0.95), eps: float = 1e-8):
    """`deepspeed.initialize` with torch AdamW (fp32 master weights under bf16), the LR
    schedule and the mpu adapter. Returns the DeepSpeed engine."""
    import deepspeed

    # fused=False/foreach=False: plain per-tensor math gives bit-identical results on any
    # world size, which the resume and DP-equivalence tests rely on.
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                                  foreach=False)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, mpu=MegatronMPU(),
        lr_scheduler=make_lr_scheduler(lr, min_lr, warmup_iters, decay_iters))
    return engine
