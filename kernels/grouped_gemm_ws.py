"""Warp-specialized "ping-pong" grouped GEMM for Hopper (Gluon), forward and dgrad.

The plain Triton kernel (kernels/grouped_gemm_tma.py) runs one tile at a time per SM: with a
short K (768 at the small expert shape: a 12-step main loop) the tile's epilogue and the next
tile's prologue sit unhidden between main loops (docs/kernels_notes.md, v10). This kernel
splits each persistent program into three partitions, the schedule CUTLASS's sm90 ping-pong
GEMMs use:

- one producer warp issues the TMA loads of every tile of the program, in tile order, into a
  ring of STAGES shared-memory slots (`ready` / `empty` mbarriers per slot);
- two consumer warpgroups take the program's tiles alternately (consumer c the local tiles
  c, c + 2, ...), each with its own accumulator, so one's epilogue (convert, store) runs
  while the other's wgmma main loop keeps the tensor cores busy. Their main loops alternate
  through an order barrier (`turn`), which also keeps the ring's parity waits sound.

Or, "cooperative" (CUTLASS's other sm90 schedule): both consumer warpgroups work on every tile,
each on one half of its rows (SUB_M = BLOCK_M / 2), so a tile can be 128 x 256 (or 256 x 128)
with each warpgroup's accumulator still 128 registers a thread. The larger tile loads fewer
bytes per FLOP (85 against 64 for 128 x 128), which the long-K GEMMs need; the epilogue is no
longer hidden, which the short-K ones need. Both consumers release each ring slot (the
`empty` barrier counts two arrivals).

Same contract as `launch_gmm_tma` with EPILOGUE 0 or 1 (SwiGLU forward) and no gather, plus
EPILOGUE 2 (the W2 dgrad with the SwiGLU backward in its epilogue, `SWIGLU_BWD`):
C[rows_e] = A[rows_e] @ W[e] (W[e]^T with B_TRANS), rows sorted by expert, device-side int64
offsets, no host sync. The tile map is the TMA kernel's (GROUP_M swizzle over row tiles that
never cross an expert end); each partition finds a tile's expert with a scalar scan of the
offsets. Tiles inside their expert store through a TMA descriptor; an expert's last, partial
tile stores with masked pointer stores (a TMA store would clobber the next expert's first
rows).

Gluon compiles for sm90 but does not run under TRITON_INTERPRET, so this kernel's numerics are
tested on the GPU only (tests/kernels/test_grouped_gemm_ws.py, against the fp64 reference);
on the CPU, tools/compile_sm90.py compiles it to an sm90 cubin. It is used when `MOC_GMM_WS`
allows it (kernels/grouped_gemm.py; `choose` below).
"""
from __future__ import annotations

import functools
import os

import torch

from kernels import row_segments, sustained_timing

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # Triton 3.7+ renamed the TMA copies (the old names raise); 3.6 has only the old ones.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
except ImportError:          # Triton without Gluon (< 3.5) or no Triton: never called
    gluon = None

# "auto": on bf16/fp16 sm90 GPUs with Gluon, each GEMM shape takes whichever of this kernel
# and the TMA kernel times faster on its first call (`choose`); "on": this kernel wherever it
# can run; "off": never.
MODE = os.environ.get("MOC_GMM_WS", "auto")

# (BLOCK_M, BLOCK_N, BLOCK_K, STAGES, consumers). consumers: 2 ping-pong, 1 plain producer /
# consumer, COOP two consumers on one tile. A consumer warpgroup's fp32 accumulator is
# rows * BLOCK_N / 128 registers a thread (rows = BLOCK_M, or BLOCK_M / 2 with COOP), so
# 128 x 128 (or 64 x 256) is the largest a consumer can hold. consumers=1 won W13 dgrad
# (8, 768, 2048) in the session 8 sweep (docs/benchmarks.md), the ping-pong tiles the other
# short-K GEMMs; the COOP tiles are for long K (v14; 128 x 256 x 32 in six stages won W13 fwd
# (8, 2048, 5632) in the session 12 sweep). Shared memory: STAGES * (BLOCK_M +
# BLOCK_N) * BLOCK_K * 2 bytes + the two epilogue tiles, at most 227 KiB.
COOP = "coop"
CONFIGS = [(128, 128, 64, 4, 2), (128, 128, 64, 5, 2), (64, 256, 64, 4, 2), (128, 128, 32, 8, 2),
           (128, 128, 64, 4, 1), (128, 256, 64, 3, COOP), (128, 256, 32, 6, COOP),
           (256, 128, 64, 3, COOP)]
