"""Hugging Face model of megatron_moc: MoCGPTModel's inference in plain PyTorch (MOC_MATH.md).

Self-contained (imports torch, transformers and the standard library only): this file is
copied next to the weights of every exported model and loaded with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` (checked with
transformers 4.57.1 and 5.24). Legend: B batch, T sequence, N = B·T tokens, K slots,
E experts, D hidden, F ffn size, S IRL steps, R rounds, H heads, G kv heads, Dh head dim.

It computes what the training model computes, including its conventions:
- Tokens are routed in Megatron's order (sequence-major, [T, B] flattened), so capacity
  ties break as in training.
- RoPE as Megatron-core's RotaryEmbedding computes it with `rotary_interleaved=True`,
  `rotary_percent=1.0`: inv_freq = 1 / base^(arange(0, Dh, 2) / Dh) in fp32, angles in fp32,
  dims (2i, 2i+1) rotate together, on the output of the per-head QK RMSNorm.
- Router, step / round gates and the mediator's softmax in fp32; every RMSNorm computes in
  fp32 and returns the input's dtype.
- Capacity (MOC_MATH.md §2) is computed from the tokens of *this forward call*: a full
  forward over a batch gives the training model's logits, drops included. With a KV cache
  each decoding step routes only its new tokens (B tokens), so when drops can happen
  (`capacity_factor` > 0) cached decoding may differ from recomputing the whole sequence;
  set `capacity_factor` <= 0 (dropless) for decoding that does not depend on the batch.
Experts are one module each (`mlp.experts.{e}.{gate,up,down}_proj`, Mixtral style); each
expert computes on the rows routed to it (a loop over experts, no loop over tokens).
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_moc import MegatronMoCConfig

try:  # transformers 5: init functions that skip weights already loaded from a checkpoint
    from transformers import initialization as _init
except ImportError:  # transformers 4
    _init = nn.init


# ----------------------------------------------------------------------------- basics
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x²) + eps) * w over the last dim, in fp32 (fp64 stays fp64)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(compute)).to(x.dtype)


def _gate_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class MoCRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def step_activity(logits_NJ: torch.Tensor, temperature: float, mode: str):
    """q = softmax(logits / τ) over {0..S}; soft: a_s = Σ_{j≥s} q_j, hard: 1[argmax q ≥ s].
    Returns activity [N, S] (gate dtype)."""
    q = torch.softmax(logits_NJ / temperature, dim=-1)
    if mode == "hard":
        steps = torch.arange(q.shape[-1], device=q.device, dtype=q.dtype)
        return (q.argmax(-1, keepdim=True) >= steps[1:]).to(q.dtype)
    return q[:, 1:].flip(-1).cumsum(-1).flip(-1)


def apply_rope_interleaved(t_BHTD: torch.Tensor, angles_BTd: torch.Tensor) -> torch.Tensor:
    """Megatron's RoPE with rotary_interleaved=True: (t·cos + rotate(t)·sin), rotate pairs
    (x_{2i}, x_{2i+1}) → (−x_{2i+1}, x_{2i}); angles fp32 [B, T, Dh/2]."""
    emb = angles_BTd.repeat_interleave(2, dim=-1).unsqueeze(1)          # [B, 1, T, Dh]
    cos, sin = torch.cos(emb).to(t_BHTD.dtype), torch.sin(emb).to(t_BHTD.dtype)
    rotated = torch.stack((-t_BHTD[..., 1::2], t_BHTD[..., 0::2]), dim=-1).flatten(-2)
    return t_BHTD * cos + rotated * sin


def rope_angles(position_ids_BT: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """fp32 angles [B, T, Dh/2] = position · inv_freq, inv_freq exactly as Megatron makes it."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                            device=position_ids_BT.device) / head_dim))
    return position_ids_BT.to(torch.float32).unsqueeze(-1) * inv_freq


