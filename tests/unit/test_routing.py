"""Router capacity ranking, dispatch/combine, expert backends — cases worked by hand."""

import pytest
import torch

from megatron_moc.config import tiny_config
from megatron_moc.moc.dispatch import combine, dispatch, plan_dispatch
from megatron_moc.moc.experts import swiglu_mlp_grouped_mm, swiglu_mlp_loop
from megatron_moc.moc.router import capacity_keep_mask


def test_capacity_ranking_by_logit_with_stable_ties():
    # 4 tokens, K = 2, E = 2; capacity 2 per expert.
    experts = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    logits = torch.tensor([[1.0, 0.5], [3.0, 0.5], [1.0, 0.9], [0.1, 0.2]])
    keep = capacity_keep_mask(experts, logits, 2, capacity=2)
    # expert 0 pairs: (0,0)=1.0, (1,0)=3.0, (2,0)=1.0, (3,1)=0.2 → keep 3.0 and the first 1.0
    # expert 1 pairs: (0,1)=0.5, (1,1)=0.5, (2,1)=0.9, (3,0)=0.1 → keep 0.9 and the first 0.5
    expected = torch.tensor([[True, True], [True, False], [False, True], [False, False]])
    assert torch.equal(keep, expected)  # token 3 loses both of its pairs


def test_dropless_keeps_all():
    experts = torch.randint(0, 4, (10, 2))
    assert capacity_keep_mask(experts, torch.randn(10, 2), 4, capacity=-1).all()


def test_dispatch_then_combine_is_identity_on_kept_pairs():
    N, K, E, D = 12, 3, 5, 4
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    keep = torch.rand(N, K) > 0.3
    plan = plan_dispatch(experts, keep, E)
    x = torch.randn(N, D)
    rows = dispatch(x, plan)
    # kept rows come first, grouped by expert, matching the offsets
    num_kept = int(keep.sum())
    assert int(plan.offsets_E1[-1]) == num_kept
    for e in range(E):
        seg = plan.expert_P[plan.offsets_E1[e]:plan.offsets_E1[e + 1]]
        assert (seg == e).all()
    # combine is the exact inverse on every pair (dropped ones too: the combiners mask them)
    assert torch.equal(combine(rows, plan), x.unsqueeze(1).expand(N, K, D))
    assert torch.equal(plan.pair_P[plan.row_NK.reshape(-1)], torch.arange(N * K))


def _old_dispatch_combine(x, plan, keep):
    """The former path: index_select (backward: index_add_) and zeros.index_copy · keep."""
    rows = x.index_select(0, plan.token_P)
    h = rows * torch.arange(1, rows.shape[0] + 1, dtype=x.dtype).unsqueeze(-1)  # row-distinct
    states = h.new_zeros(h.shape).index_copy(0, plan.pair_P, h)
    return states.view(-1, plan.num_slots, x.shape[1]) * keep.unsqueeze(-1).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("num_slots", [1, 2, 3])
def test_gather_backwards_match_index_add_path(dtype, num_slots):
    """dispatch / combine (gathers both ways) against index_select + index_copy: values and
    dx, with capacity drops and a token whose pairs are all dropped."""
    from megatron_moc.moc.mediator import mask_dropped

    torch.manual_seed(0)
    N, E, D = 9, 4, 6
    experts = torch.stack([torch.randperm(E)[:num_slots] for _ in range(N)])
    keep = torch.rand(N, num_slots) > 0.35
    keep[4] = False                                   # a token with every pair dropped
    keep[0] = True
    plan = plan_dispatch(experts, keep, E)
    x = torch.randn(N, D, dtype=torch.float64).to(dtype)
    probe = torch.randn(N, num_slots, D, dtype=torch.float64).to(dtype)
    outs, grads = [], []
    for new in (True, False):
        xr = x.clone().requires_grad_(True)
        if new:
            rows = dispatch(xr, plan)
            h = rows * torch.arange(1, rows.shape[0] + 1, dtype=dtype).unsqueeze(-1)
            states = mask_dropped(combine(h, plan), keep)
        else:
            states = _old_dispatch_combine(xr, plan, keep)
        (grad,) = torch.autograd.grad((states * probe).sum(), xr)
        outs.append(states)
        grads.append(grad)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][4], torch.zeros(num_slots, D, dtype=dtype))
    if num_slots < 3:   # a + b is the same number in either order
        assert torch.equal(grads[0], grads[1])
    else:   # K = 3: another summation order (and in bf16 one rounding instead of two)
        tol = 1e-12 if dtype == torch.float64 else 2e-2
        torch.testing.assert_close(grads[0], grads[1], rtol=tol, atol=tol)
    assert torch.equal(grads[0][4], torch.zeros(D, dtype=dtype))   # all-dropped token: dx = 0


