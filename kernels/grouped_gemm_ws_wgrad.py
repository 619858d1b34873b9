"""Warp-specialized "ping-pong" weight gradient for Hopper (Gluon): dW[e] = A[rows_e]^T dY[rows_e].

The wgrad twin of kernels/grouped_gemm_ws.py, with the same three partitions: one TMA
producer warp fills a ring of (A chunk, dY chunk) slots, and two consumer warpgroups take
the program's output tiles alternately, so one's epilogue (the fp32 addend load, convert,
store) runs under the other's wgmma main loop. What differs from the forward kernel:

- an output tile is (expert e, K rows, N columns) of dW [E, K, N], and its main loop runs
  over the expert's rows, BLOCK_R at a time: the loop length differs per expert, so each
  partition walks all of the program's tiles to keep its ring position (a consumer skips
  the other's tiles by their chunk counts);
- an expert's last, partial chunk reads the rows after its end (the next expert's, or the
  unwritten tail of an internal tensor: possibly NaN); the consumer zeroes them in shared
  memory before the wgmma reads the slot, in both operands (0 * NaN would still be NaN);
- the accumulator starts from the fp32 addend (ACCUMULATE: the S-step weight-gradient sum,
  kernels/grouped_gemm.py `WeightGradAccumulator`) or from zero; experts without rows store
  it as it is. The store is by pointer, masked at K and N, in C's dtype (fp32 or bf16).

Same contract as `grouped_gemm_tma.launch_wgrad_tma` without a gather (a gathered wgrad
copies its rows first). sm90 and bf16 / fp16 only (`grouped_gemm_ws.available`); tested on
the GPU (tests/kernels/test_grouped_gemm_ws.py) and compiled on the CPU by
tools/compile_sm90.py.
"""
from __future__ import annotations

from kernels import grouped_gemm_ws as ws

if ws.gluon is not None:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, warpgroup_mma, warpgroup_mma_wait)
    _tma_load = ws._tma_load
    # Triton 3.7+ names the CTA barrier `barrier`; 3.6 has only `thread_barrier`.
    _barrier = getattr(gl, "barrier", None) or gl.thread_barrier

# (BLOCK_K, BLOCK_N, BLOCK_R, STAGES, consumers): one consumer's output tile BLOCK_K x
# BLOCK_N (fp32 accumulator: 128 registers a thread at 128 x 128), reduced BLOCK_R rows a step.
CONFIGS = [(128, 128, 64, 4, 2), (128, 128, 64, 5, 2), (64, 256, 64, 4, 2), (128, 128, 32, 8, 2),
           (128, 128, 64, 4, 1)]

