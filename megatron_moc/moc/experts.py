"""Experts: a SwiGLU FFN run S times with shared weights, the Iterative Reasoning Loop.

Legend: P dispatched rows (sorted by expert), E experts, D hidden, F ffn size, S steps.
MOC_MATH.md §3:
    h_0 = x
    h_s = h_{s-1} + a_s · α · FFN_e(RMSNorm_e(h_{s-1} + x)),  α = 1/sqrt(S)
    FFN_e(z) = W2_e( silu(z·W_gate) ⊙ (z·W_up) )

Weights are stacked so a grouped GEMM consumes them: w13 [E, D, 2F] (gate columns first,
then up), w2 [E, F, D]. One place picks how the grouped MLP runs (`moc_expert_backend`):
    triton      our grouped-GEMM kernel (kernels/), GPUs
    grouped_mm  torch.nn.functional.grouped_mm, device-side offsets, no host sync
    loop        a Python loop over experts: the readable spec, fp64 tests only (it reads the
                offsets back to the host, so never on a training path)
    auto        triton when it can run, else grouped_mm (fp32/bf16), else loop (fp64)
Hard adaptive mode runs step s on the still-active rows only, so the grouped GEMM does no
work for the others. A row's step count depends on x alone (its gate G_e(x)), so the layer
can sort each expert's rows by it, highest first, in the dispatch permutation it builds
anyway (`depth_sorted_activity`): step s's rows are then a prefix of each expert's rows and
the kernels run on row segments (kernels/row_segments.py), nothing moved. Callers that cannot
sort (expert parallelism's received rows) get the compaction of `_hard_step` instead.
"""

import functools
import importlib.util
import logging
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_moc.model.norm import rms_norm
from megatron_moc.moc.adaptive import gate_entropy, step_activity
from megatron_moc.moc.dispatch import compact_active, compact_rows, uncompact_rows
from megatron_moc.moc.logits import fp32_logits, own_gate_logits
from kernels import row_segments

log = logging.getLogger(__name__)
_LOGGED = set()


def _log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.warning(msg)


# ----------------------------------------------------------------------------- backends
def swiglu_mlp_loop(z_PD, w13_EDF, w2_EFD, offsets_E1):
    """Readable reference: one expert at a time. Syncs on `offsets.tolist()` (tests only)."""
    out = z_PD.new_zeros(z_PD.shape[0], w2_EFD.shape[-1])
    for e, (lo, hi) in enumerate(row_segments.host_bounds(offsets_E1)):   # offsets or segments
        gate, up = (z_PD[lo:hi] @ w13_EDF[e]).chunk(2, dim=-1)
        out[lo:hi] = (F.silu(gate) * up) @ w2_EFD[e]
    return out


def swiglu_mlp_grouped_mm(z_PD, w13_EDF, w2_EFD, offsets_E1):
    """F.grouped_mm with device-side int32 offsets. grouped_mm leaves rows past the last
    offset (and their gradients) uninitialized, so both are masked with `where` (and so are
    the gaps of row segments, which it computes and we drop)."""
    valid = row_segments.row_mask(offsets_E1, z_PD.shape[0]).unsqueeze(-1)
    offs = row_segments.starts(offsets_E1)[1:].to(torch.int32)
    z = torch.where(valid, z_PD, 0).contiguous()
    gate_up = torch.where(valid, F.grouped_mm(z, w13_EDF, offs=offs), 0)
    gate, up = gate_up.chunk(2, dim=-1)
    act = (F.silu(gate) * up).contiguous()
    return torch.where(valid, F.grouped_mm(act, w2_EFD, offs=offs), 0)


def swiglu_mlp_triton(z_PD, w13_EDF, w2_EFD, offsets_E1, wgrad_chain=None, zero_tail=True):
    """Our Triton kernels. With a `wgrad_chain` (kernels/expert_mlp_op.py), returns (y, the
    chain for the next step): the S steps' weight gradients then add up in fp32 inside the
    wgrad kernel and are rounded once, eager and under torch.compile alike. zero_tail=False:
    y's and z's gradient's rows past offsets[E] may be left unwritten (hard mode)."""
    if wgrad_chain is not None:
        from kernels.expert_mlp_op import expert_swiglu_mlp_op

        return expert_swiglu_mlp_op(z_PD, w13_EDF, w2_EFD, offsets_E1, backend="triton",
                                    wgrad_chain=wgrad_chain, zero_tail=zero_tail)
    from kernels.expert_mlp import expert_swiglu_mlp

    return expert_swiglu_mlp(z_PD, w13_EDF, w2_EFD, offsets_E1, backend="triton",
                             zero_tail=zero_tail)


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_can_run(x: torch.Tensor) -> bool:
    """`auto` takes Triton for GPU tensors only: the CPU interpreter (TRITON_INTERPRET=1) is
    for kernel tests that ask for backend 'triton' by name, never a training path. (No import
    lookups per call: torch.compile traces this.)"""
    return x.is_cuda and _HAS_TRITON


