"""Grouped GEMM over rows sorted by expert, driven by device-side offsets (Triton).

One idea: expert e owns the dispatched rows [offsets[e], offsets[e+1]); the forward is
Y[rows_e] = X[rows_e] @ W[e], the backward dX = dY @ W[e]^T and dW[e] = X[rows_e]^T @ dY[rows_e].
MOC_MATH.md, "Experts" (the W13 / W2 GEMMs of every IRL step). Fused SwiGLU lives in
kernels/expert_mlp.py but runs on the kernel below (EPILOGUE 1).

Shape legend: P dispatched rows, T source rows (x before a gather), E experts, K in-dim,
N out-dim. Dtypes: bf16 / fp16 / fp32 in, fp32 accumulation, output in the input dtype.

Public API
    grouped_gemm(x, w, offsets, gather_index=None, *, backend=None) -> y
        x [T, K] (T = P without gather), w [E, K, N], offsets int64 [E+1] on x's device,
        offsets[0] = 0, nondecreasing, offsets[E] <= P. Rows [offsets[E], P) of y are zeros.
        offsets may also be segments int64 [2, E+1] (expert e owns [offsets[e], ends[e]),
        kernels/row_segments.py: hard IRL mode's depth-sorted rows); rows in the gaps are
        treated as the tail.
        gather_index int64 [P]: row p of the GEMM input is x[gather_index[p]], read by the
        kernel itself (no permuted copy); every entry must be a valid row of x. Backward:
        dx = zeros([T, K]).index_add_(0, gather_index, dY @ W^T): a source row used by
        several dispatched rows (top-k) receives the sum of their gradients.
    grouped_gemm_reference(...)   same signature, fp32 (fp64 for fp64 input) per-expert loop.
    (The S IRL steps' fp32 weight-gradient sum over reuses of the same weights is the expert
    MLP's `wgrad_chain`, kernels/expert_mlp_op.py; a GEMM op on its own rounds each use's dW.)
    launch_gmm / launch_gmm_swiglu / launch_gmm_swiglu_bwd / launch_wgrad: the launchers,
        for callers that manage autograd themselves; launch_wgrad(..., accumulate_into=buf)
        adds into an fp32 [E, K, N] buffer (what the chain runs on).

On Hopper-class GPUs (and in the CPU interpreter) the launchers hand off to the TMA kernels
of kernels/grouped_gemm_tma.py (same contracts; MOC_GMM_TMA=on/off/auto); the pointer kernels
below run elsewhere, for fp32 on the GPU, and for shapes TMA cannot address. On sm90 in
bf16/fp16, forward and dgrad GEMMs without a gather (plain or with the SwiGLU epilogue) can
also run on the warp-specialized ping-pong kernel of kernels/grouped_gemm_ws.py, and the
wgrad on its twin kernels/grouped_gemm_ws_wgrad.py; with MOC_GMM_WS=auto each shape takes
whichever of the two times faster on its first call.

No host sync on the path: the grid is sized from P and E alone (cdiv(P, BLOCK_M) + E row
tiles cover every expert's tiles plus the zero tail, since sum_g ceil(n_g/B) <=
ceil(sum_g n_g/B) + groups - 1); each program finds its expert from offsets on the device and
idle programs return at once.
"""
from __future__ import annotations

import threading
from types import SimpleNamespace

import torch

from kernels import grouped_gemm_tma as tma
from kernels import grouped_gemm_ws as ws
from kernels import grouped_gemm_ws_wgrad as wsw
from kernels import row_segments
from kernels.gmm_backend import (TorchPrimitives, _interpreting, resolve_backend,
                                 wgrad_pair_composite)
from kernels.swiglu import launch_swiglu_bwd

try:
    import triton
    import triton.language as tl
except ImportError:          # the CPU path runs without Triton (STYLE rule 13)
    triton = None

_IS_HIP = torch.version.hip is not None
if triton is not None:
    from kernels.grouped_gemm_tma import group_of, group_table, store_swiglu   # shared pieces