if ws.gluon is not None:
    @gluon.jit
    def _tile_of(tile, num_k, num_n, off_ptr, BLOCK_R: gl.constexpr, GROUP_K: gl.constexpr):
        """Tile index -> (expert, its first row, its end row, its chunk count, K-tile,
        N-tile). Expert-major; inside an expert GROUP_K row-tiles of dW share their dY
        chunks in L2 (the TMA wgrad kernel's swizzle)."""
        per_e = num_k * num_n
        e = tile // per_e
        rem = tile % per_e
        per_group = GROUP_K * num_n
        first_k = (rem // per_group) * GROUP_K
        size_k = gl.minimum(num_k - first_k, GROUP_K)
        pid_k = first_k + (rem % per_group) % size_k
        pid_n = (rem % per_group) // size_k
        start = gl.load(off_ptr + e)
        end = gl.load(off_ptr + e + 1)
        chunks = ((end - start + BLOCK_R - 1) // BLOCK_R).to(gl.int32)
        return e, start, end, chunks, pid_k, pid_n

    @gluon.jit
    def _load_partition(descs, bufs, bars, scal, WHICH: gl.constexpr,
                        ACCUMULATE: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr,
                        BLOCK_R: gl.constexpr, GROUP_K: gl.constexpr, STAGES: gl.constexpr,
                        CONSUMERS: gl.constexpr):
        """Producer: every chunk of every tile of this program, in order, into the ring."""
        a_desc, b_desc = descs
        a_bufs, b_bufs = bufs
        ready, empty, turn = bars
        c_ptr, acc_ptr, off_ptr, K, N, E, stride_ce, stride_ck = scal
        num_k = gl.cdiv(K, BLOCK_K)
        num_n = gl.cdiv(N, BLOCK_N)
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        it = 0
        for tile in range(gl.program_id(0), E * num_k * num_n, gl.num_programs(0)):
            e, start, end, chunks, pid_k, pid_n = _tile_of(tile, num_k, num_n, off_ptr,
                                                           BLOCK_R, GROUP_K)
            for c in range(chunks):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, nbytes)
                r = (start + c * BLOCK_R).to(gl.int32)
                _tma_load(a_desc, [r, pid_k * BLOCK_K], bar, a_bufs.index(s))
                _tma_load(b_desc, [r, pid_n * BLOCK_N], bar, b_bufs.index(s))
                it += 1

    @gluon.jit
    def _zero_rows_from(buf, keep, ROWS: gl.constexpr, COLS: gl.constexpr):
        """buf[keep:] := 0 for a [ROWS, COLS] slot, through registers (one warpgroup)."""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        v = buf.load(layout)
        rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
        buf.store(gl.where((rows < keep)[:, None], v, gl.zeros_like(v)))

    @gluon.jit
    def _mma_partition(descs, bufs, bars, scal, WHICH: gl.constexpr,
                       ACCUMULATE: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr,
                       BLOCK_R: gl.constexpr, GROUP_K: gl.constexpr, STAGES: gl.constexpr,
                       CONSUMERS: gl.constexpr):
        """Consumer WHICH: the program's local tiles WHICH, WHICH + 2, ...: accumulator from
        the addend (or zero), wgmma over the expert's chunks, then the masked store."""
        a_bufs, b_bufs = bufs
        ready, empty, turn = bars
        c_ptr, acc_ptr, off_ptr, K, N, E, stride_ce, stride_ck = scal
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        num_k = gl.cdiv(K, BLOCK_K)
        num_n = gl.cdiv(N, BLOCK_N)
        nprog = gl.num_programs(0)
        it = 0              # ring position: every chunk of the program's tiles so far
        local = 0
        for tile in range(gl.program_id(0), E * num_k * num_n, nprog):
            e, start, end, chunks, pid_k, pid_n = _tile_of(tile, num_k, num_n, off_ptr,
                                                           BLOCK_R, GROUP_K)
            if local % CONSUMERS == WHICH:
                rk = pid_k * BLOCK_K + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, acc_layout))
                rn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
                offs = e.to(gl.int64) * stride_ce + rk[:, None] * stride_ck + rn[None, :]
                mask = (rk < K)[:, None] & (rn < N)[None, :]
                if ACCUMULATE:    # before the turn wait: under the other consumer's loop
                    acc = gl.load(acc_ptr + offs, mask=mask, other=0.0)
                else:
                    acc = gl.zeros([BLOCK_K, BLOCK_N], gl.float32, acc_layout)
                if CONSUMERS == 2:
                    # Main loops alternate (the forward kernel's order barrier; it also keeps
                    # the ring's parity waits sound).
                    mbarrier.wait(turn.index(WHICH), ((local // 2) & 1) ^ (1 - WHICH))
                for c in range(chunks):
                    s = it % STAGES
                    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                    keep = end - (start + c * BLOCK_R)
                    if keep < BLOCK_R:   # the expert's last, partial chunk
                        _zero_rows_from(a_bufs.index(s), keep, BLOCK_R, BLOCK_K)
                        _zero_rows_from(b_bufs.index(s), keep, BLOCK_R, BLOCK_N)
                        fence_async_shared()     # generic stores -> the wgmma's async reads
                        _barrier()      # every warp's rows, before the wgmma
                    acc = warpgroup_mma(a_bufs.index(s).permute((1, 0)), b_bufs.index(s), acc,
                                        is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                    mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=c > 0)
                    it += 1
                if CONSUMERS == 2:
                    mbarrier.arrive(turn.index(1 - WHICH))
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                if chunks > 0:
                    mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
                gl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)
            else:               # the other consumer's tile: only its chunks move the ring
                it += chunks
            local += 1

    @gluon.jit
    def _wgrad_ws_kernel(a_desc, b_desc, c_ptr, acc_ptr, off_ptr, K, N, E, stride_ce,
                         stride_ck, K_BUCKET, ACCUMULATE: gl.constexpr, BLOCK_K: gl.constexpr,
                         BLOCK_N: gl.constexpr, BLOCK_R: gl.constexpr, GROUP_K: gl.constexpr,
                         STAGES: gl.constexpr, MMA_REGS: gl.constexpr, LOAD_REGS: gl.constexpr,
                         CONSUMERS: gl.constexpr):
        """C[e] = (ACC[e] +) A[rows_e]^T @ B[rows_e]: A [P, K], B [P, N], C and ACC [E, K, N]
        of the same strides (ACC fp32; ACC may be C itself)."""
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_R, BLOCK_K],
                                           a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_R, BLOCK_N],
                                           b_desc.layout)
        ready, empty, turn = ws.ring_barriers(STAGES, 1)
        descs = (a_desc, b_desc)
        bufs = (a_bufs, b_bufs)
        bars = (ready, empty, turn)
        scal = (c_ptr, acc_ptr, off_ptr, K, N, E, stride_ce, stride_ck)
        if CONSUMERS == 2:
            gl.warp_specialize([
                (_mma_partition, (descs, bufs, bars, scal, 0, ACCUMULATE, BLOCK_K, BLOCK_N,
                                  BLOCK_R, GROUP_K, STAGES, CONSUMERS)),
                (_mma_partition, (descs, bufs, bars, scal, 1, ACCUMULATE, BLOCK_K, BLOCK_N,
                                  BLOCK_R, GROUP_K, STAGES, CONSUMERS)),
                (_load_partition, (descs, bufs, bars, scal, 0, ACCUMULATE, BLOCK_K, BLOCK_N,
                                   BLOCK_R, GROUP_K, STAGES, CONSUMERS)),
            ], [4, 1], [MMA_REGS, LOAD_REGS])
        else:   # one consumer: producer / consumer only (no ping-pong)
            gl.warp_specialize([
                (_mma_partition, (descs, bufs, bars, scal, 0, ACCUMULATE, BLOCK_K, BLOCK_N,
                                  BLOCK_R, GROUP_K, STAGES, CONSUMERS)),
                (_load_partition, (descs, bufs, bars, scal, 0, ACCUMULATE, BLOCK_K, BLOCK_N,
                                   BLOCK_R, GROUP_K, STAGES, CONSUMERS)),
            ], [1], [LOAD_REGS])


