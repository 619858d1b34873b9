"""Benchmark of the expert SwiGLU MLP and its grouped GEMMs (kernels/), on one GPU.

    python tools/bench_grouped_gemm.py                 # everything, bf16, 32768 rows
    python tools/bench_grouped_gemm.py --quick         # one shape, fewer repeats
    OUT=/some/dir python tools/bench_grouped_gemm.py   # also writes $OUT/bench_grouped_gemm.json

Parts: (1) bf16 correctness of expert_swiglu_mlp against the fp32 reference; (2) TFLOP/s of the
expert MLP, forward and forward+backward, for our Triton op (fused and unfused SwiGLU), a
per-expert loop, F.grouped_mm and one dense MLP of equal FLOPs, balanced and Zipf routing;
(3) per-GEMM forward / dgrad / wgrad against dense cuBLAS (mm and bmm of the same shape) and
F.grouped_mm; (4) hard IRL mode: S = 2 where half the rows stop after step 1, against soft
mode; (5) `--parts pairs`: per GEMM, ours, grouped_mm and mm interleaved in CUDA graphs, so
each sees the same power state (tools/interleaved_gemm_timing.py); (6) `--parts wgradpairs`:
the wgrad kernels' fixed configs against grouped_mm, the same way; (7) `--parts hardpairs`:
part (4) with soft and hard mode as CUDA graphs replayed in turns, the reduction taken within
each round (`--wgrad-pair on,off` adds both settings to the same rotation). Times are
triton.testing.do_bench medians on random data, inputs rotated.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import grouped_gemm as gg                                         # noqa: E402
from kernels import grouped_gemm_tma as tma                                    # noqa: E402
from kernels import grouped_gemm_ws as ws                                      # noqa: E402
from kernels import grouped_gemm_ws_wgrad as wsw                               # noqa: E402
from kernels import sustained_timing                                           # noqa: E402
from kernels.expert_mlp import expert_swiglu_mlp, expert_swiglu_mlp_reference  # noqa: E402
from tools import interleaved_gemm_timing as interleaved                       # noqa: E402

SHAPES = [(8, 768, 2048), (8, 2048, 5632), (16, 2048, 2816), (64, 2048, 1408)]
GEMM_SHAPES = [(8, 2048, 5632), (8, 768, 2048), (8, 1024, 3200)]   # the last: moe_1b's experts
ROT = 3   # input sets to rotate through
NO_POINTER = False   # --no-pointer: skip the pointer-kernel columns
DEV = "cuda"   # --smoke: "cpu" (with TRITON_INTERPRET=1), to check the script, not to time


def bench(fn, grad_to_none=None, rep=100, warmup=25):
    if DEV == "cpu":
        import time
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def routing(p, e, kind, seed=0):
    """offsets int64 [E+1] (cuda) and host counts: balanced, or Zipf(1) over a shuffled
    expert order."""
    g = torch.Generator().manual_seed(seed)
    if kind == "balanced":
        counts = torch.full((e,), p // e, dtype=torch.int64)
        counts[: p - int(counts.sum())] += 1
    else:
        prob = 1.0 / torch.arange(1, e + 1, dtype=torch.float64)
        prob = prob[torch.randperm(e, generator=g)]
        ids = torch.multinomial(prob, p, replacement=True, generator=g)
        counts = torch.bincount(ids, minlength=e)
    offsets = torch.zeros(e + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    return offsets.to(DEV), counts.tolist()


@contextlib.contextmanager
def switch(module, attr, value):
    """module.<attr> = value inside the block (one of the kernel modules' MOC_GMM_* switches)."""
    old = getattr(module, attr)
    setattr(module, attr, value)
    try:
        yield
    finally:
        setattr(module, attr, old)


def switched(module, attr, value, fn):
    """fn run under switch(module, attr, value). The backward of what fn returns runs after
    fn has returned, so a caller that times backward too enters `run.switch()` around it
    (_time_mlp): the switches are read at launch time."""
    def run(*a):
        with switch(module, attr, value):
            return fn(*a)
    run.switch = functools.partial(switch, module, attr, value)
    return run


def mode_off(module, fn):
    """fn run with module.MODE = "off" (MOC_GMM_TMA / MOC_GMM_WS off)."""
    return switched(module, "MODE", "off", fn)


def pointer(fn):
    """fn run on the pointer kernels (TMA off): the pre-TMA version, side by side."""
    return mode_off(tma, fn)


def tma_only(fn):
    """fn with the warp-specialized kernel off (MOC_GMM_WS=off): the TMA kernel alone."""
    return mode_off(ws, fn)


def abba(names, rounds):
    """(round, name) for every name in every round, the order reversed on odd rounds: clock
    and thermal drift then falls on both sides of a comparison."""
    for rnd in range(rounds):
        for name in (names if rnd % 2 == 0 else names[::-1]):
            yield rnd, name


def median(vals):
    """The middle value (the upper one of an even count); nan for none."""
    vals = sorted(vals)
    return vals[len(vals) // 2] if vals else float("nan")


class Rot:
    """Cycles through ROT input sets so repeated calls do not hit a warm L2."""

    def __init__(self, sets):
        self.sets, self.i = sets, 0

    def next(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def mlp_fns(e, d, f, p, offsets, counts, dtype=torch.bfloat16):
    """name -> (forward fn(x) -> y, weights). Each fn is the expert MLP for one method."""
    w13 = (torch.randn(e, d, 2 * f, device=DEV) / d ** 0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(e, f, d, device=DEV) / f ** 0.5).to(dtype).requires_grad_()
    offs32 = offsets[1:].to(torch.int32)
    bounds = [0] + torch.tensor(counts).cumsum(0).tolist()
    w13_d = (torch.randn(d, 2 * f, device=DEV) / d ** 0.5).to(dtype).requires_grad_()
    w2_d = (torch.randn(f, d, device=DEV) / f ** 0.5).to(dtype).requires_grad_()

    def swiglu(gu):
        return F.silu(gu[:, :f]) * gu[:, f:]

    def unfused(x):
        h = swiglu(gg.grouped_gemm(x, w13, offsets, backend="triton"))
        return gg.grouped_gemm(h, w2, offsets, backend="triton")

    def loop(x):
        return torch.cat([swiglu(x[lo:hi] @ w13[i]) @ w2[i]
                          for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))])

    ours = lambda x: expert_swiglu_mlp(x, w13, w2, offsets, backend="triton")   # noqa: E731
    fns = {
        "triton": (ours, [w13, w2]),
        "triton_tma": (tma_only(ours), [w13, w2]),   # without the warp-specialized kernel
        # the W2 dgrad with the SwiGLU backward in the ping-pong kernel's epilogue
        "triton_swiglu_fused": (switched(ws, "SWIGLU_BWD", "on", ours), [w13, w2]),
        "triton_ptr": (pointer(ours), [w13, w2]),
        "triton_unfused": (unfused, [w13, w2]),
        "grouped_mm": (lambda x: F.grouped_mm(swiglu(F.grouped_mm(x, w13, offs=offs32)), w2,
                                              offs=offs32), [w13, w2]),
        "loop": (loop, [w13, w2]),
        "dense": (lambda x: swiglu(x @ w13_d) @ w2_d, [w13_d, w2_d]),
    }
    if NO_POINTER:
        del fns["triton_ptr"]
    return fns


def bench_mlp(shape, kind, p, rep, rounds=1, methods=None):
    """Each method's forward and forward + backward; with rounds > 1 every method is timed
    that many times, the order reversed on odd rounds (clock and thermal drift then falls
    on both sides of a comparison); the table takes each method's median."""
    e, d, f = shape
    offsets, counts = routing(p, e, kind)
    xs = [torch.randn(p, d, device=DEV, dtype=torch.bfloat16).requires_grad_()
          for _ in range(ROT)]
    dys = [torch.randn(p, d, device=DEV, dtype=torch.bfloat16) for _ in range(ROT)]
    rot = Rot(list(zip(xs, dys)))
    flops = 6.0 * p * d * f
    out = []
    fns = mlp_fns(e, d, f, p, offsets, counts)
    order = [m for m in fns if methods is None or m in methods]
    for rnd, name in abba(order, rounds):
        out.append(_time_mlp(shape, kind, name, *fns[name], rot, xs, flops, rep, rnd))
    return out


def _time_mlp(shape, kind, name, fn, weights, rot, xs, flops, rep, rnd):
    e, d, f = shape

    def fwd():
        fn(rot.next()[0])

    switch_on = getattr(fn, "switch", contextlib.nullcontext)   # also for the backward

    def fwd_bwd():
        x, dy = rot.next()
        with switch_on():
            fn(x).backward(dy)

    t_f = bench(fwd, rep=rep)
    t_fb = bench(fwd_bwd, grad_to_none=xs + weights, rep=rep)
    row = dict(part="mlp", E=e, d=d, f=f, routing=kind, method=name, round=rnd,
               fwd_ms=t_f, fwd_tflops=flops / t_f * 1e-9,
               fwdbwd_ms=t_fb, fwdbwd_tflops=3 * flops / t_fb * 1e-9)
    print(f"  mlp {shape} {kind:8s} {name:15s} fwd {row['fwd_tflops']:6.1f}  "
          f"fwd+bwd {row['fwdbwd_tflops']:6.1f} TFLOP/s  (round {rnd})", flush=True)
    return row


GRAPH_WARMUP_MS = 300


def graph_time(fn, calls=10, rep=100):
    """ms per call of fn(i), i over the ROT input sets, from the replay of one CUDA graph of
    `calls` calls (captured after a warm-up, which also autotunes): GPU time without each
    launch's host work, as the model's graphed train step runs it."""
    graph = interleaved.capture_graph(fn, calls, ROT)
    # A long warm-up: the GPU idles while the autotuner and Triton compile (seconds), and
    # its clocks take longer than do_bench's 25 ms to come back. In the session 21 sweep
    # the first-timed column of each GEMM ran 7-13% below the same kernel timed later.
    t = bench(graph.replay, rep=rep, warmup=GRAPH_WARMUP_MS) / calls
    del graph
    torch.cuda.empty_cache()
    return t


def gemm_fns(shape, p):
    """The GEMMs of the expert MLP, balanced routing, bf16: name -> (flop count, {method:
    fn(i)}), fn(i) one call on input set i of ROT (ours, grouped_mm, cuBLAS mm and bmm)."""
    e, d, f = shape
    offsets, _ = routing(p, e, "balanced")
    offs32 = offsets[1:].to(torch.int32)
    bf = dict(device=DEV, dtype=torch.bfloat16)
    w13 = torch.randn(e, d, 2 * f, **bf)
    w2 = torch.randn(e, f, d, **bf)
    x, dgu, h, dy = [[torch.randn(p, n, **bf) for _ in range(ROT)] for n in (d, 2 * f, f, d)]
    pre = [torch.randn(p, 2 * f, **bf) for _ in range(ROT)]
    pe = p // e
    # name -> (flop count, {method: fn})
    gemms = {
        "w13_fwd": (2.0 * p * d * 2 * f, {
            "triton": lambda i: gg.launch_gmm(x[i], w13, offsets),
            "triton_swiglu": lambda i: gg.launch_gmm_swiglu(x[i], w13, offsets),
            "grouped_mm": lambda i: F.grouped_mm(x[i], w13, offs=offs32),
            "mm": lambda i: x[i] @ w13[0],
            "bmm": lambda i: torch.bmm(x[i].view(e, pe, d), w13)}),
        "w13_dgrad": (2.0 * p * d * 2 * f, {
            "triton": lambda i: gg.launch_gmm(dgu[i], w13, offsets, trans_w=True),
            "grouped_mm": lambda i: F.grouped_mm(dgu[i], w13.transpose(1, 2), offs=offs32),
            "mm": lambda i: dgu[i] @ w13[0].t(),
            "bmm": lambda i: torch.bmm(dgu[i].view(e, pe, 2 * f), w13.transpose(1, 2))}),
        "w13_wgrad": (2.0 * p * d * 2 * f, {
            "triton": lambda i: gg.launch_wgrad(x[i], dgu[i], offsets),
            "grouped_mm": lambda i: F.grouped_mm(x[i].t(), dgu[i], offs=offs32),
            "mm": lambda i: x[i].t() @ dgu[i],
            "bmm": lambda i: torch.bmm(x[i].view(e, pe, d).transpose(1, 2),
                                       dgu[i].view(e, pe, 2 * f))}),
        "w2_fwd": (2.0 * p * f * d, {
            "triton": lambda i: gg.launch_gmm(h[i], w2, offsets),
            "grouped_mm": lambda i: F.grouped_mm(h[i], w2, offs=offs32),
            "mm": lambda i: h[i] @ w2[0],
            "bmm": lambda i: torch.bmm(h[i].view(e, pe, f), w2)}),
        "w2_dgrad": (2.0 * p * f * d, {
            "triton": lambda i: gg.launch_gmm(dy[i], w2, offsets, trans_w=True),
            "triton_swiglu": lambda i: gg.launch_gmm_swiglu_bwd(dy[i], w2, offsets, pre[i]),
            # the SwiGLU backward in the ping-pong kernel's epilogue (MOC_GMM_SWIGLU_BWD=on)
            "triton_swiglu_fused": switched(ws, "SWIGLU_BWD", "on", lambda i: (
                gg.launch_gmm_swiglu_bwd(dy[i], w2, offsets, pre[i]))),
            "grouped_mm": lambda i: F.grouped_mm(dy[i], w2.transpose(1, 2), offs=offs32),
            "mm": lambda i: dy[i] @ w2[0].t(),
            "bmm": lambda i: torch.bmm(dy[i].view(e, pe, d), w2.transpose(1, 2))}),
        "w2_wgrad": (2.0 * p * f * d, {
            "triton": lambda i: gg.launch_wgrad(h[i], dy[i], offsets),
            "grouped_mm": lambda i: F.grouped_mm(h[i].t(), dy[i], offs=offs32),
            "mm": lambda i: h[i].t() @ dy[i],
            "bmm": lambda i: torch.bmm(h[i].view(e, pe, f).transpose(1, 2),
                                       dy[i].view(e, pe, d))}),
    }
    return gemms


GRAPHED = ("triton", "triton_tma", "triton_swiglu", "triton_swiglu_fused", "grouped_mm", "mm",
           "bmm")   # the --graph columns


def gemm_timers(fns, rep, graph):
    """column -> a call that times it once (ms): every method eager, with the inputs rotated,
    and with `graph` (on the GPU) the GRAPHED ones inside a CUDA graph as `<method>_graph`."""
    r = Rot(list(range(ROT)))

    def eager(fn):
        return lambda: bench(lambda: fn(r.next()), rep=rep)

    timers = {m: eager(fn) for m, fn in fns.items()}
    if graph and DEV == "cuda":
        timers.update({f"{m}_graph": functools.partial(graph_time, fns[m], rep=rep)
                       for m in GRAPHED if m in fns})
    return timers


def bench_gemms(shape, p, rep, graph=False, pointer_kernels=True, rounds=1):
    """Per GEMM of the MLP (gemm_fns), TFLOP/s of each column (gemm_timers). With rounds > 1
    every column is timed that many times, in abba order as in bench_mlp; the row keeps the
    median under the column's name and the per-round values under `rounds_<column>`."""
    e, d, f = shape
    out = []
    for name, (flops, fns) in gemm_fns(shape, p).items():
        if pointer_kernels:
            fns["triton_ptr"] = pointer(fns["triton"])
        fns["triton_tma"] = tma_only(fns["triton"])   # without the ping-pong kernels
        if "triton_swiglu" in fns:
            fns["triton_swiglu_tma"] = tma_only(fns["triton_swiglu"])
        timers = gemm_timers(fns, rep, graph)
        per_round = {col: [] for col in timers}
        for _, col in abba(list(timers), rounds):
            per_round[col].append(flops / timers[col]() * 1e-9)
        row = dict(part="gemm", E=e, d=d, f=f, gemm=name)
        row.update({col: median(v) for col, v in per_round.items()})
        if rounds > 1:
            row.update({f"rounds_{col}": v for col, v in per_round.items()})
        out.append(row)
        print(f"  gemm {shape} {name:10s} " + "  ".join(
            f"{k} {v:6.1f}" for k, v in row.items() if isinstance(v, float))
            + (f"  (medians of {rounds} rounds)" if rounds > 1 else ""), flush=True)
    return out


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_bf16(shape=(8, 768, 2048), p=32768):
    """bf16 Triton op vs the fp32 reference, skewed routing, with a gather: output, dx, dw13,
    dw2 relative errors (target <= 1e-2)."""
    e, d, f = shape
    torch.backends.cuda.matmul.allow_tf32 = False
    offsets, _ = routing(p, e, "zipf", seed=1)
    gidx = torch.randint(0, p, (p,), device=DEV)
    x = torch.randn(p, d, device=DEV)
    w13 = torch.randn(e, d, 2 * f, device=DEV) / d ** 0.5
    w2 = torch.randn(e, f, d, device=DEV) / f ** 0.5
    dy = torch.randn(p, d, device=DEV)
    res = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        leaves = [t.to(dt).requires_grad_() for t in (x, w13, w2)]
        fn = expert_swiglu_mlp if name == "bf16" else expert_swiglu_mlp_reference
        y = fn(*leaves, offsets, gidx)
        y.backward(dy.to(dt))
        res[name] = [y] + [t.grad for t in leaves]
    errs = {k: rel(a, b) for k, a, b in zip(("y", "dx", "dw13", "dw2"), res["bf16"], res["fp32"])}
    ok = all(v <= 1e-2 for v in errs.values())
    print(f"  bf16 check {shape} rows {p}: " + "  ".join(f"{k} {v:.2e}" for k, v in errs.items())
          + ("  OK" if ok else "  FAIL"), flush=True)
    return dict(part="bf16_check", E=e, d=d, f=f, ok=ok, **errs)


def graphed(fn, leaves):
    """fn() (forward + backward) captured in a CUDA graph after a warm-up on a side stream;
    returns the replay. Gradients of `leaves` are reset first so the captured backward
    writes them (from the graph's pool) instead of adding into them."""
    gc.collect()   # no earlier (default-stream) autograd graph may still reach the leaves
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    for leaf in leaves:
        leaf.grad = None
    gc.collect()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def autotune_report():
    """The config each autotuner chose, per key, and the timing of every candidate."""
    lines = []
    for mod, name in ((ws, "_ws_tuned"), (ws, "_ws_swiglu_tuned"), (wsw, "_tuned"),
                      (gg, "_gmm_plain"),
                      (gg, "_gmm_swiglu"), (gg, "_wgrad_tuned"), (tma, "_gmm_tuned"),
                      (tma, "_swiglu_tuned"), (tma, "_wgrad_tuned")):
        tuner = getattr(mod, name, None)
        for key, cfg in getattr(tuner, "cache", {}).items():
            lines.append(f"{mod.__name__}.{name} key={key} best={cfg}")
    for key, (t_ws, t_tma) in ws._CHOICE_MS.items():
        lines.append(f"ws.choose key={key} ws {t_ws * 1e3:.1f} us, tma {t_tma * 1e3:.1f} us "
                     f"({sustained_timing.MODE}) -> {'ws' if ws._CHOICE[key] else 'tma'}")
    return lines


def table(rows):
    out = ["", "expert SwiGLU MLP, bf16, TFLOP/s (fwd | fwd+bwd)"]
    mlp = [r for r in rows if r["part"] == "mlp"]
    methods = list(dict.fromkeys(r["method"] for r in mlp))
    out.append(f"{'E,d,f':16s}{'routing':9s}" + "".join(f"{m:>20s}" for m in methods))
    for key in dict.fromkeys((r["E"], r["d"], r["f"], r["routing"]) for r in mlp):
        def med(m, col):
            return median(r[col] for r in mlp if r["method"] == m
                          and (r["E"], r["d"], r["f"], r["routing"]) == key)
        out.append(f"{str(key[:3]):16s}{key[3]:9s}" + "".join(
            f"{med(m, 'fwd_tflops'):10.0f} |{med(m, 'fwdbwd_tflops'):6.0f}  "
            for m in methods))
    gem = [r for r in rows if r["part"] == "gemm"]
    if gem:
        out += ["", "per GEMM, balanced, TFLOP/s (triton = TMA kernels, ptr = pointer kernels;"
                " ratios: triton / mm, / bmm, / grouped_mm)"]
        for r in gem:
            fused = (f"  +swiglu {r['triton_swiglu']:.0f} (tma {r['triton_swiglu_tma']:.0f})"
                     if "triton_swiglu" in r else "")
            ptr = r.get("triton_ptr", float("nan"))   # nan with --no-pointer
            out.append(f"{str((r['E'], r['d'], r['f'])):16s}{r['gemm']:10s} triton "
                       f"{r['triton']:5.0f} ptr {ptr:5.0f} gmm {r['grouped_mm']:5.0f} "
                       f"mm {r['mm']:5.0f} bmm "
                       f"{r['bmm']:5.0f}  {r['triton'] / r['mm']:.2f} {r['triton'] / r['bmm']:.2f}"
                       f" {r['triton'] / r['grouped_mm']:.2f}{fused}")
            if "triton_tma" in r:
                out.append(f"{'':16s}{'  tma':10s} {r['triton_tma']:5.0f}"
                           + (f"  graph {r['triton_tma_graph']:5.0f}"
                              if "triton_tma_graph" in r else ""))
            if "triton_swiglu_fused" in r:   # w2_dgrad with the SwiGLU backward: split / fused
                graph = (f"  graph {r['triton_swiglu_graph']:5.0f} / "
                         f"{r['triton_swiglu_fused_graph']:5.0f}"
                         if "triton_swiglu_fused_graph" in r else "")
                out.append(f"{'':16s}{'  +swiglu':10s} {r['triton_swiglu']:5.0f} / "
                           f"{r['triton_swiglu_fused']:5.0f} (split / fused epilogue){graph}")
            if "triton_graph" in r:
                out.append(f"{'':16s}{'  graph':10s} triton {r['triton_graph']:5.0f} "
                           f"gmm {r['grouped_mm_graph']:5.0f} mm {r['mm_graph']:5.0f} bmm "
                           f"{r['bmm_graph']:5.0f}  {r['triton_graph'] / r['mm_graph']:.2f} "
                           f"{r['triton_graph'] / r['bmm_graph']:.2f} "
                           f"{r['triton_graph'] / r['grouped_mm_graph']:.2f}")
    for r in rows:
        if r["part"] in ("bf16_check", "hard_mode", "hard_pairs", "probe_hard", "sweep", "ws_sweep",
                         "gemm_pairs", "wgrad_pairs"):
            out.append(json.dumps(r))
    return "\n".join(out)


def gemm_shapes_of(args):
    if args.gemm_shapes:
        return [tuple(int(v) for v in s.split(",")) for s in args.gemm_shapes.split(";")]
    return GEMM_SHAPES[:1] if args.quick else GEMM_SHAPES


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--quick", action="store_true", help="one shape, short repeats")
    ap.add_argument("--parts", default="check,mlp,gemm,probe,hard")
    ap.add_argument("--graph", action="store_true",
                    help="per-GEMM part: also time each GEMM inside a CUDA graph")
    ap.add_argument("--no-pointer", action="store_true",
                    help="per-GEMM part: skip the pointer kernels (MOC_GMM_TMA=off) column")
    ap.add_argument("--gemm-shapes", default=None,
                    help="per-GEMM part: shapes as E,d,f;E,d,f (default: all three)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="MLP and per-GEMM parts: time every method this many times (order "
                         "reversed on odd rounds); the table shows medians")
    ap.add_argument("--mlp-methods", default=None,
                    help="MLP part: comma-separated subset of the methods")
    ap.add_argument("--shapes", default=None,
                    help="MLP / hard-mode parts: shapes as E,d,f;E,d,f (default: all four)")
    ap.add_argument("--sweep-gemms", default=None,
                    help="wssweep part: comma-separated subset of w13_fwd, w13_dgrad, w2_fwd, "
                         "w2_dgrad, w13_wgrad, w2_wgrad (default: all six)")
    ap.add_argument("--wgrad-pair", default=None,
                    help="hard-mode part: comma-separated on / off, timed in turns in this one "
                         "process (kernels/expert_mlp_op.PAIR: the last two S-steps' wgrads "
                         "in one pass, or each on its own through fp32 sums); default: as "
                         "MOC_GMM_WGRAD_PAIR says")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU (needs TRITON_INTERPRET=1): checks the script")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    global DEV, SHAPES, GEMM_SHAPES, NO_POINTER
    NO_POINTER = args.no_pointer
    if args.smoke:
        DEV, SHAPES, GEMM_SHAPES, args.rows = "cpu", [(4, 64, 96)], [(4, 64, 96)], 256
    shapes = SHAPES[1:2] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    rep = 30 if args.quick else 100
    parts, rows = args.parts.split(","), []
    if "sweep" in parts or "wssweep" in parts or "wgradpairs" in parts:
        from tools import sweep_gemm_configs as sweeps
        sweeps.bench = sys.modules[__name__]   # this module's settings, also when run as a script
    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    print(f"device {device}  torch {torch.__version__}", flush=True)
    if "check" in parts:
        rows.append(check_bf16(*((SHAPES[0], 256) if args.smoke else ())))
    if "mlp" in parts:
        for shape in shapes:
            for kind in ("balanced", "zipf"):
                rows += bench_mlp(shape, kind, args.rows, rep, args.rounds,
                                  args.mlp_methods.split(",") if args.mlp_methods else None)
    if "gemm" in parts:
        for shape in gemm_shapes_of(args):
            rows += bench_gemms(shape, args.rows, rep, graph=args.graph,
                                pointer_kernels=not args.no_pointer, rounds=args.rounds)
    if "pairs" in parts:
        for shape in gemm_shapes_of(args):
            rows += interleaved.bench_pairs(gemm_fns, shape, args.rows, ROT,
                                            on_gpu=DEV == "cuda",
                                            reps=40 if DEV == "cuda" else 4)
    if "sweep" in parts and DEV == "cuda":
        for shape in GEMM_SHAPES[:2]:
            try:
                rows += sweeps.sweep_gemms(shape, args.rows, rep)
            except Exception as err:   # keep the other parts' numbers
                print(f"  sweep {shape} failed: {type(err).__name__}: {err}", flush=True)
    if "wssweep" in parts and DEV == "cuda":
        for shape in gemm_shapes_of(args):
            try:
                rows += sweeps.sweep_ws(shape, args.rows, rep, args.sweep_gemms
                                        and args.sweep_gemms.split(","))
            except Exception as err:   # keep the other parts' numbers
                print(f"  ws sweep {shape} failed: {type(err).__name__}: {err}", flush=True)
    if "wgradpairs" in parts:
        wgrads = [g for g in (args.sweep_gemms or "w13_wgrad,w2_wgrad").split(",")
                  if g.endswith("_wgrad")]
        for shape in gemm_shapes_of(args):
            rows += sweeps.sweep_wgrad_pairs(
                shape, args.rows, wgrads, on_gpu=DEV == "cuda",
                **({} if DEV == "cuda" else dict(reps=2, ws_configs=[], tma_configs=[
                    (16, 16, 16, 4, 1, g) for g in (1, 8)])))   # --smoke: interpreter-sized
    from tools import bench_hard_mode_mlp as hard_mlp
    hard_mlp.bgg = sys.modules[__name__]   # this module's settings, also when run as a script
    if "probe" in parts:
        rows.append(hard_mlp.probe_hard(shapes[1] if len(shapes) > 1 else shapes[0], args.rows,
                                        rep))
    if "hardpairs" in parts and DEV != "cuda":
        print("  hardpairs: CUDA graphs only; skipped here", flush=True)
    elif "hardpairs" in parts:
        for shape in shapes[:2]:
            rows.append(hard_mlp.bench_hard_pairs(shape, args.rows, tuple(
                args.wgrad_pair.split(",")) if args.wgrad_pair else (None,)))
    if "hard" in parts:
        from kernels import expert_mlp_op
        pairs = args.wgrad_pair.split(",") if args.wgrad_pair else [None]
        if not set(pairs) <= {"on", "off", None}:
            raise SystemExit(f"--wgrad-pair: on / off, got {args.wgrad_pair!r}")
        default = expert_mlp_op.PAIR
        for shape in shapes[:2]:
            for pair in pairs:
                expert_mlp_op.PAIR = default if pair is None else pair == "on"
                if pair is not None:
                    print(f"  wgrad pair {pair}:", flush=True)
                try:
                    rows.append(dict(hard_mlp.bench_hard_mode(shape, args.rows, rep),
                                     wgrad_pair=expert_mlp_op.PAIR))
                except ModuleNotFoundError as err:   # keep the other parts' numbers
                    print(f"  hard mode {shape} skipped: it runs megatron_moc's permute, which "
                          f"needs megatron-core installed ({err})", flush=True)
                    break
        expert_mlp_op.PAIR = default
    tune = autotune_report()
    print("\n".join(tune))
    print(table(rows))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_grouped_gemm.json"), "w") as fh:
            json.dump(dict(device=device, rows=rows, autotune=tune),
                      fh, indent=1)


if __name__ == "__main__":
    main()
