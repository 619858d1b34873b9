"""MoCGPTModel state dict <-> Hugging Face `MegatronMoCForCausalLM` state dict, and the files.

Names (per layer l; Megatron's fused, stacked parameters on the left):
    embedding.word_embeddings.weight          model.embed_tokens.weight (also the LM head)
    decoder.final_layernorm.weight            model.norm.weight
    decoder.layers.l.input_layernorm          model.layers.l.input_layernorm
    self_attention.linear_qkv [G(H/G+2)Dh, D] self_attn.{q,k,v}_proj (per-query-group layout
                                              [q_1..q_{H/G}, k, v] of each group split apart)
    self_attention.linear_proj                self_attn.o_proj
    self_attention.{q,k}_layernorm            self_attn.{q,k}_norm
    pre_mlp_layernorm                         post_attention_layernorm
    mlp.router.weight [E, D]                  mlp.gate.weight
    mlp.experts.w13 [E, D, 2F]                mlp.experts.e.gate_proj.weight = w13[e, :, :F]ᵀ,
                                              mlp.experts.e.up_proj.weight = w13[e, :, F:]ᵀ
    mlp.experts.w2 [E, F, D]                  mlp.experts.e.down_proj.weight = w2[e]ᵀ
    mlp.experts.norm_weight [E, D]            mlp.experts.e.norm.weight
    mlp.experts.step_gate_{weight,bias}       mlp.experts.e.step_gate.{weight,bias}
    mlp.combiner.*                            mlp.collab.* (same names below)
    mlp.o_proj                                mlp.o_proj
    mlp.ffn.* (dense / irl_only, E = 1)       mlp.{gate,up,down}_proj, mlp.norm, mlp.step_gate
Every key is mapped or refused: leftovers on either side fail with their names.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch

from megatron_moc.config import MoCConfig

Tensor = torch.Tensor
HF_FILES = ("configuration_moc.py", "modeling_moc.py")
# MoCConfig field <- HF config field, for every field that changes the function.
ARCH_FIELDS = {
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads", "num_query_groups": "num_key_value_heads",
    "kv_channels": "head_dim", "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings", "rotary_base": "rope_theta",
    "layernorm_epsilon": "rms_norm_eps", "init_method_std": "initializer_range",
    "moc_model_kind": "moc_model_kind", "moc_capacity_factor": "capacity_factor",
    "moc_irl_steps": "irl_steps", "moc_adaptive_steps": "adaptive_steps",
    "moc_adaptive_mode": "adaptive_mode", "moc_step_gate_temperature": "step_gate_temperature",
    "moc_collab_rounds": "collab_rounds", "moc_adaptive_rounds": "adaptive_rounds",
    "moc_round_gate_temperature": "round_gate_temperature", "moc_feedback": "feedback",
    "moc_mediator_vector": "mediator_vector", "moc_value_rank": "value_rank",
}
EXPERT_FIELDS = {"num_moe_experts": "num_experts", "moe_router_topk": "num_experts_per_tok"}


# ----------------------------------------------------------------------------- config
def hf_config_from_moc(cfg: MoCConfig, **token_ids):
    """The HF config of `cfg` (token ids: bos_token_id / eos_token_id / pad_token_id)."""
    from megatron_moc.hf.configuration_moc import MODEL_KINDS, MegatronMoCConfig

    if cfg.moc_model_kind not in MODEL_KINDS:
        raise ValueError(f"moc_model_kind {cfg.moc_model_kind!r} has no Hugging Face export "
                         f"(supported: {', '.join(MODEL_KINDS)})")
    values = {hf: getattr(cfg, ours) for ours, hf in ARCH_FIELDS.items()}
    # Megatron builds RoPE with int(rotary_base) (model/gpt.py): export what it computes.
    values["rope_theta"] = float(int(cfg.rotary_base))
    values["head_dim"] = cfg.head_dim
    if cfg.has_experts:
        values.update({hf: getattr(cfg, ours) for ours, hf in EXPERT_FIELDS.items()})
    values["intermediate_size"] = (cfg.moe_ffn_hidden_size if cfg.has_experts
                                   else cfg.ffn_hidden_size)
    training = cfg.to_dict()
    training.update(tensor_model_parallel_size=1, expert_model_parallel_size=1,
                    sequence_parallel=False)
    hf = MegatronMoCConfig(**values, training_config=training, **token_ids,
                           architectures=["MegatronMoCForCausalLM"])
    hf.auto_map = {"AutoConfig": "configuration_moc.MegatronMoCConfig",
                   "AutoModel": "modeling_moc.MegatronMoCModel",
                   "AutoModelForCausalLM": "modeling_moc.MegatronMoCForCausalLM"}
    return hf


def moc_config_from_hf(hf, **overrides) -> MoCConfig:
    """MoCConfig of an HF config: its `training_config`, the architecture fields from the HF
    fields (so an edited config.json wins), TP = EP = 1, fp32, CPU init."""
    values = dict(getattr(hf, "training_config", None) or {})
    values.update({ours: getattr(hf, h) for ours, h in ARCH_FIELDS.items()})
    if hf.moc_model_kind in ("moe", "collab_only", "moc"):
        values.update({ours: getattr(hf, h) for ours, h in EXPERT_FIELDS.items()})
        values["moe_ffn_hidden_size"] = hf.intermediate_size
        values.setdefault("ffn_hidden_size", hf.intermediate_size)
    else:
        values["ffn_hidden_size"] = hf.intermediate_size
        values["num_moe_experts"] = values["moe_ffn_hidden_size"] = None
    values.update(tensor_model_parallel_size=1, expert_model_parallel_size=1,
                  sequence_parallel=False, bf16=False, fp16=False)
    values.update(overrides)
    unknown = sorted(set(values) - set(MoCConfig.yaml_fields()))
    if unknown:
        raise ValueError(f"config.json training_config: unknown MoCConfig field(s) {unknown}")
    return MoCConfig(**values, params_dtype=torch.float32, use_cpu_initialization=True)


# ----------------------------------------------------------------------------- weights
class _Keys:
    """A dict that must be consumed completely: `take` pops, `done` names the leftovers."""

    def __init__(self, state: Dict[str, Tensor], source: str):
        self.state, self.source = dict(state), source

    def take(self, key: str) -> Tensor:
        if key not in self.state:
            raise KeyError(f"{self.source}: missing key {key!r}")
        return self.state.pop(key)

    def take_prefix(self, prefix: str) -> Dict[str, Tensor]:
        found = {k[len(prefix):]: self.state.pop(k) for k in list(self.state) if k.startswith(prefix)}
        return found

    def done(self) -> None:
        if self.state:
            left = sorted(self.state)
            raise KeyError(f"{self.source}: unmapped key(s) {left[:8]}{' ...' if len(left) > 8 else ''}")


def _c(t: Tensor) -> Tensor:
    return t.detach().contiguous().clone()


def to_hf_state(state: Dict[str, Tensor], cfg: MoCConfig) -> Dict[str, Tensor]:
    """MoCGPTModel parameters (TP = EP = 1) → HF names and layouts."""
    src, out = _Keys(state, "megatron_moc state"), {}
    H, G, Dh = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    out["model.embed_tokens.weight"] = _c(src.take("embedding.word_embeddings.weight"))
    out["model.norm.weight"] = _c(src.take("decoder.final_layernorm.weight"))
    for l in range(cfg.num_layers):
        ours, hf = f"decoder.layers.{l}.", f"model.layers.{l}."
        out[hf + "input_layernorm.weight"] = _c(src.take(ours + "input_layernorm.weight"))
        out[hf + "post_attention_layernorm.weight"] = _c(src.take(ours + "pre_mlp_layernorm.weight"))
        qkv = src.take(ours + "self_attention.linear_qkv.weight")
        qkv = qkv.view(G, H // G + 2, Dh, qkv.shape[-1])
        out[hf + "self_attn.q_proj.weight"] = _c(qkv[:, :H // G].reshape(H * Dh, -1))
        out[hf + "self_attn.k_proj.weight"] = _c(qkv[:, H // G].reshape(G * Dh, -1))
        out[hf + "self_attn.v_proj.weight"] = _c(qkv[:, H // G + 1].reshape(G * Dh, -1))
        out[hf + "self_attn.o_proj.weight"] = _c(src.take(ours + "self_attention.linear_proj.weight"))
        out[hf + "self_attn.q_norm.weight"] = _c(src.take(ours + "self_attention.q_layernorm.weight"))
        out[hf + "self_attn.k_norm.weight"] = _c(src.take(ours + "self_attention.k_layernorm.weight"))
        if cfg.has_experts:
            out[hf + "mlp.gate.weight"] = _c(src.take(ours + "mlp.router.weight"))
            out[hf + "mlp.o_proj.weight"] = _c(src.take(ours + "mlp.o_proj.weight"))
            for e, expert in enumerate(_split_experts(src, ours + "mlp.experts.", cfg)):
                out.update({f"{hf}mlp.experts.{e}.{k}": v for k, v in expert.items()})
            for k, v in src.take_prefix(ours + "mlp.combiner.").items():
                out[hf + "mlp.collab." + k] = _c(v)
        else:
            (expert,) = _split_experts(src, ours + "mlp.ffn.", cfg)
            out.update({hf + "mlp." + k: v for k, v in expert.items()})
    src.done()
    return out


def _split_experts(src: _Keys, prefix: str, cfg: MoCConfig):
    w13, w2 = src.take(prefix + "w13"), src.take(prefix + "w2")
    norm = src.take(prefix + "norm_weight")
    Fh = w2.shape[1]
    gate_w = src.take(prefix + "step_gate_weight") if cfg.adaptive_steps_on else None
    gate_b = src.take(prefix + "step_gate_bias") if cfg.adaptive_steps_on else None
    for e in range(w13.shape[0]):
        expert = {"gate_proj.weight": _c(w13[e, :, :Fh].t()), "up_proj.weight": _c(w13[e, :, Fh:].t()),
                  "down_proj.weight": _c(w2[e].t()), "norm.weight": _c(norm[e])}
        if gate_w is not None:
            expert["step_gate.weight"], expert["step_gate.bias"] = _c(gate_w[e]), _c(gate_b[e])
        yield expert


def from_hf_state(hf_state: Dict[str, Tensor], cfg: MoCConfig) -> Dict[str, Tensor]:
    """HF names and layouts → MoCGPTModel parameters (TP = EP = 1)."""
    src, out = _Keys(hf_state, "Hugging Face state"), {}
    H, G, Dh = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    out["embedding.word_embeddings.weight"] = _c(src.take("model.embed_tokens.weight"))
    out["decoder.final_layernorm.weight"] = _c(src.take("model.norm.weight"))
    for l in range(cfg.num_layers):
        ours, hf = f"decoder.layers.{l}.", f"model.layers.{l}."
        out[ours + "input_layernorm.weight"] = _c(src.take(hf + "input_layernorm.weight"))
        out[ours + "pre_mlp_layernorm.weight"] = _c(src.take(hf + "post_attention_layernorm.weight"))
        q, k, v = (src.take(hf + f"self_attn.{n}_proj.weight") for n in "qkv")
        D = q.shape[-1]
        out[ours + "self_attention.linear_qkv.weight"] = _c(torch.cat(
            [q.reshape(G, H // G, Dh, D), k.reshape(G, 1, Dh, D), v.reshape(G, 1, Dh, D)],
            dim=1).reshape(-1, D))
        out[ours + "self_attention.linear_proj.weight"] = _c(src.take(hf + "self_attn.o_proj.weight"))
        out[ours + "self_attention.q_layernorm.weight"] = _c(src.take(hf + "self_attn.q_norm.weight"))
        out[ours + "self_attention.k_layernorm.weight"] = _c(src.take(hf + "self_attn.k_norm.weight"))
        if cfg.has_experts:
            out[ours + "mlp.router.weight"] = _c(src.take(hf + "mlp.gate.weight"))
            out[ours + "mlp.o_proj.weight"] = _c(src.take(hf + "mlp.o_proj.weight"))
            prefixes = [f"{hf}mlp.experts.{e}." for e in range(cfg.num_moe_experts)]
            out.update(_stack_experts(src, prefixes, ours + "mlp.experts.", cfg))
            for k, v in src.take_prefix(hf + "mlp.collab.").items():
                out[ours + "mlp.combiner." + k] = _c(v)
        else:
            out.update(_stack_experts(src, [hf + "mlp."], ours + "mlp.ffn.", cfg))
    src.done()
    return out


def _stack_experts(src: _Keys, prefixes, ours: str, cfg: MoCConfig) -> Dict[str, Tensor]:
    def stack(name, fn=lambda t: t):
        return torch.stack([fn(src.take(p + name)) for p in prefixes]).contiguous()

    out = {ours + "w13": torch.cat([stack("gate_proj.weight", lambda t: t.t()),
                                    stack("up_proj.weight", lambda t: t.t())], dim=-1).contiguous(),
           ours + "w2": stack("down_proj.weight", lambda t: t.t()),
           ours + "norm_weight": stack("norm.weight")}
    if cfg.adaptive_steps_on:
        out[ours + "step_gate_weight"] = stack("step_gate.weight")
        out[ours + "step_gate_bias"] = stack("step_gate.bias")
    return out


def check_state(state: Dict[str, Tensor], expected: Dict[str, torch.Size], source: str) -> None:
    """Same keys and shapes as `expected`, or an error naming the first differences."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        raise KeyError(f"{source}: missing key(s) {missing[:8]}")
    if unexpected:
        raise KeyError(f"{source}: unexpected key(s) {unexpected[:8]}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise ValueError(f"{source}: {key!r} has shape {tuple(state[key].shape)}, the model "
                             f"expects {tuple(shape)}")