# ----------------------------------------------------------------------------- attention
class MoCAttention(nn.Module):
    """GQA self-attention: q/k/v projections, per-head QK RMSNorm, RoPE, causal SDPA, o_proj."""

    def __init__(self, config: MegatronMoCConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, D = config.head_dim, config.hidden_size
        self.q_proj = nn.Linear(D, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(D, self.num_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(D, self.num_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, D, bias=False)
        self.q_norm = MoCRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = MoCRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x_BTD, angles_BTd, mask, cache):
        B, T, _ = x_BTD.shape
        q = self.q_norm(self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x_BTD).view(B, T, self.num_kv, self.head_dim))
        v = self.v_proj(x_BTD).view(B, T, self.num_kv, self.head_dim)
        q = apply_rope_interleaved(q.transpose(1, 2), angles_BTd)           # [B, H, T, Dh]
        k = apply_rope_interleaved(k.transpose(1, 2), angles_BTd)           # [B, G, T, Dh]
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.num_kv != self.num_heads:  # query head i reads kv head i // (H / G)
            rep = self.num_heads // self.num_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        causal = isinstance(mask, str)  # "causal": no cache, no padding: SDPA's own causal path
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask,
                                             is_causal=causal)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


# ----------------------------------------------------------------------------- FFN / experts
class MoCIRLExpert(nn.Module):
    """A SwiGLU FFN run S times with shared weights (MOC_MATH.md §3):
    h_s = h_{s-1} + a_s·α·FFN(RMSNorm(h_{s-1} + x)), h_0 = x, α = 1/sqrt(S).
    The dense FFN of `dense` / `irl_only` models is one of these too."""

    def __init__(self, config: MegatronMoCConfig):
        super().__init__()
        D, Fh, S = config.hidden_size, config.intermediate_size, config.irl_steps
        self.gate_proj = nn.Linear(D, Fh, bias=False)
        self.up_proj = nn.Linear(D, Fh, bias=False)
        self.down_proj = nn.Linear(Fh, D, bias=False)
        self.norm = MoCRMSNorm(D, config.rms_norm_eps)
        self.step_gate = nn.Linear(D, S + 1, bias=True) if config.adaptive_steps_on else None
        self.steps, self.alpha = S, 1.0 / math.sqrt(S)
        self.hard = config.adaptive_mode == "hard" and self.step_gate is not None
        self.temperature, self.mode = config.step_gate_temperature, config.adaptive_mode

    def ffn(self, z_PD):
        return self.down_proj(F.silu(self.gate_proj(z_PD)) * self.up_proj(z_PD))

    def forward(self, x_PD: torch.Tensor) -> torch.Tensor:
        P, dt = x_PD.shape[0], _gate_dtype(x_PD)
        if self.step_gate is None:
            activity_PS = x_PD.new_ones(P, self.steps, dtype=dt)
        else:  # fp32 gate
            logits = F.linear(x_PD.to(dt), self.step_gate.weight.to(dt), self.step_gate.bias.to(dt))
            activity_PS = step_activity(logits, self.temperature, self.mode)
        h = x_PD
        for s in range(self.steps):
            a_P1 = (activity_PS[:, s:s + 1] * self.alpha).to(x_PD.dtype)
            if self.hard:  # only the rows still active compute step s
                rows = (activity_PS[:, s] > 0).nonzero(as_tuple=True)[0]
                z = self.norm(h.index_select(0, rows) + x_PD.index_select(0, rows))
                h = h.index_add(0, rows, self.ffn(z) * a_P1.index_select(0, rows))
            else:
                h = h + a_P1 * self.ffn(self.norm(h + x_PD))
        return h


