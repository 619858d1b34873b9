"""Read a training checkpoint of any TP / EP / ZeRO layout into one TP = 1, EP = 1 state dict.

DeepSpeed's own `zero_to_fp32.py` fails on MoE checkpoints, so the converters read the files
themselves. Layout of a tag directory `<save>/<tag>/` (training/checkpoint.py):

    config.yaml                         the MoCConfig
    mp_rank_{tp:02d}_model_states.pt    one per TP rank: {'module': state dict, ...} (DeepSpeed)
    ep_layout.json                      only with EP > 1: {"expert_model_parallel_size": EP,
                                        "tensor_model_parallel_size": TP, "num_experts": E}
    experts_ep{r:02d}.safetensors       only with EP > 1, one per EP rank: `<path>.<e>` = slice
                                        e (global expert index) of the stacked expert param
                                        `<path>`, e.g. decoder.layers.3.mlp.experts.w13.5
    *optim_states.pt, rng_*.pt          optimizer / RNG: not read (ZeRO 1/2 shard only those,
                                        never the module weights)

TP merge (Megatron's partitioning): column-parallel `linear_qkv` and the vocab-parallel
embedding / output layer are concatenated along dim 0 (each rank holds whole query groups of
the per-group [q..., k, v] layout, so concatenation restores it); row-parallel `linear_proj`
along dim 1; everything else (norms, router, experts, mediator) is replicated and must be
identical on every rank. With EP > 1 the `.experts.` entries of the model-state files hold
one EP rank's local experts only and are replaced by the expert files.

Nothing is unpickled beyond tensors and plain containers: `torch.load(weights_only=True)`
and safetensors. Every failure names the file, key or shape.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Tuple

import torch

from megatron_moc.config import MoCConfig

MODEL_STATES = re.compile(r"^mp_rank_(\d{2})_model_states\.pt$")
EP_LAYOUT = "ep_layout.json"
# Megatron tensor-parallel partition dim by parameter-name suffix; anything else is replicated.
TP_SPLIT_DIM = (
    (re.compile(r"(^|\.)embedding\.word_embeddings\.weight$"), 0),
    (re.compile(r"(^|\.)output_layer\.weight$"), 0),
    (re.compile(r"\.linear_qkv\.(weight|bias)$"), 0),
    (re.compile(r"\.linear_proj\.weight$"), 1),
)


def expert_file(rank: int) -> str:
    return f"experts_ep{rank:02d}.safetensors"


def resolve_tag_dir(path: str) -> str:
    """`path` is a tag directory (has model-state files) or a save directory with `latest`."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if any(MODEL_STATES.match(n) for n in os.listdir(path)):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        tag_dir = os.path.join(path, tag)
        if not os.path.isdir(tag_dir):
            raise FileNotFoundError(f"{latest} names tag {tag!r}, but {tag_dir} does not exist")
        return tag_dir
    raise FileNotFoundError(f"{path}: no mp_rank_00_model_states.pt and no 'latest' file "
                            "(not a training checkpoint)")


def _load_module_state(path: str) -> Dict[str, torch.Tensor]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with code in it is refused here, by design
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True): {err}") from None
    if not isinstance(blob, dict) or "module" not in blob:
        raise KeyError(f"{path}: no 'module' entry (not a DeepSpeed model-state file)")
    state = {}
    for key, value in blob["module"].items():
        if key.endswith("._extra_state"):
            continue  # Megatron/TE metadata (None for our modules), no weights
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state[key] = value
    return state


def _split_dim(key: str):
    for pattern, dim in TP_SPLIT_DIM:
        if pattern.search(key):
            return dim
    return None