# ----------------------------------------------------------------------------- HF files
def read_safetensors_dir(path: str) -> Dict[str, Tensor]:
    """All tensors of `model.safetensors` or of the shards named by
    `model.safetensors.index.json`; a missing shard or key fails naming it."""
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        state = {}
        for shard in sorted(set(weight_map.values())):
            file = os.path.join(path, shard)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{path}: missing shard {shard} (named in "
                                        "model.safetensors.index.json)")
            state.update(load_file(file))
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise KeyError(f"{path}: key(s) {absent[:5]} listed in the index are in no shard")
        return state
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{path}: neither model.safetensors nor "
                                "model.safetensors.index.json")
    return load_file(single)


def copy_code(out_dir: str) -> None:
    """configuration_moc.py and modeling_moc.py next to the weights (trust_remote_code)."""
    import shutil

    here = os.path.dirname(os.path.abspath(__file__))
    for name in HF_FILES:
        shutil.copyfile(os.path.join(here, name), os.path.join(out_dir, name))


def save_hf(state: Dict[str, Tensor], cfg: MoCConfig, out_dir: str,
            tokenizer: Optional[str] = None, dtype: Optional[torch.dtype] = None,
            max_shard_size: str = "2GB") -> None:
    """Write an HF model directory from a full MoCGPTModel state dict: config.json (auto_map),
    the two code files, safetensors shards + index, generation_config.json and, when
    `tokenizer` (a SentencePiece .model) is given, the tokenizer."""
    from transformers import GenerationConfig

    from megatron_moc.hf.modeling_moc import MegatronMoCForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    ids = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)  # tools/train_tokenizer.py's
    if tokenizer is not None:
        from megatron_moc.hf.tokenizer import save_hf_tokenizer

        tok = save_hf_tokenizer(tokenizer, out_dir, cfg.max_position_embeddings)
        ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                   eos_token_id=tok.eos_token_id)
    hf_cfg = hf_config_from_moc(cfg, **ids)
    hf_state = to_hf_state(state, cfg)
    if dtype is not None:
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
    saved_dtype = str(next(iter(hf_state.values())).dtype).replace("torch.", "")
    if "dtype" in getattr(type(hf_cfg), "__dataclass_fields__", {}):  # transformers 5
        hf_cfg.dtype = saved_dtype
    else:
        hf_cfg.torch_dtype = saved_dtype
    with torch.device("meta"):
        skeleton = MegatronMoCForCausalLM(hf_cfg)
    check_state(hf_state, {k: p.shape for k, p in skeleton.state_dict().items()},
                "converted state")
    _save_shards(hf_state, out_dir, max_shard_size)
    hf_cfg.save_pretrained(out_dir)
    GenerationConfig(**ids).save_pretrained(out_dir)
    copy_code(out_dir)


def _save_shards(state: Dict[str, Tensor], out_dir: str, max_shard_size: str) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for name in os.listdir(out_dir):  # a previous export's shards must not linger
        if name.startswith("model") and name.endswith((".safetensors", ".safetensors.index.json")):
            os.remove(os.path.join(out_dir, name))
    for file, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, os.path.join(out_dir, file),
                  metadata={"format": "pt"})
    if split.is_sharded:
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename},
                      f, indent=2)
