"""Probe: variants of the plain grouped GEMM (forward / dgrad, no gather) on Hopper, timed in
CUDA graphs against the production TMA kernel, F.grouped_mm and dense cuBLAS mm.

    python3 tools/probe_gemm_ws.py            # GPU; OUT=dir also writes probe_gemm_ws.json
    TRITON_INTERPRET=1 python3 tools/probe_gemm_ws.py --smoke   # CPU: correctness only

The variants (issue 3's per-GEMM misses are short-K GEMMs whose epilogue is not overlapped
with the main loop, docs/kernels_notes.md):
- device-side TMA descriptors, the output stored by TMA through a descriptor whose row bound
  is the tile's expert end (so a tile past the end cannot clobber the next expert, with no
  branch in the persistent loop), optionally in two column halves (epilogue subtiling);
- Triton's automatic warp specialization (`tl.range(warp_specialize=True)`, which Triton 3.6
  runs through its Hopper pass on sm90), on the persistent tile loop, flattened or not;
- the production kernel at fixed configs small enough for two programs per SM.
Session 7's run (docs/benchmarks.md) found none worth taking into kernels/: this stays as the
record of how that was measured, and the place to try the next variant.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import grouped_gemm as gg                      # noqa: E402
from kernels import grouped_gemm_tma as tma                 # noqa: E402
from kernels.grouped_gemm_tma import group_of, group_table  # noqa: E402


@triton.jit
def _gmm_dev_desc_kernel(a_ptr, b_ptr, c_ptr, off_ptr, P, N, K, E, stride_am, stride_bm,
                         stride_cm, B_TRANS: tl.constexpr, E_POW2: tl.constexpr,
                         WS: tl.constexpr, FLATTEN: tl.constexpr, SUBTILE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    starts, ends, tiles, cum = group_table(off_ptr, 1, P, E, BLOCK_M, E_POW2)
    num_m = tl.sum(tl.where(tl.arange(0, E_POW2) < E, tiles, 0), 0)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_group = GROUP_M * num_n
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[P, K], strides=[stride_am, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    if B_TRANS:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * N, K], strides=[stride_bm, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * K, N], strides=[stride_bm, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    C_BN: tl.constexpr = BLOCK_N // 2 if SUBTILE else BLOCK_N
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0),
                         flatten=FLATTEN, warp_specialize=WS):
        first_m = (tile // per_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % size_m
        pid_n = (tile % per_group) // size_m
        g, row0, row_end = group_of(starts, ends, tiles, cum, pid_m, BLOCK_M, E_POW2)
        n0 = pid_n * BLOCK_N
        r0 = row0.to(tl.int32)
        b_row = (g * (N if B_TRANS else K)).to(tl.int32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            k0 = ki * BLOCK_K
            a = a_desc.load([r0, k0])
            if B_TRANS:
                b = tl.trans(b_desc.load([b_row + n0, k0]))
            else:
                b = b_desc.load([b_row + k0, n0])
            acc = tl.dot(a, b, acc)
        # rows past the expert's end fall outside this descriptor: TMA drops them
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[row_end.to(tl.int32), N],
                                           strides=[stride_cm, 1],
                                           block_shape=[BLOCK_M, C_BN])
        if SUBTILE:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, C_BN)), (0, 2, 1))
            lo, hi = tl.split(halves)
            c_desc.store([r0, n0], lo.to(c_ptr.dtype.element_ty))
            c_desc.store([r0, n0 + C_BN], hi.to(c_ptr.dtype.element_ty))
        else:
            c_desc.store([r0, n0], acc.to(c_ptr.dtype.element_ty))


OCC2_CANDIDATES = [(128, 128, 64, 4, 3, False), (128, 128, 64, 4, 2, False),
                   (64, 256, 64, 4, 2, False), (64, 256, 64, 4, 3, False),
                   (128, 128, 32, 4, 4, False), (128, 64, 64, 4, 4, False),
                   (128, 128, 64, 8, 3, False)]


def _alloc(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available()
                       else "cpu")


def launch(a, w, c, offsets, trans_w, ws, flatten, subtile, bm, bn, bk, warps, stages,
           persistent=True, programs=None):
    p, e = c.shape[0], w.shape[0]
    k, n = (w.shape[2], w.shape[1]) if trans_w else (w.shape[1], w.shape[2])
    w2 = tma.weights_2d(w)
    tiles = (triton.cdiv(p, bm) + e) * triton.cdiv(n, bn)
    grid = (min(programs or tma.num_programs(a.device), tiles) if persistent else tiles,)
    _gmm_dev_desc_kernel[grid](a, w2, c, offsets, p, n, k, e, a.stride(0), w2.stride(0),
                               c.stride(0), B_TRANS=trans_w,
                               E_POW2=triton.next_power_of_2(e + 1), WS=ws, FLATTEN=flatten,
                               SUBTILE=subtile, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                               num_warps=warps, num_stages=stages)
    return c


def routing(p, e, skew, dev):
    if skew:   # uneven, not block multiples, one empty expert
        counts = torch.tensor([0] + [p // (e - 1)] * (e - 2), dtype=torch.int64)
        counts = torch.cat([counts, torch.tensor([p - int(counts.sum()) - 37])])
    else:
        counts = torch.full((e,), p // e, dtype=torch.int64)
    off = torch.zeros(e + 1, dtype=torch.int64)
    off[1:] = counts.cumsum(0)
    return off.to(dev)


def reference(a, w, offsets, trans_w):
    out = torch.zeros(a.shape[0], w.shape[1] if trans_w else w.shape[2], dtype=torch.float64,
                      device=a.device)
    off = offsets.tolist()
    for g in range(w.shape[0]):
        wg = w[g].double()
        out[off[g]:off[g + 1]] = a[off[g]:off[g + 1]].double() @ (wg.t() if trans_w else wg)
    return out


def graph_time(fn, calls=10):
    from triton.testing import do_bench
    for i in range(3):
        fn(i % 3)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % 3)
    t = do_bench(graph.replay, warmup=25, rep=100, return_mode="median") / calls
    del graph
    return t


def smoke():
    triton.set_allocator(_alloc)
    torch.manual_seed(0)
    for trans, skew, sub, ws in itertools.product((False, True), (False, True), (False, True),
                                                  (False,)):
        e, k, n, p = 4, 48, 40, 200
        offsets = routing(p, e, skew, "cpu")
        w = torch.randn(e, n, k) if trans else torch.randn(e, k, n)
        a = torch.randn(p, k)
        c = torch.full((p, n), float("nan"))
        launch(a, w, c, offsets, trans, ws, True, sub, 16, 32, 16, 4, 1, programs=3)
        ref = reference(a, w, offsets, trans)
        end = int(offsets[-1])
        err = (c[:end].double() - ref[:end]).abs().max().item()
        print(f"smoke trans={trans} skew={skew} subtile={sub}: max err {err:.2e}", flush=True)
        assert err < 1e-3, err
        assert not torch.isnan(c[:end]).any()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--case", type=int, default=None, help="run only this case (index)")
    ap.add_argument("--no-variants", action="store_true",
                    help="only the references and the production kernel's fixed configs")
    args = ap.parse_args()
    if args.smoke:
        return smoke()
    triton.set_allocator(_alloc)
    dev, bf = "cuda", dict(device="cuda", dtype=torch.bfloat16)
    p = args.rows
    rows = []
    print(f"triton {triton.__version__}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name()}", flush=True)
    # (name, E, d, f, which GEMM): W2 fwd (K=f, N=d), W2 dgrad (K=d, N=f, B^T), W13 dgrad
    cases = [("w2_dgrad", 8, 768, 2048), ("w2_fwd", 8, 2048, 5632), ("w2_dgrad", 8, 2048, 5632),
             ("w2_fwd", 8, 768, 2048), ("w13_dgrad", 8, 768, 2048)]
    variants = [  # (ws, flatten, subtile)
        (False, True, True), (True, False, False), (True, True, False), (True, False, True)]
    cfgs = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 4, 4)]
    if args.case is not None:
        cases = [cases[args.case]]
    for name, e, d, f in cases:
        offsets = routing(p, e, False, dev)
        offs32 = offsets[1:].to(torch.int32)
        if name == "w2_dgrad":
            w, trans, kdim, ndim = torch.randn(e, f, d, **bf), True, d, f
        elif name == "w2_fwd":
            w, trans, kdim, ndim = torch.randn(e, f, d, **bf), False, f, d
        else:
            w, trans, kdim, ndim = torch.randn(e, d, 2 * f, **bf), True, 2 * f, d
        a = [torch.randn(p, kdim, **bf) for _ in range(3)]
        outs = [torch.empty(p, ndim, **bf) for _ in range(3)]
        flops = 2.0 * p * kdim * ndim
        wt = w.transpose(1, 2) if trans else w
        w0 = wt[0]
        ref = {"mm": lambda i: a[i] @ w0,
               "grouped_mm": lambda i: F.grouped_mm(a[i], wt, offs=offs32),
               "ours_now": lambda i: gg.launch_gmm(a[i], w, offsets, trans_w=trans)}
        row = dict(gemm=name, E=e, d=d, f=f)
        for m, fn in ref.items():
            row[m] = flops / graph_time(fn) * 1e-9
        # correctness of one variant against grouped_mm (bf16)
        exp = F.grouped_mm(a[0], wt, offs=offs32).float()
        pb = 1 << (p - 1).bit_length()
        trials = []   # (key, fn(i) writing outs[i])
        # the production kernel at fixed configs small enough for two programs per SM
        for bm, bn, bk, warps, stages, pers in OCC2_CANDIDATES:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, PERSISTENT=pers,
                       num_warps=warps, num_stages=stages)
            trials.append((f"prod_pers{int(pers)}_{bm}x{bn}x{bk}_w{warps}_s{stages}",
                           lambda i, cfg=cfg: tma.launch_gmm_tma(
                               a[i], w, outs[i], None, offsets, None, ndim, kdim, 0, False,
                               trans, pb, "ieee", config=cfg)))
        for (ws, flat, sub), cfg in itertools.product(
                [] if args.no_variants else variants, cfgs):
            trials.append((f"ws{int(ws)}_fl{int(flat)}_sub{int(sub)}_{cfg[0]}x{cfg[1]}x{cfg[2]}"
                           f"_w{cfg[3]}_s{cfg[4]}",
                           lambda i, v=(ws, flat, sub), cfg=cfg: launch(
                               a[i], w, outs[i], offsets, trans, *v, *cfg)))
        for key, fn in trials:
            try:
                fn(0)
                torch.cuda.synchronize()
                err = ((outs[0].float() - exp).norm() / exp.norm()).item()
                t = flops / graph_time(fn) * 1e-9
            except Exception as exc:   # compile failure / out of resources
                msg = str(exc).strip().splitlines()
                print(f"  {name} {d},{f} {key}: {type(exc).__name__}: "
                      f"{msg[-1][:200] if msg else ''}", flush=True)
                continue
            if err < 1e-2:   # a wrong variant gets no number
                row[key] = t
            print(f"  {name} {d},{f} {key}: {t:6.1f} TFLOP/s  err {err:.1e}"
                  f"{'' if err < 1e-2 else '  WRONG'}", flush=True)
        best = max(((v, k) for k, v in row.items() if isinstance(v, float)
                    and k not in ref), default=(0.0, None))
        row["best"], row["best_key"] = best
        print(f"== {name} (E {e}, d {d}, f {f}): mm {row['mm']:.0f} grouped_mm "
              f"{row['grouped_mm']:.0f} ours_now {row['ours_now']:.0f} | best variant "
              f"{best[0]:.0f} {best[1]}  (x mm {best[0] / row['mm']:.2f}, x grouped_mm "
              f"{best[0] / row['grouped_mm']:.2f})", flush=True)
        rows.append(row)
    if os.environ.get("OUT"):
        tag = "" if args.case is None else f"_{args.case}"
        with open(os.path.join(os.environ["OUT"], f"probe_gemm_ws{tag}.json"), "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
