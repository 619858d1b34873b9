"""Export a training checkpoint (or a model directory) as a Hugging Face model directory.

    python tools/convert_to_hf.py --checkpoint runs/tiny --output hf/tiny --tokenizer data/tok.model
    python tools/convert_to_hf.py --checkpoint runs/tiny/step_300 --output hf/tiny --dtype bfloat16

`--checkpoint` is a save directory (its `latest` tag is read), a tag directory of any TP / EP /
ZeRO layout (megatron_moc/training/checkpoint_reader.py), or a model directory
(`config.yaml` + `model.safetensors`, e.g. from tools/convert_from_hf.py). Written: config.json
(model_type megatron_moc, auto_map), configuration_moc.py + modeling_moc.py, safetensors shards
with model.safetensors.index.json when sharded, generation_config.json, and the tokenizer
(tokenizer.json, tokenizer_config.json, tokenizer.model) when `--tokenizer` is given.
The export ends by loading the directory with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and comparing its fp32
logits with MoCGPTModel's on a random batch (`--no-verify` skips it).
"""

import argparse
import os
import sys
from typing import Dict, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_moc.config import MoCConfig  # noqa: E402

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def load_source(path: str) -> Tuple[MoCConfig, Dict[str, torch.Tensor]]:
    """(config with TP = EP = 1, full state dict) of a training checkpoint or a model dir."""
    from megatron_moc.model.io import CONFIG_FILE, WEIGHTS_FILE

    if os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        from safetensors.torch import load_file

        values = MoCConfig.from_yaml(os.path.join(path, CONFIG_FILE)).to_dict()
        values.update(tensor_model_parallel_size=1, expert_model_parallel_size=1,
                      sequence_parallel=False, bf16=False, fp16=False)
        config = MoCConfig(**values, params_dtype=torch.float32, use_cpu_initialization=True)
        return config, load_file(os.path.join(path, WEIGHTS_FILE))
    from megatron_moc.training.checkpoint_reader import read_training_checkpoint

    return read_training_checkpoint(path)


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def build_reference(config: MoCConfig, state: Dict[str, torch.Tensor]):
    """MoCGPTModel (fp32, eval) holding `state`, in a single-process Megatron world."""
    from megatron_moc.model.gpt import build_model
    from megatron_moc.model.io import load_model_state
    from megatron_moc.parallel.cpu_compat import enable_cpu_compat
    from megatron_moc.parallel.groups import init_single_process

    enable_cpu_compat()
    init_single_process()
    model = build_model(config)
    load_model_state(model, {k: v.float() for k, v in state.items()}, source="checkpoint")
    return model.to(_device()).eval()


@torch.no_grad()
def compare_logits(reference, hf_model, vocab_size: int, batch: int = 2, seq: int = 16,
                   seed: int = 0) -> float:
    """Max |logits difference| of the two models on one random batch (fp32)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=gen).to(_device())
    positions = torch.arange(seq, device=ids.device).unsqueeze(0).expand(batch, seq)
    ours = reference(ids, positions, None).float()
    theirs = hf_model(input_ids=ids, use_cache=False).logits.float()
    return float((ours - theirs).abs().max())


def convert(checkpoint: str, output: str, tokenizer: Optional[str] = None,
            dtype: str = "auto", verify: bool = True, max_shard_size: str = "2GB",
            tolerance: float = 1e-4) -> Optional[float]:
    """Export `checkpoint` to `output`. Returns the verification's max logits difference
    (None with verify=False). Raises ValueError when it exceeds `tolerance`."""
    from megatron_moc.hf.convert import save_hf

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    config, state = load_source(checkpoint)
    if tokenizer is None:
        print("warning: no --tokenizer given: the export has no tokenizer files", file=sys.stderr)
    save_hf(state, config, output, tokenizer=tokenizer, dtype=DTYPES[dtype],
            max_shard_size=max_shard_size)
    if not verify:
        return None
    from transformers import AutoModelForCausalLM

    if DTYPES[dtype] is not None:  # compare with the weights as rounded on export
        state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    reference = build_reference(config, state)
    hf_model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True,
                                                    dtype=torch.float32)
    diff = compare_logits(reference, hf_model.to(_device()).eval(), config.vocab_size)
    if diff > tolerance:
        raise ValueError(f"{output}: logits differ from the checkpoint's by {diff:.3e} "
                         f"(> {tolerance:g}); the export is wrong")
    return diff


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="save dir (reads `latest`), tag dir, or model dir (config.yaml + "
                             "model.safetensors)")
    parser.add_argument("--output", required=True, help="Hugging Face directory to write")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece .model of the run")
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                        help="weights' dtype on disk (auto: as in the checkpoint)")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the final logits comparison")
    args = parser.parse_args(argv)
    try:
        diff = convert(args.checkpoint, args.output, args.tokenizer, args.dtype,
                       not args.no_verify, args.max_shard_size)
    except (ValueError, KeyError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    note = "" if diff is None else f"; logits match the checkpoint (max abs diff {diff:.2e})"
    print(f"wrote {args.output}{note}")


if __name__ == "__main__":
    main()
