"""kernels/active_rows.py (hard mode's row moves) against its torch twin and a float64
formula, and dispatch.compact_rows / uncompact_rows (the moves with autograd) against plain
permutation gathers with the inactive rows zeroed. On CPU the kernel runs in the Triton
interpreter (conftest), in fp32."""
import pytest
import torch

from kernels import active_rows
from megatron_moc.moc.dispatch import compact_active, compact_rows, uncompact_rows

pytestmark = pytest.mark.skipif(active_rows.triton is None, reason="needs Triton")


def _case(p, e, d, frac, seed, device, dtype=torch.float32):
    """Rows sorted by expert (some experts empty), a few dropped rows past offsets[E], and
    `frac` of the rows active: (x, order, inverse, offsets of the active rows)."""
    g = torch.Generator().manual_seed(seed)
    kept = p - p // 7
    cuts = torch.sort(torch.randint(0, kept + 1, (e - 1,), generator=g)).values
    offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([kept])]).to(device)
    active = (torch.rand(p, generator=g) < frac).to(device)
    order, inverse, off2 = compact_active(active, offsets)
    x = torch.randn(p, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return x, order, inverse, off2


def _formula(x, index, count, by_source):
    """out[r] = x[index[r]] where the row carries data, else 0, row by row in float64."""
    out = torch.zeros(index.shape[0], x.shape[1], dtype=torch.float64)
    n = int(count)
    for r, i in enumerate(index.tolist()):
        if (i if by_source else r) < n:
            out[r] = x[i].double().cpu()
    return out


@pytest.mark.parametrize("p,e,d,frac", [(37, 3, 20, 0.5), (64, 4, 256, 0.0), (50, 1, 300, 1.0),
                                        (129, 5, 33, 0.3)])
@pytest.mark.parametrize("by_source", [False, True])
def test_kernel_matches_twin_and_formula(p, e, d, frac, by_source, device, poison):
    """Sizes not block multiples, no row active, every row active, one expert; the poisoned
    output (NaN from torch.empty) shows every element is written."""
    x, order, inverse, off2 = _case(p, e, d, frac, seed=p + d, device=device)
    index = inverse if by_source else order
    count = off2[-1:]
    out = active_rows.masked_row_gather(x, index, count, by_source)
    ref = active_rows.masked_row_gather_reference(x, index, count, by_source)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(out.double().cpu(), _formula(x, index, count, by_source),
                               rtol=0, atol=0)


def test_rows_that_carry_no_data_are_not_read(device):
    """NaN in every inactive source row reaches no output: the kernel does not read them
    (the twin's where() hides them too, so this pins the kernel's masked loads)."""
    x, order, inverse, off2 = _case(40, 3, 64, 0.5, seed=3, device=device)
    n = int(off2[-1])
    x[order[n:]] = float("nan")              # compact never reads the inactive rows
    out = active_rows.masked_row_gather(x, order, off2[-1:], False)
    assert not out.isnan().any() and (out[n:] == 0).all()
    y = torch.randn_like(x)
    y[n:] = float("nan")                     # uncompact never reads the compacted tail
    back = active_rows.masked_row_gather(y, inverse, off2[-1:], True)
    assert not back.isnan().any()


def test_bad_index_dtype_names_the_field(device):
    x, order, _, off2 = _case(16, 2, 8, 0.5, seed=1, device=device)
    with pytest.raises(ValueError, match="int64"):
        active_rows.masked_row_gather(x, order.int(), off2[-1:], False)


@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0])
def test_compact_and_uncompact_gradients_match_the_permutation(frac):
    """compact_rows / uncompact_rows (with autograd) equal plain permutation gathers with the
    inactive rows zeroed, values and float64 gradients; uncompact(compact(x)) keeps the
    active rows and zeroes the rest."""
    x, order, inverse, off2 = _case(45, 4, 12, frac, seed=7, device="cpu", dtype=torch.float64)
    n = int(off2[-1])
    live = torch.zeros(45, 1, dtype=torch.float64)
    live[:n] = 1
    x.requires_grad_()
    g1, g2 = torch.randn(45, 12, dtype=torch.float64), torch.randn(45, 12, dtype=torch.float64)
    zc = compact_rows(x, order, inverse, off2[-1:])
    back = uncompact_rows(zc * 3.0, inverse, order, off2[-1:])
    got = torch.autograd.grad((zc, back), x, (g1, g2))[0]
    zc_ref = x[order] * live
    back_ref = (zc_ref * 3.0)[inverse] * live[inverse]
    want = torch.autograd.grad((zc_ref, back_ref), x, (g1, g2))[0]
    torch.testing.assert_close(zc, zc_ref)
    torch.testing.assert_close(back, back_ref)
    torch.testing.assert_close(got, want)
    active = torch.zeros(45, dtype=torch.bool)
    active[order[:n]] = True
    torch.testing.assert_close(back, 3.0 * x.detach() * active[:, None])
