"""Test oracle: the MoC language model written straight from /work/shared/design/MOC_MATH.md.

One idea: a slow, plain-PyTorch model that reads like the specification (sections "Block",
1-5, "Model loss", "Defaults", "Reference parameter names"; not the research variants). It
imports nothing from megatron_moc, so the library can be tested against it. It runs in the
parameters' dtype (float32 or float64); the spots the spec marks fp32 (router, adaptive
gates, the mediator's masked softmax) run in promote(dtype, float32), i.e. fp32 or fp64.

Shape legend: B batch, T sequence, N tokens (= B*T), K slots (top-k), E experts, D hidden,
F ffn hidden, S max IRL steps, R max collaboration rounds, H heads, V vocab, M rows given to
one expert.

Config: `ReferenceConfig` uses the field names of the research code's model config
(`LunarisCodexConfig` in github.com/Auren-Research/lunaris, model_moc.py), so a checkpoint's
`config['model']` dict maps onto it one to one. Two fields are this oracle's own
(`moc_layers`, `moc_zero_round_output`, listed in REFERENCE_ONLY_FIELDS) and are not
written into research-format checkpoints.

Model kinds, as the research config expresses them (see `config_for_kind`):
    dense        n_experts = None (or 0, or top_k < 1), n_reasoning_steps = 1: every layer
                 has a SwiGLU FFN (`feed_forward.w13/w2/norm`), no aux loss.
    irl_only     as dense with n_reasoning_steps = S > 1: the dense FFN runs the IRL of
                 section 3 (`feed_forward.step_gate` when adaptive). MOC_MATH "Block" says
                 "dense / IRL-only models use an FFN here". Its step penalty is not added to
                 the loss (the research computes it for dense FFNs but never uses it, and the
                 spec's loss only sums MoC layers' aux).
    moe          n_experts = E, use_moc_collab = False (use_simple_collab = True),
                 n_reasoning_steps = 1: top-k MoE, MoC(x) = W_o*ws.
    moc          n_experts = E, use_moc_collab = True, moc_collab_steps = R, S >= 1.
    collab_only  moc with n_reasoning_steps = 1 (plain one-step experts plus the mediator).
In the research code every layer is of the same kind; `moc_layers` (oracle-only) may name a
subset of layers to be MoC, the rest then being the dense/IRL FFN.

Choices where the spec is silent or ambiguous (all follow the research code unless noted):
- "Original order" of (token, slot) pairs for capacity ties: token-major, then slot k, where
  slot k is the k-th entry of torch.topk (descending logit). Ranking uses the (noisy) router
  logit of the pair.
- mediator_0 without mu: sum_k w_k e_k + W_ctx x with the kept-renormalised weights w_k of
  section 5 (the spec writes weighted_sum(e, p)).
- Round penalty and "average rounds": mean over all N tokens of E[rounds] (the research does
  not exclude all-dropped tokens there, though their c_r is 0). Step penalty and average
  steps: mean over kept pairs. Non-adaptive: E[steps] = S, E[rounds] = R, so a positive
  penalty weight adds the constant w.
- Adaptive gates only exist when S > 1 (resp. R > 1) and the flag is on; gate temperature is
  clamped at 1e-4; optional gate noise (research fields *_gate_noise_std) is added to the gate
  logits in training mode only, like the router noise.
- R = 0 with collaboration on: `moc_zero_round_output = "fused"` (default) reads sections 4-5
  literally: fused = gamma*mediator_0 + (1-gamma)*ws, x for all-dropped tokens.
  "ws" gives W_o*ws (x for all-dropped tokens), which is what the research code computes
  apart from its 0 for all-dropped tokens.
- Hard mode multiplies step/round updates by a 0/1 activity instead of gathering active rows;
  the values are the same and inactive rows get no gradient either way.
- Diagnostics that need a window (Gini, dead experts) are not per call and are left out.
- Dropout fields are accepted and ignored (the oracle is dropout-free); the research's
  fake-quantisation fields must be 0.
- F = multiple_of * ceil((2/3 * ffn_hidden_multiplier * D) / multiple_of) exactly as the spec
  says. NOTE: the research computes int(2 * int(mult * D) / 3) before rounding up, which
  differs when that truncation crosses a multiple (e.g. D=40, mult 4, multiple_of 2: 106 vs
  108); with multiple_of 256 and integer D*mult they agree.

Cross-check (done once by hand, outside this repository; the research code is not imported
here): with lunaris model_moc.py at be575cf in fp32, eval mode, all weights perturbed, logits
agree to 7e-7 and losses to 1e-6 over 20 configurations (soft S 1-3, R 0-2, low rank, no mu,
no feedback, heavy drops, MoE, top_k = E, penalties, non-adaptive, dense, IRL-only, GQA 1).
Two expected differences: (a) hard mode with S >= 2 (experts and dense IRL): the research sets
`h = x` and then updates h in place (`index_copy_`), which overwrites x, so its steps s >= 2
compute RMSNorm_e(2 h_{s-1}) instead of RMSNorm_e(h_{s-1} + x); with `h = x.clone()` it
matches this oracle to 5e-7. (b) R = 0 with drops: research gives 0 for all-dropped tokens.
"""

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

