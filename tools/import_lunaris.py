"""Import a checkpoint of the research code ("lunaris") into a megatron_moc model directory.

    python tools/import_lunaris.py --ckpt latest_checkpoint.pt --out models/imported

The research checkpoint is a torch.save dict: `model` = state dict (keys possibly prefixed
`_orig_mod.` or `module.`), `config['model']` = the model fields (MOC_MATH.md, "Reference
parameter names"). It is read with `torch.load(weights_only=True)`: no code is unpickled.
Every key is mapped or refused: a missing key, a wrong shape, an unmapped key or an unknown
config field stops the import with a message that names it. The output is `config.yaml` +
`model.safetensors` (megatron_moc.model.io), and the import ends by comparing nothing itself:
tests/unit/test_import_lunaris.py compares logits against the reference.
"""

import argparse
import os
import sys
from typing import Any, Dict, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_moc.config import MoCConfig  # noqa: E402

# research field -> MoCConfig field
FIELD_MAP = {
    "d_model": "hidden_size", "n_layers": "num_layers", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_query_groups", "vocab_size": "vocab_size", "multiple_of": "moc_multiple_of",
    "ffn_hidden_multiplier": "moc_ffn_mult", "max_seq_len": "max_position_embeddings",
    "rope_theta": "rotary_base", "top_k": "moe_router_topk",
    "aux_loss_weight": "moe_aux_loss_coeff", "capacity_factor": "moc_capacity_factor",
    "router_z_loss_weight": "moe_z_loss_coeff", "router_noise_std": "moc_router_noise_std",
    "drop_penalty_weight": "moc_drop_loss_coeff", "moc_collab_steps": "moc_collab_rounds",
    "moc_use_mediator": "moc_mediator_vector", "moc_expert_feedback": "moc_feedback",
    "moc_low_rank_message_dim": "moc_value_rank", "n_reasoning_steps": "moc_irl_steps",
    "adaptive_reasoning": "moc_adaptive_steps", "adaptive_collaboration": "moc_adaptive_rounds",
    "adaptive_compute_mode": "moc_adaptive_mode",
    "reasoning_gate_temperature": "moc_step_gate_temperature",
    "reasoning_step_penalty_weight": "moc_step_penalty_coeff",
    "collaboration_gate_temperature": "moc_round_gate_temperature",
    "collaboration_step_penalty_weight": "moc_round_penalty_coeff",
}
# Fields that only steer the research code's engineering (checkpointing, logging, training-time
# noise on the gates): they do not change the function the weights compute.
IGNORED_FIELDS = {
    "use_gradient_checkpointing", "grad_ckpt_policy", "save_attn_weights", "track_routing_stats",
    "return_routing_diagnostics", "moc_collab_heads", "simple_collab_dropout",
    "reasoning_gate_noise_std", "collaboration_gate_noise_std",
    # The research's MoE preset sets it; it only acts when use_moc_collab=False, where it
    # selects the weighted sum that kind 'moe' computes anyway.
    "use_simple_collab",
}
# Fields of later research versions that change the math; accepted only at these values.
NEUTRAL_FIELDS = {
    "dropout": 0.0, "moc_collab_dropout": 0.0,
    "irl_momentum_beta": 0.0, "use_fuse_conf": False, "use_fuse_delta": False,
    "aggressive_router_quant_bits": 0, "aggressive_ffn_quant_bits": 0,
}


def config_from_research(fields: Dict[str, Any], source: str = "checkpoint", **overrides) -> MoCConfig:
    """Map `config['model']` of a research checkpoint to a MoCConfig (model kind included)."""
    values: Dict[str, Any] = {}
    for name, value in fields.items():
        if name in FIELD_MAP:
            values[FIELD_MAP[name]] = value
        elif name in NEUTRAL_FIELDS:
            if value != NEUTRAL_FIELDS[name]:
                raise ValueError(f"{source}: config field {name}={value!r} is not supported "
                                 f"(only {NEUTRAL_FIELDS[name]!r}; MOC_MATH.md has no such term)")
        elif name not in IGNORED_FIELDS and name != "n_experts" and name != "use_moc_collab":
            raise ValueError(f"{source}: unknown config field {name!r}")
    n_experts = fields.get("n_experts", 8)
    steps = int(fields.get("n_reasoning_steps", 1))
    collab = bool(fields.get("use_moc_collab", True))
    if not n_experts:
        kind = "dense" if steps == 1 else "irl_only"
    elif not collab:
        if steps != 1:
            raise ValueError(f"{source}: use_moc_collab=False with n_reasoning_steps={steps} "
                             "(an IRL MoE without mediator) has no model kind here")
        kind = "moe"
    else:
        kind = "moc" if steps > 1 else "collab_only"
    values.update(moc_model_kind=kind, num_moe_experts=n_experts or None)
    values.update(overrides)
    return MoCConfig(**values)


