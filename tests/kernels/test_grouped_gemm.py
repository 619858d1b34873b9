"""grouped_gemm (forward, dX, dW, gather, fp32 accumulation) against a float64 reference.

Sizes are a few dozen rows and columns, not multiples of the interpreter's 16-wide tiles;
each case has an expert with no rows, or one expert with every row, or a zero tail."""
import logging

import pytest
import torch

from kernels import gmm_backend
from kernels.grouped_gemm import grouped_gemm, grouped_gemm_reference, launch_wgrad

# (E, K, N, rows per expert, zero-tail rows)
CASES = [
    (4, 40, 24, [10, 0, 33, 20], 0),      # an empty expert; odd sizes
    (3, 17, 9, [0, 45, 0], 0),            # one expert holds every row
    (5, 32, 48, [7, 0, 0, 16, 1], 11),    # rows past offsets[E] must come out as zeros
    (2, 16, 16, [0, 0], 6),               # no expert has a row
]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_case(e, k, n, counts, tail, gather, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = sum(counts) + tail
    offsets = torch.zeros(e + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts).cumsum(0)
    t = p + 5 if gather else p
    x = torch.randn(t, k, generator=g)
    w = torch.randn(e, k, n, generator=g) / k ** 0.5
    dy = torch.randn(p, n, generator=g)
    gidx = torch.randint(0, t, (p,), generator=g) if gather else None
    to = lambda v: None if v is None else v.to(device)
    return (x.to(device, dtype), w.to(device, dtype), offsets.to(device), to(gidx),
            dy.to(device, dtype))


def run(fn, x, w, offsets, gidx, dy, **kw):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = fn(x, w, offsets, gidx, **kw)
    y.backward(dy)
    return y, x.grad, w.grad


def reference(x, w, offsets, gidx, dy):
    return run(grouped_gemm_reference, x.double(), w.double(), offsets, gidx, dy.double())


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(case, gather, device, poison, gmm_path):
    x, w, offsets, gidx, dy = make_case(*case, gather, device)
    y, dx, dw = run(grouped_gemm, x, w, offsets, gidx, dy, backend="triton")
    y_r, dx_r, dw_r = reference(x, w, offsets, gidx, dy)
    assert not y.isnan().any() and not dx.isnan().any() and not dw.isnan().any()
    assert rel(y, y_r) < 1e-5 and rel(dx, dx_r) < 1e-5 and rel(dw, dw_r) < 1e-5
    tail = offsets[-1].item()
    assert (y[tail:] == 0).all()
    empty = (offsets[1:] == offsets[:-1]).cpu()
    assert (dw[empty] == 0).all()                  # experts with no rows: dW exactly 0


@pytest.mark.parametrize("gather", [False, True])
def test_wgrad_accumulates_into_fp32_buffer(gather, device, gmm_path):
    x, w, offsets, gidx, dy = make_case(*CASES[0], gather, device)
    start = torch.randn(w.shape, device=device)
    buf = start.clone()
    out = launch_wgrad(x, dy, offsets, gidx, accumulate_into=buf)
    _, _, dw_r = reference(x, w, offsets, gidx, dy)
    assert out is buf
    assert rel(buf - start, dw_r) < 1e-5


@pytest.mark.parametrize("gather", [False, True])
def test_wgrad_final_add_writes_out_dtype(gather, device, gmm_path):
    """accumulate_into with a narrower out_dtype: the sum comes back in that dtype, in a new
    tensor, and the fp32 buffer is left as it was (the wgrad chain's first step, whose
    backward runs last, kernels/expert_mlp_op.py)."""
    x, w, offsets, gidx, dy = make_case(*CASES[2], gather, device)
    start = torch.randn(w.shape, device=device)
    buf = start.clone()
    out = launch_wgrad(x, dy, offsets, gidx, accumulate_into=buf, out_dtype=torch.bfloat16)
    _, _, dw_r = reference(x, w, offsets, gidx, dy)
    assert out.dtype == torch.bfloat16 and out is not buf
    assert torch.equal(buf, start)
    assert rel(out, start.double() + dw_r) < 1e-2


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("gather", [False, True])
def test_fallback_matches_reference(backend, gather):
    # grouped_mm needs 16-byte aligned rows (K, N multiples of 4 in fp32); the loop does not
    e, k, n, counts, tail = (5, 32, 48, [7, 0, 0, 16, 1], 11)
    if backend == "loop":
        k, n = 17, 9
    x, w, offsets, gidx, dy = make_case(e, k, n, counts, tail, gather, "cpu")
    y, dx, dw = run(grouped_gemm, x, w, offsets, gidx, dy, backend=backend)
    y_r, dx_r, dw_r = reference(x, w, offsets, gidx, dy)
    assert rel(y, y_r) < 1e-5 and rel(dx, dx_r) < 1e-5 and rel(dw, dw_r) < 1e-5
    assert (y[offsets[-1].item():] == 0).all()


def test_fallback_survives_stride0_grad():
    x, w, offsets, _, _ = make_case(*CASES[2], False, "cpu")
    w = w.requires_grad_()
    grouped_gemm(x, w, offsets, backend="grouped_mm").sum().backward()   # expanded ones grad
    assert w.grad is not None


def test_bad_inputs_raise(device):
    x, w, offsets, _, _ = make_case(*CASES[0], False, device)
    with pytest.raises(ValueError, match="int64"):
        grouped_gemm(x, w, offsets.int(), backend="triton")
    with pytest.raises(ValueError, match=r"\[E\+1\]"):
        grouped_gemm(x, w, offsets[:-1], backend="triton")
    with pytest.raises(ValueError, match="in-dim"):
        grouped_gemm(x[:, :-1], w, offsets, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        grouped_gemm(x, w, offsets, backend="cutlass")


def test_backend_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(gmm_backend, "_LOGGED", set())
    x, w, offsets, _, _ = make_case(*CASES[0], False, "cpu")
    with caplog.at_level(logging.WARNING, logger="kernels.gmm_backend"):
        grouped_gemm(x, w, offsets, backend="grouped_mm")
        grouped_gemm(x, w, offsets, backend="grouped_mm")
    assert len([r for r in caplog.records if "grouped_mm" in r.getMessage()]) == 1
    assert gmm_backend.backend_available()       # interpreter or GPU: Triton path can run


def test_smem_pruning_keeps_configs_that_fit():
    """fp32 tiles take twice the shared memory of bf16: configs that overflow Hopper's
    227 KiB are dropped before autotuning (the GPU otherwise stops on OutOfResources)."""
    triton = pytest.importorskip("triton")
    from kernels.grouped_gemm_tma import fits_smem
    cfgs = [triton.Config(dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), num_stages=4),
            triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), num_stages=3)]
    bf16, fp32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    assert fits_smem(cfgs, {"b_ptr": bf16}, EPILOGUE=0) == cfgs          # 192 KiB fits
    assert fits_smem(cfgs, {"b_ptr": fp32}, EPILOGUE=0) == cfgs[1:]      # 384 KiB does not
    assert fits_smem(cfgs, {"b_ptr": bf16}, EPILOGUE=1) == cfgs[1:]      # gate and up tiles
    big = cfgs[:1]
    assert fits_smem(big, {"b_ptr": fp32}, EPILOGUE=0) == big            # none fit: keep one