RMS_EPS = 1e-6
REFERENCE_ONLY_FIELDS = ("moc_layers", "moc_zero_round_output")
CHECKPOINT_KEY_PREFIXES = ("_orig_mod.", "module.")


# -----------------------------------------------------------------------------
# Config
# -----------------------------------------------------------------------------
@dataclass
class ReferenceConfig:
    # backbone
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int = 12
    vocab_size: int = 50257
    multiple_of: int = 256
    ffn_hidden_multiplier: float = 4.0
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    dropout: float = 0.0  # ignored by the oracle
    # router (section 1-2)
    n_experts: Optional[int] = 8  # None or 0: dense model
    top_k: int = 2
    aux_loss_weight: float = 1e-2  # w_bal
    capacity_factor: float = 1.25  # <= 0: dropless (this project's addition)
    router_z_loss_weight: float = 1e-3  # w_z
    router_noise_std: float = 0.0
    drop_penalty_weight: float = 1e-3  # w_drop
    # research engineering fields (no effect on the math)
    use_gradient_checkpointing: bool = True
    grad_ckpt_policy: str = "ffn"
    save_attn_weights: bool = False
    # collaboration (section 4)
    use_simple_collab: bool = False  # only meaningful when use_moc_collab is False
    use_moc_collab: bool = True  # collaboration on/off
    simple_collab_dropout: float = 0.1  # ignored
    moc_collab_steps: int = 2  # R
    moc_collab_heads: int = 4  # unused by the research too
    moc_collab_dropout: float = 0.0  # ignored
    moc_use_mediator: bool = True  # learned mu (else weighted sum)
    moc_expert_feedback: bool = True
    moc_low_rank_message_dim: int = 0  # r; 0 (or >= d_model) = full W_v
    # IRL (section 3)
    n_reasoning_steps: int = 1  # S
    # adaptive compute
    adaptive_reasoning: bool = True  # step gate when S > 1
    adaptive_collaboration: bool = True  # round gate when R > 1
    adaptive_compute_mode: str = "soft"  # "soft" | "hard"
    reasoning_gate_temperature: float = 1.0
    reasoning_gate_noise_std: float = 0.0
    reasoning_step_penalty_weight: float = 0.0
    collaboration_gate_temperature: float = 1.0
    collaboration_gate_noise_std: float = 0.0
    collaboration_step_penalty_weight: float = 0.0
    # research diagnostics / experiments
    track_routing_stats: bool = True
    return_routing_diagnostics: bool = False
    aggressive_router_quant_bits: int = 0  # must be 0 here
    aggressive_ffn_quant_bits: int = 0  # must be 0 here
    # oracle-only (not written to research checkpoints)
    moc_layers: Optional[List[int]] = None  # None: all layers MoC when n_experts > 0
    moc_zero_round_output: str = "fused"  # R = 0 with collaboration: "fused" | "ws"

    def __post_init__(self):
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError("d_model must divide by n_heads and n_heads by n_kv_heads")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head_dim = d_model / n_heads must be even for RoPE")
        if self.has_experts and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..n_experts={self.n_experts}")
        if self.adaptive_compute_mode not in ("soft", "hard"):
            raise ValueError("adaptive_compute_mode must be 'soft' or 'hard'")
        if self.aggressive_router_quant_bits or self.aggressive_ffn_quant_bits:
            raise ValueError("fake quantisation is not part of MOC_MATH.md; set *_quant_bits=0")
        if self.moc_zero_round_output not in ("fused", "ws"):
            raise ValueError("moc_zero_round_output must be 'fused' or 'ws'")

    @property
    def has_experts(self) -> bool:
        return self.n_experts is not None and self.n_experts > 0 and self.top_k >= 1

    def is_moc_layer(self, i: int) -> bool:
        if not self.has_experts:
            return False
        return self.moc_layers is None or i in self.moc_layers

    @property
    def num_moc_layers(self) -> int:
        return sum(self.is_moc_layer(i) for i in range(self.n_layers))

    def research_dict(self) -> Dict[str, Any]:
        """The model fields the research code knows (plain Python values only)."""
        d = dataclasses.asdict(self)
        for k in REFERENCE_ONLY_FIELDS:
            d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ReferenceConfig":
        """Build from a checkpoint's config['model']; unknown keys are ignored with a warning."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            warnings.warn(f"ReferenceConfig ignores unknown model config keys: {unknown}")
        return cls(**{k: v for k, v in d.items() if k in names})


def config_for_kind(kind: str, **overrides) -> ReferenceConfig:
    """A ReferenceConfig for one of the project's model kinds (see the module docstring)."""
    kinds = {
        "dense": dict(n_experts=None, n_reasoning_steps=1),
        "irl_only": dict(n_experts=None, n_reasoning_steps=2),
        "moe": dict(use_moc_collab=False, use_simple_collab=True, n_reasoning_steps=1),
        "moc": dict(use_moc_collab=True, n_reasoning_steps=2),
        "collab_only": dict(use_moc_collab=True, n_reasoning_steps=1),
    }
    if kind not in kinds:
        raise ValueError(f"kind must be one of {sorted(kinds)}, got {kind!r}")
    cfg = ReferenceConfig(**{**kinds[kind], **overrides})
    S, experts, collab = cfg.n_reasoning_steps, cfg.has_experts, cfg.use_moc_collab
    ok = {
        "dense": not experts and S <= 1,
        "irl_only": not experts and S > 1,
        "moe": experts and not collab and S <= 1,
        "moc": experts and collab,
        "collab_only": experts and collab and S <= 1,
    }[kind]
    if not ok:
        raise ValueError(f"overrides {overrides} do not describe a {kind!r} model")
    return cfg


