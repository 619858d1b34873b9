"""Adaptive depth gates (MOC_MATH.md §3 "Adaptive depth", §4 "Adaptive rounds"), and the
research variant "Gate entropy regularization" (entropy of q, β schedule).

A gate gives q = softmax(logits / τ) over {0..S} steps (fp32). Step s (1-based) runs with
activity a_s: soft mode a_s = Σ_{j≥s} q_j (tail probability), hard mode a_s = 1[argmax q ≥ s].
E[steps] = Σ_j j·q_j in both modes (used by penalties and diagnostics).
"""

import torch


def step_activity(logits_NJ: torch.Tensor, temperature: float, mode: str):
    """Args: logits_NJ fp32 [N, S+1]. Returns (activity_NS fp32 [N, S], expected_N fp32 [N])."""
    q = torch.softmax(logits_NJ / temperature, dim=-1)
    steps = torch.arange(q.shape[-1], device=q.device, dtype=q.dtype)
    expected = (q * steps).sum(-1)
    if mode == "hard":
        chosen = q.argmax(-1, keepdim=True)
        activity = (chosen >= steps[1:]).to(q.dtype)
    else:
        activity = q[:, 1:].flip(-1).cumsum(-1).flip(-1)
    return activity, expected


def gate_entropy(logits_NJ: torch.Tensor, temperature: float) -> torch.Tensor:
    """H(q) = −Σ_j q_j log(max(q_j, 1e-9)) per row, q = softmax(logits / τ)
    (MOC_MATH.md "Gate entropy regularization"). Args: logits fp32 [N, J]. Returns fp32 [N]."""
    q = torch.softmax(logits_NJ / temperature, dim=-1)
    return -(q * q.clamp_min(1e-9).log()).sum(-1)


def gate_entropy_beta(beta0: float, beta_final: float, warmup_frac: float, step: int,
                      total_steps: int) -> float:
    """β of the gate entropy term for optimizer step `step` (1-based, the step being taken)
    of `total_steps`: β_0 while step / total ≤ warmup_frac, then linear in step / total to
    β_final at the last step (step = total). Plain Python: the trainer calls it once a step."""
    if total_steps <= 0:
        return beta0
    progress = min(max(step / total_steps, 0.0), 1.0)
    if progress <= warmup_frac or warmup_frac >= 1.0:
        return beta0
    return beta0 + (beta_final - beta0) * (progress - warmup_frac) / (1.0 - warmup_frac)