@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("trans_w", [False, True])
def test_tma_kernel_both_grids(persistent, trans_w, device, poison, monkeypatch):
    """The TMA kernel's two grids (persistent loop with pointer stores; one program per tile
    with TMA stores inside a group) give the same rows, tail zeros included; a tile that
    overhangs its expert must not write the rows past it."""
    from kernels import grouped_gemm_tma
    from kernels.grouped_gemm import launch_gmm
    monkeypatch.setattr(grouped_gemm_tma, "MODE", "on")
    x, w, offsets, _, _ = make_case(5, 32, 48, [7, 0, 0, 40, 1], 11, False, device)
    if trans_w:
        w = w.transpose(1, 2).contiguous()                 # [E, N, K]: y = x @ w[e]^T
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=8, PERSISTENT=persistent,
               num_warps=4, num_stages=1)
    y = launch_gmm(x, w, offsets, trans_w=trans_w, config=cfg)
    w_ref = w.transpose(1, 2) if trans_w else w
    y_r = grouped_gemm_reference(x.double(), w_ref.double(), offsets)
    end = offsets[-1].item()
    assert rel(y, y_r) < 1e-5 and (y[end:] == 0).all()
    # Without the zero fill nobody writes the tail: the last expert's tile overhangs into
    # it, and its poison must survive (a store past an expert's end would overwrite it).
    y = launch_gmm(x, w, offsets, trans_w=trans_w, config=cfg, zero_tail=False)
    assert rel(y[:end], y_r[:end]) < 1e-5 and y[end:].isnan().all()