def capacity_keep_mask(experts_NK, logits_NK, num_experts: int, capacity: int):
    """Inside each expert keep the `capacity` pairs with the highest router logit (ties in
    token-major, then slot order). Same algorithm as training (megatron_moc/moc/router.py)."""
    if capacity < 0:
        return torch.ones_like(experts_NK, dtype=torch.bool)
    experts = experts_NK.reshape(-1)
    by_logit = torch.argsort(logits_NK.reshape(-1), descending=True, stable=True)
    by_expert = torch.argsort(experts[by_logit], stable=True)
    order = by_logit[by_expert]
    counts = torch.zeros(num_experts, dtype=torch.long, device=experts.device)
    counts.scatter_add_(0, experts, torch.ones_like(experts))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=experts.device) - starts[experts[order]]
    keep = torch.empty_like(experts, dtype=torch.bool)
    keep[order] = rank < capacity
    return keep.view_as(experts_NK)


def fusion_weights(probs_NK, keep_NK):
    """w_k = p_k·m_k / Σ_k p_k·m_k, 0 for a token with no kept pair."""
    masked = probs_NK * keep_NK.to(probs_NK.dtype)
    denom = masked.sum(-1, keepdim=True)
    return torch.where(denom > 0, masked / torch.where(denom > 0, denom, 1), 0)


def weighted_sum(states_NKD, w_NK):
    return (states_NKD * w_NK.to(states_NKD.dtype).unsqueeze(-1)).sum(1)


def _linear(d_in, d_out, bias=False):
    return nn.Linear(d_in, d_out, bias=bias)


class MoCMediator(nn.Module):
    """R rounds of mediator attention over the K expert states, gated feedback, adaptive
    rounds, then fused = γ·mediator + (1−γ)·ws (MOC_MATH.md §4, §5)."""

    def __init__(self, config: MegatronMoCConfig):
        super().__init__()
        D, R, eps = config.hidden_size, config.collab_rounds, config.rms_norm_eps
        self.rounds, self.config = R, config
        self.mediator = nn.Parameter(torch.zeros(1, D)) if config.mediator_vector else None
        self.med_context = _linear(D, D)
        self.mediator_norm = MoCRMSNorm(D, eps)
        self.expert_norm = MoCRMSNorm(D, eps)
        self.med_q = _linear(D, D)
        self.exp_k = _linear(D, D)
        rank = config.value_rank
        self.exp_v = (nn.Sequential(_linear(D, rank), _linear(rank, D)) if 0 < rank < D
                      else _linear(D, D))
        self.med_mlp = nn.Sequential(_linear(D, D), MoCRMSNorm(D, eps), nn.SiLU(), _linear(D, D))
        if config.feedback:
            self.med_to_exp = _linear(D, D)
            self.exp_feedback_e = _linear(D, 1, bias=True)
            self.exp_feedback_m = _linear(D, 1)
        else:
            self.med_to_exp = None
        self.collab_step_gate = _linear(D, R + 1, bias=True) if config.adaptive_rounds_on else None
        self.fuse_gate = _linear(D, 1, bias=True)

    def round(self, mediator_ND, states_NKD, keep_NK):
        m_norm, e_norm = self.mediator_norm(mediator_ND), self.expert_norm(states_NKD)
        q_ND, k_NKD, v_NKD = self.med_q(m_norm), self.exp_k(e_norm), self.exp_v(e_norm)
        dt = _gate_dtype(states_NKD)  # β in fp32: softmax over the kept experts, renormalized
        scores = (k_NKD * q_ND.unsqueeze(1)).sum(-1).to(dt) / math.sqrt(q_ND.shape[-1])
        beta = torch.softmax(scores.masked_fill(~keep_NK, -1e4), dim=-1) * keep_NK.to(dt)
        denom = beta.sum(-1, keepdim=True)
        beta = torch.where(denom > 0, beta / torch.where(denom > 0, denom, 1), 0)
        msg_ND = (beta.to(v_NKD.dtype).unsqueeze(-1) * v_NKD).sum(1)
        new_mediator = mediator_ND + self.med_mlp(m_norm + msg_ND)
        if self.med_to_exp is None:
            return new_mediator, states_NKD
        feedback_ND = self.med_to_exp(self.mediator_norm(new_mediator))
        gate_NK1 = torch.sigmoid(self.exp_feedback_e(states_NKD)
                                 + self.exp_feedback_m(new_mediator).unsqueeze(1))
        keep = keep_NK.unsqueeze(-1).to(states_NKD.dtype)
        return new_mediator, (states_NKD + gate_NK1 * feedback_ND.unsqueeze(1)) * keep

    def forward(self, x_ND, states_NKD, probs_NK, keep_NK):
        cfg, N, dt = self.config, x_ND.shape[0], _gate_dtype(x_ND)
        w_NK, any_kept = fusion_weights(probs_NK, keep_NK), keep_NK.any(-1)
        context = self.med_context(x_ND.to(states_NKD.dtype))
        if self.mediator is not None:
            mediator = self.mediator.to(states_NKD.dtype) + context
        else:
            mediator = weighted_sum(states_NKD, w_NK) + context
        if self.collab_step_gate is None:
            activity_NR = x_ND.new_ones(N, self.rounds, dtype=dt)
        else:  # fp32 round gate
            g = self.collab_step_gate
            logits = F.linear(x_ND.to(dt), g.weight.to(dt), g.bias.to(dt))
            activity_NR = step_activity(logits, cfg.round_gate_temperature, cfg.adaptive_mode)
        activity_NR = activity_NR * any_kept.unsqueeze(-1).to(dt)
        for r in range(self.rounds):
            new_mediator, new_states = self.round(mediator, states_NKD, keep_NK)
            c = activity_NR[:, r:r + 1].to(states_NKD.dtype)
            mediator = mediator + c * (new_mediator - mediator)
            states_NKD = states_NKD + c.unsqueeze(-1) * (new_states - states_NKD)
        ws = weighted_sum(states_NKD * keep_NK.unsqueeze(-1).to(states_NKD.dtype), w_NK)
        gamma_N1 = torch.sigmoid(self.fuse_gate(x_ND.to(ws.dtype)))
        return gamma_N1 * mediator + (1 - gamma_N1) * ws


