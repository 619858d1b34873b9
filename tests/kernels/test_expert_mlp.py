"""grouped_swiglu and expert_swiglu_mlp (fused SwiGLU epilogues) against a float64 reference:
output and every gradient, gather on/off, empty experts, a zero tail, fp32 accumulation over
S steps; plus a bf16 check on the GPU."""
import pytest
import torch

from kernels.expert_mlp import (expert_swiglu_mlp, expert_swiglu_mlp_reference, grouped_swiglu,
                                grouped_swiglu_reference)
from kernels.expert_mlp_op import wgrad_chain

# (E, D, F, rows per expert, zero-tail rows)
CASES = [
    (4, 40, 12, [10, 0, 33, 20], 0),
    (3, 17, 9, [0, 45, 0], 0),
    (5, 32, 24, [7, 0, 0, 16, 1], 11),
]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(e, d, f, counts, tail, gather, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = sum(counts) + tail
    offsets = torch.zeros(e + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts).cumsum(0)
    t = p + 3 if gather else p
    gidx = torch.randint(0, t, (p,), generator=g).to(device) if gather else None
    x = torch.randn(t, d, generator=g)
    w13 = torch.randn(e, d, 2 * f, generator=g) / d ** 0.5
    w2 = torch.randn(e, f, d, generator=g) / f ** 0.5
    dy = torch.randn(p, d, generator=g)
    return [v.to(device, dtype) for v in (x, w13, w2, dy)] + [offsets.to(device), gidx]


def grads(fn, tensors, *args, **kw):
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves, *args, **kw)
    return out, leaves


@pytest.mark.parametrize("entry", ["function", "custom_op"])
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_expert_mlp_matches_reference(case, gather, entry, device, poison, gmm_path):
    """The autograd Function and the torch.library custom op (kernels/expert_mlp_op.py, what
    torch.compile sees) against the float64 reference."""
    from kernels.expert_mlp_op import expert_swiglu_mlp_op

    fn = expert_swiglu_mlp if entry == "function" else expert_swiglu_mlp_op
    x, w13, w2, dy, offsets, gidx = make(*case, gather, device)
    y, leaves = grads(fn, (x, w13, w2), offsets, gidx, backend="triton")
    y.backward(dy)
    y_r, leaves_r = grads(expert_swiglu_mlp_reference, (x.double(), w13.double(),
                                                         w2.double()), offsets, gidx)
    y_r.backward(dy.double())
    assert rel(y, y_r) < 1e-5
    assert (y[offsets[-1].item():] == 0).all()
    for a, b in zip(leaves, leaves_r):
        assert not a.grad.isnan().any()
        assert rel(a.grad, b.grad) < 1e-5


