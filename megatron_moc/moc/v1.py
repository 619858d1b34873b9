"""MoC v1, the first MoC: every expert on every token, attention to route, attention to fuse.

Legend: N tokens, E experts, K slots (top-k), D hidden size, F ffn size, H heads.
MOC_MATH.md "MoC v1 (the first MoC)":

    O_n      = [FFN_1(x_n) … FFN_E(x_n)]                        [N, E, D]  all experts
    C        = RMSNorm_r(MHA_r(O, O, O) + O)                     attention over the E outputs
    logits   = (W_r·mean_E(C) + b_r) / τ_r                       fp32
    topv, topi = topk(logits, K);  p = softmax(topv);  P = softmax(logits)
    S_n      = O_n[topi_n]                                       [N, K, D]
    Z        = RMSNorm_c(MHA_c(S, S, S) + S);  A = MHA_c weights averaged over heads [N, K, K]
    refined  = FFN_c(Z) + Z,  FFN_c = Linear(D, 2D, +b) → ReLU → Linear(2D, D, +b)
    out      = W_o·Σ_k p_k·refined_k                             (no capacity, no drops)
    aux      = w_aux·(0.01·(−H(A)) + 0.01·Var_e(mean_n P))      (Var: E − 1 denominator)

The all-experts pass is two batched GEMMs on stacked weights (w13 [E, D, 2F], w2 [E, F, D]):
every expert sees the same x, so the first is one [N, D]·[D, E·2F] GEMM (einsum), the second a
bmm over E. No Python loop over experts, no dispatch, no host sync. The two attentions are
torch.nn.MultiheadAttention (batch_first; in/out projections with biases), sequence length E
and K with the model's head count. Cost is O(E) expert FLOPs per token: a layer for
ablations (tools/ablate.py), not for scale. H(A) uses log(max(A, 1e-9)) like every entropy here.

A Megatron MLP submodule like MoCLayer: `forward(hidden_states [s, b, D]) -> (out, None)`,
with `last_aux_loss` and `last_stats` (RoutingStats) left on the layer for the model and
the trainer.
"""

import torch
import torch.nn.functional as F
from torch import nn

from megatron_moc.model.norm import RMSNorm
from megatron_moc.moc.layer import RoutingStats


def _init_linear(config, layer: nn.Linear) -> nn.Linear:
    config.init_method(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _mha(config) -> nn.MultiheadAttention:
    """torch's MHA with the spec's init: projections N(0, σ) (init_method), biases 0."""
    attn = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, bias=True,
                                 batch_first=True, dtype=config.params_dtype)
    config.init_method(attn.in_proj_weight)
    nn.init.zeros_(attn.in_proj_bias)
    _init_linear(config, attn.out_proj)
    return attn


class AllExperts(nn.Module):
    """E plain SwiGLU FFNs (one step) run on every token with two batched GEMMs."""

    def __init__(self, config, num_experts: int):
        super().__init__()
        E, D = num_experts, config.hidden_size
        Fh = config.moe_ffn_hidden_size or config.ffn_hidden_size
        dt = config.params_dtype
        self.w13 = nn.Parameter(torch.empty(E, D, 2 * Fh, dtype=dt))  # gate (w1) then up (w3)
        self.w2 = nn.Parameter(torch.empty(E, Fh, D, dtype=dt))
        config.init_method(self.w13)
        config.init_method(self.w2)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        """x [N, D] → O [N, E, D]: FFN_e(x_n) = W2_e(silu(x·W1_e) ⊙ (x·W3_e))."""
        gate_up_ENF = torch.einsum("nd,edf->enf", x_ND, self.w13)    # one GEMM: x shared
        gate_ENF, up_ENF = gate_up_ENF.chunk(2, dim=-1)
        out_END = torch.bmm(F.silu(gate_ENF) * up_ENF, self.w2)     # batched over experts
        return out_END.transpose(0, 1)