class MoCSparseBlock(nn.Module):
    """Router (fp32 top-k + capacity) → IRL experts → [N, K, D] states → mediator + fusion
    (or the weighted sum) → o_proj. Tokens with every pair dropped pass x through."""

    def __init__(self, config: MegatronMoCConfig):
        super().__init__()
        self.config = config
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(MoCIRLExpert(config) for _ in range(self.num_experts))
        self.collab = MoCMediator(config) if config.has_mediator else None
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.transpose(0, 1).reshape(-1, D)  # Megatron's token order: [T, B] flattened
        dt = _gate_dtype(x_ND)
        logits_NE = x_ND.to(dt) @ self.gate.weight.to(dt).t()
        logits_NK, experts_NK = torch.topk(logits_NE, self.top_k, dim=-1)
        probs_NK = torch.softmax(logits_NK, dim=-1)
        keep_NK = capacity_keep_mask(experts_NK, logits_NK, self.num_experts,
                                     self.config.capacity(x_ND.shape[0]))
        states_NKD = x_ND.new_zeros(x_ND.shape[0], self.top_k, D)
        routed = (experts_NK.unsqueeze(-1) == torch.arange(
            self.num_experts, device=x_ND.device)) & keep_NK.unsqueeze(-1)   # [N, K, E]
        for e, expert in enumerate(self.experts):
            n_idx, k_idx = routed[..., e].nonzero(as_tuple=True)
            if n_idx.numel():
                states_NKD[n_idx, k_idx] = expert(x_ND.index_select(0, n_idx))
        if self.collab is not None:
            fused = self.collab(x_ND, states_NKD, probs_NK, keep_NK)
        else:
            fused = weighted_sum(states_NKD, fusion_weights(probs_NK, keep_NK))
        fused = torch.where(keep_NK.any(-1, keepdim=True), fused.to(x_ND.dtype), x_ND)
        return self.o_proj(fused).view(T, B, D).transpose(0, 1)


