"""The mediator round's fused kernels (kernels/mediator_round.py) as torch.library custom ops.

One idea: as opaque custom ops with fake shapes, the Triton kernels sit inside the compiled
MediatorCombiner like matmuls (torch.compile cannot trace the launchers), and the small
[N, D] work of their backward formulas (the mediator's share of the feedback gate's
gradient, the bias and w_m gradients) is plain torch that inductor fuses with its
neighbours. MOC_MATH.md §4.

    mediator_attend(states, keep, norm_weight, qk, eps) -> pooled [N, D]
    mediator_feedback(states, keep, feedback, new_mediator, activity, w_e, b_e, w_m)
        -> states after the gated feedback and the round's update [N, K, D]

Same contracts as kernels.mediator_round.attend_reference / feedback_reference (their
twins). Registered once per process: the ops look the launchers up at call time, so a
kernels.mediator_round reloaded by the kernel tests is the one that runs.
"""
from __future__ import annotations

import torch

_NS = "moc_kernels"


def _kernels():
    from kernels import mediator_round   # at call time: see the module docstring

    return mediator_round


@torch.library.custom_op(f"{_NS}::mediator_attend_fwd", mutates_args=())
def _attend_fwd(states: torch.Tensor, keep: torch.Tensor, norm_weight: torch.Tensor,
                qk: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pooled [N, D], rstd [N, K] fp32, beta [N, K] fp32)."""
    return _kernels().attend_fwd(states, keep, norm_weight, qk, eps)


@_attend_fwd.register_fake
def _attend_fwd_fake(states, keep, norm_weight, qk, eps):
    n, k, d = states.shape
    f32 = dict(dtype=torch.float32)
    return states.new_empty(n, d), states.new_empty(n, k, **f32), states.new_empty(n, k, **f32)


@torch.library.custom_op(f"{_NS}::mediator_attend_bwd", mutates_args=())
def _attend_bwd(dpooled: torch.Tensor, states: torch.Tensor, norm_weight: torch.Tensor,
                qk: torch.Tensor, rstd: torch.Tensor, beta: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d states, d qk, d norm_weight [D] fp32)."""
    return _kernels().attend_bwd(dpooled, states, norm_weight, qk, rstd, beta)


@_attend_bwd.register_fake
def _attend_bwd_fake(dpooled, states, norm_weight, qk, rstd, beta):
    return (torch.empty_like(states), torch.empty_like(qk),
            norm_weight.new_empty(states.shape[-1], dtype=torch.float32))


def _attend_setup(ctx, inputs, output):
    states, _keep, norm_weight, qk, _eps = inputs
    _, rstd, beta = output
    ctx.save_for_backward(states, norm_weight, qk, rstd, beta)


def _attend_backward(ctx, dpooled, _drstd, _dbeta):
    states, norm_weight, qk, rstd, beta = ctx.saved_tensors
    dstates, dqk, dw = _attend_bwd(dpooled, states, norm_weight, qk, rstd, beta)
    return dstates, None, dw.to(norm_weight.dtype), dqk, None


_attend_fwd.register_autograd(_attend_backward, setup_context=_attend_setup)


@torch.library.custom_op(f"{_NS}::mediator_feedback_fwd", mutates_args=())
def _feedback_fwd(states: torch.Tensor, keep: torch.Tensor, feedback: torch.Tensor,
                  new_mediator: torch.Tensor, activity: torch.Tensor, w_e: torch.Tensor,
                  b_e: torch.Tensor, w_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(new states [N, K, D], gate [N, K] fp32)."""
    return _kernels().feedback_fwd(states, keep, feedback, new_mediator, activity, w_e, b_e,
                                   w_m)


@_feedback_fwd.register_fake
def _feedback_fwd_fake(states, keep, feedback, new_mediator, activity, w_e, b_e, w_m):
    return torch.empty_like(states), states.new_empty(states.shape[:2], dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::mediator_feedback_bwd", mutates_args=())
def _feedback_bwd(dout: torch.Tensor, states: torch.Tensor, keep: torch.Tensor,
                  feedback: torch.Tensor, activity: torch.Tensor, w_e: torch.Tensor,
                  gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor, torch.Tensor]:
    """(d states, d feedback, dz [N] fp32, d activity [N] fp32, d w_e [D] fp32)."""
    return _kernels().feedback_bwd(dout, states, keep, feedback, activity, w_e, gate)


@_feedback_bwd.register_fake
def _feedback_bwd_fake(dout, states, keep, feedback, activity, w_e, gate):
    n, _, d = states.shape
    f32 = dict(dtype=torch.float32)
    return (torch.empty_like(states), torch.empty_like(feedback), states.new_empty(n, **f32),
            states.new_empty(n, **f32), states.new_empty(d, **f32))


def _feedback_setup(ctx, inputs, output):
    states, keep, feedback, new_mediator, activity, w_e, b_e, w_m = inputs
    ctx.save_for_backward(states, keep, feedback, new_mediator, activity, w_e, b_e, w_m,
                          output[1])


def _feedback_backward(ctx, dout, _dgate):
    states, keep, feedback, new_mediator, activity, w_e, b_e, w_m, gate = ctx.saved_tensors
    dstates, dfb, dz, dact, dwe = _feedback_bwd(dout, states, keep, feedback, activity, w_e,
                                                gate)
    # z_k = w_e·e_k + b_e + w_m·m' for every k: m', w_m and b_e get Σ_k dz_k = dz
    dm = (dz[:, None] * w_m.reshape(1, -1).float()).to(new_mediator.dtype)
    dwm = (dz[:, None] * new_mediator.float()).sum(0).reshape(w_m.shape).to(w_m.dtype)
    dbe = dz.sum().reshape(b_e.shape).to(b_e.dtype)
    return (dstates, None, dfb, dm, dact.to(activity.dtype), dwe.reshape(w_e.shape).to(w_e.dtype),
            dbe, dwm)


_feedback_fwd.register_autograd(_feedback_backward, setup_context=_feedback_setup)


def mediator_attend(states_NKD, keep_NK, norm_weight, qk_ND, eps: float) -> torch.Tensor:
    """pooled [N, D] = Σ_k β_k·RMSNorm_exp(e_k) (see kernels/mediator_round.py).

    Args: states_NKD [N, K, D] (bf16, fp16 or fp32); keep_NK bool [N, K]; norm_weight [D];
        qk_ND [N, D] = W_kᵀ q; eps the RMSNorm epsilon."""
    return _attend_fwd(states_NKD, keep_NK, norm_weight, qk_ND, eps)[0]


def mediator_feedback(states_NKD, keep_NK, feedback_ND, new_mediator_ND, activity_N,
                      w_e, b_e, w_m) -> torch.Tensor:
    """States after the gated feedback and the round's update, [N, K, D].

    Args: feedback_ND = W_fb·RMSNorm_med(m'); new_mediator_ND = m'; activity_N the round's
        c (fp32); w_e [1, D], b_e [1], w_m [1, D] (exp_feedback_e / exp_feedback_m)."""
    return _feedback_fwd(states_NKD, keep_NK, feedback_ND, new_mediator_ND, activity_N,
                         w_e, b_e, w_m)[0]
