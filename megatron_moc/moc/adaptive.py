"""Adaptive depth gates (MOC_MATH.md §3 "Adaptive depth", §4 "Adaptive rounds").

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
