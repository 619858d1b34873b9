"""Our own model directory: `config.yaml` + `model.safetensors` (no pickle anywhere).

Used by the research importer and as the hand-off format between tools; training
checkpoints (DeepSpeed) are a separate format (training/checkpoint.py).
"""

import os
from typing import Dict

import torch

from megatron_moc.config import MoCConfig

CONFIG_FILE, WEIGHTS_FILE = "config.yaml", "model.safetensors"


def model_state(model) -> Dict[str, torch.Tensor]:
    """Parameters only (Megatron's `_extra_state` entries carry nothing for our modules)."""
    return {name: p.detach() for name, p in model.named_parameters()}


def load_model_state(model, state: Dict[str, torch.Tensor], source: str = "state") -> None:
    """Copy `state` into `model`, failing with a message that names any missing, unexpected
    or wrongly shaped key."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing:
        raise KeyError(f"{source}: missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise KeyError(f"{source}: unexpected key(s) {unexpected[:5]}"
                       f"{' ...' if len(unexpected) > 5 else ''}")
    for name, p in params.items():
        if tuple(state[name].shape) != tuple(p.shape):
            raise ValueError(f"{source}: key {name!r} has shape {tuple(state[name].shape)}, "
                             f"the model expects {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(p.dtype))


def save_model_dir(model, config: MoCConfig, out_dir: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    config.to_yaml(os.path.join(out_dir, CONFIG_FILE))
    state = {k: v.contiguous().cpu() for k, v in model_state(model).items()}
    tmp = os.path.join(out_dir, WEIGHTS_FILE + ".tmp")
    save_file(state, tmp, metadata={"format": "megatron_moc"})
    os.replace(tmp, os.path.join(out_dir, WEIGHTS_FILE))


def load_model_dir(path: str, **config_overrides):
    """Build the model of `path/config.yaml` and load `path/model.safetensors` into it."""
    from safetensors.torch import load_file

    from megatron_moc.model.gpt import build_model

    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not os.path.exists(os.path.join(path, name)):
            raise FileNotFoundError(f"{path}: no {name} (not a megatron_moc model directory)")
    values = MoCConfig.from_yaml(os.path.join(path, CONFIG_FILE)).to_dict()
    values.update(config_overrides)
    config = MoCConfig(**values)
    model = build_model(config)
    load_model_state(model, load_file(os.path.join(path, WEIGHTS_FILE)), source=path)
    return model, config