# SwiGLU forward: gate and up accumulators of BLOCK_N columns each (2 x 64 registers).
SWIGLU_CONFIGS = [(128, 64, 64, 4, 2), (128, 64, 64, 6, 2), (64, 128, 64, 4, 2),
                  (128, 64, 64, 4, 1), (128, 128, 64, 4, COOP)]
# SwiGLU backward in the W2 dgrad's epilogue (EPILOGUE 2): the epilogue also holds the gate
# and up pre-activations of its tile in fp32, so the accumulator stays at 64 registers a
# thread (128 x 64, or 128 x 128 split between two cooperative consumers).
SWIGLU_BWD_CONFIGS = [(128, 64, 64, 4, 2), (128, 64, 64, 6, 2), (64, 128, 64, 4, 2),
                      (128, 128, 64, 4, COOP)]
# MOC_GMM_SWIGLU_BWD: "on" runs the W2 dgrad with the SwiGLU backward in this kernel's
# epilogue (one pass: no dh [P, F] written and read back); "off" (default) the dgrad and
# kernels/swiglu.py's elementwise pass; "auto" times both once per shape and keeps the
# faster (`choose`). Off by default until it is measured on a GPU (docs/kernels_notes.md).
SWIGLU_BWD = os.environ.get("MOC_GMM_SWIGLU_BWD", "off")
_NUM_REGS = (232, 40)        # consumer 1, producer (the default partition gets the rest)
_MAXNREG = 168               # 12 warps (3 warpgroups) x 168 x 32 <= 64K registers


_SM90: dict[int, bool] = {}


def available(a: torch.Tensor) -> bool:
    """Whether this kernel may run on a's device and dtype (cached: runs on every launch)."""
    if gluon is None or MODE == "off" or a.device.type != "cuda":
        return False
    if a.dtype not in (torch.bfloat16, torch.float16) or torch.version.hip is not None:
        return False
    idx = a.device.index if a.device.index is not None else torch.cuda.current_device()
    if idx not in _SM90:
        _SM90[idx] = torch.cuda.get_device_capability(idx)[0] == 9
    return _SM90[idx]