def ffn_hidden_dim(cfg: ReferenceConfig) -> int:
    """f = multiple_of * ceil((2/3 * ffn_mult * d) / multiple_of)  (MOC_MATH section 3)."""
    return cfg.multiple_of * math.ceil((2.0 / 3.0 * cfg.ffn_hidden_multiplier * cfg.d_model) / cfg.multiple_of)


def gate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 spots of the spec: at least float32 (float64 when the model is float64)."""
    return torch.promote_types(dtype, torch.float32)


def linear_in(x: torch.Tensor, layer: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """layer(x) computed in `dtype` (used for the fp32 router and gates)."""
    b = None if layer.bias is None else layer.bias.to(dtype)
    return F.linear(x.to(dtype), layer.weight.to(dtype), b)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + 1e-6) * w."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + RMS_EPS) * self.weight


# -----------------------------------------------------------------------------
# Attention (Block section)
# -----------------------------------------------------------------------------
def apply_rope_interleaved(x_BHTd: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate dims (2i, 2i+1) of each head by angle t * theta^(-2i/hd), t = position."""
    T, hd = x_BHTd.shape[-2], x_BHTd.shape[-1]
    freq_i = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=x_BHTd.dtype) / hd)  # [hd/2]
    angle_Ti = torch.arange(T, dtype=x_BHTd.dtype)[:, None] * freq_i[None, :]  # [T, hd/2]
    cos, sin = angle_Ti.cos(), angle_Ti.sin()
    x0, x1 = x_BHTd[..., 0::2], x_BHTd[..., 1::2]  # [B, H, T, hd/2] each
    out0 = x0 * cos - x1 * sin
    out1 = x0 * sin + x1 * cos
    return torch.stack([out0, out1], dim=-1).flatten(-2)  # re-interleave -> [B, H, T, hd]


