"""Hopper path of the grouped GEMM: TMA tile loads and a persistent grid (Triton).

Same contracts as the pointer kernels in kernels/grouped_gemm.py (which call the launchers
below when `tma_ok` says the tensors suit them); what changes is how tiles reach the tensor
cores. docs/kernels_notes.md has the measurements behind each choice.

- Operands come in through host-built TMA descriptors (`TensorDescriptor`): A [P, K], and the
  weights viewed as one 2-D matrix W [E*K, N] (row e*K + k of the view is row k of expert e).
  TMA zero-fills whatever lies past a descriptor's bounds, so the ragged edges need no masks:
  a K tail reads zero columns of A (so the next expert's weight rows it also reads contribute
  nothing); a tile that runs past its expert's last row reads the next expert's rows, whose
  results the masked epilogue store drops. A gathered A (`gather_index`) has no TMA form on
  Hopper and is read with pointer loads, B still by TMA.
- Forward / dgrad run on a persistent grid (one program per SM looping over tiles, `flatten`
  so the software pipeliner overlaps one tile's epilogue with the next tile's loads) or one
  program per tile, whichever the autotuner measures faster. The tile count comes from the
  device-side offsets, so there is still no host sync. The zero tail [offsets[E], P) is not in
  the tile loop (hard IRL mode parks its inactive rows there, up to half of P): a second small
  kernel writes its zeros.
- wgrad keeps one program per (expert, K-tile, N-tile) output tile (its K loop is the
  expert's rows: long, so an epilogue costs little); full row chunks come by TMA, the last
  partial chunk is masked after the load (rows past the expert's end belong to the next one).
"""
from __future__ import annotations

import os

import torch

from kernels import row_segments, sustained_timing

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:            # no Triton: grouped_gemm.py never calls in here
    triton = None

# "auto": TMA on Hopper-class NVIDIA GPUs (and in the CPU interpreter, so the tests run it);
# "on" / "off" force it (off = the pointer kernels). Tests and benchmarks flip this.
MODE = os.environ.get("MOC_GMM_TMA", "auto")
# Whether a gathered A (pointer-loaded rows, TMA for B only) also takes this path.
GATHER = os.environ.get("MOC_GMM_TMA_GATHER", "1") == "1"
_SMEM_BYTES = 227 * 1024   # Hopper's per-block shared-memory limit


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_SMS: dict[int, int] = {}


def num_programs(device: torch.device) -> int:
    """Persistent grid size: the SM count (3 in the interpreter, so every program loops)."""
    if device.type != "cuda":
        return 3
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


_HOPPER: dict[int, bool] = {}