def pick_backend(name: str, x: torch.Tensor):
    """The one place that maps `moc_expert_backend` to a function."""
    if name == "auto":
        if x.dtype == torch.float64:
            name = "loop"
        elif _triton_can_run(x):
            name = "triton"
        else:
            name = "grouped_mm"
            _log_once("MoC experts: Triton grouped GEMM unavailable (no GPU or Triton); "
                      "using torch.nn.functional.grouped_mm")
    return {"triton": swiglu_mlp_triton, "grouped_mm": swiglu_mlp_grouped_mm,
            "loop": swiglu_mlp_loop}[name]


def rows_of(weight_ED: torch.Tensor, expert_P: torch.Tensor) -> torch.Tensor:
    """weight[expert_P] [P, D] as a one-hot product: the same values (one nonzero term per
    row), but its backward is an [E, P]·[P, D] GEMM with fp32 accumulation, where the
    index_select's is an index_add with P rows contending for E (measured 0.37 ms per layer
    at P = 32768, E = 8, in bf16 atomics)."""
    experts_E = torch.arange(weight_ED.shape[0], device=expert_P.device)
    onehot_PE = (expert_P.unsqueeze(1) == experts_E).to(weight_ED.dtype)  # F.one_hot syncs
    return onehot_PE @ weight_ED


def step_segments(active_P: torch.Tensor, expert_P: torch.Tensor, offsets_E1: torch.Tensor
                  ) -> torch.Tensor:
    """Row segments [2, E+1] of one hard step on depth-sorted rows: each expert's rows still
    active are the first `count` of its rows (kernels/row_segments.py). The counts come from
    a [P, E] compare on the device, no host sync."""
    experts_E = torch.arange(offsets_E1.shape[0] - 1, device=expert_P.device)
    kept_P = torch.arange(expert_P.shape[0], device=expert_P.device) < offsets_E1[-1]
    live_P = (active_P > 0) & kept_P
    count_E = ((expert_P.unsqueeze(1) == experts_E) & live_P.unsqueeze(1)).sum(0)
    return row_segments.with_active_ends(offsets_E1, count_E)


