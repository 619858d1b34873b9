"""Row segments (kernels/row_segments.py): expert e owns rows [offsets[e], ends[e]), hard IRL
mode's depth-sorted layout. Every kernel path and its torch twins against the float64
reference, with NaN in every row outside the segments (the gaps and the tail), so a kernel
that reads a gap row for a result, or leaves an output row unwritten that it must write,
fails. Sizes are not multiples of the interpreter's 16-wide tiles."""
import pytest
import torch

from kernels import row_segments
from kernels.expert_mlp import expert_swiglu_mlp, expert_swiglu_mlp_reference
from kernels.expert_mlp_op import wgrad_chain
from kernels.grouped_gemm import grouped_gemm, grouped_gemm_reference, launch_wgrad_pair
from kernels.swiglu import launch_swiglu_bwd, swiglu_bwd_reference

# (E, K, N, rows per expert, active rows per expert, tail rows)
CASES = [
    (4, 40, 24, [10, 0, 33, 20], [4, 0, 33, 0], 3),     # a full expert, an inactive one
    (3, 17, 9, [0, 45, 0], [0, 17, 0], 0),              # one expert holds every row
    (5, 32, 48, [7, 0, 0, 16, 1], [7, 0, 0, 1, 1], 11),  # gaps of 15 rows and a tail
]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def segments_of(counts, active, device):
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts).cumsum(0)
    return row_segments.with_active_ends(offsets, torch.tensor(active)).to(device)


def outside_as_nan(t, seg):
    """t with NaN in the rows outside every segment."""
    keep = row_segments.row_mask(seg, t.shape[0])[:, None]
    return torch.where(keep, t, float("nan"))