def merge_tensor_parallel(shards: List[Dict[str, torch.Tensor]], files: List[str]
                          ) -> Dict[str, torch.Tensor]:
    """One state dict from the TP ranks' state dicts (see the module docstring)."""
    keys = list(shards[0])
    for shard, name in zip(shards[1:], files[1:]):
        if set(shard) != set(keys):
            diff = sorted(set(shard) ^ set(keys))
            raise KeyError(f"{name}: keys differ from {files[0]}: {diff[:5]}")
    merged = {}
    for key in keys:
        parts = [s[key] for s in shards]
        dim = _split_dim(key)
        if dim is not None:
            merged[key] = torch.cat(parts, dim=dim)
            continue
        for part, name in zip(parts[1:], files[1:]):
            if part.shape != parts[0].shape or not torch.equal(part, parts[0]):
                raise ValueError(f"{name}: replicated parameter {key!r} differs from "
                                 f"{files[0]} (shapes {tuple(part.shape)} / "
                                 f"{tuple(parts[0].shape)}); tensor-parallel ranks disagree")
        merged[key] = parts[0]
    return merged


def read_expert_files(tag_dir: str, num_ep: int, num_experts: int) -> Dict[str, torch.Tensor]:
    """Stack `experts_ep*.safetensors` into full [E, ...] params, keyed by module path."""
    from safetensors import safe_open

    slices: Dict[str, Dict[int, torch.Tensor]] = {}
    for rank in range(num_ep):
        path = os.path.join(tag_dir, expert_file(rank))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{tag_dir}: missing expert file {expert_file(rank)} "
                                    f"(ep_layout.json says {num_ep} EP ranks)")
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                base, _, index = key.rpartition(".")
                if not base or not index.isdigit():
                    raise KeyError(f"{path}: key {key!r} is not '<param path>.<expert index>'")
                e = int(index)
                if not 0 <= e < num_experts:
                    raise KeyError(f"{path}: key {key!r}: expert index {e} is outside "
                                   f"[0, {num_experts})")
                if e in slices.setdefault(base, {}):
                    raise KeyError(f"{path}: expert slice {key!r} appears in two expert files")
                slices[base][e] = f.get_tensor(key)
    stacked = {}
    for base, parts in slices.items():
        missing = sorted(set(range(num_experts)) - set(parts))
        if missing:
            raise KeyError(f"{tag_dir}: expert parameter {base!r} lacks expert(s) {missing} "
                           "in the experts_ep*.safetensors files")
        shapes = {tuple(t.shape) for t in parts.values()}
        if len(shapes) != 1:
            raise ValueError(f"{tag_dir}: slices of {base!r} have different shapes {sorted(shapes)}")
        stacked[base] = torch.stack([parts[e] for e in range(num_experts)])
    return stacked


def _read_layout(tag_dir: str, num_tp_files: int, config: MoCConfig) -> Tuple[int, int]:
    path = os.path.join(tag_dir, EP_LAYOUT)
    if not os.path.isfile(path):
        return 1, num_tp_files
    with open(path) as f:
        layout = json.load(f)
    for field in ("expert_model_parallel_size", "tensor_model_parallel_size", "num_experts"):
        if field not in layout:
            raise KeyError(f"{path}: no field {field!r}")
    if layout["tensor_model_parallel_size"] != num_tp_files:
        raise ValueError(f"{path}: tensor_model_parallel_size {layout['tensor_model_parallel_size']}"
                         f" but {tag_dir} has {num_tp_files} mp_rank_*_model_states.pt file(s)")
    if layout["num_experts"] != config.num_moe_experts:
        raise ValueError(f"{path}: num_experts {layout['num_experts']} but config.yaml has "
                         f"num_moe_experts {config.num_moe_experts}")
    return int(layout["expert_model_parallel_size"]), num_tp_files


def read_checkpoint_config(tag_dir: str) -> MoCConfig:
    """The checkpoint's MoCConfig, made single-process: TP = EP = 1, fp32 params, CPU init."""
    path = os.path.join(tag_dir, "config.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{tag_dir}: no config.yaml (written by training/checkpoint.py)")
    values = MoCConfig.from_yaml(path).to_dict()
    values.update(tensor_model_parallel_size=1, expert_model_parallel_size=1,
                  sequence_parallel=False, bf16=False, fp16=False)
    return MoCConfig(**values, params_dtype=torch.float32, use_cpu_initialization=True)


