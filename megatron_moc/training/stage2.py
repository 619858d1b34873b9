"""Stage II: gate-only training (MOC_MATH.md "Research variants", "Stage II").

Every parameter is frozen except the adaptive gates — the IRL step gates (`step_gate_weight`,
`step_gate_bias` of each expert, and of the dense IRL FFN) and the round gate
(`collab_step_gate`) — which train with their own constant learning rate `train.stage2_lr`.
Two ways in, both from the recipe's `train:` section:

    train.stage2_start_step=N   steps 1..N train everything, steps N+1.. only the gates
    train.stage2_from=DIR       a separate run: the model weights of checkpoint DIR (a save
                                directory, its `latest`, or one `step_*` directory), a fresh
                                optimizer, step 0, gates only (stage2_start_step is then 0)

How: the gate-only phase is its own DeepSpeed engine, built on a fresh model that holds the
current weights, whose optimizer sees only the gates (`requires_grad=False` elsewhere, so
ZeRO never flattens, reduces or decays the frozen weights and they stay bit-identical). A
fresh model, not the old one re-wrapped: ZeRO-2 leaves gradient hooks on every parameter of
the engine it built, which a second engine on the same parameters would trip over.
Resume (`engine_plan`): a checkpoint of step < N resumes Stage I as usual; the one of step N
was written by the full-model engine (its optimizer state covers every parameter), so the
gate-only engine takes only its weights, RNG and step; one of step > N is the gate-only
engine's own and loads whole. In-process switch and resume take the same steps (tested
bit-exact in tests/e2e/test_stage2.py).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

# Name parts of the adaptive gates' parameters (moc/experts.py, moc/mediator.py).
GATE_NAME_PARTS = ("step_gate",)  # step_gate_weight/_bias, collab_step_gate.weight/.bias


def is_gate(name: str) -> bool:
    return any(part in name for part in GATE_NAME_PARTS)


def freeze_all_but_gates(model: torch.nn.Module) -> List[str]:
    """requires_grad False on every parameter but the adaptive gates. Returns the gate names.

    Raises:
        ValueError: the model has no adaptive gate (S = 1 and R ≤ 1, MoE, dense, MoC v1).
    """
    gates = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_gate(name))
        if is_gate(name):
            gates.append(name)
    if not gates:
        raise ValueError("train.stage2_*: the model has no adaptive gate to train (needs "
                         "moc_irl_steps > 1 with moc_adaptive_steps, or a mediator with "
                         "moc_collab_rounds > 1 and moc_adaptive_rounds)")
    return gates


def check_args(args, model_config, source: str = "config") -> None:
    """Validate the `train.stage2_*` fields once, before anything heavy (one-line errors)."""
    if args.stage2_from is not None:
        if args.stage2_start_step not in (None, 0):
            raise ValueError(f"{source}: train.stage2_from starts Stage II at step 0; got "
                             f"train.stage2_start_step={args.stage2_start_step} (drop it)")
        args.stage2_start_step = 0
        _tag_dir(args.stage2_from)  # exists?
    if args.stage2_start_step is None:
        return
    if int(args.stage2_start_step) < 0:
        raise ValueError(f"{source}: train.stage2_start_step must be >= 0, got "
                         f"{args.stage2_start_step}")
    if not args.stage2_lr or float(args.stage2_lr) <= 0:
        raise ValueError(f"{source}: train.stage2_lr must be > 0, got {args.stage2_lr}")
    cfg = model_config
    if not (cfg.adaptive_steps_on or (cfg.has_mediator and cfg.adaptive_rounds_on)):
        raise ValueError(f"{source}: train.stage2_start_step is set but model kind "
                         f"{cfg.moc_model_kind!r} (S={cfg.moc_irl_steps}, R="
                         f"{cfg.moc_collab_rounds}) has no adaptive gate to train")


def active(args, step: int) -> bool:
    """Is step `step + 1` (the next optimizer step) a Stage II step?"""
    return args.stage2_start_step is not None and step >= int(args.stage2_start_step)


# ----------------------------------------------------------------------------- checkpoints
def _tag_dir(path: str) -> str:
    """A save directory (its `latest`) or a tag directory → the tag directory."""
    from megatron_moc.training.checkpoint_reader import resolve_tag_dir

    try:
        return resolve_tag_dir(path)
    except FileNotFoundError as err:  # user input: one line
        raise ValueError(f"train.stage2_from: {err}") from None


def load_weights(model, path: str) -> None:
    """Copy the model weights of training checkpoint `path` (any TP / EP layout, read with
    weights_only=True by checkpoint_reader) into `model`, this rank's slices."""
    from megatron_moc.model.io import load_model_state
    from megatron_moc.training.checkpoint_reader import local_slices, read_training_checkpoint

    _, state = read_training_checkpoint(_tag_dir(path))
    try:
        load_model_state(model, local_slices(state, model), source=f"Stage II weights {path}")
    except KeyError as err:
        raise ValueError(err.args[0]) from None


