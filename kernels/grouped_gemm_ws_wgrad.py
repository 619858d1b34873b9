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
- with TWO, a tile's main loop runs on over a second segment of rows (A2, dY2 and their own
  offsets: the next IRL step's operands) after the first, into the same accumulator, so two
  steps' dW cost one epilogue and no fp32 partial sum in memory (launch_wgrad_pair); each
  segment's last, partial chunk is zeroed on its own;
- the accumulator starts from the fp32 addend (ACCUMULATE: the S-step weight-gradient sum,
  the wgrad_chain of kernels/expert_mlp_op.py) or from zero; experts without rows store it
  as it is.
- a 16-bit C leaves by TMA store, asynchronously: the consumer writes its tile to shared
  memory, issues the store and goes on to its next tile's main loop (it waits for that store
  only before its next epilogue reuses the buffer). Its tile rows that cross K (they would
  land in the next expert's rows of the 2-D view) and an fp32 C (the S-step sum: twice the
  bytes, no room for the buffer) are stored by pointer, masked, in registers. Measured on an
  H100 (docs/benchmarks.md, session 23): with the pointer store, the cooperative kernel's
  time per tile had a fixed part about a sixth of the whole at 4096 rows an expert, the
  epilogue's global writes stalling every SM at once at the tile boundary.