class MoCV1Layer(nn.Module):
    """The MoC v1 layer (kind 'moc_v1'). Parameter names: experts.{w13,w2},
    router_attn / router_norm / router (contextual router), collab_attn / collab_norm /
    collab_ffn (collaborative fusion), o_proj."""

    def __init__(self, config, **kwargs):
        super().__init__()
        self.config = config
        D, E = config.hidden_size, config.num_moe_experts
        eps = config.layernorm_epsilon
        self.num_experts, self.top_k = E, config.moe_router_topk
        self.experts = AllExperts(config, E)
        self.router_attn = _mha(config)
        self.router_norm = RMSNorm(config, D, eps)
        self.router = _init_linear(config, nn.Linear(D, E, bias=True, dtype=config.params_dtype))
        self.collab_attn = _mha(config)
        self.collab_norm = RMSNorm(config, D, eps)
        self.collab_ffn = nn.Sequential(
            _init_linear(config, nn.Linear(D, 2 * D, bias=True, dtype=config.params_dtype)),
            nn.ReLU(),
            _init_linear(config, nn.Linear(2 * D, D, bias=True, dtype=config.params_dtype)))
        self.o_proj = nn.Linear(D, D, bias=False, dtype=config.params_dtype)
        config.output_layer_init_method(self.o_proj.weight)  # as MoCLayer's o_proj
        self.last_aux_loss = None
        self.last_stats = None

    def route(self, outputs_NED: torch.Tensor):
        """Contextual router. Returns (logits_NE, topv_NK, topi_NK, p_NK, P_NE), fp32."""
        context, _ = self.router_attn(outputs_NED, outputs_NED, outputs_NED, need_weights=False)
        c_NED = self.router_norm(context + outputs_NED)
        # Router in fp32 (fp64 for the fp64 tests), as the main router: the logits decide.
        dt = torch.float64 if c_NED.dtype == torch.float64 else torch.float32
        logits_NE = F.linear(c_NED.mean(1).to(dt), self.router.weight.to(dt),
                             self.router.bias.to(dt)) / self.config.moc_v1_router_temperature
        topv_NK, topi_NK = torch.topk(logits_NE, self.top_k, dim=-1)
        return (logits_NE, topv_NK, topi_NK, torch.softmax(topv_NK, dim=-1),
                torch.softmax(logits_NE, dim=-1))

    def fuse(self, selected_NKD: torch.Tensor):
        """Collaborative fusion over the K chosen outputs. Returns (refined_NKD, A_NKK)."""
        z, attn_NKK = self.collab_attn(selected_NKD, selected_NKD, selected_NKD,
                                       need_weights=True, average_attn_weights=True)
        z_NKD = self.collab_norm(z + selected_NKD)
        return self.collab_ffn(z_NKD) + z_NKD, attn_NKK

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        shape = hidden_states.shape
        x_ND = hidden_states.reshape(-1, shape[-1])
        N, D = x_ND.shape
        outputs_NED = self.experts(x_ND)
        logits_NE, _, topi_NK, p_NK, P_NE = self.route(outputs_NED)
        selected_NKD = outputs_NED.gather(1, topi_NK.unsqueeze(-1).expand(N, self.top_k, D))
        refined_NKD, attn_NKK = self.fuse(selected_NKD)
        fused_ND = (p_NK.to(refined_NKD.dtype).unsqueeze(-1) * refined_NKD).sum(1)
        out = self.o_proj(fused_ND)

        # Aux (fp32): attention entropy over the K·K weights, variance of the mean router probs.
        a = attn_NKK.to(P_NE.dtype)
        attn_entropy = -(a * a.clamp_min(1e-9).log()).sum(-1).mean()
        variance = P_NE.mean(0).var()          # unbiased (E − 1), as torch.var
        self.last_aux_loss = self.config.moe_aux_loss_coeff * (
            0.01 * (-attn_entropy) + 0.01 * variance)
        self.last_stats = self._stats(topi_NK, P_NE)
        return out.view(shape), None

    @torch.no_grad()
    def _stats(self, topi_NK: torch.Tensor, P_NE: torch.Tensor) -> RoutingStats:
        """No capacity in v1: requested = kept, drop rate 0. One step, one fusion pass, no γ,
        no adaptive gates."""
        dev = topi_NK.device
        hist = torch.zeros(self.num_experts, device=dev).scatter_add_(
            0, topi_NK.reshape(-1), torch.ones(topi_NK.numel(), device=dev))
        zero = torch.zeros((), device=dev)
        entropy = -(P_NE * P_NE.clamp_min(1e-9).log()).sum(-1).mean().float()
        return RoutingStats(
            requested_hist=hist, kept_hist=hist.clone(), drop_rate=zero, capacity=-1,
            router_entropy=entropy, avg_steps=zero + 1.0, avg_rounds=zero + 1.0,
            mean_gamma=zero, step_gate_entropy=zero, round_gate_entropy=zero,
            gate_entropy_beta=zero)


def v1_flops_params_per_token(config) -> float:
    """Matmul parameters a token touches in one MoC v1 layer (for metrics.py's FLOP count):
    all E experts 3·D·F each; router attention over E rows (in 3D², out D² per row, scores and
    values 2·E·D per row) and W_r D·E; fusion attention over K rows likewise, FFN_c 4·D² per
    row; o_proj D²."""
    D, E, K = config.hidden_size, config.num_moe_experts, config.moe_router_topk
    Fh = config.moe_ffn_hidden_size or config.ffn_hidden_size
    attn = lambda rows: rows * (4 * D * D + 2 * rows * D)  # noqa: E731
    return E * 3 * D * Fh + attn(E) + D * E + attn(K) + K * 4 * D * D + D * D


__all__ = ["AllExperts", "MoCV1Layer", "v1_flops_params_per_token"]
