"""Test oracle for MOC_MATH.md "Research variants beyond the main layer", written from the spec.

Plain PyTorch, float64 in the tests, imports nothing from megatron_moc. It reuses the main
oracle (lunaris_reference.py) for the parts the variants share with the main layer (router,
capacity, the gate modules), and writes everything new by hand:

- `entropy`, `entropy_grad_wrt_logits`: H(q) = −Σ q_j log(max(q_j, 1e-9)), q = softmax(z/τ),
  and its gradient in closed form, ∂H/∂z_i = −(q_i/τ)(log q_i + H) (no clamp active).
- `beta_at`: the β schedule as the spec words it: β_0 for the first warmup_frac of training,
  then linear to β_final at the last step. Step t = 1..T is the optimizer step being taken;
  "the first warmup_frac of training" is t/T ≤ warmup_frac.
- `gate_entropy_terms(layer, x)`: for a ReferenceMoCLayer, (H_irl, H_round): each expert's
  step gate H averaged over the kept pairs it saw, weighted by its share of kept pairs; the
  round gate's H averaged over all N tokens (the rows it sees; as the round penalty). A layer
  without the gate gives 0 for that term. The model adds −β·(H_irl + H_round) to its aux.
- `ReferenceMoCV1Layer`: MoC v1 with per-expert nn.Linear w1 / w3 / w2, a Python loop over
  experts, and multi-head attention written out from its definition (packed in-projection
  [3D, D] + bias, per-head softmax(q·kᵀ/sqrt(hd)), concatenated heads, out-projection + bias:
  the parameter layout of torch.nn.MultiheadAttention, but not its code).
Stage II needs no oracle: its check is bit-identity of the frozen parameters.
"""

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.reference.lunaris_reference import (RMSNorm, ReferenceMoCLayer, capacity,
                                               capacity_keep, gate_dtype, linear_in)

ENTROPY_FLOOR = 1e-9


