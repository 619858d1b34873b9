"""Every model kind builds and trains; aux loss reaches the router; parameter counts."""

import pytest
import torch

from megatron_moc.config import MoCConfig, tiny_config
from megatron_moc.model.gpt import build_model
from megatron_moc.model.params import count_parameters

KINDS = [("dense", 1), ("irl_only", 2), ("moe", 1), ("collab_only", 1), ("moc", 2)]


@pytest.mark.parametrize("kind, steps", KINDS)
def test_kind_trains(kind, steps):
    torch.manual_seed(0)
    model = build_model(tiny_config(moc_model_kind=kind, moc_irl_steps=steps))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (4, 32))  # a small sub-vocabulary: learnable quickly
    losses = []
    for _ in range(8):
        total, ce, aux = model.lm_loss(ids, torch.roll(ids, -1, 1))
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(total))
        assert torch.isfinite(total)
        if kind in ("dense", "irl_only"):
            assert float(aux) == 0.0
        else:
            assert float(aux) > 0.0
    assert losses[-1] < losses[0] - 0.5


def test_router_receives_balance_loss_gradient():
    torch.manual_seed(0)
    model = build_model(tiny_config(moc_model_kind="moc", moc_irl_steps=2))
    ids = torch.randint(0, 512, (2, 16))
    model.lm_loss(ids, ids)
    router = model.moc_layers()[0].router.weight
    (g_aux,) = torch.autograd.grad(model.aux_loss(), router, retain_graph=True)
    assert g_aux.abs().sum() > 0
    # Only the balance term: zero the other coefficients and compare with a direct formula.
    cfg = tiny_config(moc_model_kind="moe", moc_irl_steps=1, moe_z_loss_coeff=0.0,
                      moc_drop_loss_coeff=0.0)
    torch.manual_seed(0)
    model = build_model(cfg)
    layer = model.moc_layers()[0]
    # Megatron's vocab-parallel CE backward works in place: one backward per forward.
    total, _, _ = model.lm_loss(ids, ids)
    (g_total,) = torch.autograd.grad(total, layer.router.weight)
    _, ce, aux = model.lm_loss(ids, ids)
    (g_ce,) = torch.autograd.grad(ce, layer.router.weight, retain_graph=True)
    _, _, aux = model.lm_loss(ids, ids)
    (g_aux,) = torch.autograd.grad(aux, layer.router.weight)
    assert g_aux.abs().sum() > 0
    torch.testing.assert_close(g_total, g_ce + g_aux)


def test_routing_stats_after_forward():
    torch.manual_seed(0)
    cfg = tiny_config(moc_model_kind="moc", moc_irl_steps=2, moc_capacity_factor=0.5)
    model = build_model(cfg)
    model.lm_loss(torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16)))
    stats = model.routing_stats()
    assert len(stats) == cfg.num_layers
    s = stats[0]
    assert float(s.requested_hist.sum()) == 32 * cfg.moe_router_topk
    assert float(s.kept_hist.sum()) <= 32 * cfg.moe_router_topk
    assert 0 < float(s.drop_rate) < 1
    assert 0 <= float(s.avg_steps) <= 2 and 0 <= float(s.avg_rounds) <= 2
    assert 0 < float(s.mean_gamma) < 1 and float(s.router_entropy) > 0


def test_500m_reference_parameter_count():
    cfg = MoCConfig(num_layers=10, vocab_size=65536, moc_irl_steps=2, moc_collab_rounds=2,
                    use_cpu_initialization=True)
    counts = count_parameters(cfg)
    assert abs(counts.total - 499.0e6) <= 0.005 * 499.0e6, counts
    assert abs(counts.active - 216e6) <= 0.005 * 216e6, counts