def make(e, k, n, counts, active, tail, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = sum(counts) + tail
    seg = segments_of(counts, active, device)
    x = outside_as_nan(torch.randn(p, k, generator=g).to(device), seg)
    w = (torch.randn(e, k, n, generator=g) / k ** 0.5).to(device)
    dy = outside_as_nan(torch.randn(p, n, generator=g).to(device), seg)
    return x, w, dy, seg


def test_row_mask_and_bounds():
    seg = segments_of([10, 0, 33, 20], [4, 0, 33, 0], "cpu")
    mask = row_segments.row_mask(seg, 66)
    want = torch.zeros(66, dtype=torch.bool)
    want[0:4] = want[10:43] = True
    assert torch.equal(mask, want)
    assert row_segments.host_bounds(seg) == [(0, 4), (10, 10), (10, 43), (43, 43)]
    assert row_segments.end_shift(seg) == 5 and row_segments.end_shift(seg[0]) == 1
    assert row_segments.kept_end(seg).tolist() == [63]


@pytest.mark.parametrize("bad, what", [
    (torch.zeros(3, dtype=torch.int64), "[E+1] = [5]"),
    (torch.zeros(2, 5, dtype=torch.int32), "int32"),
    (torch.zeros(3, 5, dtype=torch.int64), "(3, 5)"),
])
def test_bad_offsets_are_named(bad, what, device):
    x = torch.randn(8, 16, device=device)
    w = torch.randn(4, 16, 8, device=device)
    with pytest.raises(ValueError, match="offsets must be") as err:
        grouped_gemm(x, w, bad.to(device), backend="triton")
    assert what in str(err.value)


@pytest.mark.parametrize("case", CASES)
def test_grouped_gemm_on_segments(case, device, poison, gmm_path):
    """Forward, dX and dW on the segments' rows only; y's and dX's other rows are zeros."""
    x, w, dy, seg = make(*case, device)
    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    y = grouped_gemm(*leaves, seg, backend="triton")
    y.backward(dy)
    ref = [x.double().requires_grad_(), w.double().requires_grad_()]
    y_r = grouped_gemm_reference(*ref, seg)
    y_r.backward(torch.nan_to_num(dy.double()))
    for got, want in ((y, y_r), (leaves[0].grad, ref[0].grad), (leaves[1].grad, ref[1].grad)):
        assert not got.isnan().any()
        assert rel(got, want) < 1e-5
    outside = ~row_segments.row_mask(seg, x.shape[0])
    assert (y[outside] == 0).all() and (leaves[0].grad[outside] == 0).all()


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_torch_twins_on_segments(backend, device):
    x, w, dy, seg = make(*CASES[0], device)
    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    y = grouped_gemm(*leaves, seg, backend=backend)
    y.backward(dy)
    ref = [x.double().requires_grad_(), w.double().requires_grad_()]
    y_r = grouped_gemm_reference(*ref, seg)
    y_r.backward(torch.nan_to_num(dy.double()))
    for got, want in ((y, y_r), (leaves[0].grad, ref[0].grad), (leaves[1].grad, ref[1].grad)):
        assert not got.isnan().any() and rel(got, want) < 1e-5


@pytest.mark.parametrize("zero_tail", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_expert_mlp_on_segments(case, zero_tail, device, poison, gmm_path):
    """The SwiGLU MLP forward + backward (its SwiGLU backward pass reads no gap row): with
    zero_tail the rows outside are zeros, without it only the segments' rows are compared."""
    e, k, n = case[:3]
    x, _, dy, seg = make(e, k, k, *case[3:], device)
    g = torch.Generator().manual_seed(1)
    w13 = (torch.randn(e, k, 2 * n, generator=g) / k ** 0.5).to(device)
    w2 = (torch.randn(e, n, k, generator=g) / n ** 0.5).to(device)
    leaves = [t.clone().requires_grad_() for t in (x, w13, w2)]
    y = expert_swiglu_mlp(*leaves, seg, backend="triton", zero_tail=zero_tail)
    y.backward(dy)
    ref = [t.double().requires_grad_() for t in (x, w13, w2)]
    y_r = expert_swiglu_mlp_reference(*ref, seg)
    y_r.backward(torch.nan_to_num(dy.double()))
    inside = row_segments.row_mask(seg, x.shape[0])
    rows = slice(None) if zero_tail else inside
    assert rel(y[rows], y_r[rows]) < 1e-5
    assert rel(leaves[0].grad[rows], ref[0].grad[rows]) < 1e-5
    for got, want in zip(leaves[1:], ref[1:]):
        assert not got.grad.isnan().any() and rel(got.grad, want.grad) < 1e-5


def test_two_step_chain_on_shrinking_segments(device, monkeypatch):
    """Two IRL-like steps on shared weights, the second on a prefix of each expert's rows
    (hard mode), both ways the chain can link them (fp32 sums, or the last step's operands
    handed to the step before: the wgrad pair). dW is the sum of the two steps' dW."""
    from kernels import expert_mlp_op
    from kernels import grouped_gemm as gg
    e, k, n, counts, _, tail = CASES[2]
    full = segments_of(counts, counts, device)
    prefix = segments_of(counts, [3, 0, 0, 9, 0], device)
    x, _, dy, _ = make(e, k, k, counts, counts, tail, device)
    x, dy = torch.nan_to_num(x), torch.nan_to_num(dy)
    g = torch.Generator().manual_seed(2)
    w13 = (torch.randn(e, k, 2 * n, generator=g) / k ** 0.5).to(device)
    w2 = (torch.randn(e, n, k, generator=g) / n ** 0.5).to(device)

    def loop(mlp, leaves, chain):
        h = leaves[0]
        for seg in (full, prefix):
            if chain is None:
                y = mlp(h, *leaves[1:], seg)
            else:
                y, chain = mlp(h, *leaves[1:], seg, wgrad_chain=chain, backend="triton")
            h = h + 0.5 * y
        return h

    ref = [t.double().requires_grad_() for t in (x, w13, w2)]
    loop(expert_swiglu_mlp_reference, ref, None).backward(dy.double())
    for pair in (False, True):
        monkeypatch.setattr(expert_mlp_op, "PAIR", pair)
        monkeypatch.setattr(gg.TritonPrimitives, "pair_fused",
                            staticmethod(lambda dev, dt: pair))
        leaves = [t.clone().requires_grad_() for t in (x, w13, w2)]
        loop(expert_swiglu_mlp, leaves, wgrad_chain(2)).backward(dy)
        for got, want in zip(leaves, ref):
            assert rel(got.grad, want.grad) < 1e-5, pair


def test_wgrad_pair_with_segments(device, gmm_path):
    """launch_wgrad_pair's two segments of rows may each be row segments."""
    x, w, dy, seg = make(*CASES[0], device)
    x2, _, dy2, seg2 = make(*CASES[0][:3], [10, 0, 33, 20], [10, 0, 1, 19], 3, device, seed=3)
    got = launch_wgrad_pair(x, dy, seg, None, (x2, dy2, seg2), out_dtype=torch.float32)
    want = sum(torch.stack([a[lo:hi].double().T @ d[lo:hi].double()
                            for lo, hi in row_segments.host_bounds(s)])
               for a, d, s in ((x, dy, seg), (x2, dy2, seg2)))
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("zero_tail", [True, False])
def test_swiglu_bwd_skips_gaps(zero_tail, device, poison):
    """The elementwise SwiGLU backward reads no row outside the segments (NaN there stays
    out of the result); those rows are zeros with zero_tail, else unwritten."""
    e, _, _, counts, active, tail = CASES[2]
    seg = segments_of(counts, active, device)
    p, f = sum(counts) + tail, 40
    g = torch.Generator().manual_seed(4)
    pre = outside_as_nan(torch.randn(p, 2 * f, generator=g).to(device), seg)
    dh = outside_as_nan(torch.randn(p, f, generator=g).to(device), seg)
    out = launch_swiglu_bwd(pre, dh, row_segments.kept_end(seg), zero_tail=zero_tail,
                            segments=seg)
    inside = row_segments.row_mask(seg, p)
    want = swiglu_bwd_reference(pre.double(), dh.double())
    assert rel(out[inside], want[inside]) < 1e-6
    if zero_tail:
        assert (out[~inside] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("pair", [True, False])
def test_bf16_two_steps_on_segments_on_gpu(pair, monkeypatch):
    """Hard mode's layout on the GPU's own kernels (on sm90 the warp-specialized GEMMs and the
    fused wgrad pair): two bf16 steps through one weight-gradient chain, step 1 on most of
    each expert's rows and step 2 on a prefix of them, NaN in every input row outside the
    segments; against the fp32 reference, relative error <= 1e-2."""
    from kernels import expert_mlp_op
    monkeypatch.setattr(expert_mlp_op, "PAIR", pair)
    counts, tail = [900, 0, 2100, 37, 501, 700, 1, 400], 77
    seg1 = segments_of(counts, [800, 0, 2100, 30, 0, 699, 1, 400], "cuda")
    seg2 = segments_of(counts, [333, 0, 1000, 30, 0, 1, 0, 399], "cuda")
    e, d, f, p = 8, 256, 384, sum(counts) + tail
    g = torch.Generator().manual_seed(5)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x = outside_as_nan(torch.randn(p, d, generator=g).to(**bf), seg1)
    w13 = (torch.randn(e, d, 2 * f, generator=g) / d ** 0.5).to(**bf).requires_grad_()
    w2 = (torch.randn(e, f, d, generator=g) / f ** 0.5).to(**bf).requires_grad_()
    dy1, dy2 = (torch.randn(p, d, generator=g).to(**bf) for _ in range(2))
    h1, chain = expert_swiglu_mlp(x, w13, w2, seg1, wgrad_chain=wgrad_chain(2))
    h2, _ = expert_swiglu_mlp(outside_as_nan(h1, seg2), w13, w2, seg2, wgrad_chain=chain)
    torch.autograd.backward((h1, h2), (dy1, dy2))
    ref = [t.detach().float().requires_grad_() for t in (w13, w2)]
    h1_r = expert_swiglu_mlp_reference(torch.nan_to_num(x.float()), *ref, seg1)
    h2_r = expert_swiglu_mlp_reference(h1_r, *ref, seg2)
    torch.autograd.backward((h1_r, h2_r), (dy1.float(), dy2.float()))
    assert rel(h1, h1_r) < 1e-2 and rel(h2, h2_r) < 1e-2
    assert not h2.isnan().any() and (h2[~row_segments.row_mask(seg2, p)] == 0).all()
    for got, want in zip((w13, w2), ref):
        assert got.grad.dtype == torch.bfloat16 and rel(got.grad, want.grad) < 1e-2