Or cooperative (`consumers = ws.COOP`, the forward kernel's other schedule): both consumer
warpgroups work on every tile, each on one half of its K rows (SUB_K = BLOCK_K / 2), so a
tile can be 256 x 128 or 128 x 256 (fewer bytes loaded per FLOP: the wgrads reduce over
thousands of rows, the long-K regime where the forward kernel's COOP tiles won, v14; on
the H200 they did not win here, see CONFIGS). The A chunk is loaded as two TMA boxes, one
per consumer's half: a wgrad's A is sliced along its contiguous dimension, which a swizzled
slot cannot be sliced along. The dY chunk is shared: on a partial chunk both consumers zero
its tail rows, each before its own wgmma. That is a race between writes of identical values
(a row below the end is stored back unchanged, one past it as zero, by either), so neither
needs to wait for the other's stores: its own have already made the whole slot right.

Same contract as `grouped_gemm_tma.launch_wgrad_tma` without a gather (a gathered wgrad
copies its rows first). sm90 and bf16 / fp16 only (`grouped_gemm_ws.available`); tested on
the GPU (tests/kernels/test_grouped_gemm_ws_wgrad.py) and compiled on the CPU by
tools/compile_sm90.py.
"""
from __future__ import annotations

import os

import torch

from kernels import grouped_gemm_ws as ws
from kernels import row_segments

# "auto": grouped_gemm.launch_wgrad times this kernel against the TMA wgrad kernel once per
# key and keeps the faster (grouped_gemm_ws.choose); "on" / "off" decide outright. Under
# MOC_GMM_WS=off neither warp-specialized kernel runs.
MODE = os.environ.get("MOC_GMM_WS_WGRAD", "auto")

if ws.gluon is not None:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    _tma_load = ws._tma_load
    _tma_store = ws._tma_store
    # Triton 3.7+ names the CTA barrier `barrier`; 3.6 has only `thread_barrier`.
    _barrier = getattr(gl, "barrier", None) or gl.thread_barrier

# (BLOCK_K, BLOCK_N, BLOCK_R, STAGES, consumers): an output tile BLOCK_K x BLOCK_N, reduced
# BLOCK_R rows a step; consumers 1, 2 (ping-pong: a consumer's tile is the whole tile, fp32
# accumulator 128 registers a thread at 128 x 128) or ws.COOP (each consumer half the K rows).
# Shared memory STAGES * (BLOCK_K + BLOCK_N) * BLOCK_R * 2 bytes, plus 2 * SUB_K * BLOCK_N * 2
# for a 16-bit C's epilogue tiles, at most 227 KiB.
# The session 12 sweep (docs/benchmarks.md; tools/sweep_gemm_configs.py WS_WGRAD_SWEEP) found
# the cooperative tiles 1-5% slower than the ping-pong 128 x 128 x 64 in five stages at every
# wgrad of (8, 768, 2048) and (8, 2048, 5632) on the H200: one stays, for the autotuner to
# weigh on other GPUs and shapes.
CONFIGS = [(128, 128, 64, 4, 2), (128, 128, 64, 5, 2), (64, 256, 64, 4, 2), (128, 128, 32, 8, 2),
           (128, 128, 64, 4, 1), (128, 256, 64, 3, ws.COOP)]

if ws.gluon is not None:
    @gluon.jit
    def _tile_of(tile, num_k, num_n, off_ptr, end_ptr, BLOCK_R: gl.constexpr,
                 GROUP_K: gl.constexpr):
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
        end = gl.load(end_ptr + e)
        chunks = ((end - start + BLOCK_R - 1) // BLOCK_R).to(gl.int32)
        return e, start, end, chunks, pid_k, pid_n

    @gluon.jit
    def _load_partition(descs, bufs, bars, scal, WHICH: gl.constexpr, TWO: gl.constexpr,
                        ACCUMULATE: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr,
                        BLOCK_R: gl.constexpr, GROUP_K: gl.constexpr, STAGES: gl.constexpr,
                        CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr, SUB_K: gl.constexpr):
        """Producer: every chunk of every tile of this program, in order, into the ring."""
        a_desc, b_desc, c_desc, a2_desc, b2_desc = descs
        a_bufs, b_bufs, c_bufs = bufs
        ready, empty, turn = bars
        c_ptr, acc_ptr, off_ptr, end_ptr, off2_ptr, end2_ptr, K, N, E, stride_ce, stride_ck = scal
        num_k = gl.cdiv(K, BLOCK_K)
        num_n = gl.cdiv(N, BLOCK_N)
        A_SPLIT: gl.constexpr = BLOCK_K // SUB_K     # A boxes per slot: 2 cooperative
        nbytes: gl.constexpr = a_desc.block_type.nbytes * A_SPLIT + b_desc.block_type.nbytes
        it = 0
        for tile in range(gl.program_id(0), E * num_k * num_n, gl.num_programs(0)):
            e, start, end, chunks, pid_k, pid_n = _tile_of(tile, num_k, num_n, off_ptr,
                                                           end_ptr, BLOCK_R, GROUP_K)
            start2, end2, chunks2 = _second_segment(off2_ptr, end2_ptr, e, BLOCK_R, TWO)
            for c in range(chunks + chunks2):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, nbytes)
                col_k = pid_k * BLOCK_K
                col_n = pid_n * BLOCK_N
                if TWO:
                    if c >= chunks:    # the second segment's chunks, after the first's
                        _load_chunk(a2_desc, b2_desc,
                                    (start2 + (c - chunks) * BLOCK_R).to(gl.int32), col_k,
                                    col_n, bar, a_bufs, b_bufs, s, A_SPLIT, SUB_K)
                    else:
                        _load_chunk(a_desc, b_desc, (start + c * BLOCK_R).to(gl.int32), col_k,
                                    col_n, bar, a_bufs, b_bufs, s, A_SPLIT, SUB_K)
                else:
                    _load_chunk(a_desc, b_desc, (start + c * BLOCK_R).to(gl.int32), col_k,
                                col_n, bar, a_bufs, b_bufs, s, A_SPLIT, SUB_K)
                it += 1

    @gluon.jit
    def _load_chunk(a_desc, b_desc, r, col_k, col_n, bar, a_bufs, b_bufs, s,
                    A_SPLIT: gl.constexpr, SUB_K: gl.constexpr):
        """One ring slot: A rows [r, r + BLOCK_R) of columns col_k.. (A_SPLIT boxes) and the
        same rows of dY from column col_n, all arriving on `bar`."""
        for h in gl.static_range(A_SPLIT):
            _tma_load(a_desc, [r, col_k + h * SUB_K], bar, a_bufs.index(A_SPLIT * s + h))
        _tma_load(b_desc, [r, col_n], bar, b_bufs.index(s))

    @gluon.jit
    def _second_segment(off2_ptr, end2_ptr, e, BLOCK_R: gl.constexpr, TWO: gl.constexpr):
        """(first row, end row, chunk count) of expert e in the second segment's rows, or an
        empty segment without TWO."""
        if TWO:
            start2 = gl.load(off2_ptr + e)
            end2 = gl.load(end2_ptr + e)
            return start2, end2, ((end2 - start2 + BLOCK_R - 1) // BLOCK_R).to(gl.int32)
        else:
            return 0, 0, 0

    @gluon.jit
    def _zero_rows_from(buf, keep, ROWS: gl.constexpr, COLS: gl.constexpr):
        """buf[keep:] := 0 for a [ROWS, COLS] slot, through registers (one warpgroup)."""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        v = buf.load(layout)
        rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
        buf.store(gl.where((rows < keep)[:, None], v, gl.zeros_like(v)))

    @gluon.jit
    def _mma_partition(descs, bufs, bars, scal, WHICH: gl.constexpr, TWO: gl.constexpr,
                       ACCUMULATE: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr,
                       BLOCK_R: gl.constexpr, GROUP_K: gl.constexpr, STAGES: gl.constexpr,
                       CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr, SUB_K: gl.constexpr):
        """Consumer WHICH. Ping-pong: the program's local tiles WHICH, WHICH + 2, ...;
        cooperative (SUB_K < BLOCK_K): K rows [WHICH * SUB_K, (WHICH + 1) * SUB_K) of every
        tile. Accumulator from the addend (or zero), wgmma over the expert's chunks, then the
        store of its rows (module docstring)."""
        a_desc, b_desc, c_desc, a2_desc, b2_desc = descs
        a_bufs, b_bufs, c_bufs = bufs
        ready, empty, turn = bars
        c_ptr, acc_ptr, off_ptr, end_ptr, off2_ptr, end2_ptr, K, N, E, stride_ce, stride_ck = scal
        # C's descriptor is over C itself only when C is 16-bit (c_descriptor)
        TMA_STORE: gl.constexpr = c_desc.dtype == c_ptr.dtype.element_ty
        c_smem = c_bufs.index(WHICH)
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        A_SPLIT: gl.constexpr = BLOCK_K // SUB_K
        num_k = gl.cdiv(K, BLOCK_K)
        num_n = gl.cdiv(N, BLOCK_N)
        nprog = gl.num_programs(0)
        it = 0              # ring position: every chunk of the program's tiles so far
        local = 0
        for tile in range(gl.program_id(0), E * num_k * num_n, nprog):
            e, start, end, chunks, pid_k, pid_n = _tile_of(tile, num_k, num_n, off_ptr,
                                                           end_ptr, BLOCK_R, GROUP_K)
            start2, end2, chunks2 = _second_segment(off2_ptr, end2_ptr, e, BLOCK_R, TWO)
            if PINGPONG:
                mine = local % 2 == WHICH
            else:           # every tile: one consumer, or cooperative
                mine = local >= 0
            if mine:
                row0 = pid_k * BLOCK_K + WHICH * (BLOCK_K - SUB_K)   # COOP: this half's rows
                rk = row0 + gl.arange(0, SUB_K, layout=gl.SliceLayout(1, acc_layout))
                rn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
                offs = e.to(gl.int64) * stride_ce + rk[:, None] * stride_ck + rn[None, :]
                mask = (rk < K)[:, None] & (rn < N)[None, :]
                if ACCUMULATE:    # before the turn wait: under the other consumer's loop
                    acc = gl.load(acc_ptr + offs, mask=mask, other=0.0)
                else:
                    acc = gl.zeros([SUB_K, BLOCK_N], gl.float32, acc_layout)
                if PINGPONG:
                    # Main loops alternate (the forward kernel's order barrier; it also keeps
                    # the ring's parity waits sound).
                    mbarrier.wait(turn.index(WHICH), ((local // 2) & 1) ^ (1 - WHICH))
                for c in range(chunks + chunks2):
                    s = it % STAGES
                    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                    a = a_bufs.index(A_SPLIT * s + WHICH * (A_SPLIT - 1))   # this half
                    keep = end - (start + c * BLOCK_R)     # rows of this chunk in its segment
                    if TWO:
                        if c >= chunks:
                            keep = end2 - (start2 + (c - chunks) * BLOCK_R)
                    if keep < BLOCK_R:   # the expert's last, partial chunk
                        _zero_rows_from(a, keep, BLOCK_R, SUB_K)
                        # COOP: the other consumer may be zeroing it too (the same values)
                        _zero_rows_from(b_bufs.index(s), keep, BLOCK_R, BLOCK_N)
                        fence_async_shared()     # generic stores -> the wgmma's async reads
                        _barrier()      # every warp's rows, before the wgmma
                    acc = warpgroup_mma(a.permute((1, 0)), b_bufs.index(s), acc, is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                    mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=c > 0)
                    it += 1
                if PINGPONG:
                    mbarrier.arrive(turn.index(1 - WHICH))
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                if chunks + chunks2 > 0:
                    mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
                out = acc.to(c_ptr.dtype.element_ty)
                if TMA_STORE:
                    if row0 + SUB_K <= K:     # rows inside this expert's dW
                        tma.store_wait(0)     # this consumer's last store has left c_smem
                        c_smem.store(out)
                        fence_async_shared()
                        _tma_store(c_desc, [(e * K + row0).to(gl.int32), pid_n * BLOCK_N],
                                   c_smem)
                    else:
                        gl.store(c_ptr + offs, out, mask=mask)
                else:
                    gl.store(c_ptr + offs, out, mask=mask)
            else:               # the other consumer's tile: only its chunks move the ring
                it += chunks + chunks2
            local += 1
        if TMA_STORE:
            tma.store_wait(0)

    @gluon.jit
    def _wgrad_ws_kernel(a_desc, b_desc, c_desc, a2_desc, b2_desc, c_ptr, acc_ptr, off_ptr,
                         off2_ptr, END_SHIFT, END_SHIFT2, K, N, E, stride_ce, stride_ck, K_BUCKET, TWO: gl.constexpr,
                         ACCUMULATE: gl.constexpr, BLOCK_K: gl.constexpr,
                         BLOCK_N: gl.constexpr, BLOCK_R: gl.constexpr, GROUP_K: gl.constexpr,
                         STAGES: gl.constexpr, MMA_REGS: gl.constexpr, LOAD_REGS: gl.constexpr,
                         CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr, SUB_K: gl.constexpr):
        """C[e] = (ACC[e] +) A[rows_e]^T @ B[rows_e] (+ A2[rows2_e]^T @ B2[rows2_e] with TWO):
        A [P, K], B [P, N], rows_e = off[e]:end[e] (end = off + END_SHIFT, kernels/row_segments.py; A2 [P2, K], B2 [P2, N], rows2_e by off2;
        without TWO, a2_desc / b2_desc / off2_ptr are not read), C and ACC [E, K, N]
        of the same strides (ACC fp32; ACC may be C itself); c_desc: C as [E * K, N] when C
        is 16-bit and contiguous, else a placeholder of another dtype (pointer stores only).
        CONSUMERS: consumer warpgroups (1 or 2); PINGPONG: they take alternate tiles, else
        (2, cooperative) each takes SUB_K = BLOCK_K / 2 rows of every tile."""
        a_bufs = gl.allocate_shared_memory(a_desc.dtype,
                                           [STAGES * (BLOCK_K // SUB_K), BLOCK_R, SUB_K],
                                           a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_R, BLOCK_N],
                                           b_desc.layout)
        c_bufs = gl.allocate_shared_memory(   # one epilogue tile per consumer
            c_desc.dtype, [2, c_desc.block_shape[0], c_desc.block_shape[1]], c_desc.layout)
        ready, empty, turn = ws.ring_barriers(STAGES, 2 if SUB_K < BLOCK_K else 1)
        descs = (a_desc, b_desc, c_desc, a2_desc, b2_desc)
        bufs = (a_bufs, b_bufs, c_bufs)
        bars = (ready, empty, turn)
        scal = (c_ptr, acc_ptr, off_ptr, off_ptr + END_SHIFT, off2_ptr, off2_ptr + END_SHIFT2,
                K, N, E, stride_ce, stride_ck)
        if CONSUMERS == 2:
            gl.warp_specialize([
                (_mma_partition, (descs, bufs, bars, scal, 0, TWO, ACCUMULATE, BLOCK_K, BLOCK_N,
                                  BLOCK_R, GROUP_K, STAGES, CONSUMERS, PINGPONG, SUB_K)),
                (_mma_partition, (descs, bufs, bars, scal, 1, TWO, ACCUMULATE, BLOCK_K, BLOCK_N,
                                  BLOCK_R, GROUP_K, STAGES, CONSUMERS, PINGPONG, SUB_K)),
                (_load_partition, (descs, bufs, bars, scal, 0, TWO, ACCUMULATE, BLOCK_K, BLOCK_N,
                                   BLOCK_R, GROUP_K, STAGES, CONSUMERS, PINGPONG, SUB_K)),
            ], [4, 1], [MMA_REGS, LOAD_REGS])
        else:   # one consumer: producer / consumer only (no ping-pong)
            gl.warp_specialize([
                (_mma_partition, (descs, bufs, bars, scal, 0, TWO, ACCUMULATE, BLOCK_K, BLOCK_N,
                                  BLOCK_R, GROUP_K, STAGES, CONSUMERS, PINGPONG, SUB_K)),
                (_load_partition, (descs, bufs, bars, scal, 0, TWO, ACCUMULATE, BLOCK_K, BLOCK_N,
                                   BLOCK_R, GROUP_K, STAGES, CONSUMERS, PINGPONG, SUB_K)),
            ], [1], [LOAD_REGS])


def _size_blocks(nargs):
    bn, br = nargs["BLOCK_N"], nargs["BLOCK_R"]
    for a_name, b_name in (("a_desc", "b_desc"), ("a2_desc", "b2_desc")):
        ws._set_block(nargs[a_name], (br, nargs["SUB_K"]))   # one box per consumer's half
        ws._set_block(nargs[b_name], (br, bn))
    if nargs["c_desc"].base.dtype == nargs["c_ptr"].dtype:    # C itself: a consumer's tile
        ws._set_block(nargs["c_desc"], (nargs["SUB_K"], bn))
    else:                                                     # the placeholder: smallest box
        ws._set_block(nargs["c_desc"], PLACEHOLDER_BOX)


PLACEHOLDER_BOX = (8, 64)
_PLACEHOLDERS: dict = {}


def c_descriptor(c: torch.Tensor):
    """The kernel's c_desc: a TMA descriptor over c [E, K, N] as [E * K, N] when c is 16-bit
    and contiguous (its tiles leave by TMA store), else over a small placeholder of another
    16-bit dtype than c's (the kernel then stores by pointer only)."""
    if c.element_size() == 2 and c.is_contiguous():
        return ws._desc(c.view(-1, c.shape[2]))
    dtype = torch.float16 if c.dtype == torch.bfloat16 else torch.bfloat16
    if (c.device, dtype) not in _PLACEHOLDERS:
        _PLACEHOLDERS[c.device, dtype] = torch.empty(PLACEHOLDER_BOX, dtype=dtype,
                                                     device=c.device)
    return ws._desc(_PLACEHOLDERS[c.device, dtype])


def config(bk, bn, br, stages, consumers=2, group=8):
    """A triton.Config of this kernel (also for fixed-config tests and sweeps); consumers 1,
    2 (ping-pong) or ws.COOP; group: GROUP_K, the dW row tiles that share their dY chunks
    in L2."""
    if consumers not in (1, 2, ws.COOP):
        raise ValueError(f"grouped_gemm_ws_wgrad.config: consumers must be 1, 2 or "
                         f"{ws.COOP!r}, got {consumers!r}")
    coop = consumers == ws.COOP
    parts = 1 if consumers == 1 else 2
    return triton.Config(dict(BLOCK_K=bk, BLOCK_N=bn, BLOCK_R=br, GROUP_K=group, STAGES=stages,
                              MMA_REGS=ws._NUM_REGS[0], LOAD_REGS=ws._NUM_REGS[1],
                              CONSUMERS=parts, PINGPONG=consumers == 2,
                              SUB_K=bk // 2 if coop else bk),
                         num_warps=4, maxnreg=ws._MAXNREG if parts == 2 else None,
                         pre_hook=_size_blocks)


if ws.gluon is not None:
    _tuned = triton.autotune([config(*c) for c in CONFIGS],
                             key=["N", "K", "K_BUCKET", "TWO", "ACCUMULATE"],
                             restore_value=["c_ptr"],   # tuning runs must not add twice
                             do_bench=ws._bench)(_wgrad_ws_kernel)


def launch_wgrad_ws(a, dy, c, offsets, acc_in, k_bucket, num_programs, cfg=None,
                    second=None):
    """c [E, K, N] = (acc_in +) per-expert a^T dy, a [P, K] and dy [P, N] compact (no
    gather), acc_in fp32 [E, K, N] of c's strides or None (c itself: in place); returns c.
    cfg: a fixed `config(...)` instead of the autotuner. second: (a2, dy2, offsets2), a
    second segment of rows whose per-expert a2^T dy2 goes into the same accumulator, its
    chunks after the first's (two S-steps' wgrads in one pass: grouped_gemm.launch_wgrad_pair)."""
    e, k, n = c.shape
    a_desc, b_desc, c_desc = ws._desc(a), ws._desc(dy), c_descriptor(c)
    if second is None:
        a2_desc, b2_desc, offsets2 = a_desc, b_desc, offsets
    else:
        a2_desc, b2_desc, offsets2 = ws._desc(second[0]), ws._desc(second[1]), second[2]

    def grid(meta):   # persistent: at most one program per SM
        return (min(num_programs, e * triton.cdiv(k, meta["BLOCK_K"])
                    * triton.cdiv(n, meta["BLOCK_N"])),)

    kernel, extra = _tuned, {}
    if cfg is not None:
        kernel, extra = _wgrad_ws_kernel, dict(cfg.all_kwargs())
        _size_blocks(dict(extra, a_desc=a_desc, b_desc=b_desc, c_desc=c_desc, c_ptr=c,
                          a2_desc=a2_desc, b2_desc=b2_desc))
    kernel[grid](a_desc, b_desc, c_desc, a2_desc, b2_desc, c, c if acc_in is None else acc_in,
                 offsets, offsets2, row_segments.end_shift(offsets),
                 row_segments.end_shift(offsets2), k, n, e, c.stride(0), c.stride(1), k_bucket,
                 TWO=second is not None, ACCUMULATE=acc_in is not None, **extra)
    return c