def _configs(shapes, extra=None):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) -> triton.Config list (_gmm_kernel)."""
    out = []
    for bm, bn, bk, warps, stages in shapes:
        kw = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, **(extra or {}))
        out.append(triton.Config(kw, num_warps=warps, num_stages=stages))
    return out


def _wgrad_configs(shapes, extra=None):
    """(out rows BLOCK_K, out cols BLOCK_N, reduction chunk BLOCK_M, warps, stages)."""
    return [triton.Config(dict(BLOCK_K=bk, BLOCK_N=bn, BLOCK_M=bm, GROUP_M=8, **(extra or {})),
                          num_warps=w, num_stages=st) for bk, bn, bm, w, st in shapes]


if triton is not None:
    if _interpreting():   # tiny tiles: the tests use odd sizes of a few dozen rows
        _GMM_CFG = _SWIGLU_CFG = _configs([(16, 16, 16, 4, 1)])
        _WGRAD_CFG = _wgrad_configs([(16, 16, 16, 4, 1)])
    elif _IS_HIP:         # MI300X: wave64, 2 stages, 16x16 MFMA; sane defaults, not tuned
        _amd = dict(waves_per_eu=2, matrix_instr_nonkdim=16, kpack=2)
        _GMM_CFG = _configs([(256, 256, 64, 8, 2), (128, 128, 64, 4, 2)], _amd)
        _SWIGLU_CFG = _configs([(256, 128, 64, 8, 2), (128, 64, 64, 4, 2)], _amd)
        _WGRAD_CFG = _wgrad_configs([(256, 256, 64, 8, 2), (128, 128, 64, 4, 2)], _amd)
    else:                 # Hopper (H100 / H200); see docs/kernels_notes.md for the sweep
        _GMM_CFG = _configs([(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 4, 4),
                             (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (256, 128, 64, 8, 4),
                             (128, 128, 128, 8, 3)])
        _SWIGLU_CFG = _configs([(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4),
                                (64, 128, 64, 4, 4), (256, 64, 64, 8, 3)])
        _WGRAD_CFG = _wgrad_configs([(128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                                     (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                                     (128, 256, 32, 8, 4)])

    @triton.jit
    def _find_group(off_ptr, END_SHIFT, pid_m, P, E, BLOCK_M: tl.constexpr,
                    E_POW2: tl.constexpr):
        """Row tile pid_m -> (group g, first row, end row). Groups 0..E-1 are the experts,
        group E is the zero tail [offsets[E], P); g > E means this tile slot is idle."""
        starts, ends, tiles, cum = group_table(off_ptr, END_SHIFT, P, E, BLOCK_M, E_POW2)
        return group_of(starts, ends, tiles, cum, pid_m, BLOCK_M, E_POW2)

    @triton.jit
    def _gmm_kernel(a_ptr, b_ptr, c_ptr, pre_ptr, off_ptr, gidx_ptr, END_SHIFT,
                    P, N, K, E, stride_am, stride_be, stride_bk, stride_bn, stride_cm,
                    stride_pm, P_BUCKET,
                    EPILOGUE: tl.constexpr, HAS_GATHER: tl.constexpr, STORE_PRE: tl.constexpr,
                    B_K_CONTIG: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                    E_POW2: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """C[rows_g] = A[rows_g] @ B[g]  (A: [P or T, K] unit stride in K; B: [E, K, N]).
        EPILOGUE 0: plain. 1: SwiGLU forward, B has 2N columns (gate | up), C = silu(gate)*up
        [P, N], and with STORE_PRE the pre-activation [P, 2N] goes to pre_ptr. (A SwiGLU
        backward epilogue was measured slower than a separate pass: docs/kernels_notes.md.)"""
        pid = tl.program_id(0)
        num_slots = tl.cdiv(P, BLOCK_M) + E
        num_pid_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_pid_n            # L2 swizzle: GROUP_M row tiles share B
        first_m = (pid // per_group) * GROUP_M
        size_m = min(num_slots - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        g, row0, row_end = _find_group(off_ptr, END_SHIFT, pid_m, P, E, BLOCK_M, E_POW2)
        if g > E:
            return
        rm = row0 + tl.arange(0, BLOCK_M)                   # int64 rows
        rmask = rm < row_end
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rk = tl.arange(0, BLOCK_K)
        if HAS_GATHER:
            src = tl.load(gidx_ptr + rm, mask=rmask, other=0)
        else:
            src = tl.where(rmask, rm, row0)                 # clamp: no row mask in the loop
        a_ptrs = a_ptr + src[:, None] * stride_am + rk[None, :]
        b_base = b_ptr + g.to(tl.int64) * stride_be
        if B_K_CONTIG:                                      # B = W^T (dgrad): unit stride in K
            b_ptrs = b_base + rk[:, None] + rn[None, :] * stride_bn
            b_step = BLOCK_K
            up_shift = N * stride_bn
        else:
            b_ptrs = b_base + rk[:, None] * stride_bk + rn[None, :]
            b_step = BLOCK_K * stride_bk
            up_shift = N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_iters = tl.where(g < E, tl.cdiv(K, BLOCK_K), 0)   # the zero tail skips the loop
        for k in range(0, k_iters):
            if EVEN_K and EVEN_N:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                kmask = rk < K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PREC)
            if EPILOGUE == 1:
                if EVEN_K and EVEN_N:
                    bu = tl.load(b_ptrs + up_shift)
                else:
                    bu = tl.load(b_ptrs + up_shift, mask=kmask[:, None] & nmask[None, :],
                                 other=0.0)
                acc_up = tl.dot(a, bu, acc_up, input_precision=PREC)
            a_ptrs += BLOCK_K
            b_ptrs += b_step
        cmask = rmask[:, None] & nmask[None, :]
        c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :]
        if EPILOGUE == 0:
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=cmask)
        else:
            store_swiglu(acc, acc_up, c_ptrs, pre_ptr, rm, rn, cmask, N, stride_pm, STORE_PRE)

    @triton.jit
    def _wgrad_kernel(a_ptr, b_ptr, c_ptr, acc_in_ptr, off_ptr, gidx_ptr, END_SHIFT, K, N,
                      stride_am,
                      stride_bm, stride_ce, stride_ck, K_BUCKET,
                      HAS_GATHER: tl.constexpr, ACCUMULATE: tl.constexpr, EVEN_K: tl.constexpr,
                      EVEN_N: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """C[e] = (ACC_IN[e] +) A[rows_e]^T @ B[rows_e]: A [P or T, K], B [P, N], C and
        ACC_IN [E, K, N] of the same strides (ACC_IN fp32; C itself to add in place).
        Program (k-tile, n-tile) of expert program_id(1); the reduction runs over the expert's
        rows, BLOCK_M at a time, unmasked except the last partial chunk."""
        pid = tl.program_id(0)
        e = tl.program_id(1)
        num_pid_k = tl.cdiv(K, BLOCK_K)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_pid_n
        first_k = (pid // per_group) * GROUP_M
        size_k = min(num_pid_k - first_k, GROUP_M)
        pid_k = first_k + (pid % per_group) % size_k
        pid_n = (pid % per_group) // size_k
        start = tl.load(off_ptr + e)
        end = tl.load(off_ptr + e + END_SHIFT)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask = rk < K
        nmask = rn < N
        rk_l = rk                                           # clamp instead of masking loads
        if not EVEN_K:
            rk_l = tl.where(kmask, rk, 0)
        rn_l = rn
        if not EVEN_N:
            rn_l = tl.where(nmask, rn, 0)
        rr = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        n_full = (end - start) // BLOCK_M
        rows = start + rr                                   # int64
        b_ptrs = b_ptr + rows[:, None] * stride_bm + rn_l[None, :]
        a_ptrs = a_ptr + rows[:, None] * stride_am + rk_l[None, :]
        for i in range(0, n_full):
            if HAS_GATHER:                                  # row addresses from the index
                src = tl.load(gidx_ptr + start + i * BLOCK_M + rr)
                a = tl.load(a_ptr + src[:, None] * stride_am + rk_l[None, :])
            else:
                a = tl.load(a_ptrs)
                a_ptrs += BLOCK_M * stride_am
            b = tl.load(b_ptrs)
            b_ptrs += BLOCK_M * stride_bm
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PREC)
        rows = start + n_full * BLOCK_M + rr                # the partial last chunk
        rmask = rows < end
        if HAS_GATHER:
            src = tl.load(gidx_ptr + rows, mask=rmask, other=0)
        else:
            src = tl.where(rmask, rows, 0)
        a = tl.load(a_ptr + src[:, None] * stride_am + rk_l[None, :], mask=rmask[:, None],
                    other=0.0)
        b = tl.load(b_ptr + tl.where(rmask, rows, 0)[:, None] * stride_bm + rn_l[None, :],
                    mask=rmask[:, None], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PREC)
        offs = e.to(tl.int64) * stride_ce + rk[:, None] * stride_ck + rn[None, :]
        cmask = kmask[:, None] & nmask[None, :]
        if ACCUMULATE:
            acc += tl.load(acc_in_ptr + offs, mask=cmask, other=0.0)
        tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=cmask)

    def _even(dim, block):
        return lambda args: args[dim] % args[block] == 0

    _heur = {"EVEN_K": _even("K", "BLOCK_K"), "EVEN_N": _even("N", "BLOCK_N")}
    _prune = {"early_config_prune": tma.fits_smem}
    _gmm_plain = triton.autotune(_GMM_CFG, key=["N", "K", "P_BUCKET", "EPILOGUE",
                                                "B_K_CONTIG", "HAS_GATHER"],
                                 prune_configs_by=_prune)(
        triton.heuristics(_heur)(_gmm_kernel))
    _gmm_swiglu = triton.autotune(_SWIGLU_CFG, key=["N", "K", "P_BUCKET", "EPILOGUE",
                                                    "B_K_CONTIG", "HAS_GATHER"],
                                  prune_configs_by=_prune)(
        triton.heuristics(_heur)(_gmm_kernel))
    _wgrad_tuned = triton.autotune(_WGRAD_CFG, key=["N", "K", "K_BUCKET", "HAS_GATHER",
                                                    "ACCUMULATE"], prune_configs_by=_prune,
                                   restore_value=["c_ptr"])(   # tuning runs must not add twice
        triton.heuristics(_heur)(_wgrad_kernel))


# ---------------------------------------------------------------------------------------
# launchers: validate, allocate, launch (no host sync)
# ---------------------------------------------------------------------------------------

def _prec(dtype):
    if dtype != torch.float32:
        return "ieee"   # ignored for 16-bit inputs
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 and not _interpreting() else "ieee"


_THREAD = threading.local()


def _bind_cuda_context(t):
    """Make t's device's primary CUDA context current in this thread, once per thread.
    Autograd runs backward on a thread of its own; Triton launches through the driver API,
    which needs a current context, and torch's runtime calls make it current only lazily.
    When our kernel was the first CUDA work of that thread, the launch failed ("Failed to
    create tensor map descriptor: invalid device context", or "Pointer argument cannot be
    accessed from Triton"; session 10, H200, with dense upstream grads). cudaMemGetInfo is a
    runtime call that binds the context and does not touch a stream (legal under capture)."""
    if t.is_cuda and not getattr(_THREAD, "bound", False):
        torch.cuda.mem_get_info(t.device)
        _THREAD.bound = True


def _check(a, w, offsets, gather_index, k_dim):
    _bind_cuda_context(a)
    if a.dim() != 2 or w.dim() != 3:
        raise ValueError(f"expected a [T, K] and w [E, ., .], got {tuple(a.shape)}, "
                         f"{tuple(w.shape)}")
    if a.dtype != w.dtype or a.device != w.device:
        raise ValueError(f"a and w must share dtype and device, got {a.dtype}/{a.device} "
                         f"and {w.dtype}/{w.device}")
    if a.shape[1] != k_dim:
        raise ValueError(f"in-dim mismatch: a has {a.shape[1]} columns, weight needs {k_dim}")
    row_segments.check(offsets, w.shape[0], a.device)
    if gather_index is not None and (gather_index.dtype != torch.int64
                                     or gather_index.dim() != 1):
        raise ValueError("gather_index must be an int64 [P] tensor")
    if w.shape[1] * w.shape[2] >= 2 ** 31:
        raise ValueError("one expert's weight must hold fewer than 2^31 elements")


def _rows(a, gather_index):
    return a.shape[0] if gather_index is None else gather_index.shape[0]


def _p_bucket(p):
    return triton.next_power_of_2(max(p, 1))


def _launch(kernel, a, w, c, pre, offsets, gather_index, n, k, epilogue, store_pre, trans_w,
            config, zero_tail=True):
    """zero_tail=False: rows [offsets[E], P) of c may be left unwritten (the TMA path skips
    them; the pointer kernels write zeros anyway)."""
    p, e = c.shape[0], w.shape[0]
    if (gather_index is None and config is None and ws.available(a)
            and tma.tma_ok(a, w2 := tma.weights_2d(w), c)):
        def run_ws():
            return ws.launch_gmm_ws(a, w2, c, offsets, n, k, e, trans_w,
                                    _p_bucket(p), tma.num_programs(a.device), pre=pre,
                                    epilogue=epilogue, store_pre=store_pre)

        def run_tma():
            return tma.launch_gmm_tma(a, w, c, pre, offsets, None, n, k, epilogue, store_pre,
                                      trans_w, _p_bucket(p), _prec(a.dtype), None,
                                      zero_tail=False)

        key = (n, k, _p_bucket(p), trans_w, epilogue, store_pre, a.dtype, a.device)
        (run_ws if ws.choose(key, run_ws, run_tma) else run_tma)()
        if zero_tail:   # after the GEMM launch: its host work is then under the GEMM
            tma.zero_rows_from_end(c, offsets, e)
        return c
    if ((gather_index is None or tma.GATHER)
            and tma.tma_ok(a if gather_index is None else None, tma.weights_2d(w),
                           c if epilogue == 0 else None)):
        return tma.launch_gmm_tma(a, w, c, pre, offsets, gather_index, n, k, epilogue,
                                  store_pre, trans_w, _p_bucket(p), _prec(a.dtype), config,
                                  zero_tail)
    stride_bk, stride_bn = (w.stride(2), w.stride(1)) if trans_w else (w.stride(1), w.stride(2))
    if config is not None:      # a fixed config (benchmark sweeps): bypass the autotuner
        kernel = triton.heuristics(_heur)(_gmm_kernel)
    grid = lambda meta: ((triton.cdiv(p, meta["BLOCK_M"]) + e) * triton.cdiv(n, meta["BLOCK_N"]),)
    kernel[grid](a, w, c, c if pre is None else pre, offsets,
                 offsets if gather_index is None else gather_index, row_segments.end_shift(offsets),
                 p, n, k, e, a.stride(0), w.stride(0), stride_bk, stride_bn, c.stride(0),
                 0 if pre is None else pre.stride(0), _p_bucket(p),
                 EPILOGUE=epilogue, HAS_GATHER=gather_index is not None, STORE_PRE=store_pre,
                 B_K_CONTIG=trans_w, E_POW2=triton.next_power_of_2(e + 1),
                 PREC=_prec(a.dtype), **(config or {}))
    if zero_tail and row_segments.is_segments(offsets):   # the tail tiles miss the gaps
        tma.zero_rows_from_end(c, offsets, e)
    return c


def _unit_k(a):
    return a if a.stride(1) == 1 else a.contiguous()


def launch_gmm(a, w, offsets, gather_index=None, trans_w=False, out=None, config=None,
               zero_tail=True):
    """y [P, N] = A[rows_e] @ W[e] (W[e]^T when trans_w), A = a[gather_index] if given.
    w [E, K, N] (or [E, N, K] with trans_w), any strides; out: optional [P, N] buffer.
    Rows [offsets[E], P) are zeros; with zero_tail=False they may be left unwritten (for
    outputs whose readers stop at offsets[E])."""
    k, n = (w.shape[2], w.shape[1]) if trans_w else (w.shape[1], w.shape[2])
    _check(a, w, offsets, gather_index, k)
    a = _unit_k(a)
    w = w if w.stride(2) == 1 else w.contiguous()   # unit stride in N, or in K with trans_w
    p = _rows(a, gather_index)
    c = torch.empty(p, n, dtype=a.dtype, device=a.device) if out is None else out
    return _launch(_gmm_plain, a, w, c, None, offsets, gather_index, n, k, 0, False, trans_w,
                   config, zero_tail)


def launch_gmm_swiglu(a, w13, offsets, gather_index=None, store_pre=True, config=None,
                      zero_tail=True):
    """h [P, F] = silu(A @ W13[e][:, :F]) * (A @ W13[e][:, F:]), and the pre-activation
    [P, 2F] (gate | up) when store_pre, else None. h's rows [offsets[E], P) are zeros (left
    unwritten with zero_tail=False); pre's are undefined (its reader stops at offsets[E])."""
    _check(a, w13, offsets, gather_index, w13.shape[1])
    if w13.shape[2] % 2:
        raise ValueError(f"w13 needs an even number of columns (gate | up), got {w13.shape[2]}")
    a, w13 = _unit_k(a), (w13 if w13.stride(2) == 1 else w13.contiguous())
    p, f = _rows(a, gather_index), w13.shape[2] // 2
    h = torch.empty(p, f, dtype=a.dtype, device=a.device)
    pre = torch.empty(p, 2 * f, dtype=a.dtype, device=a.device) if store_pre else None
    _launch(_gmm_swiglu, a, w13, h, pre, offsets, gather_index, f, w13.shape[1], 1, store_pre,
            False, config, zero_tail)
    return h, pre