def engine_plan(args, load_dir: str, find_checkpoint=None) -> Tuple[bool, Optional[str], bool]:
    """Before building the engine: (gate_only, weights_from, weights_only_resume).

    gate_only: build the Stage II engine now. weights_from: a checkpoint (tag directory or
    save directory) whose model weights, and nothing else, it starts from: the Stage II source
    run, or the full-model checkpoint saved at step == stage2_start_step. weights_only_resume:
    that checkpoint is this run's own, so its step and RNG are restored too
    (`load_trainer_state`). `find_checkpoint(load_dir)` names the tag resume will load
    (training/checkpoint.py's, which verifies; injectable for tests)."""
    if args.stage2_start_step is None:
        return False, None, False
    if find_checkpoint is None:
        from megatron_moc.training.checkpoint import find_checkpoint
    start = int(args.stage2_start_step)
    tag = find_checkpoint(load_dir)
    if tag is None:
        return start == 0, (args.stage2_from if start == 0 else None), False
    with open(os.path.join(load_dir, tag, "trainer_state.json")) as f:
        step = int(json.load(f)["step"])
    if step < start:
        return False, None, False
    if step == start:  # saved by the full-model engine, before the switch
        return True, os.path.join(load_dir, tag), True
    return True, None, False


def load_trainer_state(tag_dir: str) -> Dict[str, Any]:
    """Step and this rank's RNG of a full-model checkpoint whose weights the gate-only engine
    already holds (its optimizer state covers other parameters and is not loaded)."""
    from megatron_moc.training import checkpoint as ckpt

    rng_file = os.path.join(tag_dir, f"rng_rank_{torch.distributed.get_rank():05d}.safetensors")
    if os.path.isfile(rng_file):
        ckpt.load_rng_state(rng_file)
    with open(os.path.join(tag_dir, ckpt.TRAINER_STATE)) as f:
        state = json.load(f)
    state["tag"] = os.path.basename(os.path.normpath(tag_dir))
    return state


# ----------------------------------------------------------------------------- engines
def build_gate_only_engine(model_config, ds_config: Dict[str, Any], args,
                           state_dict: Optional[Dict[str, torch.Tensor]] = None,
                           weights_from: Optional[str] = None):
    """A fresh model with the given weights, every parameter but the gates frozen, and a
    DeepSpeed engine whose AdamW holds only the gates at constant LR `stage2_lr`."""
    from megatron_moc.model.gpt import build_model
    from megatron_moc.training.engine import setup_engine

    model = build_model(model_config)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    elif weights_from is not None:
        load_weights(model, weights_from)
    if torch.cuda.is_available():
        model = model.cuda()
    freeze_all_but_gates(model)
    lr = float(args.stage2_lr)
    return setup_engine(model, ds_config, lr, lr, 0, 1, args.weight_decay,
                        betas=(args.adam_beta1, args.adam_beta2))


def enter(engine, model_config, ds_config: Dict[str, Any], args):
    """Switch a running Stage I engine to Stage II at a step boundary, in process: the new
    engine starts from the current weights and the RNG continues as if nothing happened
    (model construction draws from it), so a run that switches in process and one resumed
    from the step-N checkpoint take the same steps."""
    from megatron_moc.training import checkpoint as ckpt

    ckpt.wait_for_pending_save()  # a background commit of the old engine's last save
    state = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
             for k, v in engine.module.state_dict().items()}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    new_engine = build_gate_only_engine(model_config, ds_config, args, state_dict=state)
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng)
    return new_engine
