"""The [N, K, D] passes of a mediator round as fused Triton kernels, with plain-torch twins.

One idea: a mediator round (MOC_MATH.md §4) is a few [N, D] GEMMs, which cuBLAS runs near
peak, and two stretches of elementwise work and reductions over every token's K expert
states, which torch.compile left as many passes over [N, K, D] (1B MoC, one H100: ~2 ms a
layer of a 14 ms layer, forward and backward; docs/benchmarks.md, issue 7, session 5).
Each stretch here is one kernel that holds a token's K state rows in registers, forward and
backward:

    attend     ê_k = RMSNorm_exp(e_k);  s_k = ê_k·qk / sqrt(D)   (qk = W_kᵀ q, [N, D])
               β = softmax of s over the kept k (0 when none is kept);  pooled = Σ_k β_k ê_k
    feedback   g_k = sigmoid(w_e·e_k + b_e + w_m·m');  u_k = (e_k + g_k·fb)·m_k
               e_k ← e_k + c·(u_k − e_k)        (c: the round's activity, soft or 0/1)

The GEMMs between them (W_v, the mediator MLP, W_fb) stay in torch. Math in fp32 (fp64 has
no kernel: the torch twins serve it); outputs in the states' dtype; β, the RMS factors and
the gates are saved in fp32 for the backward, which recomputes ê from e instead of saving
[N, K, D]. The weight gradients over N (RMSNorm_exp's weight, w_e) are summed per program
in the backward kernels and the few partial rows are added in torch.

Shape legend: N tokens, K slots per token, D hidden size.
"""
from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


# ---------------------------------------------------------------------------------------
# Plain-torch twins (the path for fp64, CPU training and `moc_mediator_backend=torch`;
# under torch.compile inductor fuses them).
# ---------------------------------------------------------------------------------------

