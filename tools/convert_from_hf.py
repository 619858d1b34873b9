"""Import an exported Hugging Face model back into a megatron_moc model directory, to train on.

    python tools/convert_from_hf.py --hf hf/tiny --output models/tiny
    python -m megatron_moc.training.pretrain --config my_recipe.yaml train.init_from=models/tiny

The output is a model directory (`config.yaml` + `model.safetensors`, megatron_moc/model/io.py;
plus `tokenizer.model` when the HF directory has one). `pretrain.py` starts a run from it with
`train.init_from=<dir>`: the weights are loaded before the optimizer is built, at step 0 (the
recipe's `model:` section must describe the same architecture; a mismatch is named).
Reading is safe: config.json is parsed as JSON with megatron_moc's own config class (no code
from the HF directory runs), the weights come from safetensors. A missing shard, a missing or
unmapped key, or a wrong shape stops the import and names it. The import ends by comparing
the logits of the imported MoCGPTModel with the HF model's (`--no-verify` skips it).
"""

import argparse
import json
import os
import shutil
import sys
from typing import Dict, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_moc.config import MoCConfig  # noqa: E402


def read_hf_dir(hf_dir: str):
    """(HF config, HF state dict) of an exported directory, without running its code."""
    from megatron_moc.hf.configuration_moc import MegatronMoCConfig
    from megatron_moc.hf.convert import read_safetensors_dir

    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir}: no config.json")
    with open(path) as f:
        values = json.load(f)
    if values.get("model_type") != MegatronMoCConfig.model_type:
        raise ValueError(f"{path}: model_type {values.get('model_type')!r} is not "
                         f"{MegatronMoCConfig.model_type!r} (not a megatron_moc export)")
    return MegatronMoCConfig.from_dict(values), read_safetensors_dir(hf_dir)


def convert_from_hf(hf_dir: str, output: str, verify: bool = True,
                    tolerance: float = 1e-4) -> Tuple[MoCConfig, Dict[str, torch.Tensor]]:
    """Write the model directory `output` from `hf_dir`. Returns (config, state dict)."""
    from safetensors.torch import save_file

    from megatron_moc.hf.convert import check_state, from_hf_state, moc_config_from_hf
    from megatron_moc.hf.modeling_moc import MegatronMoCForCausalLM
    from megatron_moc.hf.tokenizer import SPM_MODEL_FILE
    from megatron_moc.model.io import CONFIG_FILE, WEIGHTS_FILE

    hf_cfg, hf_state = read_hf_dir(hf_dir)
    with torch.device("meta"):  # names and shapes the config implies, checked before mapping
        skeleton = MegatronMoCForCausalLM(hf_cfg)
    check_state(hf_state, {k: p.shape for k, p in skeleton.state_dict().items()}, hf_dir)
    config = moc_config_from_hf(hf_cfg)
    state = from_hf_state(hf_state, config)
    if verify:
        diff = _compare(config, state, hf_cfg, hf_state)
        if diff > tolerance:
            raise ValueError(f"{hf_dir}: imported logits differ by {diff:.3e} (> {tolerance:g})")
    os.makedirs(output, exist_ok=True)
    config.to_yaml(os.path.join(output, CONFIG_FILE))
    tmp = os.path.join(output, WEIGHTS_FILE + ".tmp")
    save_file(state, tmp, metadata={"format": "megatron_moc"})
    os.replace(tmp, os.path.join(output, WEIGHTS_FILE))
    if os.path.isfile(os.path.join(hf_dir, SPM_MODEL_FILE)):
        shutil.copyfile(os.path.join(hf_dir, SPM_MODEL_FILE), os.path.join(output, SPM_MODEL_FILE))
    return config, state


@torch.no_grad()
def _compare(config, state, hf_cfg, hf_state) -> float:
    """Max |logits difference| between MoCGPTModel with `state` and the HF model (our own
    copy of modeling_moc.py, not the directory's) with `hf_state`, fp32."""
    from megatron_moc.hf.modeling_moc import MegatronMoCForCausalLM
    from tools.convert_to_hf import build_reference, compare_logits

    reference = build_reference(config, state)
    hf_model = MegatronMoCForCausalLM(hf_cfg).float()
    hf_model.load_state_dict({k: v.float() for k, v in hf_state.items()}, strict=True)
    return compare_logits(reference, hf_model.to(next(reference.parameters()).device).eval(),
                          config.vocab_size)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf", required=True, help="Hugging Face directory (our export)")
    parser.add_argument("--output", required=True, help="model directory to write")
    parser.add_argument("--no-verify", action="store_true", help="skip the logits comparison")
    args = parser.parse_args(argv)
    try:
        convert_from_hf(args.hf, args.output, verify=not args.no_verify)
    except (ValueError, KeyError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {args.output} (start training from it with train.init_from={args.output})")


if __name__ == "__main__":
    main()
