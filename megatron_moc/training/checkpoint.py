"""Training checkpoints: DeepSpeed's format plus our model config and the trainer state,
written atomically and verified on load (training/atomic_checkpoint.py has the protocol).

Layout of `<save>/<tag>/` (tag = "step_<N>", `<save>/latest` names the newest):
    mp_rank_XX_model_states.pt, *optim_states.pt   DeepSpeed (weights, optimizer, LR schedule)
    config.yaml                                    the MoCConfig (model.io's format)
    recipe.yaml                                    the resolved run recipe
    trainer_state.json                             step, consumed samples, non-finite counters
    rng_rank_RRRRR.safetensors                     each rank's RNG: torch / cuda generator
                                                   states as uint8 tensors, numpy and python
                                                   states as JSON in the metadata
    manifest.json                                  every other file's size and CRC-32, the
                                                   step, the model-config hash (written last)

Everything of ours is safetensors / JSON / YAML; DeepSpeed's own `.pt` shards are the one
pickle (DeepSpeed reads them itself; docs/reliability.md). A save goes to `.tmp_<tag>/` and is
renamed to `<tag>` only once every file is fsynced and in the manifest; `latest` moves after
that. Loading takes the newest checkpoint that verifies and warns about each one it skips.

Exact resume needs all of it: the data order is an offset of the step (data.py), the
optimizer and schedule come back through DeepSpeed, and the RNG states make any randomness
(router noise, dropout) continue as if uninterrupted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from megatron_moc.training import atomic_checkpoint as atomic
from megatron_moc.training.atomic_checkpoint import CheckpointError  # noqa: F401 (re-export)

from megatron_moc.parallel.expert_checkpoint import (layout_changed, module_load_fn,
                                                     save_expert_shards, saved_layout)

TRAINER_STATE = "trainer_state.json"
ASYNC_COMMIT_TIMEOUT_S = 1800.0  # rank 0 waits this long for the other ranks' checksums


def latest_tag(load_dir: str) -> Optional[str]:
    """The tag `<load_dir>/latest` names (not verified: see `find_checkpoint`)."""
    return atomic.read_latest(load_dir)


# ----------------------------------------------------------------------------- collectives
def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _dist() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if _dist() else 1


def _barrier() -> None:
    if _dist():
        torch.distributed.barrier()


def _from_rank0(obj):
    """Rank 0's `obj` on every rank (directory listings: one view for all ranks, even where a
    network file system shows other nodes' new files late)."""
    if not _dist():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj) -> List[Any]:
    if not _dist():
        return [obj]
    out = [None] * _world()
    torch.distributed.all_gather_object(out, obj)
    return out


def _warn(msg: str) -> None:
    if _rank() == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- RNG
def save_rng_state(path: str) -> None:
    """This process's torch / cuda / numpy / python RNG as safetensors (no pickle)."""
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": json.dumps([name, keys.tolist(), int(pos), int(has_gauss), float(cached)]),
            "python": json.dumps([version, list(internal), gauss_next])}
    save_file(tensors, path, metadata=meta)


def load_rng_state(path: str) -> None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    name, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss_next))


# ----------------------------------------------------------------------------- saving
class _AsyncCommit:
    """The one background commit a process may have in flight (train.async_save)."""

    thread: Optional[threading.Thread] = None
    error: Optional[BaseException] = None
    tag: Optional[str] = None


def wait_for_pending_save() -> None:
    """Join this process's background commit, if any; raise if it failed. Call on all
    ranks (before the next save, and before the process ends)."""
    thread = _AsyncCommit.thread
    if thread is None:
        return
    thread.join()
    _AsyncCommit.thread = None
    error, _AsyncCommit.error = _AsyncCommit.error, None
    if error is not None:
        raise CheckpointError(f"background commit of checkpoint {_AsyncCommit.tag} failed: "
                              f"{error}") from error


def _finish_async(save_dir: str, stage: str, tag: str, mine: List[str], meta: Dict[str, Any],
                  keep_last: int, step: int, rank: int, world: int) -> None:
    try:
        atomic.write_share(stage, rank, atomic.fsync_and_checksum(stage, mine))
        if rank != 0:
            return
        deadline = time.time() + ASYNC_COMMIT_TIMEOUT_S
        while (entries := atomic.read_shares(stage, world)) is None:
            if time.time() > deadline:
                raise CheckpointError(f"{stage}: not every rank handed in its checksums within "
                                      f"{ASYNC_COMMIT_TIMEOUT_S:.0f} s")
            time.sleep(0.05)
        atomic.remove_shares(stage, world)
        atomic.commit(save_dir, stage, tag, entries, meta)
        atomic.rotate(save_dir, keep_last, step)
    except BaseException as err:  # reported by wait_for_pending_save
        _AsyncCommit.error = err