def scalar_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x·wᵀ (+ b) for a D -> 1 linear (weight [1, D]) as a product and a sum over D:
    compiled, it fuses into the neighbouring elementwise work, where cuBLAS ran an
    unaligned one-column GEMM per call (1B MoC, one H100: 0.043 ms a call). Returns [..., 1]."""
    out = (x.unsqueeze(-2) * weight).sum(-1)   # weight [1, D] as is: a view of the parameter
    # made the compiled backward return a [D] gradient for it (seen on the GPU)
    return out if bias is None else out + bias


def attend_reference(states_NKD, keep_NK, norm_weight, qk_ND, eps: float) -> torch.Tensor:
    """pooled [N, D] = Σ_k β_k·RMSNorm_exp(e_k), β the masked softmax of ê_k·qk / sqrt(D)."""
    from megatron_moc.model.norm import rms_norm

    e_norm = rms_norm(states_NKD, norm_weight, eps)
    dt = torch.float64 if states_NKD.dtype == torch.float64 else torch.float32
    scores = (e_norm * qk_ND.unsqueeze(1)).sum(-1).to(dt) / math.sqrt(qk_ND.shape[-1])
    keep = keep_NK.to(scores.dtype)
    beta = torch.softmax(scores.masked_fill(~keep_NK, -1e4), dim=-1) * keep
    denom = beta.sum(-1, keepdim=True)
    beta = torch.where(denom > 0, beta / torch.where(denom > 0, denom, 1), 0)
    return (beta.to(e_norm.dtype).unsqueeze(-1) * e_norm).sum(1)


def feedback_reference(states_NKD, keep_NK, feedback_ND, new_mediator_ND, activity_N,
                       w_e, b_e, w_m) -> torch.Tensor:
    """The states after the gated feedback and the round's soft update:
    e + c·((e + g·fb)·m − e), g = sigmoid(w_e·e + b_e + w_m·m'). w_e, w_m [1, D]; b_e [1]."""
    gate_NK1 = torch.sigmoid(scalar_gate(states_NKD, w_e, b_e)
                             + scalar_gate(new_mediator_ND, w_m, None).unsqueeze(1))
    keep = keep_NK.unsqueeze(-1).to(states_NKD.dtype)
    new_states = (states_NKD + gate_NK1 * feedback_ND.unsqueeze(1)) * keep
    c = activity_N.to(states_NKD.dtype)[:, None, None]
    return states_NKD + c * (new_states - states_NKD)


# ---------------------------------------------------------------------------------------
# Triton kernels. A program takes BLOCK_T tokens with their whole D row (BLOCK_D = next
# power of two); the K slots are a static loop. The backward kernels loop over token blocks
# (one program per few tokens would leave thousands of weight-gradient partial rows).
# ---------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _pick(mat, kk, k):
        """Column k of a [BLOCK_T, K_POW2] matrix as a [BLOCK_T] vector."""
        return tl.sum(tl.where(kk[None, :] == k, mat, 0.0), 1)

    @triton.jit
    def _attend_fwd_kernel(e_ptr, keep_ptr, w_ptr, qk_ptr, pooled_ptr, rstd_ptr, beta_ptr,
                           N, D, eps, scale, K: tl.constexpr, K_POW2: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        kk = tl.arange(0, K_POW2)
        rmask = rows < N
        tile = rmask[:, None] & (cols < D)[None, :]
        nk_mask = rmask[:, None] & (kk < K)[None, :]
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        qk = tl.load(qk_ptr + rows[:, None] * D + cols[None, :], mask=tile,
                     other=0.0).to(tl.float32)
        keep = tl.load(keep_ptr + rows[:, None] * K + kk[None, :], mask=nk_mask, other=0) != 0
        e_rows = e_ptr + rows[:, None] * (K * D) + cols[None, :]
        scores = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
        rstd = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
        for k in tl.static_range(K):
            e = tl.load(e_rows + k * D, mask=tile, other=0.0).to(tl.float32)
            r = tl.rsqrt(tl.sum(e * e, 1) / D + eps)
            s = tl.sum(e * w[None, :] * qk, 1) * r * scale
            scores = tl.where(kk[None, :] == k, s[:, None], scores)
            rstd = tl.where(kk[None, :] == k, r[:, None], rstd)
        # softmax over the kept slots only; β = 0 for a token with none kept
        top = tl.max(tl.where(keep, scores, -float("inf")), 1)
        top = tl.where(tl.sum(keep.to(tl.int32), 1) > 0, top, 0.0)
        p = tl.where(keep, tl.exp(scores - top[:, None]), 0.0)
        den = tl.sum(p, 1)
        beta = p / tl.where(den > 0, den, 1.0)[:, None]
        tl.store(rstd_ptr + rows[:, None] * K + kk[None, :], rstd, mask=nk_mask)
        tl.store(beta_ptr + rows[:, None] * K + kk[None, :], beta, mask=nk_mask)
        pooled = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for k in tl.static_range(K):   # the rows again, from cache
            e = tl.load(e_rows + k * D, mask=tile, other=0.0).to(tl.float32)
            pooled += (_pick(beta, kk, k) * _pick(rstd, kk, k))[:, None] * e
        tl.store(pooled_ptr + rows[:, None] * D + cols[None, :],
                 (pooled * w[None, :]).to(pooled_ptr.dtype.element_ty), mask=tile)

    @triton.jit
    def _attend_bwd_kernel(e_ptr, w_ptr, qk_ptr, rstd_ptr, beta_ptr, dpooled_ptr, de_ptr,
                           dqk_ptr, dw_part_ptr, N, D, scale, K: tl.constexpr,
                           K_POW2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        cols = tl.arange(0, BLOCK_D)
        kk = tl.arange(0, K_POW2)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for blk in range(tl.program_id(0), tl.cdiv(N, BLOCK_T), tl.num_programs(0)):
            rows = (blk * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
            rmask = rows < N
            tile = rmask[:, None] & (cols < D)[None, :]
            nk_mask = rmask[:, None] & (kk < K)[None, :]
            nd = rows[:, None] * D + cols[None, :]
            qk = tl.load(qk_ptr + nd, mask=tile, other=0.0).to(tl.float32)
            dp = tl.load(dpooled_ptr + nd, mask=tile, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows[:, None] * K + kk[None, :], mask=nk_mask, other=0.0)
            beta = tl.load(beta_ptr + rows[:, None] * K + kk[None, :], mask=nk_mask, other=0.0)
            e_rows = e_ptr + rows[:, None] * (K * D) + cols[None, :]
            dbeta = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
            for k in tl.static_range(K):             # dβ_k = dpooled · ê_k
                e = tl.load(e_rows + k * D, mask=tile, other=0.0).to(tl.float32)
                db = tl.sum(dp * e * w[None, :], 1) * _pick(rstd, kk, k)
                dbeta = tl.where(kk[None, :] == k, db[:, None], dbeta)
            dscore = beta * (dbeta - tl.sum(beta * dbeta, 1)[:, None]) * scale
            dqk = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
            for k in tl.static_range(K):
                e = tl.load(e_rows + k * D, mask=tile, other=0.0).to(tl.float32)
                r = _pick(rstd, kk, k)[:, None]
                ds = _pick(dscore, kk, k)[:, None]
                xhat = e * r
                dqk += ds * xhat * w[None, :]
                dehat = _pick(beta, kk, k)[:, None] * dp + ds * qk
                dw += dehat * xhat
                gx = dehat * w[None, :]              # RMSNorm backward
                de = r * (gx - xhat * (tl.sum(gx * xhat, 1) / D)[:, None])
                tl.store(de_ptr + rows[:, None] * (K * D) + k * D + cols[None, :],
                         de.to(de_ptr.dtype.element_ty), mask=tile)
            tl.store(dqk_ptr + nd, dqk.to(dqk_ptr.dtype.element_ty), mask=tile)
        tl.store(dw_part_ptr + tl.program_id(0) * D + cols, tl.sum(dw, 0), mask=cols < D)

    @triton.jit
    def _feedback_fwd_kernel(e_ptr, keep_ptr, fb_ptr, m_ptr, c_ptr, we_ptr, be_ptr, wm_ptr,
                             out_ptr, gate_ptr, N, D, K: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_D: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < N
        tile = rmask[:, None] & (cols < D)[None, :]
        nd = rows[:, None] * D + cols[None, :]
        we = tl.load(we_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        wm = tl.load(wm_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        fb = tl.load(fb_ptr + nd, mask=tile, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + nd, mask=tile, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
        z_m = tl.sum(m * wm[None, :], 1) + tl.load(be_ptr).to(tl.float32)
        for k in tl.static_range(K):
            e_k = rows[:, None] * (K * D) + k * D + cols[None, :]
            e = tl.load(e_ptr + e_k, mask=tile, other=0.0).to(tl.float32)
            kept = (tl.load(keep_ptr + rows * K + k, mask=rmask, other=0) != 0).to(tl.float32)
            g = tl.sigmoid(tl.sum(e * we[None, :], 1) + z_m)
            u = kept[:, None] * (e + g[:, None] * fb)
            tl.store(out_ptr + e_k, (e + c * (u - e)).to(out_ptr.dtype.element_ty), mask=tile)
            tl.store(gate_ptr + rows * K + k, g, mask=rmask)

    @triton.jit
    def _feedback_bwd_kernel(e_ptr, keep_ptr, fb_ptr, c_ptr, we_ptr, gate_ptr, dout_ptr,
                             de_ptr, dfb_ptr, dz_ptr, dc_ptr, dwe_part_ptr, N, D,
                             K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        cols = tl.arange(0, BLOCK_D)
        we = tl.load(we_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        dwe = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for blk in range(tl.program_id(0), tl.cdiv(N, BLOCK_T), tl.num_programs(0)):
            rows = (blk * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
            rmask = rows < N
            tile = rmask[:, None] & (cols < D)[None, :]
            nd = rows[:, None] * D + cols[None, :]
            fb = tl.load(fb_ptr + nd, mask=tile, other=0.0).to(tl.float32)
            c = tl.load(c_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            dfb = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
            dz_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
            dc = tl.zeros((BLOCK_T,), dtype=tl.float32)
            for k in tl.static_range(K):
                e_k = rows[:, None] * (K * D) + k * D + cols[None, :]
                e = tl.load(e_ptr + e_k, mask=tile, other=0.0).to(tl.float32)
                dout = tl.load(dout_ptr + e_k, mask=tile, other=0.0).to(tl.float32)
                kept = (tl.load(keep_ptr + rows * K + k, mask=rmask, other=0) != 0).to(tl.float32)
                g = tl.load(gate_ptr + rows * K + k, mask=rmask, other=0.0)
                u = kept[:, None] * (e + g[:, None] * fb)
                dc += tl.sum(dout * (u - e), 1)
                du = c[:, None] * dout                         # d(loss)/d(u_k)
                dz = kept * tl.sum(du * fb, 1) * g * (1.0 - g)
                dfb += (kept * g)[:, None] * du
                de = dout - du + kept[:, None] * du + dz[:, None] * we[None, :]
                tl.store(de_ptr + e_k, de.to(de_ptr.dtype.element_ty), mask=tile)
                dwe += dz[:, None] * e
                dz_sum += dz
            tl.store(dfb_ptr + nd, dfb.to(dfb_ptr.dtype.element_ty), mask=tile)
            tl.store(dz_ptr + rows, dz_sum, mask=rmask)
            tl.store(dc_ptr + rows, dc, mask=rmask)
        tl.store(dwe_part_ptr + tl.program_id(0) * D + cols, tl.sum(dwe, 0), mask=cols < D)


# ---------------------------------------------------------------------------------------
# Launchers. Inputs are made contiguous; keep is read as bytes.
# ---------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _blocks(d: int, config: dict | None = None, backward: bool = False) -> dict:
    """BLOCK_D = the row rounded up to a power of two; BLOCK_T tokens so a tile holds ~2K
    elements forward, ~1K backward (more live tiles there), 16 per thread; PROGRAMS_PER_SM for
    the backward kernels' loops. From a sweep at N 16384, K 2, D 1024 on an H100
    (`tools/bench_mediator.py --sweep`, docs/benchmarks.md): 2.4-2.7 TB/s forward, 2.4-2.5
    backward. `config` (benchmark sweeps) overrides."""
    block_d = triton.next_power_of_2(d)
    block_t = max(1, (1024 if backward else 2048) // block_d)
    cfg = dict(BLOCK_T=block_t, num_warps=max(2, min(8, block_t * block_d // 512)),
               PROGRAMS_PER_SM=8)
    return dict(cfg, **(config or {}), BLOCK_D=block_d)


def _loop_programs(device: torch.device, blocks: int, cfg: dict) -> int:
    """Programs for the backward kernels' token-block loops (pops PROGRAMS_PER_SM from cfg;
    few programs in the interpreter, so each one loops)."""
    per_sm = cfg.pop("PROGRAMS_PER_SM")
    if device.type != "cuda":
        return min(blocks, 3)
    return min(blocks, per_sm * torch.cuda.get_device_properties(device).multi_processor_count)


def _keep_bytes(keep_NK: torch.Tensor) -> torch.Tensor:
    keep_NK = keep_NK.contiguous()
    return keep_NK.view(torch.uint8) if keep_NK.dtype == torch.bool else keep_NK


def _check(states_NKD: torch.Tensor, keep_NK: torch.Tensor, **nd: torch.Tensor) -> None:
    n, k, d = states_NKD.shape
    if keep_NK.shape != (n, k):
        raise ValueError(f"keep_NK must be [N, K] = [{n}, {k}], got {tuple(keep_NK.shape)}")
    for name, t in nd.items():
        if t.shape != (n, d):
            raise ValueError(f"{name} must be [N, D] = [{n}, {d}], got {tuple(t.shape)}")


def attend_fwd(states_NKD, keep_NK, norm_weight, qk_ND, eps: float, config=None):
    """(pooled [N, D] in the states' dtype, rstd [N, K] fp32, beta [N, K] fp32)."""
    _check(states_NKD, keep_NK, qk_ND=qk_ND)
    n, k, d = states_NKD.shape
    e = states_NKD.contiguous()
    pooled = torch.empty(n, d, dtype=e.dtype, device=e.device)
    rstd = torch.empty(n, k, dtype=torch.float32, device=e.device)
    beta = torch.empty(n, k, dtype=torch.float32, device=e.device)
    cfg = _blocks(d, config)
    cfg.pop("PROGRAMS_PER_SM")
    _attend_fwd_kernel[(triton.cdiv(n, cfg["BLOCK_T"]),)](
        e, _keep_bytes(keep_NK), norm_weight.contiguous(), qk_ND.contiguous(), pooled, rstd,
        beta, n, d, eps, 1.0 / math.sqrt(d), K=k, K_POW2=triton.next_power_of_2(k), **cfg)
    return pooled, rstd, beta


def attend_bwd(dpooled_ND, states_NKD, norm_weight, qk_ND, rstd_NK, beta_NK, config=None):
    """(d states [N, K, D], d qk [N, D], d norm_weight [D] in fp32)."""
    n, k, d = states_NKD.shape
    e = states_NKD.contiguous()
    de = torch.empty_like(e)
    dqk = torch.empty(n, d, dtype=qk_ND.dtype, device=e.device)
    cfg = _blocks(d, config, backward=True)
    programs = _loop_programs(e.device, triton.cdiv(n, cfg["BLOCK_T"]), cfg)
    dw_part = torch.empty(programs, d, dtype=torch.float32, device=e.device)
    _attend_bwd_kernel[(programs,)](
        e, norm_weight.contiguous(), qk_ND.contiguous(), rstd_NK.contiguous(),
        beta_NK.contiguous(), dpooled_ND.contiguous(), de, dqk, dw_part, n, d,
        1.0 / math.sqrt(d), K=k, K_POW2=triton.next_power_of_2(k), **cfg)
    return de, dqk, dw_part.sum(0)


def feedback_fwd(states_NKD, keep_NK, feedback_ND, new_mediator_ND, activity_N, w_e, b_e, w_m,
                 config=None):
    """(new states [N, K, D], gate [N, K] fp32). w_e, w_m: [1, D] or [D]; b_e [1]."""
    _check(states_NKD, keep_NK, feedback_ND=feedback_ND, new_mediator_ND=new_mediator_ND)
    n, k, d = states_NKD.shape
    e = states_NKD.contiguous()
    out = torch.empty_like(e)
    gate = torch.empty(n, k, dtype=torch.float32, device=e.device)
    cfg = _blocks(d, config)
    cfg.pop("PROGRAMS_PER_SM")
    _feedback_fwd_kernel[(triton.cdiv(n, cfg["BLOCK_T"]),)](
        e, _keep_bytes(keep_NK), feedback_ND.contiguous(), new_mediator_ND.contiguous(),
        activity_N.contiguous(), w_e.contiguous(), b_e.contiguous(), w_m.contiguous(), out,
        gate, n, d, K=k, **cfg)
    return out, gate


def feedback_bwd(dout_NKD, states_NKD, keep_NK, feedback_ND, activity_N, w_e, gate_NK, config=None):
    """(d states, d feedback [N, D], dz [N] = Σ_k d(gate logit_k) (fp32), d activity [N]
    (fp32), d w_e [D] (fp32)). The gradients of w_m, b_e and m' follow from dz in torch."""
    n, k, d = states_NKD.shape
    e = states_NKD.contiguous()
    de = torch.empty_like(e)
    dfb = torch.empty(n, d, dtype=feedback_ND.dtype, device=e.device)
    dz = torch.empty(n, dtype=torch.float32, device=e.device)
    dc = torch.empty(n, dtype=torch.float32, device=e.device)
    cfg = _blocks(d, config, backward=True)
    programs = _loop_programs(e.device, triton.cdiv(n, cfg["BLOCK_T"]), cfg)
    dwe_part = torch.empty(programs, d, dtype=torch.float32, device=e.device)
    _feedback_bwd_kernel[(programs,)](
        e, _keep_bytes(keep_NK), feedback_ND.contiguous(), activity_N.contiguous(),
        w_e.contiguous(), gate_NK.contiguous(), dout_NKD.contiguous(), de, dfb, dz, dc,
        dwe_part, n, d, K=k, **cfg)
    return de, dfb, dz, dc, dwe_part.sum(0)