def _hopper(device: torch.device) -> bool:
    """NVIDIA sm90+ (cached: this runs on every launch)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _HOPPER:
        _HOPPER[idx] = (torch.version.hip is None
                        and torch.cuda.get_device_capability(idx)[0] >= 9)
    return _HOPPER[idx]


def _tma_tensor_ok(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base, 16-byte aligned row strides and unit last stride."""
    return (t.dim() == 2 and t.stride(1) == 1 and t.shape[0] > 0 and t.shape[1] > 0
            and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0)


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether the TMA kernels may run on these 2-D operands (None entries are skipped).
    "auto" keeps fp32 on the GPU with the pointer kernels: an exact fp32 dot is not a
    tensor-core product, and fp32 is the test dtype there, not a training one."""
    if triton is None or MODE == "off":
        return False
    if MODE == "auto":
        first = next(t for t in tensors if t is not None)
        dev = first.device
        if dev.type == "cuda":
            if not _hopper(dev) or first.dtype == torch.float32:
                return False
        elif not _interpreting():
            return False
    return all(t is None or _tma_tensor_ok(t) for t in tensors)


def weights_2d(w: torch.Tensor) -> torch.Tensor:
    """W [E, K, N] (contiguous) as the 2-D matrix the descriptors address: [E*K, N]."""
    w = w if w.is_contiguous() else w.contiguous()
    return w.view(w.shape[0] * w.shape[1], w.shape[2])


def fits_smem(configs, named_args, **kwargs):
    """Autotuner pruning: drop configs whose pipelined tiles overflow shared memory (fp32
    inputs need half the stages of bf16); keep the smallest if none fit."""
    args = {**named_args, **kwargs}
    elem = args["b_ptr"].element_size() if "b_ptr" in args else args["b_desc"].base.element_size()
    b_tiles = 2 if args.get("EPILOGUE", 0) == 1 else 1

    def need(c):
        m, n, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        per_stage = m * k + (m * n if "ACCUMULATE" in args else b_tiles * k * n)
        return c.num_stages * per_stage * elem

    limit = _SMEM_BYTES / (1.5 if elem == 4 else 1.0)   # fp32 dots stage more than tiles
    kept = [c for c in configs if need(c) <= limit]
    return kept or [min(configs, key=need)]


if triton is not None:
    def _configs(shapes):
        """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, persistent); pre_hook sizes the
        descriptors. Persistent: one program per SM looping over tiles; else one per tile."""
        return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                                   PERSISTENT=pers),
                              num_warps=w, num_stages=s, pre_hook=_size_blocks)
                for bm, bn, bk, w, s, pers in shapes]

    def _wgrad_configs(shapes):
        """(out rows BLOCK_K, out cols BLOCK_N, reduction chunk BLOCK_M, warps, stages)."""
        return [triton.Config(dict(BLOCK_K=bk, BLOCK_N=bn, BLOCK_M=bm, GROUP_M=8),
                              num_warps=w, num_stages=s, pre_hook=_size_wgrad_blocks)
                for bk, bn, bm, w, s in shapes]

    def _size_blocks(nargs):
        bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        if nargs["a_desc"] is not None:
            nargs["a_desc"].block_shape = [bm, bk]
        if nargs["c_desc"] is not None:
            nargs["c_desc"].block_shape = [bm, bn]
        nargs["b_desc"].block_shape = [bn, bk] if nargs["B_TRANS"] else [bk, bn]

    def _size_wgrad_blocks(nargs):
        bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        if nargs["a_desc"] is not None:
            nargs["a_desc"].block_shape = [bm, bk]
        nargs["b_desc"].block_shape = [bm, bn]

    if _interpreting():
        _GMM_CFG = _SWIGLU_CFG = _configs([(16, 16, 16, 4, 1, True)])
        _WGRAD_CFG = _wgrad_configs([(16, 16, 16, 4, 1)])
    else:   # Hopper; the sweep that chose these is in docs/kernels_notes.md
        _GMM_CFG = _configs([(bm, bn, bk, w, s, pers) for pers in (True, False)
                             for bm, bn, bk, w, s in
                             [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 4, 4),
                              (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (256, 128, 64, 8, 3)]]
                            + [(64, 64, 32, 4, 2, False)])   # fits fp32 (tests)
        _SWIGLU_CFG = _configs([(bm, bn, bk, w, s, pers) for pers in (True, False)
                                for bm, bn, bk, w, s in
                                [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4),
                                 (64, 128, 64, 4, 4)]] + [(64, 64, 32, 4, 2, False)])
        _WGRAD_CFG = _wgrad_configs([(128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                                     (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                                     (128, 256, 64, 8, 4), (128, 128, 128, 8, 3),
                                     (64, 64, 32, 4, 2)])

    @triton.jit
    def group_table(off_ptr, END_SHIFT, P, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
        """Per group (experts 0..E-1, then the zero tail [offsets[E], P) as group E):
        first row, end row, row-tile count and its inclusive cumsum, as E_POW2 vectors.
        Expert e's end row is at off_ptr + e + END_SHIFT (kernels/row_segments.py)."""
        idx = tl.arange(0, E_POW2)
        starts = tl.load(off_ptr + idx, mask=idx <= E, other=P)
        ends = tl.load(off_ptr + idx + END_SHIFT, mask=idx < E, other=P)
        tiles = ((ends - starts + BLOCK_M - 1) // BLOCK_M).to(tl.int32)
        return starts, ends, tiles, tl.cumsum(tiles, 0)

    @triton.jit
    def group_of(starts, ends, tiles, cum, pid_m, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
        """Row tile pid_m -> (group, first row, end row); group > E when pid_m is past the
        last tile."""
        idx = tl.arange(0, E_POW2)
        g = tl.sum((cum <= pid_m).to(tl.int32), 0)
        sel = idx == g
        first_tile = tl.sum(tl.where(sel, cum - tiles, 0), 0)
        row0 = tl.sum(tl.where(sel, starts, 0), 0) + (pid_m - first_tile) * BLOCK_M
        return g, row0.to(tl.int64), tl.sum(tl.where(sel, ends, 0), 0).to(tl.int64)

    @triton.jit
    def store_swiglu(gate, up, c_ptrs, pre_ptr, rm, rn, cmask, N, stride_pm,
                     STORE_PRE: tl.constexpr):
        """SwiGLU epilogue: C = silu(gate) * up, and with STORE_PRE the pre-activation
        (gate | up) into pre [P, 2N] for the backward."""
        if STORE_PRE:
            p_ptrs = pre_ptr + rm[:, None] * stride_pm + rn[None, :]
            tl.store(p_ptrs, gate.to(pre_ptr.dtype.element_ty), mask=cmask)
            tl.store(p_ptrs + N, up.to(pre_ptr.dtype.element_ty), mask=cmask)
        h = gate * tl.sigmoid(gate) * up
        tl.store(c_ptrs, h.to(c_ptrs.dtype.element_ty), mask=cmask)

    @triton.jit
    def _gmm_tma_kernel(a_desc, a_ptr, b_desc, c_desc, c_ptr, pre_ptr, off_ptr, gidx_ptr,
                        END_SHIFT, P, N, K, E, stride_am, stride_cm, stride_pm, P_BUCKET,
                        EPILOGUE: tl.constexpr, HAS_GATHER: tl.constexpr,
                        STORE_PRE: tl.constexpr, B_TRANS: tl.constexpr, EVEN_K: tl.constexpr,
                        E_POW2: tl.constexpr, PREC: tl.constexpr, PERSISTENT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
        """C[rows_g] = A[rows_g] @ B[g], on a persistent grid or one program per tile. B is
        W[g] ([K, N] rows of the 2-D view), or W[g]^T with B_TRANS (the view's rows are then
        the N output columns). EPILOGUE 1: SwiGLU forward (W has 2N columns, gate | up;
        C = silu(gate) * up, and with STORE_PRE the pre-activation [P, 2N] goes to pre_ptr).
        One program per tile, EPILOGUE 0 stores a tile that lies inside its group by TMA
        (c_desc) and a group's last partial tile with masked pointer stores (a TMA store
        would clobber the next group's rows); the persistent loop stores by pointer only
        (Triton 3.6's loop flattening rejects the branch)."""
        starts, ends, tiles, cum = group_table(off_ptr, END_SHIFT, P, E, BLOCK_M, E_POW2)
        num_m = tl.sum(tl.where(tl.arange(0, E_POW2) < E, tiles, 0), 0)   # experts only
        num_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        per_group = GROUP_M * num_n
        rk = tl.arange(0, BLOCK_K)
        for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0),
                             flatten=PERSISTENT):
            first_m = (tile // per_group) * GROUP_M        # L2 swizzle: GROUP_M row tiles
            size_m = tl.minimum(num_m - first_m, GROUP_M)  # share their B tiles
            pid_m = first_m + (tile % per_group) % size_m
            pid_n = (tile % per_group) // size_m
            g, row0, row_end = group_of(starts, ends, tiles, cum, pid_m, BLOCK_M, E_POW2)
            n0 = pid_n * BLOCK_N
            b_row = g * (N if B_TRANS else K)
            rm = row0 + tl.arange(0, BLOCK_M)
            rmask = rm < row_end
            if HAS_GATHER:
                src = tl.load(gidx_ptr + rm, mask=rmask, other=0)
                a_ptrs = a_ptr + src[:, None] * stride_am + rk[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(k_tiles):
                k0 = ki * BLOCK_K
                if HAS_GATHER:
                    if EVEN_K:
                        a = tl.load(a_ptrs)
                    else:
                        a = tl.load(a_ptrs, mask=(rk < K - k0)[None, :], other=0.0)
                    a_ptrs += BLOCK_K
                else:
                    a = a_desc.load([row0.to(tl.int32), k0])
                if B_TRANS:
                    b = tl.trans(b_desc.load([b_row + n0, k0]))
                else:
                    b = b_desc.load([b_row + k0, n0])
                acc = tl.dot(a, b, acc, input_precision=PREC)
                if EPILOGUE == 1:
                    acc_up = tl.dot(a, b_desc.load([b_row + k0, n0 + N]), acc_up,
                                    input_precision=PREC)
            rn = n0 + tl.arange(0, BLOCK_N)
            cmask = rmask[:, None] & (rn < N)[None, :]
            c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :]
            if EPILOGUE == 0 and PERSISTENT:
                tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=cmask)
            elif EPILOGUE == 0:
                if row0 + BLOCK_M <= row_end:
                    c_desc.store([row0.to(tl.int32), n0], acc.to(c_ptr.dtype.element_ty))
                else:
                    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=cmask)
            else:
                store_swiglu(acc, acc_up, c_ptrs, pre_ptr, rm, rn, cmask, N, stride_pm,
                             STORE_PRE)

    @triton.jit
    def _wgrad_tma_kernel(a_desc, a_ptr, b_desc, c_ptr, acc_in_ptr, off_ptr, gidx_ptr,
                          END_SHIFT, K, N,
                          stride_am, stride_ce, stride_ck, K_BUCKET,
                          HAS_GATHER: tl.constexpr, ACCUMULATE: tl.constexpr,
                          EVEN_K: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """C[e] = (ACC_IN[e] +) A[rows_e]^T @ B[rows_e] for program (tile, e): A [P or T, K],
        B [P, N], C and ACC_IN [E, K, N] of the same strides (ACC_IN fp32; C itself to add in
        place). Full BLOCK_M row chunks by TMA; the last partial chunk is zeroed past
        the expert's end after its load."""
        pid = tl.program_id(0)
        e = tl.program_id(1)
        num_k = tl.cdiv(K, BLOCK_K)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_k = (pid // per_group) * GROUP_M
        size_k = tl.minimum(num_k - first_k, GROUP_M)
        pid_k = first_k + (pid % per_group) % size_k
        pid_n = (pid % per_group) // size_k
        start = tl.load(off_ptr + e)
        end = tl.load(off_ptr + e + END_SHIFT)
        k0 = pid_k * BLOCK_K
        n0 = pid_n * BLOCK_N
        rr = tl.arange(0, BLOCK_M)
        rk = k0 + tl.arange(0, BLOCK_K)
        if HAS_GATHER:
            rk_l = rk if EVEN_K else tl.where(rk < K, rk, 0)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        n_full = (end - start) // BLOCK_M
        for i in range(0, n_full):
            r = start + i * BLOCK_M
            if HAS_GATHER:
                src = tl.load(gidx_ptr + r + rr)
                a = tl.load(a_ptr + src[:, None] * stride_am + rk_l[None, :])
            else:
                a = a_desc.load([r.to(tl.int32), k0])
            b = b_desc.load([r.to(tl.int32), n0])
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PREC)
        r = start + n_full * BLOCK_M                        # the partial last chunk
        if r < end:
            rmask = (r + rr) < end
            if HAS_GATHER:
                src = tl.load(gidx_ptr + r + rr, mask=rmask, other=0)
                a = tl.load(a_ptr + src[:, None] * stride_am + rk_l[None, :],
                            mask=rmask[:, None], other=0.0)
            else:
                a = tl.where(rmask[:, None], a_desc.load([r.to(tl.int32), k0]), 0.0)
            b = tl.where(rmask[:, None], b_desc.load([r.to(tl.int32), n0]), 0.0)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PREC)
        rn = n0 + tl.arange(0, BLOCK_N)
        offs = e.to(tl.int64) * stride_ce + rk[:, None] * stride_ck + rn[None, :]
        cmask = (rk < K)[:, None] & (rn < N)[None, :]
        if ACCUMULATE:
            acc += tl.load(acc_in_ptr + offs, mask=cmask, other=0.0)
        tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def _zero_tail_kernel(c_ptr, off_ptr, END_SHIFT, P, N, E, stride_cm,
                          SEGMENTS: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
        """Rows of C [P, N] outside every expert's rows := 0: the tail [offsets[E], P), and
        with SEGMENTS the gaps [ends[e], offsets[e+1]) too (kernels/row_segments.py). One
        program per BLOCK_M rows, looping over N: programs with no such row return at once.
        (A [rows, N-tiles] grid made thousands of programs that mostly just returned: 6.1 µs
        a call against 1.9 µs now, at the 1B MoC shapes on an H100, 160 calls a
        micro-batch.)"""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        if SEGMENTS:
            idx = tl.arange(0, E_POW2)
            first = tl.load(off_ptr + idx, mask=idx < E, other=0)
            end = tl.load(off_ptr + idx + END_SHIFT, mask=idx < E, other=0)
            inside = (rm[:, None] >= first[None, :]) & (rm[:, None] < end[None, :])
            dead = (tl.max(inside.to(tl.int32), 1) == 0) & (rm < P)
            if tl.max(dead.to(tl.int32), 0) == 0:
                return
        else:
            tail = tl.load(off_ptr + E)
            if tl.program_id(0) * BLOCK_M + BLOCK_M <= tail:
                return
            dead = (rm >= tail) & (rm < P)
        row_mask = dead[:, None]
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty)
        ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            tl.store(ptrs + rn[None, :], zero, mask=row_mask & (rn < N)[None, :])

    _even_k = {"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0}
    _tune = dict(prune_configs_by={"early_config_prune": fits_smem},
                 do_bench=sustained_timing.autotune_do_bench())
    _gmm_tuned = triton.autotune(_GMM_CFG, key=["N", "K", "P_BUCKET", "EPILOGUE", "B_TRANS",
                                                "HAS_GATHER"], **_tune)(
        triton.heuristics(_even_k)(_gmm_tma_kernel))
    _swiglu_tuned = triton.autotune(_SWIGLU_CFG, key=["N", "K", "P_BUCKET", "EPILOGUE",
                                                      "B_TRANS", "HAS_GATHER"], **_tune)(
        triton.heuristics(_even_k)(_gmm_tma_kernel))
    _wgrad_tuned = triton.autotune(_WGRAD_CFG, key=["N", "K", "K_BUCKET", "HAS_GATHER",
                                                    "ACCUMULATE"],
                                   restore_value=["c_ptr"],   # tuning runs must not add twice
                                   **_tune)(triton.heuristics(_even_k)(_wgrad_tma_kernel))


def _desc(t: torch.Tensor) -> "TensorDescriptor":
    """A 2-D descriptor over all of t; the block shape is set per config by the pre_hook."""
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [16, 16])