def launch_gmm_swiglu_bwd(dy, w2, offsets, pre):
    """d(gate | up) [P, 2F] from dy [P, D], w2 [E, F, D] and the saved pre-activation
    [P, 2F]: dh = dY[rows_e] @ W2[e]^T (grouped GEMM), then one elementwise SwiGLU-backward
    pass (kernels/swiglu.py; measured faster than doing it in the pointer kernels' epilogue;
    on sm90, MOC_GMM_SWIGLU_BWD=on / auto puts it in the ping-pong kernel's epilogue). Rows
    [offsets[E], P) are left undefined, and neither pass reads or writes them there: the
    result's readers (the W13 wgrad and the dX dgrad) stop at offsets[E]. In hard IRL mode
    half the rows can sit in that tail."""
    _check(dy, w2, offsets, None, w2.shape[2])
    if pre.shape != (dy.shape[0], 2 * w2.shape[1]):
        raise ValueError(f"pre must be [P, 2F] = [{dy.shape[0]}, {2 * w2.shape[1]}], got "
                         f"{tuple(pre.shape)}")
    def split():
        dh = launch_gmm(dy, w2, offsets, trans_w=True, zero_tail=False)
        return launch_swiglu_bwd(pre, dh, row_segments.kept_end(offsets), zero_tail=False,
                                 segments=offsets if row_segments.is_segments(offsets) else None)

    if (ws.SWIGLU_BWD != "off" and ws.available(dy)
            and tma.tma_ok(dy, w2d := tma.weights_2d(w2), pre)):
        # the dgrad with the SwiGLU backward in its epilogue (grouped_gemm_ws, EPILOGUE 2):
        # no dh [P, F] round trip; MOC_GMM_SWIGLU_BWD=on / auto (off by default, unmeasured)
        e, f, d = w2.shape
        p = dy.shape[0]

        def fused():
            return ws.launch_gmm_ws(dy, w2d, torch.empty_like(pre), offsets, f, d, e, True,
                                    _p_bucket(p), tma.num_programs(dy.device), pre=pre,
                                    epilogue=2)

        key = ("swiglu_bwd", f, d, _p_bucket(p), dy.dtype, dy.device)
        return (fused if ws.choose(key, fused, split, mode=ws.SWIGLU_BWD) else split)()
    return split()