class ReferenceAttention(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.theta = cfg.rope_theta
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.wqkv = nn.Linear(cfg.d_model, q_size + 2 * kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        hd, H, G = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.wqkv(x_BTD).split([H * hd, G * hd, G * hd], dim=-1)
        q = q.view(B, T, H, hd).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, G, hd).transpose(1, 2)  # [B, G, T, hd]
        v = v.view(B, T, G, hd).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)  # per-head QK norm, before RoPE
        q, k = apply_rope_interleaved(q, self.theta), apply_rope_interleaved(k, self.theta)
        # GQA: query head h reads kv head h // (H / G)
        k = k.repeat_interleave(H // G, dim=1)  # [B, H, T, hd]
        v = v.repeat_interleave(H // G, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # [B, H, T, T]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        y = scores.softmax(dim=-1) @ v  # [B, H, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))


# -----------------------------------------------------------------------------
# Adaptive depth gate (sections 3 and 4)
# -----------------------------------------------------------------------------
def step_activity(gate_logits: torch.Tensor, max_steps: int, mode: str, temperature: float):
    """Activity a_s (s = 1..S) from gate logits over {0..S}.

    Args: gate_logits [M, S+1] in the gate dtype.
    Returns: activity [M, S] (soft: sum_{j>=s} q_j; hard: 1[argmax q >= s]),
             expected steps [M] (sum_j j q_j).
    """
    q = torch.softmax(gate_logits / max(float(temperature), 1e-4), dim=-1)  # [M, S+1]
    expected = (q * torch.arange(max_steps + 1, dtype=q.dtype)).sum(-1)  # [M]
    s = torch.arange(1, max_steps + 1)
    if mode == "hard":
        activity = (q.argmax(-1)[:, None] >= s[None, :]).to(q.dtype)
    else:
        # tail[s-1] = q_s + ... + q_S
        activity = torch.stack([q[:, j:].sum(-1) for j in range(1, max_steps + 1)], dim=-1)
    return activity, expected


def gate_logits_with_noise(gate: nn.Linear, x: torch.Tensor, noise_std: float, training: bool):
    logits = linear_in(x, gate, gate_dtype(x.dtype))  # fp32 gate
    if training and noise_std > 0:
        logits = logits + torch.randn_like(logits) * noise_std
    return logits


# -----------------------------------------------------------------------------
# Expert / dense FFN: SwiGLU run as an Iterative Reasoning Loop (section 3)
# -----------------------------------------------------------------------------
class ReferenceIRLFFN(nn.Module):
    """h_s = h_{s-1} + a_s * alpha * FFN(RMSNorm(h_{s-1} + x)), h_0 = x, alpha = 1/sqrt(S)."""

    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        d, f = cfg.d_model, ffn_hidden_dim(cfg)
        self.w13 = nn.Linear(d, 2 * f, bias=False)  # [2F, D]: gate rows then up rows
        self.w2 = nn.Linear(f, d, bias=False)
        self.norm = RMSNorm(d)
        self.num_steps = max(1, int(cfg.n_reasoning_steps))
        self.alpha = 1.0 / math.sqrt(self.num_steps)
        self.mode = cfg.adaptive_compute_mode
        self.temperature = cfg.reasoning_gate_temperature
        self.noise_std = cfg.reasoning_gate_noise_std
        adaptive = cfg.adaptive_reasoning and self.num_steps > 1
        self.step_gate = nn.Linear(d, self.num_steps + 1, bias=True) if adaptive else None

    def swiglu(self, z_MD: torch.Tensor) -> torch.Tensor:
        gate_MF, up_MF = self.w13(z_MD).chunk(2, dim=-1)
        return self.w2(F.silu(gate_MF) * up_MF)

    def forward(self, x_MD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns h_S [M, D] and E[steps] [M] (gate dtype)."""
        S, M = self.num_steps, x_MD.shape[0]
        if self.step_gate is None:
            a_MS = torch.ones(M, S, dtype=gate_dtype(x_MD.dtype))
            expected_M = torch.full((M,), float(S), dtype=gate_dtype(x_MD.dtype))
        else:
            logits = gate_logits_with_noise(self.step_gate, x_MD, self.noise_std, self.training)
            a_MS, expected_M = step_activity(logits, S, self.mode, self.temperature)
        h = x_MD
        for s in range(S):
            update = self.swiglu(self.norm(h + x_MD))
            h = h + a_MS[:, s : s + 1].to(h.dtype) * self.alpha * update
        return h, expected_M


# -----------------------------------------------------------------------------
# Capacity (section 2)
# -----------------------------------------------------------------------------
def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """cap = next_pow2(ceil(N*K/E * cf)), at most N*K; cf <= 0: dropless (N*K)."""
    slots = num_tokens * top_k
    if capacity_factor <= 0:
        return slots
    target = int(math.ceil(slots / num_experts * capacity_factor))
    if target <= 0:
        return 0
    return min(1 << (target - 1).bit_length(), slots)


def capacity_keep(topi_NK: torch.Tensor, topv_NK: torch.Tensor, cap: int, num_experts: int) -> torch.Tensor:
    """Keep mask [N, K] (bool): inside each expert, pairs ranked by router logit, highest
    first, ties in original order (token-major, then slot); the first `cap` are kept."""
    N, K = topi_NK.shape
    ids, vals = topi_NK.tolist(), topv_NK.tolist()
    keep = [[False] * K for _ in range(N)]
    for e in range(num_experts):
        pairs = [(n, k) for n in range(N) for k in range(K) if ids[n][k] == e]  # original order
        ranked = sorted(pairs, key=lambda nk: -vals[nk[0]][nk[1]])  # Python sort is stable
        for n, k in ranked[:cap]:
            keep[n][k] = True
    return torch.tensor(keep, dtype=torch.bool).reshape(N, K)


def masked_softmax(scores_NK: torch.Tensor, mask_NK: torch.Tensor) -> torch.Tensor:
    """softmax over the kept entries of each row; rows with none kept give 0."""
    any_kept = mask_NK.any(-1, keepdim=True)
    safe = torch.where(any_kept, scores_NK.masked_fill(~mask_NK, float("-inf")), torch.zeros_like(scores_NK))
    return torch.softmax(safe, dim=-1) * mask_NK.to(scores_NK.dtype)


# -----------------------------------------------------------------------------
# The MoC layer (sections 1-5)
# -----------------------------------------------------------------------------
class ReferenceMoCLayer(nn.Module):
    """The `feed_forward` of a MoC layer. forward(x [N, D]) -> (out [N, D], aux scalar);
    the diagnostics of the last call are in `self.last_diagnostics`."""

    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        d, E = cfg.d_model, cfg.n_experts
        self.cfg = cfg
        self.num_experts, self.top_k = E, cfg.top_k
        self.num_rounds = max(0, int(cfg.moc_collab_steps))
        self.collaborate = bool(cfg.use_moc_collab)
        # Parameters in the research layout; the mediator modules exist even when
        # collaboration is off (unused then), so research checkpoints load strictly.
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([ReferenceIRLFFN(cfg) for _ in range(E)])
        self.mediator_norm = RMSNorm(d)
        self.expert_norm = RMSNorm(d)
        self.med_q = nn.Linear(d, d, bias=False)
        self.exp_k = nn.Linear(d, d, bias=False)
        rank = int(cfg.moc_low_rank_message_dim)
        if 0 < rank < d:
            self.exp_v_down = nn.Linear(d, rank, bias=False)  # [r, D]
            self.exp_v_up = nn.Linear(rank, d, bias=False)  # [D, r]
        else:
            self.exp_v = nn.Linear(d, d, bias=False)
        self.med_mlp = nn.Sequential(nn.Linear(d, d, bias=False), RMSNorm(d), nn.SiLU(), nn.Linear(d, d, bias=False))
        self.mediator = nn.Parameter(torch.randn(1, d) * 0.02) if cfg.moc_use_mediator else None
        self.med_context = nn.Linear(d, d, bias=False)
        self.fuse_gate = nn.Linear(d, 1, bias=True)
        if cfg.moc_expert_feedback:
            self.med_to_exp = nn.Linear(d, d, bias=False)
            self.exp_feedback_e = nn.Linear(d, 1, bias=True)
            self.exp_feedback_m = nn.Linear(d, 1, bias=False)
        adaptive_rounds = cfg.adaptive_collaboration and self.num_rounds > 1
        self.collab_step_gate = nn.Linear(d, self.num_rounds + 1, bias=True) if adaptive_rounds else None
        self.o_proj = nn.Linear(d, d, bias=False)
        self.last_diagnostics: Dict[str, Any] = {}

    # ---- section 1: router -------------------------------------------------
    def route(self, x_ND: torch.Tensor):
        gd = gate_dtype(x_ND.dtype)
        logits_NE = linear_in(x_ND, self.gate, gd)  # router always in (at least) fp32
        if self.training and self.cfg.router_noise_std > 0:
            logits_NE = logits_NE + torch.randn_like(logits_NE) * self.cfg.router_noise_std
        topv_NK, topi_NK = torch.topk(logits_NE, self.top_k, dim=-1)
        p_NK = torch.softmax(topv_NK, dim=-1)
        P_NE = torch.softmax(logits_NE, dim=-1)
        A_NE = torch.zeros_like(P_NE).scatter_add(1, topi_NK, p_NK)
        balance = self.num_experts * (P_NE.mean(0) * A_NE.mean(0)).sum()
        z_loss = torch.logsumexp(logits_NE, dim=-1).pow(2).mean()
        return logits_NE, topv_NK, topi_NK, p_NK, P_NE, balance, z_loss

    # ---- section 4: one mediator round --------------------------------------
    def values(self, en_NKD: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "exp_v"):
            return self.exp_v(en_NKD)
        return self.exp_v_up(self.exp_v_down(en_NKD))  # W_v = W_up W_down (rank r)

    def collab_round(self, med_ND, e_NKD, m_NK):
        d = med_ND.shape[-1]
        mn_ND = self.mediator_norm(med_ND)
        en_NKD = self.expert_norm(e_NKD)
        q_ND = self.med_q(mn_ND)
        k_NKD = self.exp_k(en_NKD)
        v_NKD = self.values(en_NKD)
        scores_NK = (k_NKD * q_ND[:, None, :]).sum(-1) / math.sqrt(d)
        beta_NK = masked_softmax(scores_NK.to(gate_dtype(scores_NK.dtype)), m_NK)  # fp32
        msg_ND = (beta_NK.to(v_NKD.dtype)[..., None] * v_NKD).sum(1)
        med_new = med_ND + self.med_mlp(mn_ND + msg_ND)
        if not self.cfg.moc_expert_feedback:
            return med_new, e_NKD
        g_NK1 = torch.sigmoid(self.exp_feedback_e(e_NKD) + self.exp_feedback_m(med_new)[:, None, :])
        fb_N1D = self.med_to_exp(self.mediator_norm(med_new))[:, None, :]
        e_new = (e_NKD + g_NK1 * fb_N1D) * m_NK[..., None].to(e_NKD.dtype)
        return med_new, e_new

    # ---- forward -------------------------------------------------------------
    def forward(self, x_ND: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        cfg, E, K = self.cfg, self.num_experts, self.top_k
        N, D = x_ND.shape
        dt, gd = x_ND.dtype, gate_dtype(x_ND.dtype)

        # 1. router
        logits_NE, topv_NK, topi_NK, p_NK, P_NE, balance, z_loss = self.route(x_ND)

        # 2. capacity
        cap = capacity(N, K, E, cfg.capacity_factor)
        m_NK = capacity_keep(topi_NK, topv_NK, cap, E)  # bool
        num_dropped = int((~m_NK).sum())

        # 3. experts (IRL) on their kept pairs; dropped pairs stay 0
        states_PD = x_ND.new_zeros(N * K, D)  # P = N*K pairs, token-major then slot
        expected_steps = []
        for e in range(E):
            pair_idx = ((topi_NK == e) & m_NK).flatten().nonzero().flatten()  # [M]
            if pair_idx.numel() == 0:
                continue
            h_MD, steps_M = self.experts[e](x_ND[pair_idx // K])
            states_PD = states_PD.index_put((pair_idx,), h_MD)
            expected_steps.append(steps_M)
        e_NKD = states_PD.view(N, K, D)
        steps_all = torch.cat(expected_steps) if expected_steps else torch.zeros(0, dtype=gd)
        S = self.experts[0].num_steps
        avg_steps = steps_all.mean() if steps_all.numel() else torch.zeros((), dtype=gd)
        step_penalty = torch.zeros((), dtype=gd)
        if cfg.reasoning_step_penalty_weight > 0 and steps_all.numel():
            step_penalty = cfg.reasoning_step_penalty_weight * steps_all.mean() / S

        # 5. fusion weights w_k = p_k m_k / sum(p m), 0 if nothing kept
        pm_NK = p_NK * m_NK.to(gd)
        denom_N1 = pm_NK.sum(-1, keepdim=True)
        no_kept_N1 = denom_N1 <= 0
        w_NK = torch.where(no_kept_N1, torch.zeros_like(pm_NK), pm_NK / torch.where(no_kept_N1, 1.0, denom_N1))
        w_NK = w_NK.to(dt)
        ws_ND = (w_NK[..., None] * e_NKD).sum(1)

        # 4. collaboration
        avg_rounds = torch.zeros((), dtype=gd)
        round_penalty = torch.zeros((), dtype=gd)
        mean_gamma = None
        R = self.num_rounds
        if not self.collaborate or (R == 0 and cfg.moc_zero_round_output == "ws"):
            fused_ND = ws_ND
        else:
            mu_or_ws = self.mediator.to(dt) if self.mediator is not None else ws_ND
            med_ND = mu_or_ws + self.med_context(x_ND)  # mediator_0
            if R > 0:
                if self.collab_step_gate is None:
                    c_NR = torch.ones(N, R, dtype=gd)
                    exp_rounds_N = torch.full((N,), float(R), dtype=gd)
                else:
                    logits = gate_logits_with_noise(
                        self.collab_step_gate, x_ND, cfg.collaboration_gate_noise_std, self.training
                    )
                    c_NR, exp_rounds_N = step_activity(
                        logits, R, cfg.adaptive_compute_mode, cfg.collaboration_gate_temperature
                    )
                c_NR = c_NR * (~no_kept_N1).to(c_NR.dtype)  # all-dropped tokens: c_r = 0
                for r in range(R):
                    med_new, e_new = self.collab_round(med_ND, e_NKD, m_NK)
                    c_N1 = c_NR[:, r : r + 1].to(dt)
                    med_ND = med_ND + c_N1 * (med_new - med_ND)
                    e_NKD = e_NKD + c_N1[..., None] * (e_new - e_NKD)
                avg_rounds = exp_rounds_N.mean()
                if cfg.collaboration_step_penalty_weight > 0:
                    round_penalty = cfg.collaboration_step_penalty_weight * exp_rounds_N.mean() / R
            # 5. fusion
            e_NKD = e_NKD * m_NK[..., None].to(dt)
            ws_ND = (w_NK[..., None] * e_NKD).sum(1)  # refined states
            gamma_N1 = torch.sigmoid(self.fuse_gate(x_ND))
            fused_ND = gamma_N1 * med_ND + (1 - gamma_N1) * ws_ND
            mean_gamma = float(gamma_N1.detach().mean())
        fused_ND = torch.where(no_kept_N1, x_ND, fused_ND)  # all pairs dropped: x
        out_ND = self.o_proj(fused_ND)

        aux = cfg.aux_loss_weight * balance + cfg.router_z_loss_weight * z_loss
        if cfg.drop_penalty_weight > 0 and N * K > 0:
            aux = aux + cfg.drop_penalty_weight * num_dropped / (N * K)
        aux = aux + step_penalty + round_penalty

        requested = torch.bincount(topi_NK.flatten(), minlength=E)
        kept = torch.bincount(topi_NK[m_NK], minlength=E)
        self.last_diagnostics = {
            "requested_hist": requested,  # [E] pairs asked for per expert
            "kept_hist": kept,  # [E] pairs kept per expert
            "capacity": cap,
            "num_dropped": num_dropped,
            "drop_rate": num_dropped / max(1, N * K),
            "router_entropy": float(-(P_NE * P_NE.clamp_min(1e-9).log()).sum(-1).mean().detach()),
            "avg_reasoning_steps": float(avg_steps.detach()),
            "avg_collab_steps": float(avg_rounds.detach()),
            "mean_gamma": mean_gamma,  # None when no fusion gate ran
            "balance_loss": float(balance.detach()),
            "z_loss": float(z_loss.detach()),
            "step_penalty": float(step_penalty.detach()),
            "round_penalty": float(round_penalty.detach()),
            "aux": float(aux.detach()),
            "topk_idx": topi_NK.detach(),  # [N, K]
            "topk_probs": p_NK.detach(),  # [N, K]
            "keep_mask": m_NK,  # [N, K]
            "router_logits": logits_NE.detach(),  # [N, E]
        }
        return out_ND, aux


# -----------------------------------------------------------------------------
# Block and model
# -----------------------------------------------------------------------------
class ReferenceBlock(nn.Module):
    def __init__(self, cfg: ReferenceConfig, is_moc: bool):
        super().__init__()
        self.is_moc = is_moc
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attention = ReferenceAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model)
        self.feed_forward = ReferenceMoCLayer(cfg) if is_moc else ReferenceIRLFFN(cfg)

    def forward(self, x_BTD: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        B, T, D = x_BTD.shape
        h = x_BTD + self.attention(self.attn_norm(x_BTD))
        z_ND = self.ffn_norm(h).reshape(B * T, D)
        if self.is_moc:
            y_ND, aux = self.feed_forward(z_ND)
        else:
            y_ND, _ = self.feed_forward(z_ND)  # dense/IRL FFN: no aux (step penalty unused)
            aux = None
        return h + y_ND.view(B, T, D), aux


class ReferenceModel(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
                h=nn.ModuleList([ReferenceBlock(cfg, cfg.is_moc_layer(i)) for i in range(cfg.n_layers)]),
                ln_f=RMSNorm(cfg.d_model),
            )
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied
        self.reset_parameters()
        self.last_diagnostics: List[Optional[Dict[str, Any]]] = []

    @torch.no_grad()
    def reset_parameters(self):
        """Linear and embedding N(0, 0.02), biases 0, RMSNorm 1, mu N(0, 0.02); then attention
        o_proj and the MoC o_proj (dense FFN: w2) times 1/sqrt(2 n_layers)."""
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, 0.0, 0.02)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, RMSNorm):
                nn.init.ones_(mod.weight)
            elif isinstance(mod, ReferenceMoCLayer) and mod.mediator is not None:
                nn.init.normal_(mod.mediator, 0.0, 0.02)
        scale = 1.0 / math.sqrt(2 * self.cfg.n_layers)
        for block in self.transformer.h:
            block.attention.o_proj.weight.mul_(scale)
            out = block.feed_forward.o_proj if block.is_moc else block.feed_forward.w2
            out.weight.mul_(scale)

    def forward(self, idx_BT: torch.Tensor, targets_BT: Optional[torch.Tensor] = None):
        """Returns logits [B, T, V], loss (CE + sum aux / n_moc_layers, or None), aux
        (sum aux / n_moc_layers, 0 for a model without MoC layers)."""
        B, T = idx_BT.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.transformer.wte(idx_BT)  # [B, T, D]
        aux_sum = torch.zeros((), dtype=gate_dtype(x.dtype))
        self.last_diagnostics = []
        for block in self.transformer.h:
            x, aux = block(x)
            if aux is not None:
                aux_sum = aux_sum + aux
            self.last_diagnostics.append(block.feed_forward.last_diagnostics if block.is_moc else None)
        aux_mean = aux_sum / max(1, self.cfg.num_moc_layers)
        logits = self.lm_head(self.transformer.ln_f(x))  # [B, T, V]
        loss = None
        if targets_BT is not None:
            ce = F.cross_entropy(logits.flatten(0, 1), targets_BT.flatten(), ignore_index=-1)
            loss = ce + aux_mean.to(ce.dtype)
        return logits, loss, aux_mean


# -----------------------------------------------------------------------------
# Research-format checkpoints
# -----------------------------------------------------------------------------
RESEARCH_TRAIN_DEFAULTS = dict(
    data_dir="data", learning_rate=3e-4, weight_decay=0.1, beta1=0.9, beta2=0.95,
    warmup_steps=2000, max_steps=600_000, batch_size=16, gradient_accumulation_steps=1,
    num_epochs=1, grad_clip=1.0, device="cuda", compile_model=True, out_dir="checkpoints",
    log_interval=20, save_interval=1000,
)  # a subset of the research TrainConfig; its fields sit beside 'model' in config


def save_research_checkpoint(model: ReferenceModel, cfg: ReferenceConfig, path, prefix: str = "",
                             step: int = 0, train: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write `path` the way the research training script does (plain containers/tensors only,
    so torch.load(weights_only=True) reads it). Keys get `prefix` (e.g. "_orig_mod.").
    Returns the saved dict."""
    state = {prefix + k: v.detach().clone() for k, v in model.state_dict().items()}
    config = {"model": cfg.research_dict(), **RESEARCH_TRAIN_DEFAULTS, **(train or {})}
    ckpt = {
        "model": state,
        "optimizer": {"state": {}, "param_groups": []},
        "scaler": None,
        "step": int(step),
        "epoch": 0,
        "config": config,
        "best_val_loss": float("inf"),
        "no_improve_windows": 0,
        "dead_expert_streaks": {},
        "rng_state": {"torch": torch.get_rng_state()},
    }
    torch.save(ckpt, path)
    return ckpt


def strip_key_prefixes(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop leading `_orig_mod.` / `module.` wrappers (in any order, repeated)."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for p in CHECKPOINT_KEY_PREFIXES:
                if key.startswith(p):
                    key, stripped = key[len(p):], True
        out[key] = value
    return out


def load_research_checkpoint(path, dtype: Optional[torch.dtype] = None):
    """Read a research checkpoint into a ReferenceModel (strict key and shape match).

    Returns (model, cfg, raw checkpoint dict). `dtype` casts the model (default: as stored).
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = ReferenceConfig.from_dict(dict(ckpt["config"]["model"]))
    state = strip_key_prefixes(ckpt["model"])
    model = ReferenceModel(cfg)
    stored = next(iter(state.values())).dtype
    model.to(stored)
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model, cfg, ckpt