def launch_gmm_tma(a, w, c, pre, offsets, gather_index, n, k, epilogue, store_pre, trans_w,
                   p_bucket, prec, config=None, zero_tail=True):
    """The TMA twin of grouped_gemm._launch (arguments already checked there): writes c
    (and pre) for the experts' rows, and zeros in c's other rows (tail, and gaps of
    segments) when zero_tail; returns c. pre's are never written (its one reader, the SwiGLU
    backward, reads the experts' rows only)."""
    p, e = c.shape[0], w.shape[0]
    w2 = weights_2d(w)
    a_desc = None if gather_index is not None else _desc(a)
    b_desc = _desc(w2)
    c_desc = _desc(c) if epilogue == 0 else None   # tma_ok(c) was checked by the caller
    kernel = _swiglu_tuned if epilogue == 1 else _gmm_tuned
    if config is not None:   # a fixed config (benchmark sweeps): bypass the autotuner
        kernel = triton.heuristics(_even_k)(_gmm_tma_kernel)
        _size_blocks(dict(config, a_desc=a_desc, b_desc=b_desc, c_desc=c_desc,
                          B_TRANS=trans_w))
    programs = num_programs(a.device)

    def grid(meta):   # an upper bound of the tile count (the kernel finds the exact one)
        tiles = (triton.cdiv(p, meta["BLOCK_M"]) + e) * triton.cdiv(n, meta["BLOCK_N"])
        return (min(programs, tiles) if meta["PERSISTENT"] else tiles,)

    kernel[grid](a_desc, a, b_desc, c_desc, c, c if pre is None else pre, offsets,
                 offsets if gather_index is None else gather_index,
                 row_segments.end_shift(offsets), p, n, k, e, a.stride(0), c.stride(0), 0 if pre is None else pre.stride(0),
                 p_bucket, EPILOGUE=epilogue, HAS_GATHER=gather_index is not None,
                 STORE_PRE=store_pre, B_TRANS=trans_w,
                 E_POW2=triton.next_power_of_2(e + 1), PREC=prec,
                 **(config or {}))
    if zero_tail:   # after the GEMM launch: eager, its host work then runs under the GEMM
        zero_rows_from_end(c, offsets, e)
    return c