def test_dispatch_backward_sums_in_fp32():
    """The K copies' gradients are summed in fp32 and rounded once: 1 + 2^-8 + 2^-8 is
    1 + 2^-7 in bf16, where rounding after each add (index_add_) loses both halves."""
    experts = torch.tensor([[0, 1, 2]])
    plan = plan_dispatch(experts, torch.ones(1, 3, dtype=torch.bool), 3)
    x = torch.zeros(1, 1, dtype=torch.bfloat16, requires_grad=True)
    rows = dispatch(x, plan)
    grad_P = torch.tensor([[1.0], [2 ** -8], [2 ** -8]], dtype=torch.bfloat16)
    (dx,) = torch.autograd.grad(rows, x, grad_P)
    assert dx.item() == 1 + 2 ** -7


def test_expert_with_zero_tokens_and_backends_agree():
    torch.manual_seed(0)
    E, D, Fh, P = 4, 8, 12, 10
    w13 = torch.randn(E, D, 2 * Fh, requires_grad=True)
    w2 = torch.randn(E, Fh, D, requires_grad=True)
    offsets = torch.tensor([0, 3, 3, 8, 8])  # experts 1 and 3 get nothing; 2 rows past the end
    z = torch.randn(P, D, requires_grad=True)
    outs, grads = [], []
    for fn in (swiglu_mlp_loop, swiglu_mlp_grouped_mm):
        y = fn(z, w13, w2, offsets)
        g = torch.autograd.grad((y * torch.arange(P).unsqueeze(-1)).sum(), (z, w13, w2))
        outs.append(y)
        grads.append(g)
    assert torch.equal(outs[1][8:], torch.zeros(2, D))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(grads[1][1][1], torch.zeros(D, 2 * Fh))  # empty expert: zero dW
    assert torch.equal(grads[1][0][8:], torch.zeros(2, D))      # rows past the end: zero dX


@pytest.mark.parametrize("seed", range(4))
def test_compact_active_is_the_stable_sort_on_inactive_then_expert(seed):
    """compact_active's prefix-sum partition gives the active rows in the order, and the
    offsets, of the stable sort it stands for; the rest (inactive or dropped) after them."""
    from megatron_moc.moc.dispatch import compact_active

    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 6, (5,), generator=g)
    counts[seed % 5] = 0                                     # an empty expert
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    kept, P = int(offsets[-1]), int(offsets[-1]) + 4         # 4 dropped rows at the end
    expert = torch.cat([torch.repeat_interleave(torch.arange(5), counts),
                        torch.randint(0, 5, (4,), generator=g)])
    active = torch.rand(P, generator=g) < 0.5
    active[kept:] = True                                     # dropped rows stay out anyway
    order, inverse, off2 = compact_active(active, offsets)

    live = active & (torch.arange(P) < kept)
    want = torch.argsort(expert + 5 * (~live).long(), stable=True)
    n = int(live.sum())
    assert torch.equal(order[:n], want[:n])
    assert set(order[n:].tolist()) == set(want[n:].tolist())
    assert torch.equal(order[inverse], torch.arange(P))
    want_off = torch.cat([torch.zeros(1, dtype=torch.long),
                          torch.bincount(expert[live], minlength=5).cumsum(0)])
    assert torch.equal(off2, want_off)