def _wgrad_hopper(a, dy, c, offsets, acc_in, k_bucket):
    """sm90 bf16 wgrad: the warp-specialized kernel or the TMA kernel, whichever times faster
    for this key (grouped_gemm_ws.choose). The timing runs write a scratch output, so an
    in-place accumulation (c is acc_in) is not added to more than once."""
    def run(use_ws, out):
        if use_ws:
            return wsw.launch_wgrad_ws(a, dy, out, offsets, acc_in, k_bucket,
                                       tma.num_programs(a.device))
        return tma.launch_wgrad_tma(a, dy, out, offsets, None, acc_in, k_bucket,
                                    _prec(a.dtype))

    scratch = []

    def timed(use_ws):
        def fn():
            if not scratch:
                scratch.append(torch.empty_like(c))
            return run(use_ws, scratch[0])
        return fn

    key = ("wgrad", c.shape, k_bucket, acc_in is not None, c.dtype, a.dtype, a.device)
    return run(ws.choose(key, timed(True), timed(False),
                         mode=None if wsw.MODE == "auto" else wsw.MODE), c)


def launch_wgrad(a, dy, offsets, gather_index=None, accumulate_into=None, out_dtype=None,
                 num_experts=None, config=None, out_of_place=False):
    """dW [E, K, N] with dW[e] = A[rows_e]^T @ dY[rows_e] (fp32 accumulation); experts with
    no rows get zeros. accumulate_into: fp32 [E, K, N] to add into (returned); with an
    out_dtype other than fp32, or with out_of_place, the sum goes to a new tensor of out_dtype
    instead and accumulate_into is left as it was (the last of several uses: add and cast in
    one pass; out_of_place: a sum that must not touch its addend, kernels/expert_mlp_op.py)."""
    e = row_segments.num_experts(offsets) if num_experts is None else num_experts
    k, n = a.shape[1], dy.shape[1]
    if accumulate_into is not None and (accumulate_into.dtype != torch.float32
                                        or accumulate_into.shape != (e, k, n)):
        raise ValueError(f"accumulate_into must be fp32 [{e}, {k}, {n}], got "
                         f"{accumulate_into.dtype} {tuple(accumulate_into.shape)}")
    if dy.dim() != 2 or dy.shape[0] != _rows(a, gather_index) or dy.dtype != a.dtype:
        raise ValueError(f"dy must be [P, N] in {a.dtype}, got {dy.dtype} {tuple(dy.shape)}")
    _check(a, dy.new_empty(e, k, 0), offsets, gather_index, k)
    a, dy = _unit_k(a), _unit_k(dy)
    c = acc_in = accumulate_into
    if acc_in is not None and not acc_in.is_contiguous():
        raise ValueError("accumulate_into must be contiguous")
    if c is None or out_of_place or out_dtype not in (None, torch.float32):
        c = torch.empty(e, k, n, dtype=out_dtype or a.dtype, device=a.device)
    k_bucket = _p_bucket(dy.shape[0] // max(e, 1))
    if gather_index is not None and tma.GATHER and tma.tma_ok(dy):
        # Measured (docs/kernels_notes.md): on the TMA path a gathered wgrad runs ~40% slower
        # than a compact one, far more than one transient row copy costs.
        a, gather_index = a.index_select(0, gather_index), None
    if gather_index is None and config is None and ws.available(a) and tma.tma_ok(a, dy):
        return _wgrad_hopper(a, dy, c, offsets, acc_in, k_bucket)
    if (gather_index is None or tma.GATHER) and tma.tma_ok(
            a if gather_index is None else None, dy):
        return tma.launch_wgrad_tma(a, dy, c, offsets, gather_index, acc_in, k_bucket,
                                    _prec(a.dtype), config)
    kernel = _wgrad_tuned if config is None else triton.heuristics(_heur)(_wgrad_kernel)
    grid = lambda meta: (triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(n, meta["BLOCK_N"]), e)
    kernel[grid](a, dy, c, c if acc_in is None else acc_in, offsets,
                 offsets if gather_index is None else gather_index, row_segments.end_shift(offsets),
                 k, n, a.stride(0), dy.stride(0), c.stride(0), c.stride(1), k_bucket,
                 HAS_GATHER=gather_index is not None, ACCUMULATE=accumulate_into is not None,
                 PREC=_prec(a.dtype), **(config or {}))
    return c


def pair_fused(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether launch_wgrad_pair runs as one fused pass for 16-bit operands of this device
    and dtype (sm90; TMA-aligned operands, else it falls back to two launches)."""
    like = SimpleNamespace(device=torch.device(device), dtype=dtype)   # all ws.available reads
    return ws.available(like) and wsw.MODE != "off" and tma.MODE != "off"


def launch_wgrad_pair(a, dy, offsets, gather_index, second, accumulate_into=None,
                      out_dtype=None):
    """dW [E, K, N] = (accumulate_into +) A[rows_e]^T dY[rows_e] + A2[rows2_e]^T dY2[rows2_e]:
    two segments of rows (two IRL steps' operands, kernels/expert_mlp_op.py) summed in one fp32
    accumulator. second: (a2 [P2, K], dy2 [P2, N], offsets2 [E+1]), compact; accumulate_into:
    fp32 [E, K, N] or None, left as it was; the sum is returned in out_dtype (a's by default).
    On sm90 one pass of the warp-specialized wgrad over both segments' rows: no fp32 partial
    sum written and read back, one epilogue per tile (the measured gain: docs/benchmarks.md,
    session 24). Elsewhere, or under MOC_GMM_WS_WGRAD=off, two launch_wgrad calls
    (gmm_backend.wgrad_pair_composite)."""
    a2, dy2, offsets2 = second
    e, k, n = row_segments.num_experts(offsets), a.shape[1], dy.shape[1]
    if (a2.dim() != 2 or dy2.dim() != 2 or a2.shape[1] != k or dy2.shape[1] != n
            or a2.shape[0] != dy2.shape[0] or (a2.dtype, dy2.dtype) != (a.dtype, a.dtype)):
        raise ValueError(f"second: a2 [P2, {k}] and dy2 [P2, {n}] in {a.dtype} expected, got "
                         f"{a2.dtype} {tuple(a2.shape)} and {dy2.dtype} {tuple(dy2.shape)}")
    if row_segments.num_experts(offsets2) != e:
        raise ValueError(f"second: offsets2 must cover E = {e} experts like offsets, got "
                         f"{tuple(offsets2.shape)}")
    fused = pair_fused(a.device, a.dtype) and tma.tma_ok(a, dy, a2, dy2)
    if not fused:
        return wgrad_pair_composite(launch_wgrad, a, dy, offsets, gather_index, second,
                                    accumulate_into, out_dtype)
    if accumulate_into is not None and (accumulate_into.dtype != torch.float32
                                        or accumulate_into.shape != (e, k, n)
                                        or not accumulate_into.is_contiguous()):
        raise ValueError(f"accumulate_into must be contiguous fp32 [{e}, {k}, {n}], got "
                         f"{accumulate_into.dtype} {tuple(accumulate_into.shape)}")
    if dy.shape[0] != _rows(a, gather_index) or dy.dtype != a.dtype:
        raise ValueError(f"dy must be [P, N] in {a.dtype}, got {dy.dtype} {tuple(dy.shape)}")
    _check(a, dy.new_empty(e, k, 0), offsets, gather_index, k)
    _check(a2, dy2.new_empty(e, k, 0), offsets2, None, k)
    if gather_index is not None:   # as launch_wgrad: a compact copy beats a gathered wgrad
        a = a.index_select(0, gather_index)
    a, dy, a2, dy2 = _unit_k(a), _unit_k(dy), _unit_k(a2), _unit_k(dy2)
    c = torch.empty(e, k, n, dtype=out_dtype or a.dtype, device=a.device)
    k_bucket = _p_bucket((dy.shape[0] + dy2.shape[0]) // max(e, 1))
    return wsw.launch_wgrad_ws(a, dy, c, offsets, accumulate_into, k_bucket,
                               tma.num_programs(a.device), second=(a2, dy2, offsets2))


class TritonPrimitives:
    """The primitives on the Triton kernels (same contracts as TorchPrimitives)."""
    gmm = staticmethod(launch_gmm)
    gmm_swiglu = staticmethod(launch_gmm_swiglu)
    gmm_swiglu_bwd = staticmethod(launch_gmm_swiglu_bwd)

    @staticmethod
    def wgrad(a, dy, offsets, gather_index=None, accumulate_into=None, out_dtype=None,
              out_of_place=False):
        return launch_wgrad(a, dy, offsets, gather_index, accumulate_into, out_dtype,
                            out_of_place=out_of_place)

    wgrad_pair = staticmethod(launch_wgrad_pair)
    pair_fused = staticmethod(pair_fused)


def primitives(backend: str | None, x: torch.Tensor):
    name = resolve_backend(backend, x)
    if name == "triton":
        return TritonPrimitives
    return TorchPrimitives(use_grouped_mm=name == "grouped_mm")


# ---------------------------------------------------------------------------------------
# autograd op and its reference twin
# ---------------------------------------------------------------------------------------

def scatter_rows(dxp, gather_index, num_rows):
    """Backward of a prologue gather: dx[t] = sum of dxp[p] over p with gather_index[p] = t."""
    if gather_index is None:
        return dxp
    out = dxp.new_zeros(num_rows, dxp.shape[1])
    return out.index_add_(0, gather_index, dxp)


class _GroupedGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets, gather_index, prims):
        ctx.save_for_backward(x, w, offsets, gather_index)
        ctx.prims = prims
        return prims.gmm(x, w, offsets, gather_index)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets, gather_index = ctx.saved_tensors
        dy = dy.contiguous()     # grouped_mm's backward fails on stride-0 grads; we copy once
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dxp = ctx.prims.gmm(dy, w, offsets, trans_w=True)
            dx = scatter_rows(dxp, gather_index, x.shape[0])
        if ctx.needs_input_grad[1]:
            dw = ctx.prims.wgrad(x, dy, offsets, gather_index, out_dtype=w.dtype)
        return dx, dw, None, None, None


def grouped_gemm(x, w, offsets, gather_index=None, *, backend=None):
    """Y [P, N] = X[rows_e] @ W[e] per expert (see the module docstring for the contract).

    Args: x [T, K]; w [E, K, N]; offsets int64 [E+1] (device); gather_index int64 [P] or None;
        backend: None/"auto", "triton", "grouped_mm" or "loop".
    Returns: y [P, N] in x.dtype, zeros in rows [offsets[E], P)."""
    return _GroupedGemm.apply(x, w, offsets, gather_index, primitives(backend, x))


def grouped_gemm_reference(x, w, offsets, gather_index=None, *, backend=None):
    """Plain-torch twin: per-expert loop in fp32 (fp64 for fp64 input); differentiable by
    autograd. backend is accepted and ignored (the reference has one path)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = x if gather_index is None else x[gather_index]
    out = rows.new_zeros(rows.shape[0], w.shape[2], dtype=ct)
    for e, (lo, hi) in enumerate(row_segments.host_bounds(offsets)):  # host sync: reference
        out[lo:hi] = rows[lo:hi].to(ct) @ w[e].to(ct)
    return out.to(x.dtype)
