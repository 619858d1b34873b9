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
    states = combine(rows, plan, keep)
    expected = x.unsqueeze(1).expand(N, K, D) * keep.unsqueeze(-1)
    assert torch.equal(states, expected)


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