def _size_blocks(nargs):
    bk, bn, br = nargs["BLOCK_K"], nargs["BLOCK_N"], nargs["BLOCK_R"]
    ws._set_block(nargs["a_desc"], (br, bk))
    ws._set_block(nargs["b_desc"], (br, bn))


def config(bk, bn, br, stages, consumers=2):
    """A triton.Config of this kernel (also for fixed-config tests and sweeps)."""
    return triton.Config(dict(BLOCK_K=bk, BLOCK_N=bn, BLOCK_R=br, GROUP_K=8, STAGES=stages,
                              MMA_REGS=ws._NUM_REGS[0], LOAD_REGS=ws._NUM_REGS[1],
                              CONSUMERS=consumers),
                         num_warps=4, maxnreg=ws._MAXNREG if consumers == 2 else None,
                         pre_hook=_size_blocks)


if ws.gluon is not None:
    _tuned = triton.autotune([config(*c) for c in CONFIGS],
                             key=["N", "K", "K_BUCKET", "ACCUMULATE"],
                             restore_value=["c_ptr"])(   # tuning runs must not add twice
        _wgrad_ws_kernel)


def launch_wgrad_ws(a, dy, c, offsets, acc_in, k_bucket, num_programs, cfg=None):
    """c [E, K, N] = (acc_in +) per-expert a^T dy, a [P, K] and dy [P, N] compact (no
    gather), acc_in fp32 [E, K, N] of c's strides or None (c itself: in place); returns c.
    cfg: a fixed `config(...)` instead of the autotuner."""
    e, k, n = c.shape
    a_desc, b_desc = ws._desc(a), ws._desc(dy)

    def grid(meta):   # persistent: at most one program per SM
        return (min(num_programs, e * triton.cdiv(k, meta["BLOCK_K"])
                    * triton.cdiv(n, meta["BLOCK_N"])),)

    kernel, extra = _tuned, {}
    if cfg is not None:
        kernel, extra = _wgrad_ws_kernel, dict(cfg.all_kwargs())
        _size_blocks(dict(extra, a_desc=a_desc, b_desc=b_desc))
    kernel[grid](a_desc, b_desc, c, c if acc_in is None else acc_in, offsets, k, n, e,
                 c.stride(0), c.stride(1), k_bucket, ACCUMULATE=acc_in is not None, **extra)
    return c