def read_training_checkpoint(path: str) -> Tuple[MoCConfig, Dict[str, torch.Tensor]]:
    """Args: a save directory (its `latest` tag is read) or a tag directory.
    Returns (config with TP = EP = 1, full state dict of MoCGPTModel's parameters in the dtype
    they were saved in)."""
    tag_dir = resolve_tag_dir(path)
    config = read_checkpoint_config(tag_dir)
    ranks = sorted(int(m.group(1)) for m in map(MODEL_STATES.match, os.listdir(tag_dir)) if m)
    for expected in range(max(ranks) + 1):
        if expected not in ranks:
            raise FileNotFoundError(f"{tag_dir}: missing mp_rank_{expected:02d}_model_states.pt "
                                    f"(found ranks {ranks})")
    num_ep, num_tp = _read_layout(tag_dir, len(ranks), config)
    files = [os.path.join(tag_dir, f"mp_rank_{r:02d}_model_states.pt") for r in ranks]
    shards = [_load_module_state(f) for f in files]
    experts = {}
    if num_ep > 1:
        experts = read_expert_files(tag_dir, num_ep, config.num_moe_experts)
        for shard, name in zip(shards, files):
            for key in list(shard):
                if key in experts:
                    del shard[key]  # one EP rank's local experts only: the expert files win
                elif ".experts." in key:
                    raise KeyError(f"{name}: expert parameter {key!r} has no slices in the "
                                   "experts_ep*.safetensors files")
    state = merge_tensor_parallel(shards, files)
    state.update(experts)
    return config, state


# ----------------------------------------------------------------------------- init_from
# Fields that change the function without changing a shape: a model directory and the recipe
# that starts from it must agree on them (shapes are checked by load_model_state).
INIT_FROM_FIELDS = (
    "moc_model_kind", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
    "vocab_size", "rotary_base", "layernorm_epsilon", "num_moe_experts", "moe_router_topk",
    "moc_irl_steps", "moc_adaptive_steps", "moc_adaptive_mode", "moc_step_gate_temperature",
    "moc_collab_rounds", "moc_adaptive_rounds", "moc_round_gate_temperature", "moc_feedback",
    "moc_mediator_vector", "moc_value_rank",
)


def local_slices(state: Dict[str, torch.Tensor], model) -> Dict[str, torch.Tensor]:
    """This rank's part of a full (TP = EP = 1) state: TP-split params by Megatron's
    partitioning, stacked expert params by the rank's expert range."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    out = dict(state)
    if tp > 1:
        for key, value in state.items():
            dim = _split_dim(key)
            if dim is not None:
                out[key] = value.chunk(tp, dim=dim)[tp_rank]
    for name, module in model.named_modules():
        if getattr(module, "expert_parallel", 1) > 1 and hasattr(module, "first_expert"):
            for pname, p in module.named_parameters(recurse=False):
                key, first = f"{name}.{pname}", module.first_expert
                if key in out:
                    out[key] = out[key][first:first + p.shape[0]]
    return out


def load_init_weights(model, config: MoCConfig, path: str) -> None:
    """Load the weights of model directory `path` (config.yaml + model.safetensors, e.g. from
    tools/convert_from_hf.py) into `model`, built from `config` on this rank (any TP / EP).
    A differing architecture field, missing key or wrong shape fails naming it."""
    from safetensors.torch import load_file

    from megatron_moc.model.io import CONFIG_FILE, WEIGHTS_FILE, load_model_state

    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(f"train.init_from: {path} has no {name} (not a model directory)")
    saved = MoCConfig.from_yaml(os.path.join(path, CONFIG_FILE))
    for field in INIT_FROM_FIELDS:
        if getattr(saved, field) != getattr(config, field):
            raise ValueError(f"train.init_from: {path} has {field}={getattr(saved, field)!r}, "
                             f"the recipe {getattr(config, field)!r}")
    state = local_slices(load_file(os.path.join(path, WEIGHTS_FILE)), model)
    try:
        load_model_state(model, state, source=f"train.init_from {path}")
    except KeyError as err:  # user input: the trainer reports ValueErrors as one line
        raise ValueError(err.args[0]) from None
