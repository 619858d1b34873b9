"""Training checkpoints: DeepSpeed's format plus our model config and the trainer state.

Layout of `<save>/<tag>/` (tag = "step_<N>", `<save>/latest` names the newest):
    mp_rank_XX_model_states.pt, *optim_states.pt   DeepSpeed (weights, optimizer, LR schedule)
    config.yaml                                    the MoCConfig (model.io's format)
    recipe.yaml                                    the resolved run recipe
    trainer_state.json                             step, consumed samples
    rng_rank_RRRRR.pt                              each rank's torch / numpy / python RNG

Exact resume needs all of it: the data order is an offset of the step (data.py), the
optimizer and schedule come back through DeepSpeed, and the RNG states make any randomness
(router noise, dropout) continue as if uninterrupted.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

TRAINER_STATE = "trainer_state.json"


def latest_tag(load_dir: str) -> Optional[str]:
    path = os.path.join(load_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, save_dir: str, step: int, consumed_samples: int, model_config,
                    recipe: Dict[str, Any]) -> str:
    """Write our files (each rank's RNG; config, recipe, trainer state from rank 0), then
    DeepSpeed's shards on every rank. Call on all ranks. Returns the checkpoint directory."""
    import yaml

    tag = f"step_{step}"
    rank = torch.distributed.get_rank()
    state = {"step": step, "consumed_samples": consumed_samples}
    # Our files go in first: DeepSpeed writes `latest` at the end of its save, so a kill at any
    # moment leaves `latest` on a checkpoint that is complete, ours included.
    ckpt_dir = os.path.join(save_dir, tag)
    os.makedirs(ckpt_dir, exist_ok=True)
    torch.save(_rng_state(), os.path.join(ckpt_dir, f"rng_rank_{rank:05d}.pt"))
    if rank == 0:
        model_config.to_yaml(os.path.join(ckpt_dir, "config.yaml"))
        with open(os.path.join(ckpt_dir, "recipe.yaml"), "w") as f:
            yaml.safe_dump(recipe, f, sort_keys=False)
        with open(os.path.join(ckpt_dir, TRAINER_STATE), "w") as f:
            json.dump(state, f)
    torch.distributed.barrier()
    engine.save_checkpoint(save_dir, tag=tag, client_state={"trainer": state})
    return ckpt_dir


def load_checkpoint(engine, load_dir: str) -> Optional[Dict[str, Any]]:
    """Load the `latest` checkpoint of `load_dir` into `engine` (weights, optimizer, LR
    schedule) and this rank's RNG. Returns the trainer state, or None if there is none."""
    tag = latest_tag(load_dir)
    if tag is None:
        return None
    path, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"{load_dir}: DeepSpeed could not load checkpoint {tag!r}")
    ckpt_dir = os.path.join(load_dir, tag)
    rng_file = os.path.join(ckpt_dir, f"rng_rank_{torch.distributed.get_rank():05d}.pt")
    if os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    with open(os.path.join(ckpt_dir, TRAINER_STATE)) as f:
        state = json.load(f)
    return state