def save_checkpoint(engine, save_dir: str, step: int, consumed_samples: int, model_config,
                    recipe: Dict[str, Any], keep_last: int = 0, async_save: bool = False,
                    trainer_extra: Optional[Dict[str, Any]] = None) -> str:
    """Write checkpoint `step_<step>` of `engine` into `save_dir`, atomically. Call on all
    ranks. Returns the directory the checkpoint has (or, with `async_save`, will have).

    Every writer writes into the staging directory; then the files are fsynced and
    checksummed (split over the ranks), and rank 0 writes the manifest, renames the directory
    into place, moves `latest` and deletes all but the newest `keep_last` checkpoints.
    With `async_save` everything up to the staging files happens here (the state is on disk
    when this returns) and the fsync / checksum / commit runs in a background thread of each
    rank; the next save, `load_checkpoint` and `wait_for_pending_save` wait for it.

    Raises:
        CheckpointError: a write failed (disk full, ...) on this rank; `latest` and the
            checkpoint it names are untouched.
    """
    wait_for_pending_save()
    rank, world = _rank(), _world()
    tag = atomic.step_tag(step)
    stage = atomic.staging_dir(save_dir, tag)
    state = {"step": step, "consumed_samples": consumed_samples, **(trainer_extra or {})}
    try:
        if rank == 0:
            os.makedirs(save_dir, exist_ok=True)
            for name in atomic.remove_stale(save_dir):
                _warn(f"removed {os.path.join(save_dir, name)} (left by a save that died)")
            os.makedirs(stage)
        _barrier()
        save_rng_state(os.path.join(stage, f"rng_rank_{rank:05d}.safetensors"))
        if rank == 0:
            model_config.to_yaml(os.path.join(stage, "config.yaml"))
            import yaml

            with open(os.path.join(stage, "recipe.yaml"), "w") as f:
                yaml.safe_dump(recipe, f, sort_keys=False)
            with open(os.path.join(stage, TRAINER_STATE), "w") as f:
                json.dump(state, f)
        # `num_experts` as DeepSpeed writes it for MoE models: an EP = 1 checkpoint then
        # loads into an expert-parallel engine too (DeepSpeed reads the key there).
        client = {"trainer": state}
        if not getattr(engine, "has_moe_layers", False):  # (EP > 1: DeepSpeed writes it)
            layers = getattr(engine.module, "moc_layers", list)()
            client["num_experts"] = [m.num_experts for m in layers]
        engine.save_checkpoint(save_dir, tag=os.path.basename(stage), client_state=client,
                               save_latest=False)
        save_expert_shards(engine.module, stage)  # EP > 1: each expert once, global index
        _barrier()
        files = _from_rank0(atomic.list_files(stage) if rank == 0 else None)
        mine = atomic.share(files, rank, world)
        meta = {"step": step, "consumed_samples": consumed_samples, "world_size": world,
                "model_config_sha256": atomic.config_sha256(model_config.to_dict()),
                "recipe_sha256": atomic.config_sha256(recipe),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if async_save:
            _AsyncCommit.tag = tag
            _AsyncCommit.thread = threading.Thread(
                target=_finish_async, name=f"commit-{tag}", daemon=True,
                args=(save_dir, stage, tag, mine, meta, keep_last, step, rank, world))
            _AsyncCommit.thread.start()
            return os.path.join(save_dir, tag)
        entries = {}
        for part in _gather(atomic.fsync_and_checksum(stage, mine)):
            entries.update(part)
        if rank == 0:
            atomic.commit(save_dir, stage, tag, entries, meta)
            atomic.rotate(save_dir, keep_last, step)
        _barrier()
    except OSError as err:
        if rank == 0:  # give the space back; the next save would remove it anyway
            shutil.rmtree(stage, ignore_errors=True)
        raise CheckpointError(
            f"saving checkpoint {tag} to {save_dir} failed on rank {rank}: {err}; `latest` still "
            f"names {atomic.read_latest(save_dir)!r}, which is untouched") from err
    return os.path.join(save_dir, tag)


# ----------------------------------------------------------------------------- loading
def find_checkpoint(load_dir: str) -> Optional[str]:
    """The newest checkpoint tag of `load_dir` that verifies (manifest, sizes, CRC-32 split
    over the ranks), the same on every rank; None if there is no candidate at all. Each
    rejected candidate gets a warning naming the file and what was wrong.

    Raises:
        CheckpointError: there are candidates but none verifies (training from scratch on
            top of them would silently throw the run away).
    """
    rank, world = _rank(), _world()
    tags = _from_rank0(atomic.candidate_tags(load_dir) if rank == 0 else None)
    rejected = []
    for tag in tags:
        ckpt_dir = os.path.join(load_dir, tag)
        head = (None, None)
        if rank == 0:
            try:
                manifest = atomic.read_manifest(ckpt_dir)
                head = (atomic.check_sizes(ckpt_dir, manifest), manifest)
            except CheckpointError as err:
                head = (str(err), None)
        error, manifest = _from_rank0(head)
        if error is None:
            mine = atomic.share(sorted(manifest["files"]), rank, world)
            error = next((e for e in _gather(atomic.check_checksums(ckpt_dir, manifest, mine))
                          if e), None)
        if error is None:
            if rejected:
                _warn(f"resuming from {ckpt_dir}, the newest complete checkpoint")
            return tag
        rejected.append(f"{tag}: {error}")
        _warn(f"checkpoint {ckpt_dir} is not usable: {error}; trying an older one")
    if rejected:
        raise CheckpointError(f"{load_dir}: no complete checkpoint ({'; '.join(rejected)}); "
                              "move the damaged ones away, or set train.load to another run")
    return None


def _config_differences(ckpt_dir: str, model_config) -> List[str]:
    import yaml

    path = os.path.join(ckpt_dir, "config.yaml")
    if not os.path.isfile(path):
        return ["config.yaml missing"]
    with open(path) as f:
        saved = yaml.safe_load(f) or {}
    now = json.loads(json.dumps(model_config.to_dict(), default=repr))
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


def load_checkpoint(engine, load_dir: str, model_config=None) -> Optional[Dict[str, Any]]:
    """Load the newest complete checkpoint of `load_dir` (`find_checkpoint`) into `engine`
    (weights, optimizer, LR schedule) and this rank's RNG. Returns the trainer state (with its
    `tag`), or None if `load_dir` has no checkpoint. Call on all ranks."""
    wait_for_pending_save()
    tag = find_checkpoint(load_dir)
    if tag is None:
        return None
    ckpt_dir = os.path.join(load_dir, tag)
    if model_config is not None:
        manifest = atomic.read_manifest(ckpt_dir)
        if manifest.get("model_config_sha256") != atomic.config_sha256(model_config.to_dict()):
            diff = _config_differences(ckpt_dir, model_config)
            _warn(f"{ckpt_dir} was written with another model config (differs: "
                  f"{', '.join(diff) or 'see config.yaml'}); loading it anyway")
    # deepspeed-exception: DeepSpeed reads its own shards with torch.load(weights_only=False)
    # (they pickle its LossScaler); find_checkpoint has verified every byte against the manifest.
    # Weights go through module_load_fn (strict for non-experts, experts by global index from
    # any EP size). ZeRO's optimizer shards only fit the EP size that wrote them.
    resharded = layout_changed(engine.module, ckpt_dir)
    path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=not resharded,
                                     load_lr_scheduler_states=not resharded,
                                     load_module_only=resharded,
                                     custom_load_fn=module_load_fn(ckpt_dir))
    if path is None:
        raise CheckpointError(f"{load_dir}: DeepSpeed could not load checkpoint {tag!r}")
    rng_file = os.path.join(ckpt_dir, f"rng_rank_{_rank():05d}.safetensors")
    if os.path.isfile(rng_file):
        load_rng_state(rng_file)
    else:  # another world size: the RNG streams continue from the seed instead
        print(f"warning: {rng_file} not found (the checkpoint has another world size?); RNG "
              "not restored on this rank", file=sys.stderr, flush=True)
    with open(os.path.join(ckpt_dir, TRAINER_STATE)) as f:
        state = json.load(f)
    state["tag"] = tag
    if resharded:
        saved = saved_layout(ckpt_dir) or {"expert_model_parallel_size": 1}
        _warn(f"{ckpt_dir} was written with expert_model_parallel_size="
              f"{saved['expert_model_parallel_size']}: weights and LR schedule restored, the "
              "optimizer moments restart (ZeRO shards cannot be resharded across EP sizes)")
        if engine.lr_scheduler is not None:
            for _ in range(int(state["step"])):
                engine.lr_scheduler.step()
    return state