@pytest.mark.parametrize("entry", ["function", "custom_op"])
def test_expert_mlp_without_zero_tail(entry, device, poison, gmm_path):
    """zero_tail=False (hard IRL mode): the rows before offsets[E] of y and of every gradient
    are those of the float64 reference; the rows past it of y and dX are left unwritten
    on the TMA path (NaN under the poison), so nothing is spent on them."""
    from kernels.expert_mlp_op import expert_swiglu_mlp_op

    fn = expert_swiglu_mlp if entry == "function" else expert_swiglu_mlp_op
    x, w13, w2, dy, offsets, _ = make(*CASES[2], False, device)
    end = int(offsets[-1])
    y, leaves = grads(fn, (x, w13, w2), offsets, backend="triton", zero_tail=False)
    y.backward(dy)
    y_r, leaves_r = grads(expert_swiglu_mlp_reference, (x.double(), w13.double(),
                                                         w2.double()), offsets)
    y_r.backward(dy.double())
    assert rel(y[:end], y_r[:end]) < 1e-5
    assert rel(leaves[0].grad[:end], leaves_r[0].grad[:end]) < 1e-5
    for a, b in zip(leaves[1:], leaves_r[1:]):
        assert rel(a.grad, b.grad) < 1e-5
    if gmm_path == "tma":   # the pointer kernels write their tiles' zeros anyway
        assert y[end:].isnan().all() and leaves[0].grad[end:].isnan().all()


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_grouped_swiglu_matches_reference(case, gather, device, poison, gmm_path):
    x, w13, _, _, offsets, gidx = make(*case, gather, device)
    p = gidx.shape[0] if gather else x.shape[0]
    dh = torch.randn(p, w13.shape[2] // 2, device=device)
    h, (xl, wl) = grads(grouped_swiglu, (x, w13), offsets, gidx, backend="triton")
    h.backward(dh)
    h_r, (xr, wr) = grads(grouped_swiglu_reference, (x.double(), w13.double()), offsets, gidx)
    h_r.backward(dh.double())
    assert rel(h, h_r) < 1e-5 and rel(xl.grad, xr.grad) < 1e-5 and rel(wl.grad, wr.grad) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
def test_mlp_fp32_accumulation_over_steps(backend, device):
    """S = 2 IRL-like steps on shared weights, the second on a compacted half of the rows
    (hard mode), through one weight-gradient chain."""
    dev = device if backend == "triton" else "cpu"
    x, w13, w2, dy, offsets, _ = make(4, 32, 16, [10, 0, 12, 10], 0, False, dev)
    keep = torch.arange(0, 32, 2, device=dev)        # rows still active after step 1
    off2 = torch.tensor([0, 5, 5, 11, 16], device=dev)
    w13 = w13.requires_grad_()
    w2 = w2.requires_grad_()
    h1, chain = expert_swiglu_mlp(x, w13, w2, offsets, wgrad_chain=wgrad_chain(2),
                                  backend=backend)
    h2, chain = expert_swiglu_mlp(h1, w13, w2, off2, keep, wgrad_chain=chain, backend=backend)
    assert chain is None
    ((h1 * dy).sum() + (h2 * dy[:16]).sum()).backward()
    w13_r = w13.detach().double().requires_grad_()
    w2_r = w2.detach().double().requires_grad_()
    h1_r = expert_swiglu_mlp_reference(x.double(), w13_r, w2_r, offsets)
    h2_r = expert_swiglu_mlp_reference(h1_r, w13_r, w2_r, off2, keep)
    ((h1_r * dy.double()).sum() + (h2_r * dy[:16].double()).sum()).backward()
    assert w13.grad.dtype == torch.float32
    assert rel(w13.grad, w13_r.grad) < 1e-5 and rel(w2.grad, w2_r.grad) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("gather", [False, True])
def test_bf16_on_gpu(gather):
    counts = [900, 0, 2100, 37, 501, 700, 1, 400]          # skewed, an empty expert
    x, w13, w2, dy, offsets, gidx = make(8, 256, 384, counts, 7, gather, "cuda",
                                         dtype=torch.bfloat16)
    y, leaves = grads(expert_swiglu_mlp, (x, w13, w2), offsets, gidx)
    y.backward(dy)
    y_r, leaves_r = grads(expert_swiglu_mlp_reference, (x.float(), w13.float(), w2.float()),
                          offsets, gidx)
    y_r.backward(dy.float())
    assert rel(y, y_r) < 1e-2
    for a, b in zip(leaves, leaves_r):
        assert rel(a.grad, b.grad) < 1e-2


@pytest.mark.parametrize("case", CASES)
def test_swiglu_bwd_after_dgrad(case, device, poison):
    """The W2 dgrad followed by the elementwise SwiGLU backward (kernels/swiglu.py). The rows
    before offsets[E] are right; the tail's saved pre-activations are never read (NaN there
    must not leak into them); the tail of the result is left undefined (its readers, the
    W13 wgrad and the dX dgrad, stop at offsets[E])."""
    from kernels.grouped_gemm import grouped_gemm_reference, launch_gmm_swiglu_bwd
    from kernels.swiglu import swiglu_bwd_reference
    x, w13, w2, dy, offsets, _ = make(*case, False, device)
    pre = torch.randn(dy.shape[0], w13.shape[2], device=device)
    end = int(offsets[-1])
    pre[end:] = float("nan")
    dgu = launch_gmm_swiglu_bwd(dy, w2, offsets, pre)
    dh = grouped_gemm_reference(dy.double(), w2.double().transpose(1, 2), offsets)
    assert not dgu[:end].isnan().any()
    assert rel(dgu[:end], swiglu_bwd_reference(pre[:end].double(), dh[:end])) < 1e-5


@pytest.mark.parametrize("zero_tail", [True, False])
def test_swiglu_bwd_tail_rows(device, zero_tail):
    """launch_swiglu_bwd past rows_end: zeros by default (zero_tail=False leaves that tail
    undefined); the rows before it are right either way, NaN in the tail's inputs unread."""
    from kernels.swiglu import launch_swiglu_bwd, swiglu_bwd_reference
    g = torch.Generator().manual_seed(3)
    p, f, end = 40, 24, 29
    pre = torch.randn(p, 2 * f, generator=g).to(device)
    dh = torch.randn(p, f, generator=g).to(device)
    pre[end:] = float("nan")
    out = launch_swiglu_bwd(pre, dh, torch.tensor([end], device=device), zero_tail=zero_tail)
    assert rel(out[:end], swiglu_bwd_reference(pre[:end].double(), dh[:end].double())) < 1e-5
    if zero_tail:
        assert (out[end:] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_accumulated_steps_on_gpu():
    """Two steps on bf16 weights through one weight-gradient chain: the first step's wgrad
    (its backward runs last) adds the fp32 sum and writes bf16 itself; the step-2 rows half
    in the zero tail."""
    counts = [900, 0, 2100, 37, 501, 700, 1, 400]
    x, w13, w2, dy, offsets, _ = make(8, 256, 384, counts, 7, False, "cuda",
                                      dtype=torch.bfloat16)
    off2 = offsets // 2            # step 2: fewer rows, the rest in the zero tail
    w13, w2 = w13.requires_grad_(), w2.requires_grad_()
    h1, chain = expert_swiglu_mlp(x, w13, w2, offsets, wgrad_chain=wgrad_chain(2))
    h2, _ = expert_swiglu_mlp(h1, w13, w2, off2, wgrad_chain=chain)
    ((h1.float() * dy.float()).sum() + (h2.float() * dy.float()).sum()).backward()
    w13_r = w13.detach().float().requires_grad_()
    w2_r = w2.detach().float().requires_grad_()
    h1_r = expert_swiglu_mlp_reference(x.float(), w13_r, w2_r, offsets)
    h2_r = expert_swiglu_mlp_reference(h1_r, w13_r, w2_r, off2)
    ((h1_r * dy.float()).sum() + (h2_r * dy.float()).sum()).backward()
    assert w13.grad.dtype == torch.bfloat16
    assert rel(w13.grad, w13_r.grad) < 1e-2 and rel(w2.grad, w2_r.grad) < 1e-2