if gluon is not None:
    @gluon.jit
    def _row_tiles(off_ptr, end_ptr, E, BLOCK_M: gl.constexpr):
        """Row tiles over all experts: sum_e ceil(rows_e / BLOCK_M); expert e's rows are
        [off_ptr[e], end_ptr[e]) (end_ptr = off_ptr + 1 for plain offsets,
        kernels/row_segments.py)."""
        n = gl.load(off_ptr) * 0
        for e in range(E):
            start = gl.load(off_ptr + e)
            end = gl.load(end_ptr + e)
            n += (end - start + BLOCK_M - 1) // BLOCK_M
        return n.to(gl.int32)

    @gluon.jit
    def _tile_of(tile, num_m, num_n, off_ptr, end_ptr, E, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
        """Tile index -> (expert, first row, expert's end row, first column); GROUP_M row
        tiles share their B tiles in L2 (the TMA kernel's swizzle)."""
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        size_m = gl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % size_m
        pid_n = (tile % per_group) // size_m
        row0 = gl.load(off_ptr)
        seen = row0 * 0
        row_end = row0
        g = pid_m - pid_m
        for e in range(E):
            start = gl.load(off_ptr + e)
            end = gl.load(end_ptr + e)
            t = (end - start + BLOCK_M - 1) // BLOCK_M
            hit = (pid_m >= seen) & (pid_m < seen + t)
            row0 = gl.where(hit, start + (pid_m - seen) * BLOCK_M, row0)
            row_end = gl.where(hit, end, row_end)
            g = gl.where(hit, e, g)
            seen += t
        return g, row0, row_end, pid_n * BLOCK_N

    @gluon.jit
    def ring_barriers(STAGES: gl.constexpr, RELEASES: gl.constexpr):
        """The ring's `ready` / `empty` mbarriers (one per slot; `empty` completes after
        RELEASES consumer arrivals) and the consumers' `turn` pair (the order barrier),
        initialized (also used by the wgrad twin)."""
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=RELEASES)
        for c in gl.static_range(2):
            mbarrier.init(turn.index(c), count=1)
        return ready, empty, turn

    @gluon.jit
    def _load_partition(descs, bufs, bars, scal, WHICH: gl.constexpr, B_TRANS: gl.constexpr,
                        EPILOGUE: gl.constexpr, STORE_PRE: gl.constexpr, BLOCK_M: gl.constexpr,
                        BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
                        STAGES: gl.constexpr, CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr,
                        SUB_M: gl.constexpr):
        """Producer: every tile of this program in order, k steps in order, into the ring."""
        a_desc, b_desc, c_desc = descs
        a_bufs, b_bufs, c_bufs = bufs
        ready, empty, turn = bars
        c_ptr, pre_ptr, off_ptr, end_ptr, N, K, E, stride_cm, stride_pm = scal
        num_m = _row_tiles(off_ptr, end_ptr, E, BLOCK_M)
        num_n = gl.cdiv(N, BLOCK_N)
        k_tiles = gl.cdiv(K, BLOCK_K)
        nbytes: gl.constexpr = (a_desc.block_type.nbytes
                                + b_desc.block_type.nbytes * (2 if EPILOGUE == 1 else 1))
        it = 0
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            g, row0, row_end, n0 = _tile_of(tile, num_m, num_n, off_ptr, end_ptr, E, BLOCK_M,
                                            BLOCK_N, GROUP_M)
            r0 = row0.to(gl.int32)
            for kk in range(k_tiles):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, nbytes)
                k0 = kk * BLOCK_K
                _tma_load(a_desc, [r0, k0], bar, a_bufs.index(s))
                if EPILOGUE == 1:   # W13 as [E*K, 2N]: the gate tile, then the up tile
                    _tma_load(b_desc, [g * K + k0, n0], bar,
                                                    b_bufs.index(2 * s))
                    _tma_load(b_desc, [g * K + k0, n0 + N], bar,
                                                    b_bufs.index(2 * s + 1))
                elif B_TRANS:       # the weights' 2-D view is [E*N, K]
                    _tma_load(b_desc, [g * N + n0, k0], bar,
                                                    b_bufs.index(s))
                else:               # [E*K, N]
                    _tma_load(b_desc, [g * K + k0, n0], bar,
                                                    b_bufs.index(s))
                it += 1

    @gluon.jit
    def _mma_partition(descs, bufs, bars, scal, WHICH: gl.constexpr, B_TRANS: gl.constexpr,
                       EPILOGUE: gl.constexpr, STORE_PRE: gl.constexpr, BLOCK_M: gl.constexpr,
                       BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
                       STAGES: gl.constexpr, CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr,
                       SUB_M: gl.constexpr):
        """Consumer WHICH (0 or 1). Ping-pong: the program's local tiles WHICH, WHICH + 2, ...;
        cooperative (SUB_M < BLOCK_M): rows [WHICH * SUB_M, (WHICH + 1) * SUB_M) of every
        tile. wgmma over the ring slots the producer filled, then the epilogue of its rows.
        EPILOGUE 1 (SwiGLU): two accumulators, gate and up columns of the same tile; the
        epilogue writes h = silu(gate) * up and, with STORE_PRE, the pre-activation."""
        a_desc, b_desc, c_desc = descs
        a_bufs, b_bufs, c_bufs = bufs
        ready, empty, turn = bars
        c_ptr, pre_ptr, off_ptr, end_ptr, N, K, E, stride_cm, stride_pm = scal
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        COOP: gl.constexpr = SUB_M < BLOCK_M
        num_m = _row_tiles(off_ptr, end_ptr, E, BLOCK_M)
        num_n = gl.cdiv(N, BLOCK_N)
        k_tiles = gl.cdiv(K, BLOCK_K)
        nprog = gl.num_programs(0)
        c_smem = c_bufs.index(WHICH)
        if PINGPONG:                      # local tiles WHICH, WHICH + 2, ...
            local = WHICH
            first = gl.program_id(0) + WHICH * nprog
            local_step = 2
        else:                             # every local tile (one consumer, or cooperative)
            local = WHICH - WHICH
            first = gl.program_id(0)
            local_step = 1
        for tile in range(first, num_m * num_n, local_step * nprog):
            g, row0, row_end, n0 = _tile_of(tile, num_m, num_n, off_ptr, end_ptr, E, BLOCK_M,
                                            BLOCK_N, GROUP_M)
            it = local * k_tiles          # the ring position of this tile's first k step
            if COOP:                      # this consumer's rows of the tile
                row0 = row0 + WHICH * SUB_M
            if PINGPONG:
                # Main loops strictly alternate between the consumers (CUTLASS's "order
                # barrier"). Besides the schedule this keeps the ring's parity waits sound:
                # a consumer only waits on a slot whose previous use the other one has
                # already taken, so it never sees a phase two uses old as "ready".
                mbarrier.wait(turn.index(WHICH), ((local // 2) & 1) ^ (1 - WHICH))
            acc = gl.zeros([SUB_M, BLOCK_N], gl.float32, acc_layout)
            if EPILOGUE == 1:
                acc_up = gl.zeros([SUB_M, BLOCK_N], gl.float32, acc_layout)
            for kk in range(k_tiles):
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                if COOP:
                    a = a_bufs.index(s).slice(WHICH * SUB_M, SUB_M)
                else:
                    a = a_bufs.index(s)
                # one step's wgmmas in flight: when the previous step's have finished, its
                # slot is read and goes back to the producer
                if EPILOGUE == 1:
                    acc = warpgroup_mma(a, b_bufs.index(2 * s), acc, is_async=True)
                    acc_up = warpgroup_mma(a, b_bufs.index(2 * s + 1), acc_up, is_async=True)
                    acc, acc_up = warpgroup_mma_wait(num_outstanding=2, deps=(acc, acc_up))
                else:
                    if B_TRANS:
                        b = b_bufs.index(s).permute((1, 0))
                    else:
                        b = b_bufs.index(s)
                    acc = warpgroup_mma(a, b, acc, is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=kk > 0)
                it += 1
            if PINGPONG:                  # the other consumer's main loop may start
                mbarrier.arrive(turn.index(1 - WHICH))
            if EPILOGUE == 1:
                acc, acc_up = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc_up))
            else:
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
            if EPILOGUE == 2:             # SwiGLU backward: acc is dh for columns rn of F
                rm = row0 + gl.arange(0, SUB_M, layout=gl.SliceLayout(1, acc_layout))
                rn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
                mask = (rm < row_end)[:, None] & (rn < N)[None, :]
                p_ptrs = pre_ptr + rm[:, None] * stride_pm + rn[None, :]
                g_pre = gl.load(p_ptrs, mask=mask, other=0.0).to(gl.float32)
                u_pre = gl.load(p_ptrs + N, mask=mask, other=0.0).to(gl.float32)
                sig = 1.0 / (1.0 + gl.exp(-g_pre))
                c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :]
                gl.store(c_ptrs, (acc * u_pre * sig * (1.0 + g_pre * (1.0 - sig))).to(
                    c_desc.dtype), mask=mask)
                gl.store(c_ptrs + N, (acc * g_pre * sig).to(c_desc.dtype), mask=mask)
            elif EPILOGUE == 1:           # pointer stores, masked at the expert's end
                rm = row0 + gl.arange(0, SUB_M, layout=gl.SliceLayout(1, acc_layout))
                rn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
                mask = (rm < row_end)[:, None] & (rn < N)[None, :]
                if STORE_PRE:
                    p_ptrs = pre_ptr + rm[:, None] * stride_pm + rn[None, :]
                    gl.store(p_ptrs, acc.to(c_desc.dtype), mask=mask)
                    gl.store(p_ptrs + N, acc_up.to(c_desc.dtype), mask=mask)
                h = acc / (1.0 + gl.exp(-acc)) * acc_up
                gl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], h.to(c_desc.dtype),
                         mask=mask)
            elif row0 + SUB_M <= row_end:
                out = acc.to(c_desc.dtype)
                tma.store_wait(0)         # this consumer's last store has left c_smem
                c_smem.store(out)
                fence_async_shared()
                _tma_store(c_desc, [row0.to(gl.int32), n0], c_smem)
            else:                         # the expert's last tile: masked, by pointer
                out = acc.to(c_desc.dtype)
                rm = row0 + gl.arange(0, SUB_M, layout=gl.SliceLayout(1, acc_layout))
                rn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
                mask = (rm < row_end)[:, None] & (rn < N)[None, :]
                gl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], out, mask=mask)
            local += local_step
        tma.store_wait(0)

    @gluon.jit
    def _gmm_ws_kernel(a_desc, b_desc, c_desc, c_ptr, pre_ptr, off_ptr, END_SHIFT, N, K, E,
                       stride_cm,
                       stride_pm, P_BUCKET, B_TRANS: gl.constexpr, EPILOGUE: gl.constexpr,
                       STORE_PRE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                       MMA_REGS: gl.constexpr, LOAD_REGS: gl.constexpr,
                       CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr, SUB_M: gl.constexpr):
        """C[rows_g] = A[rows_g] @ B[g] (see the module docstring); EPILOGUE 1: SwiGLU, W has
        2N columns (gate | up), C = silu(gate) * up, pre [P, 2N] with STORE_PRE.
        CONSUMERS: consumer warpgroups (1 or 2); PINGPONG: they take alternate tiles, else
        (2, cooperative) each takes SUB_M = BLOCK_M / 2 rows of every tile."""
        B_PER_STAGE: gl.constexpr = 2 if EPILOGUE == 1 else 1
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K],
                                           a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype,
                                           [STAGES * B_PER_STAGE] + b_desc.block_type.shape,
                                           b_desc.layout)
        c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, SUB_M, BLOCK_N], c_desc.layout)
        ready, empty, turn = ring_barriers(STAGES, 2 if SUB_M < BLOCK_M else 1)
        descs = (a_desc, b_desc, c_desc)
        bufs = (a_bufs, b_bufs, c_bufs)
        bars = (ready, empty, turn)
        scal = (c_ptr, pre_ptr, off_ptr, off_ptr + END_SHIFT, N, K, E, stride_cm, stride_pm)
        if CONSUMERS == 2:
            gl.warp_specialize([
                (_mma_partition, (descs, bufs, bars, scal, 0, B_TRANS, EPILOGUE, STORE_PRE,
                                  BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, STAGES, CONSUMERS, PINGPONG,
                                  SUB_M)),
                (_mma_partition, (descs, bufs, bars, scal, 1, B_TRANS, EPILOGUE, STORE_PRE,
                                  BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, STAGES, CONSUMERS, PINGPONG,
                                  SUB_M)),
                (_load_partition, (descs, bufs, bars, scal, 0, B_TRANS, EPILOGUE, STORE_PRE,
                                   BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, STAGES, CONSUMERS, PINGPONG,
                                  SUB_M)),
            ], [4, 1], [MMA_REGS, LOAD_REGS])
        else:   # one consumer: producer / consumer only (no ping-pong)
            gl.warp_specialize([
                (_mma_partition, (descs, bufs, bars, scal, 0, B_TRANS, EPILOGUE, STORE_PRE,
                                  BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, STAGES, CONSUMERS, PINGPONG,
                                  SUB_M)),
                (_load_partition, (descs, bufs, bars, scal, 0, B_TRANS, EPILOGUE, STORE_PRE,
                                   BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, STAGES, CONSUMERS, PINGPONG,
                                  SUB_M)),
            ], [1], [LOAD_REGS])