# ----------------------------------------------------------------------------- module
class IRLExperts(nn.Module):
    """E experts, each a SwiGLU FFN with its own RMSNorm_e and (adaptive) step gate G_e."""

    def __init__(self, config, num_experts: int, expert_parallel: int = 1):
        """`num_experts` is the model's E; with `expert_parallel` > 1 this rank holds the
        E / EP experts of its EP rank (`first_expert` on), as DeepSpeed's MoE params."""
        super().__init__()
        self.config = config
        self.expert_parallel = expert_parallel
        self.num_experts = E = num_experts // expert_parallel
        if expert_parallel > 1:
            from megatron_moc.parallel.groups import expert_parallel_rank

            self.first_expert = expert_parallel_rank(expert_parallel) * E
        else:
            self.first_expert = 0
        D, Fh = config.hidden_size, (config.moe_ffn_hidden_size or config.ffn_hidden_size)
        self.steps = S = config.moc_irl_steps
        self.alpha = 1.0 / math.sqrt(S)
        self.w13 = self._init_param((D, 2 * Fh), num_experts, config.init_method)
        self.w2 = self._init_param((Fh, D), num_experts, config.init_method)
        self.norm_weight = self._init_param((D,), num_experts, nn.init.ones_)
        if config.adaptive_steps_on:
            self.step_gate_weight = self._init_param((S + 1, D), num_experts, config.init_method)
            self.step_gate_bias = self._init_param((S + 1,), num_experts, nn.init.zeros_)
        else:
            self.step_gate_weight = self.step_gate_bias = None
        if expert_parallel > 1:
            from megatron_moc.parallel.groups import expert_group_name

            for p in self.parameters():  # DeepSpeed's MoE convention for expert params
                p.allreduce = False
                p.group_name = expert_group_name(expert_parallel)

    def _init_param(self, shape, num_experts: int, init) -> nn.Parameter:
        """Initialise all E experts' weights, keep this rank's slice: the same seed gives
        the same model at every EP size."""
        full = torch.empty(num_experts, *shape, dtype=self.config.params_dtype)
        init(full)
        local = full[self.first_expert:self.first_expert + self.num_experts]
        return nn.Parameter(local.clone() if self.expert_parallel > 1 else full)

    def activity(self, x_PD: torch.Tensor, expert_P: torch.Tensor):
        """Per-row step activity a [P, S] and E[steps] [P], fp32 (the gate is fp32)."""
        cfg, P, S = self.config, x_PD.shape[0], self.steps
        dt = torch.float64 if x_PD.dtype == torch.float64 else torch.float32
        if self.step_gate_weight is None:
            return x_PD.new_ones(P, S, dtype=dt), x_PD.new_full((P,), float(S), dtype=dt)
        return step_activity(self._own_gate_logits(x_PD, expert_P), cfg.moc_step_gate_temperature,
                             cfg.moc_adaptive_mode)

    def gate_entropy(self, x_PD: torch.Tensor, expert_P: torch.Tensor) -> torch.Tensor:
        """Per-row entropy H(q) of the row's own step gate, fp32 [P]; zeros without gates
        (MOC_MATH.md "Gate entropy regularization"). Only built when the regularizer is on:
        it repeats the gate GEMM of `activity` ([P, D]·[D, E(S+1)], cheap) so the expert
        forward keeps its signature."""
        dt = torch.float64 if x_PD.dtype == torch.float64 else torch.float32
        if self.step_gate_weight is None:
            return x_PD.new_zeros(x_PD.shape[0], dtype=dt)
        return gate_entropy(self._own_gate_logits(x_PD, expert_P),
                            self.config.moc_step_gate_temperature)

    @property
    def sorts_by_depth(self) -> bool:
        """Whether the layer should hand `forward` each expert's rows sorted by step count,
        highest first, with their activity (`depth_sorted_activity`): hard mode with step
        gates, and all E experts on this rank (expert parallelism's received rows arrive
        from several ranks, and take the compaction instead)."""
        return (self.config.moc_adaptive_mode == "hard" and self.step_gate_weight is not None
                and self.expert_parallel == 1)

    def depth_sorted_activity(self, x_ND: torch.Tensor, experts_NK: torch.Tensor):
        """(activity fp32 [N, K, S], E[steps] fp32 [N, K], steps int64 [N, K]) of each (token,
        slot) pair under its own expert's step gate, from the tokens: the layer sorts the
        dispatch by `steps` and passes the first two, in row order, to `forward`, so the
        sort and the steps' row ranges come from the same numbers. The gate GEMM runs on the
        N tokens against all E gates at once ([N, D]·[D, E(S+1)]), as `own_gate_logits`
        does on the rows."""
        weight, bias = self.step_gate_weight, self.step_gate_bias
        E, O, D = weight.shape
        N, K = experts_NK.shape
        logits = fp32_logits(x_ND, weight.reshape(E * O, D), bias.reshape(-1)).view(N, E, O)
        logits = logits.gather(1, experts_NK.unsqueeze(-1).expand(N, K, O))
        activity, expected = step_activity(logits.reshape(N * K, O),
                                           self.config.moc_step_gate_temperature, "hard")
        steps = activity.sum(-1).long()
        return activity.view(N, K, -1), expected.view(N, K), steps.view(N, K)

    def _own_gate_logits(self, x_PD: torch.Tensor, expert_P: torch.Tensor) -> torch.Tensor:
        """fp32 [P, S+1]: each row's logits under its own expert's step gate."""
        return own_gate_logits(x_PD, self.step_gate_weight, self.step_gate_bias, expert_P)

    def forward(self, x_PD: torch.Tensor, expert_P: torch.Tensor, offsets_E1: torch.Tensor,
                activity: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Args: x_PD rows sorted by expert (kept rows first); expert_P int64 [P];
        offsets_E1 int64 [E+1]; activity: None, or (activity fp32 [P, S], E[steps] fp32 [P])
        of the rows from `depth_sorted_activity`, each expert's rows then sorted by step
        count, highest first (hard mode: step s runs on row segments, nothing moved).
        Returns (h_PD: IRL output, zero-update past offsets[E]; expected_steps_P fp32 [P])."""
        mlp = pick_backend(self.config.moc_expert_backend, x_PD)
        chain = None
        if mlp is swiglu_mlp_triton and self.steps > 1 and torch.is_grad_enabled():
            # The S steps reuse the weights: their wgrads add up in fp32 in the wgrad kernel and
            # are cast once (F.grouped_mm would round each to bf16); kernels/expert_mlp_op.py.
            from kernels.expert_mlp_op import wgrad_chain

            chain = wgrad_chain(self.steps)
        activity_PS, expected_P = (self.activity(x_PD, expert_P) if activity is None
                                   else activity)
        hard = self.config.moc_adaptive_mode == "hard" and self.step_gate_weight is not None
        on_segments = hard and activity is not None
        norm_w_PD = rows_of(self.norm_weight, expert_P)   # the rows' RMSNorm_e weights
        eps = self.config.layernorm_epsilon
        # moc_recompute: keep only each step's inputs, rerun the step (its grouped MLP too,
        # +1/3 of the expert FLOPs) in backward: frees the MLP's saved [P, 3F] per step.
        recompute = (self.config.moc_recompute in ("experts", "all") and torch.is_grad_enabled())
        h = x_PD
        for s in range(self.steps):
            a_P1 = (activity_PS[:, s:s + 1] * self.alpha).to(x_PD.dtype)
            if on_segments:   # the soft step's code on this step's row segments
                step = functools.partial(self._soft_step, mlp, self.w13, self.w2, eps=eps,
                                         offsets_E1=step_segments(
                                             activity_PS[:, s], expert_P, offsets_E1))
            elif hard:
                step = functools.partial(self._hard_step, mlp, self.w13, self.w2,
                                         active_P=activity_PS[:, s], offsets_E1=offsets_E1,
                                         eps=eps)
            else:
                step = functools.partial(self._soft_step, mlp, self.w13, self.w2,
                                         offsets_E1=offsets_E1, eps=eps)
            if recompute:
                update, chain = checkpoint(step, h, x_PD, norm_w_PD, a_P1, chain,
                                           use_reentrant=False)
            else:
                update, chain = step(h, x_PD, norm_w_PD, a_P1, chain)
            h = h + update
        return h, expected_P

    @staticmethod
    def _mlp(mlp, z, w13, w2, offsets_E1, chain, zero_tail=True):
        """(y, next chain): the chain (swiglu_mlp_triton) only where there is one.
        zero_tail=False reaches the Triton MLP only; the torch backends write zeros there
        anyway."""
        if mlp is not swiglu_mlp_triton:
            return mlp(z, w13, w2, offsets_E1), None
        if chain is None:
            return mlp(z, w13, w2, offsets_E1, zero_tail=zero_tail), None
        return mlp(z, w13, w2, offsets_E1, wgrad_chain=chain, zero_tail=zero_tail)

    @staticmethod
    def _soft_step(mlp, w13, w2, h, x, norm_w, a_P1, chain, offsets_E1, eps):
        """The update a_s·α·FFN_e(RMSNorm_e(h + x)) of one step on all rows, and the next
        weight-gradient chain (None without one)."""
        y, chain = IRLExperts._mlp(mlp, rms_norm(h + x, norm_w, eps), w13, w2, offsets_E1, chain)
        return a_P1 * y, chain

    @staticmethod
    def _hard_step(mlp, w13, w2, h, x, norm_w, a_P1, chain, active_P, offsets_E1, eps):
        """One hard-mode step on the active rows only: compact them per expert (a prefix
        sum over the rows, all on the device: dispatch.compact_active), run the grouped MLP,
        move them back. The norm runs in dispatch order, as in `_soft_step` (its weights
        built once per layer); the moves there and back read only the active rows and
        write zeros for the rest (kernels/active_rows.py), so the inactive rows cost no
        reads, forward or backward. Nor do they read the MLP's rows past the active count,
        of y forward and of z's gradient backward: the MLP leaves those unwritten
        (zero_tail=False), which saves two [inactive, D] writes per step."""
        order, inverse, offsets = compact_active(active_P > 0, offsets_E1)
        count = offsets[-1:]
        z = compact_rows(rms_norm(h + x, norm_w, eps), order, inverse, count)
        y, chain = IRLExperts._mlp(mlp, z, w13, w2, offsets, chain, zero_tail=False)
        return a_P1 * uncompact_rows(y, inverse, order, count), chain   # a = 0: inactive


class IRLFeedForward(nn.Module):
    """The dense FFN of `dense` / `irl_only` models: the IRL expert with a single expert
    (MOC_MATH.md: "dense / IRL-only models use an FFN here instead")."""

    def __init__(self, config, **kwargs):
        super().__init__()
        self.config = config
        self.ffn = IRLExperts(config, num_experts=1)
        with torch.no_grad():  # spec init: the dense FFN's w2 is scaled like o_proj
            self.ffn.w2.mul_(1.0 / math.sqrt(2 * config.num_layers))
        if config.sequence_parallel:  # it sees this rank's s/TP tokens: sum grads over TP
            for p in self.parameters():
                p.sequence_parallel = True

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        shape = hidden_states.shape
        x_ND = hidden_states.reshape(-1, shape[-1])
        N = x_ND.shape[0]
        expert = torch.zeros(N, dtype=torch.long, device=x_ND.device)
        offsets = torch.arange(2, device=x_ND.device) * N  # [0, N], made on the device
        h, _ = self.ffn(x_ND, expert, offsets)
        return h.view(shape), None