def zero_rows_from_end(c: torch.Tensor, offsets: torch.Tensor, e: int) -> None:
    """Zeros in the rows of c outside every expert's rows (c[offsets[e]:] for plain offsets;
    also the gaps of segments, kernels/row_segments.py), without reading offsets on the
    host."""
    p, n = c.shape
    bm, bn = (16, 16) if _interpreting() else (64, 128)
    _zero_tail_kernel[(triton.cdiv(p, bm),)](c, offsets, row_segments.end_shift(offsets), p, n,
                                             e, c.stride(0),
                                             SEGMENTS=row_segments.is_segments(offsets),
                                             E_POW2=triton.next_power_of_2(e + 1),
                                             BLOCK_M=bm, BLOCK_N=bn)


def launch_wgrad_tma(a, dy, c, offsets, gather_index, acc_in, k_bucket, prec, config=None):
    """The TMA twin of grouped_gemm.launch_wgrad's launch: c [E, K, N] = (acc_in +)
    per-expert A^T dY (acc_in None: no add; c itself: in place); returns c."""
    e, k, n = c.shape
    a_desc = None if gather_index is not None else _desc(a)
    b_desc = _desc(dy)
    kernel = _wgrad_tuned
    if config is not None:
        kernel = triton.heuristics(_even_k)(_wgrad_tma_kernel)
        _size_wgrad_blocks(dict(config, a_desc=a_desc, b_desc=b_desc))
    grid = lambda meta: (triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(n, meta["BLOCK_N"]), e)
    kernel[grid](a_desc, a, b_desc, c, c if acc_in is None else acc_in, offsets,
                 offsets if gather_index is None else gather_index,
                 row_segments.end_shift(offsets), k, n,
                 a.stride(0), c.stride(0), c.stride(1), k_bucket,
                 HAS_GATHER=gather_index is not None, ACCUMULATE=acc_in is not None, PREC=prec,
                 **(config or {}))
    return c
