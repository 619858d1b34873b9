"""Expert weights in checkpoints: each expert stored once, under its global index.

With EP > 1 a rank holds E / EP experts, and DeepSpeed's model file (written by DP rank 0)
holds only EP rank 0's. So next to DeepSpeed's files each checkpoint directory gets

    experts_ep<RR>.safetensors   written by EP rank RR (its expert-data-parallel rank 0, TP
                                 rank 0): `<experts module>.<param>.<global expert>` → that
                                 expert's slice, e.g. `decoder.layers.3.mlp.experts.w13.5`
    ep_layout.json               {"expert_model_parallel_size", "tensor_model_parallel_size",
                                  "num_experts"} of the run that wrote it

Loading into any EP size (including 1) takes each rank's experts from those files; a
checkpoint without them (written at EP = 1) has every expert in DeepSpeed's model file and is
sliced. ZeRO's optimizer shards are per expert-data-parallel rank and cannot be resharded, so
loading into another EP size restores the weights and the LR schedule and restarts the Adam
moments (training/checkpoint.py says so in a warning).
"""

import glob
import json
import os
from typing import Dict, Iterator, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

LAYOUT_FILE = "ep_layout.json"
SHARD_PATTERN = "experts_ep*.safetensors"


def _expert_modules(model: torch.nn.Module) -> Iterator[Tuple[str, torch.nn.Module]]:
    """(state-dict prefix, IRLExperts) of every MoC layer, in model order."""
    from megatron_moc.moc.layer import MoCLayer

    for name, module in model.named_modules():
        if isinstance(module, MoCLayer):
            yield f"{name}.experts", module.experts


def is_expert_key(key: str, model: torch.nn.Module) -> bool:
    return any(key.startswith(prefix + ".") for prefix, _ in _expert_modules(model))


def _layout(model) -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    experts = next((m for _, m in _expert_modules(model)), None)
    ep = experts.expert_parallel if experts is not None else 1
    return {"expert_model_parallel_size": ep,
            "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "num_experts": experts.num_experts * ep if experts is not None else 0}


def saved_layout(ckpt_dir: str) -> Optional[Dict[str, int]]:
    path = os.path.join(ckpt_dir, LAYOUT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def save_expert_shards(model: torch.nn.Module, ckpt_dir: str) -> None:
    """Write this rank's experts (if it is its EP rank's writer) and, on rank 0, the layout.
    Call on every rank; a no-op at EP = 1 (DeepSpeed's model file then has every expert)."""
    from megatron.core import parallel_state as ps

    from megatron_moc.parallel.groups import expert_data_parallel_rank, expert_parallel_rank

    layout = _layout(model)
    ep = layout["expert_model_parallel_size"]
    if ep == 1:
        return
    if expert_data_parallel_rank(ep) == 0 and ps.get_tensor_model_parallel_rank() == 0:
        tensors = {}
        for prefix, experts in _expert_modules(model):
            for pname, p in experts.named_parameters():
                for i in range(p.shape[0]):
                    key = f"{prefix}.{pname}.{experts.first_expert + i}"
                    tensors[key] = p.detach()[i].to("cpu", copy=True).contiguous()
        rank = expert_parallel_rank(ep)
        save_file(tensors, os.path.join(ckpt_dir, f"experts_ep{rank:02d}.safetensors"),
                  metadata={"expert_model_parallel_size": str(ep), "ep_rank": str(rank)})
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(ckpt_dir, LAYOUT_FILE), "w") as f:
            json.dump(layout, f, indent=1)


def layout_changed(model: torch.nn.Module, ckpt_dir: str) -> bool:
    """True if the checkpoint's EP size differs from the model's (then the optimizer shards
    cannot be used)."""
    saved = saved_layout(ckpt_dir)
    saved_ep = saved["expert_model_parallel_size"] if saved else 1
    return saved_ep != _layout(model)["expert_model_parallel_size"]


def module_load_fn(ckpt_dir: str):
    """A `custom_load_fn` for DeepSpeed's `load_checkpoint`: every non-expert tensor strictly
    (a missing or unexpected key, or a shape, is an error naming it), expert tensors from
    `load_local_experts` (DeepSpeed's model file holds another EP size's slice)."""

    def load(src: Dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
        own = {k: v for k, v in dst.state_dict().items() if not k.endswith("_extra_state")}
        src = {k: v for k, v in src.items() if not k.endswith("_extra_state")}
        want = {k for k in own if not is_expert_key(k, dst)}
        have = {k for k in src if not is_expert_key(k, dst)}
        if want - have:
            raise KeyError(f"{ckpt_dir}: the checkpoint lacks {sorted(want - have)[0]!r}")
        if have - want:
            raise KeyError(f"{ckpt_dir}: unexpected key {sorted(have - want)[0]!r} (another "
                           "model kind or config?)")
        with torch.no_grad():
            for k in sorted(want):
                if src[k].shape != own[k].shape:
                    raise ValueError(f"{ckpt_dir}: {k} has shape {tuple(src[k].shape)}, the "
                                     f"model {tuple(own[k].shape)}")
                own[k].copy_(src[k])
        load_local_experts(dst, ckpt_dir, src)

    return load


def load_local_experts(model: torch.nn.Module, ckpt_dir: str,
                       model_file_state: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Fill this rank's expert params from the checkpoint's expert files, or, for an EP = 1
    checkpoint, from the full stacked tensors of DeepSpeed's model file (`model_file_state`)."""
    shards = sorted(glob.glob(os.path.join(ckpt_dir, SHARD_PATTERN)))
    handles = [safe_open(path, framework="pt") for path in shards]
    where = {key: h for h in handles for key in h.keys()}
    with torch.no_grad():
        for prefix, experts in _expert_modules(model):
            for pname, p in experts.named_parameters():
                for i in range(p.shape[0]):
                    g = experts.first_expert + i
                    key = f"{prefix}.{pname}.{g}"
                    if key in where:
                        value = where[key].get_tensor(key)
                    elif not shards and model_file_state is not None \
                            and f"{prefix}.{pname}" in model_file_state:
                        full = model_file_state[f"{prefix}.{pname}"]
                        if full.shape[0] <= g:
                            raise ValueError(f"{ckpt_dir}: {prefix}.{pname} holds "
                                             f"{full.shape[0]} experts, expert {g} is needed")
                        value = full[g]
                    else:
                        raise KeyError(f"{ckpt_dir}: expert {g} of {prefix}.{pname} is in no "
                                       f"file ({len(shards)} expert files: {SHARD_PATTERN})")
                    if value.shape != p[i].shape:
                        raise ValueError(f"{ckpt_dir}: {key} has shape {tuple(value.shape)}, "
                                         f"the model {tuple(p[i].shape)}")
                    p[i].copy_(value)