def strip_prefixes(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _qkv_to_megatron(w: torch.Tensor, cfg: MoCConfig) -> torch.Tensor:
    """Research wqkv rows are [all q heads; all k heads; all v heads]; Megatron's linear_qkv
    interleaves per query group: [q heads of group g; k_g; v_g] for g = 0..ng-1."""
    nh, ng, hd = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    q, k, v = w.split([nh * hd, ng * hd, ng * hd], dim=0)
    q = q.reshape(ng, nh // ng * hd, -1)
    k, v = k.reshape(ng, hd, -1), v.reshape(ng, hd, -1)
    return torch.cat([q, k, v], dim=1).reshape(-1, w.shape[-1])


def convert_state_dict(state: Dict[str, torch.Tensor], cfg: MoCConfig,
                       source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Research state dict → our parameter names and layouts. Consumes every key or fails."""
    state = dict(strip_prefixes(state))
    out: Dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise KeyError(f"{source}: missing key {key!r}")
        return state.pop(key)

    wte = take("transformer.wte.weight")
    lm_head = state.pop("lm_head.weight", None)
    if lm_head is not None and lm_head.shape != wte.shape:
        raise ValueError(f"{source}: lm_head.weight {tuple(lm_head.shape)} is not tied to "
                         f"transformer.wte.weight {tuple(wte.shape)}")
    out["embedding.word_embeddings.weight"] = wte
    out["decoder.final_layernorm.weight"] = take("transformer.ln_f.weight")
    E, S, R = cfg.num_moe_experts, cfg.moc_irl_steps, cfg.moc_collab_rounds
    for i in range(cfg.num_layers):
        src, dst = f"transformer.h.{i}.", f"decoder.layers.{i}."
        out[dst + "input_layernorm.weight"] = take(src + "attn_norm.weight")
        out[dst + "self_attention.linear_qkv.weight"] = _qkv_to_megatron(
            take(src + "attention.wqkv.weight"), cfg)
        out[dst + "self_attention.linear_proj.weight"] = take(src + "attention.o_proj.weight")
        out[dst + "self_attention.q_layernorm.weight"] = take(src + "attention.q_norm.weight")
        out[dst + "self_attention.k_layernorm.weight"] = take(src + "attention.k_norm.weight")
        out[dst + "pre_mlp_layernorm.weight"] = take(src + "ffn_norm.weight")
        ff, mlp = src + "feed_forward.", dst + "mlp."
        if not cfg.has_experts:
            _convert_experts(take, [ff], mlp + "ffn.", cfg, out)
            continue
        out[mlp + "router.weight"] = take(ff + "gate.weight")
        _convert_experts(take, [f"{ff}experts.{e}." for e in range(E)], mlp + "experts.", cfg, out)
        out[mlp + "o_proj.weight"] = take(ff + "o_proj.weight")
        if cfg.has_mediator and R > 0:
            _convert_mediator(take, state, ff, mlp + "combiner.", cfg, out)
        else:  # the research code builds these modules even where its forward skips them
            for key in [k for k in state if k.startswith(ff)]:
                state.pop(key)
    if state:
        raise KeyError(f"{source}: unmapped key(s) {sorted(state)[:5]}")
    return out


def _convert_experts(take, prefixes, dst: str, cfg: MoCConfig, out) -> None:
    out[dst + "w13"] = torch.stack([take(p + "w13.weight").t() for p in prefixes])
    out[dst + "w2"] = torch.stack([take(p + "w2.weight").t() for p in prefixes])
    out[dst + "norm_weight"] = torch.stack([take(p + "norm.weight") for p in prefixes])
    if cfg.adaptive_steps_on:
        out[dst + "step_gate_weight"] = torch.stack([take(p + "step_gate.weight") for p in prefixes])
        out[dst + "step_gate_bias"] = torch.stack([take(p + "step_gate.bias") for p in prefixes])


def _convert_mediator(take, state, ff: str, dst: str, cfg: MoCConfig, out) -> None:
    names = ["med_context.weight", "mediator_norm.weight", "expert_norm.weight", "med_q.weight",
             "exp_k.weight", "med_mlp.0.weight", "med_mlp.1.weight", "med_mlp.3.weight",
             "fuse_gate.weight", "fuse_gate.bias"]
    if cfg.moc_mediator_vector:
        names.append("mediator")
    elif ff + "mediator" in state:
        state.pop(ff + "mediator")  # moc_use_mediator=False: built by the research, unused
    if cfg.moc_feedback:
        names += ["med_to_exp.weight", "exp_feedback_e.weight", "exp_feedback_e.bias",
                  "exp_feedback_m.weight"]
    if cfg.adaptive_rounds_on:
        names += ["collab_step_gate.weight", "collab_step_gate.bias"]
    for name in names:
        out[dst + name] = take(ff + name)
    if 0 < cfg.moc_value_rank < cfg.hidden_size:
        out[dst + "exp_v.0.weight"] = take(ff + "exp_v_down.weight")
        out[dst + "exp_v.1.weight"] = take(ff + "exp_v_up.weight")
    else:
        out[dst + "exp_v.weight"] = take(ff + "exp_v.weight")


def load_research_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path}: not a research checkpoint (expected keys 'model' and 'config')")
    fields = ckpt["config"].get("model") if isinstance(ckpt["config"], dict) else None
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: config['model'] is missing")
    return ckpt["model"], fields


def import_checkpoint(path: str, **config_overrides):
    """Returns (model, config) with the research weights loaded."""
    from megatron_moc.model.gpt import build_model
    from megatron_moc.model.io import load_model_state

    state, fields = load_research_checkpoint(path)
    cfg = config_from_research(fields, source=path, **config_overrides)
    model = build_model(cfg)
    load_model_state(model, convert_state_dict(state, cfg, source=path), source=path)
    return model, cfg


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="research latest_checkpoint.pt")
    parser.add_argument("--out", required=True, help="output model directory")
    args = parser.parse_args(argv)
    from megatron_moc.model.io import save_model_dir
    from megatron_moc.model.params import count_model_parameters
    from megatron_moc.parallel.cpu_compat import enable_cpu_compat
    from megatron_moc.parallel.groups import init_single_process

    enable_cpu_compat()
    init_single_process()
    model, cfg = import_checkpoint(args.ckpt, use_cpu_initialization=True)
    save_model_dir(model, cfg, args.out)
    counts = count_model_parameters(model, cfg.num_moe_experts or 0,
                                    cfg.moe_router_topk if cfg.has_experts else 0)
    print(f"imported {args.ckpt} ({cfg.moc_model_kind}, {counts}) -> {args.out}")


if __name__ == "__main__":
    main()