# -----------------------------------------------------------------------------
# Gate entropy regularization
# -----------------------------------------------------------------------------
def entropy(logits_MJ: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row: −Σ_j q_j log(max(q_j, 1e-9)), q = softmax(logits / τ). [M]"""
    q = torch.softmax(logits_MJ / temperature, dim=-1)
    return -(q * torch.log(torch.clamp(q, min=ENTROPY_FLOOR))).sum(-1)


def entropy_grad_wrt_logits(logits_MJ: torch.Tensor, temperature: float) -> torch.Tensor:
    """∂H/∂z for each row, closed form (valid where every q_j > 1e-9). [M, J]"""
    q = torch.softmax(logits_MJ / temperature, dim=-1)
    H = -(q * q.log()).sum(-1, keepdim=True)
    return -(q / temperature) * (q.log() + H)


def beta_at(step: int, total_steps: int, beta0: float, beta_final: float,
            warmup_frac: float) -> float:
    """β for optimizer step `step` (1..T): β_0 while step/T ≤ warmup_frac, then the straight
    line through (warmup_frac, β_0) and (1, β_final) in step/T."""
    x = step / total_steps
    if x <= warmup_frac:
        return beta0
    slope = (beta_final - beta0) / (1.0 - warmup_frac)
    return beta0 + slope * (x - warmup_frac)


def gate_entropy_terms(layer: ReferenceMoCLayer, x_ND: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(H_irl, H_round) of one MoC layer for input x (gate dtype, differentiable)."""
    cfg, E, K = layer.cfg, layer.num_experts, layer.top_k
    N = x_ND.shape[0]
    gd = gate_dtype(x_ND.dtype)
    _, topv_NK, topi_NK, *_ = layer.route(x_ND)
    keep_NK = capacity_keep(topi_NK, topv_NK, capacity(N, K, E, cfg.capacity_factor), E)
    num_kept = int(keep_NK.sum())
    h_irl = torch.zeros((), dtype=gd)
    for e in range(E):
        gate = layer.experts[e].step_gate
        tokens = topi_NK.eq(e).logical_and(keep_NK).nonzero()[:, 0]    # tokens of kept pairs
        if gate is None or tokens.numel() == 0:
            continue
        h_e = entropy(linear_in(x_ND[tokens], gate, gd), cfg.reasoning_gate_temperature).mean()
        h_irl = h_irl + (tokens.numel() / num_kept) * h_e               # share of kept pairs
    h_round = torch.zeros((), dtype=gd)
    if layer.collaborate and layer.collab_step_gate is not None:
        h_round = entropy(linear_in(x_ND, layer.collab_step_gate, gd),
                          cfg.collaboration_gate_temperature).mean()
    return h_irl, h_round


# -----------------------------------------------------------------------------
# MoC v1
# -----------------------------------------------------------------------------
class ReferenceMHA(nn.Module):
    """Multi-head self-attention over a short sequence, written out. Parameters in torch's
    MultiheadAttention layout: in_proj_weight [3D, D] (q, k, v rows), in_proj_bias [3D],
    out_proj_weight [D, D], out_proj_bias [D]."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * d, d) * 0.02)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_proj_weight = nn.Parameter(torch.randn(d, d) * 0.02)
        self.out_proj_bias = nn.Parameter(torch.zeros(d))

    def forward(self, x_BLD: torch.Tensor):
        """Returns (y [B, L, D], weights averaged over heads [B, L, L])."""
        B, L, D = x_BLD.shape
        H = self.n_heads
        hd = D // H
        w_q, w_k, w_v = self.in_proj_weight.split(D, dim=0)
        b_q, b_k, b_v = self.in_proj_bias.split(D, dim=0)

        def heads(t):  # [B, L, D] -> [B, H, L, hd]
            return t.view(B, L, H, hd).transpose(1, 2)

        q = heads(x_BLD @ w_q.t() + b_q)
        k = heads(x_BLD @ w_k.t() + b_k)
        v = heads(x_BLD @ w_v.t() + b_v)
        weights_BHLL = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        y = (weights_BHLL @ v).transpose(1, 2).reshape(B, L, D)
        return y @ self.out_proj_weight.t() + self.out_proj_bias, weights_BHLL.mean(1)


class ReferenceMoCV1Layer(nn.Module):
    """MOC_MATH.md "MoC v1". forward(x [N, D]) -> (out [N, D], aux scalar)."""

    def __init__(self, d: int, n_heads: int, n_experts: int, top_k: int, ffn_dim: int,
                 aux_loss_weight: float = 1e-2, router_temperature: float = 1.0):
        super().__init__()
        self.E, self.K = n_experts, top_k
        self.aux_loss_weight, self.tau = aux_loss_weight, router_temperature
        self.w1 = nn.ModuleList([nn.Linear(d, ffn_dim, bias=False) for _ in range(n_experts)])
        self.w3 = nn.ModuleList([nn.Linear(d, ffn_dim, bias=False) for _ in range(n_experts)])
        self.w2 = nn.ModuleList([nn.Linear(ffn_dim, d, bias=False) for _ in range(n_experts)])
        self.router_attn = ReferenceMHA(d, n_heads)
        self.router_norm = RMSNorm(d)
        self.router = nn.Linear(d, n_experts, bias=True)
        self.collab_attn = ReferenceMHA(d, n_heads)
        self.collab_norm = RMSNorm(d)
        self.ffn_c1 = nn.Linear(d, 2 * d, bias=True)
        self.ffn_c2 = nn.Linear(2 * d, d, bias=True)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.last = {}

    def forward(self, x_ND: torch.Tensor):
        N, D = x_ND.shape
        gd = gate_dtype(x_ND.dtype)
        # Every expert on every token: O [N, E, D]
        O = torch.stack([self.w2[e](F.silu(self.w1[e](x_ND)) * self.w3[e](x_ND))
                         for e in range(self.E)], dim=1)
        # Router contextualization
        mha_O, _ = self.router_attn(O)
        C = self.router_norm(mha_O + O)
        logits = linear_in(C.mean(1), self.router, gd) / self.tau            # [N, E]
        topv, topi = torch.topk(logits, self.K, dim=-1)
        p = torch.softmax(topv, dim=-1)                                       # fp32 (gd)
        P = torch.softmax(logits, dim=-1)
        # Collaborative fusion over the K selected rows
        S = torch.stack([O[n, topi[n]] for n in range(N)])                    # [N, K, D]
        mha_S, A = self.collab_attn(S)
        Z = self.collab_norm(mha_S + S)
        refined = self.ffn_c2(torch.relu(self.ffn_c1(Z))) + Z
        out = self.o_proj((p.to(x_ND.dtype)[..., None] * refined).sum(1))
        # Aux: w_aux·(0.01·(−H(A)) + 0.01·Var_e(mean_n P)), Var with E − 1
        A = A.to(gd)
        H_A = -(A * torch.log(torch.clamp(A, min=ENTROPY_FLOOR))).sum(-1).mean()
        mean_P = P.mean(0)
        var = ((mean_P - mean_P.mean()) ** 2).sum() / (self.E - 1)
        aux = self.aux_loss_weight * (0.01 * (-H_A) + 0.01 * var)
        self.last = {"topi": topi, "p": p, "P": P, "A": A}
        return out, aux