_GL_DTYPE = {}


def _gl_dtype(t: torch.dtype):
    if not _GL_DTYPE:
        _GL_DTYPE.update({torch.bfloat16: gl.bfloat16, torch.float16: gl.float16})
    return _GL_DTYPE[t]


@functools.lru_cache(maxsize=None)
def _smem_layout(block: tuple, dtype: torch.dtype):
    """The swizzled smem layout of a TMA block. Cached: building one is a few dozen Python
    calls, and every launch needs three (host time per launch, docs/benchmarks.md session 9)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), _gl_dtype(dtype))


def _desc(t: torch.Tensor) -> "TensorDescriptor":
    """A 2-D descriptor over all of t; block shape and smem layout are set per config."""
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [64, 64],
                            _smem_layout((64, 64), t.dtype))


def _set_block(desc, block):
    desc.block_shape = list(block)
    desc.layout = _smem_layout(tuple(block), desc.base.dtype)


def _size_blocks(nargs):
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    _set_block(nargs["a_desc"], (bm, bk))
    _set_block(nargs["b_desc"], (bn, bk) if nargs["B_TRANS"] else (bk, bn))
    _set_block(nargs["c_desc"], (nargs["SUB_M"], bn))


def config(bm, bn, bk, stages, consumers=2, mma_regs=_NUM_REGS[0], load_regs=_NUM_REGS[1],
           group=8):
    """A triton.Config of this kernel (also for fixed-config benchmark sweeps); consumers 1,
    2 (ping-pong) or COOP; group: GROUP_M, the row tiles that share their B tiles in L2."""
    if consumers not in (1, 2, COOP):
        raise ValueError(f"grouped_gemm_ws.config: consumers must be 1, 2 or {COOP!r}, "
                         f"got {consumers!r}")
    coop = consumers == COOP
    parts = 1 if consumers == 1 else 2
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, STAGES=stages,
                              MMA_REGS=mma_regs, LOAD_REGS=load_regs, CONSUMERS=parts,
                              PINGPONG=consumers == 2, SUB_M=bm // 2 if coop else bm),
                         num_warps=4, maxnreg=_MAXNREG if parts == 2 else None,
                         pre_hook=_size_blocks)


if gluon is not None:
    _bench = sustained_timing.autotune_do_bench()
    _ws_tuned = triton.autotune([config(*c) for c in CONFIGS],
                                key=["N", "K", "P_BUCKET", "B_TRANS", "EPILOGUE"],
                                do_bench=_bench)(_gmm_ws_kernel)
    _ws_swiglu_tuned = triton.autotune([config(*c) for c in SWIGLU_CONFIGS],
                                       key=["N", "K", "P_BUCKET", "EPILOGUE", "STORE_PRE"],
                                       do_bench=_bench)(_gmm_ws_kernel)
    _ws_swiglu_bwd_tuned = triton.autotune([config(*c) for c in SWIGLU_BWD_CONFIGS],
                                           key=["N", "K", "P_BUCKET", "EPILOGUE"],
                                           do_bench=_bench)(_gmm_ws_kernel)


def launch_gmm_ws(a, w2, c, offsets, n, k, e, trans_w, p_bucket, num_programs, cfg=None,
                  pre=None, epilogue=0, store_pre=False):
    """c[rows_e] = a[rows_e] @ W[e] (W[e]^T with trans_w) for the experts' rows; w2 is the
    weights' 2-D view ([E*K, N], or [E*N, K] with trans_w). epilogue 1: SwiGLU (w2 [E*K, 2N];
    c = silu(gate) * up, pre [P, 2N] the pre-activation when store_pre). epilogue 2: SwiGLU
    backward (the W2 dgrad, trans_w: dh = a @ W[e]^T has N = F columns; pre [P, 2N] is read,
    and c [P, 2N] gets d(gate | up)). The tails [offsets[E], P) of c and pre are not
    written. cfg: a fixed `config(...)` instead of the autotuner (sweeps, tests)."""
    a_desc, b_desc, c_desc = _desc(a), _desc(w2), _desc(c)
    p = c.shape[0]

    def grid(meta):   # persistent: at most one program per SM
        tiles = (triton.cdiv(p, meta["BLOCK_M"]) + e) * triton.cdiv(n, meta["BLOCK_N"])
        return (min(num_programs, tiles),)

    kernel, extra = {0: _ws_tuned, 1: _ws_swiglu_tuned, 2: _ws_swiglu_bwd_tuned}[epilogue], {}
    if cfg is not None:
        kernel, extra = _gmm_ws_kernel, dict(cfg.all_kwargs())
        _size_blocks(dict(extra, a_desc=a_desc, b_desc=b_desc, c_desc=c_desc, B_TRANS=trans_w))
    kernel[grid](a_desc, b_desc, c_desc, c, c if pre is None else pre, offsets,
                 row_segments.end_shift(offsets), n, k, e,
                 c.stride(0), 0 if pre is None else pre.stride(0), p_bucket, B_TRANS=trans_w,
                 EPILOGUE=epilogue, STORE_PRE=store_pre, **extra)
    return c


_CHOICE: dict[tuple, bool] = {}
_CHOICE_MS: dict[tuple, tuple] = {}   # key -> (this kernel ms, TMA kernel ms)


def _times(fns):
    """ms per call of each fn: back to back behind a spin (kernels/sustained_timing.py), or
    with MOC_GMM_TIMING=flushed each call alone after an L2 flush (do_bench); ABBA order."""
    if sustained_timing.MODE == "sustained":
        return dict(zip(fns, sustained_timing.sustained_ms(fns)))
    from triton.testing import do_bench
    t = dict.fromkeys(fns, 0.0)
    for fn in (*fns, *fns[::-1]):    # ABBA: drift falls on both sides
        t[fn] += do_bench(fn, warmup=10, rep=30, return_mode="median") / 2
    return t


def choose(key, run_ws, run_tma, mode=None) -> bool:
    """Whether GEMMs of this key (shape bucket, dtype, device) run on this kernel (run_ws,
    against run_tma: or any two ways to the same result, as the fused and split SwiGLU
    backward): `mode` (MODE unless given) "on" / "off" decide outright; "auto" times both kernels once (each autotuned first; `_times`)
    and keeps the faster; the times stay in _CHOICE_MS (bench_grouped_gemm prints them).
    Neither kernel wins everywhere: at the session 8 shapes this one wins short-K GEMMs (its
    epilogue overlaps the other consumer's main loop), the TMA kernel's 128 x 256 tiles the
    long-K ones. During CUDA-graph capture
    an untimed key takes the TMA kernel (timing cannot run there). Timing the choice in CUDA
    graphs instead was tried and reverted (docs/kernels_notes.md, v13): the first call of a
    key often comes from autograd's backward thread, where a TMA descriptor built after the
    capture failed ("invalid device context")."""
    mode = MODE if mode is None else mode   # another switch's value (SWIGLU_BWD)
    if mode != "auto":
        return mode == "on"
    if key not in _CHOICE:
        if torch.cuda.is_current_stream_capturing():
            return False
        t = _times((run_ws, run_tma))
        _CHOICE[key] = t[run_ws] < t[run_tma]
        _CHOICE_MS[key] = (t[run_ws], t[run_tma])
    return _CHOICE[key]