class MoCDenseFFN(MoCIRLExpert):
    """The FFN slot of `dense` / `irl_only` models: one IRL expert on every token."""

    def forward(self, x_BTD):
        return super().forward(x_BTD.reshape(-1, x_BTD.shape[-1])).view_as(x_BTD)


# ----------------------------------------------------------------------------- model
class MoCDecoderLayer(nn.Module):
    def __init__(self, config: MegatronMoCConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = MoCRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MoCAttention(config, layer_idx)
        self.post_attention_layernorm = MoCRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoCSparseBlock(config) if config.has_experts else MoCDenseFFN(config)

    def forward(self, x_BTD, angles, mask, cache):
        h = x_BTD + self.self_attn(self.input_layernorm(x_BTD), angles, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def _output(cls, cache, **fields):
    """A ModelOutput with the cache under the name this transformers version uses
    (`past_key_values` in 4.x, `cache` in 5.x)."""
    names = {f.name for f in dataclasses.fields(cls)}
    fields["cache" if "cache" in names else "past_key_values"] = cache
    return cls(**fields)


class MegatronMoCPreTrainedModel(PreTrainedModel):
    config_class = MegatronMoCConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoCDecoderLayer"]
    _supports_cache_class = True  # transformers 4: generate may make a DynamicCache
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            _init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, MoCRMSNorm):
            _init.ones_(module.weight)
        elif isinstance(module, MoCMediator) and module.mediator is not None:
            _init.normal_(module.mediator, mean=0.0, std=std)


class MegatronMoCModel(MegatronMoCPreTrainedModel):
    def __init__(self, config: MegatronMoCConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoCDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = MoCRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _mask(self, attention_mask, T: int, past: int, device):
        """"causal" (SDPA's causal path, as in training), None, or a bool mask [B|1, 1, T, past+T]."""
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask  # already expanded by the caller
        padded = attention_mask is not None and not bool(attention_mask.all())
        if not padded:
            if past == 0 and T > 1:
                return "causal"
            if T == 1:
                return None
        q_pos = torch.arange(T, device=device).unsqueeze(1) + past
        k_pos = torch.arange(past + T, device=device).unsqueeze(0)
        mask = (k_pos <= q_pos)[None, None]
        if padded:
            mask = mask & attention_mask[:, None, None, -(past + T):].bool()
            mask = mask | (k_pos == q_pos)[None, None]  # a padded query row still sees itself
        return mask

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        cache = past_key_values if past_key_values is not None else kwargs.get("cache")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MegatronMoCModel: give exactly one of input_ids, inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
        if not use_cache:
            cache = None
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device).unsqueeze(0).expand(B, T)
        angles = rope_angles(position_ids, self.config.head_dim, self.config.rope_theta)
        mask = self._mask(attention_mask, T, past, x.device)
        hidden = (x,) if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, angles, mask, cache)
            if output_hidden_states:
                hidden = hidden + (x,)
        x = self.norm(x)
        if output_hidden_states:
            hidden = hidden[:-1] + (x,)
        out = _output(BaseModelOutputWithPast, cache, last_hidden_state=x, hidden_states=hidden)
        return out if return_dict is not False else out.to_tuple()


class MegatronMoCForCausalLM(MegatronMoCPreTrainedModel, GenerationMixin):
    """Causal LM; the LM head is the (tied) input embedding, so there is no lm_head weight."""

    def __init__(self, config: MegatronMoCConfig):
        super().__init__(config)
        self.model = MegatronMoCModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                output_hidden_states=None, return_dict=None, logits_to_keep=0, **kwargs):
        """Logits [B, T, V] (the last `logits_to_keep` positions when > 0); with `labels`, the
        mean next-token cross-entropy (labels shifted inside, -100 ignored), in fp32."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, return_dict=True,
                         cache=kwargs.get("cache"))
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = F.linear(hidden, self.model.embed_tokens.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        result = _output(CausalLMOutputWithPast, cache, loss=loss, logits=logits,
                         hidden_states=out.hidden_states)
        return result if return_dict is not False else result.to_tuple()
