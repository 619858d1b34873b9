"""Sanity checks of the MOC_MATH.md oracle against cases worked out by hand."""

import math
import time

import pytest
import torch
import torch.nn.functional as F

from tests.reference.lunaris_reference import (
    REFERENCE_ONLY_FIELDS,
    ReferenceConfig,
    ReferenceIRLFFN,
    ReferenceMoCLayer,
    ReferenceModel,
    apply_rope_interleaved,
    capacity,
    capacity_keep,
    config_for_kind,
    ffn_hidden_dim,
    load_research_checkpoint,
    masked_softmax,
    save_research_checkpoint,
)

F64 = torch.float64


def small_cfg(**kw):
    base = dict(d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, multiple_of=4,
                max_seq_len=16, n_experts=2, top_k=1, capacity_factor=1.0, n_reasoning_steps=1,
                moc_collab_steps=2)
    base.update(kw)
    return ReferenceConfig(**base)


def fixed_router_layer(cfg, seed=0):
    """fp64 layer whose router logits are x[:, :E] (gate weight = [I_E | 0])."""
    torch.manual_seed(seed)
    layer = ReferenceMoCLayer(cfg).to(F64)
    with torch.no_grad():
        layer.gate.weight.zero_()
        for e in range(cfg.n_experts):
            layer.gate.weight[e, e] = 1.0
    return layer


def tokens_with_logits(logits, d, seed=1):
    """x [N, d]: the first E dims are the wanted router logits, the rest random."""
    torch.manual_seed(seed)
    logits = torch.tensor(logits, dtype=F64)
    x = torch.randn(logits.shape[0], d, dtype=F64)
    x[:, : logits.shape[1]] = logits
    return x


def swiglu_residual(expert, z, x):
    """Plain SwiGLU written from the weights: x + W2(silu(z Wg) * (z Wu)), z = normed input."""
    f = expert.w2.weight.shape[1]
    wg, wu = expert.w13.weight[:f], expert.w13.weight[f:]
    return x + (F.silu(z @ wg.T) * (z @ wu.T)) @ expert.w2.weight.T


def rms(x, w):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w


# ---------------------------------------------------------------------------
# Section 2: capacity
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n, k, e, cf, want",
    [
        (64, 2, 4, 1.25, 64),  # 128/4*1.25 = 40 -> 64
        (10, 2, 4, 1.0, 8),  # 5 -> 8
        (4, 2, 4, 1.25, 4),  # 2.5 -> 3 -> 4
        (16, 2, 8, 1.0, 4),  # 4 -> 4
        (3, 1, 8, 1.25, 1),  # 0.46875 -> 1 -> 1
        (5, 2, 2, 2.0, 10),  # 10 -> 16, capped at N*K = 10
        (7, 2, 4, 0.0, 14),  # dropless
        (7, 2, 4, -1.0, 14),  # dropless
    ],
)
def test_capacity_values(n, k, e, cf, want):
    assert capacity(n, k, e, cf) == want


def test_capacity_keep_ranks_by_logit_with_stable_ties():
    # pairs (token-major): p0=(t0,e0,2.0) p1=(t0,e1,1.0) p2=(t1,e1,3.0) p3=(t1,e0,1.0)
    #                      p4=(t2,e0,2.0) p5=(t2,e2,0.5)
    topi = torch.tensor([[0, 1], [1, 0], [0, 2]])
    topv = torch.tensor([[2.0, 1.0], [3.0, 1.0], [2.0, 0.5]])
    # expert 0 ranks p0, p4 (tie 2.0: original order), p3; expert 1 ranks p2, p1
    assert capacity_keep(topi, topv, 1, 3).tolist() == [[True, False], [True, False], [False, True]]
    assert capacity_keep(topi, topv, 2, 3).tolist() == [[True, True], [True, False], [True, True]]
    assert capacity_keep(topi, topv, 6, 3).all()


@pytest.mark.parametrize("collab", [True, False])
def test_drops_and_all_dropped_token_outputs_o_proj_x(collab):
    # N=4, E=2, K=1, cf=0.5: cap = next_pow2(ceil(4/2*0.5)) = 1.
    # e0 gets t0 (3.0) and t1 (5.0): keeps t1. e1 gets t2 (2.0), t3 (2.0, tie): keeps t2.
    cfg = small_cfg(capacity_factor=0.5, use_moc_collab=collab, use_simple_collab=not collab,
                    drop_penalty_weight=0.1)
    layer = fixed_router_layer(cfg)
    x = tokens_with_logits([[3.0, 0.0], [5.0, 0.0], [0.0, 2.0], [0.0, 2.0]], 8)
    out, aux = layer(x)
    diag = layer.last_diagnostics
    assert diag["capacity"] == 1
    assert diag["keep_mask"].flatten().tolist() == [False, True, True, False]
    assert diag["requested_hist"].tolist() == [2, 2]
    assert diag["kept_hist"].tolist() == [1, 1]
    assert diag["drop_rate"] == 0.5
    o_x = x @ layer.o_proj.weight.T
    torch.testing.assert_close(out[[0, 3]], o_x[[0, 3]], rtol=0, atol=1e-14)
    assert (out[[1, 2]] - o_x[[1, 2]]).abs().max() > 1e-3
    # aux contains w_drop * dropped / (N*K) = 0.1 * 2/4
    router_only = cfg.aux_loss_weight * diag["balance_loss"] + cfg.router_z_loss_weight * diag["z_loss"]
    assert aux.item() == pytest.approx(router_only + 0.05, abs=1e-12)


def test_dropless_keeps_all_even_when_skewed():
    cfg = small_cfg(n_experts=4, top_k=1, capacity_factor=0.0)
    layer = fixed_router_layer(cfg)
    x = tokens_with_logits([[5.0, 0.0, 0.0, 0.0]] * 8, 8)  # every token wants expert 0
    layer(x)
    assert layer.last_diagnostics["kept_hist"].tolist() == [8, 0, 0, 0]
    assert layer.last_diagnostics["drop_rate"] == 0.0
    layer.cfg.capacity_factor = 1.0  # cap = next_pow2(ceil(8/4)) = 2
    layer(x)
    assert layer.last_diagnostics["kept_hist"].tolist() == [2, 0, 0, 0]
    # equal logits: the first two tokens (original order) win
    assert layer.last_diagnostics["keep_mask"].flatten().tolist() == [True, True] + [False] * 6


def test_top_k_equals_num_experts_moe_is_prob_weighted_sum():
    cfg = small_cfg(n_experts=3, top_k=3, capacity_factor=0.0, use_moc_collab=False, use_simple_collab=True)
    torch.manual_seed(0)
    layer = ReferenceMoCLayer(cfg).to(F64)
    x = torch.randn(5, 8, dtype=F64)
    out, _ = layer(x)
    P = torch.softmax(x @ layer.gate.weight.T, -1)  # [N, E]; top_k = E: p_k are P reordered
    ws = sum(P[:, e : e + 1] * swiglu_residual(ex, rms(2 * x, ex.norm.weight), x)
             for e, ex in enumerate(layer.experts))
    torch.testing.assert_close(out, ws @ layer.o_proj.weight.T, rtol=0, atol=1e-12)
    assert layer.last_diagnostics["kept_hist"].tolist() == [5, 5, 5]


def test_expert_with_zero_tokens_gets_no_gradient():
    cfg = small_cfg(n_experts=3, top_k=2, capacity_factor=0.0)
    layer = fixed_router_layer(cfg)
    x = tokens_with_logits([[1.0, 0.5, -50.0], [0.2, 1.0, -50.0], [2.0, 1.0, -50.0]], 8)
    out, aux = layer(x)
    assert layer.last_diagnostics["kept_hist"].tolist() == [3, 3, 0]
    (out.sum() + aux).backward()
    assert torch.isfinite(out).all()
    for p in layer.experts[2].parameters():
        assert p.grad is None or p.grad.abs().max() == 0
    assert layer.experts[0].w13.weight.grad.abs().max() > 0


def test_masked_softmax_hand():
    scores = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    got = masked_softmax(scores, mask)
    e = math.exp(1.0)
    want = torch.tensor([[1 / (1 + e), e / (1 + e)], [1.0, 0.0], [0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------
# Section 1: router losses
# ---------------------------------------------------------------------------
def test_router_aux_by_hand():
    # logits [[1,0],[0,1]], K=1: P = softmax rows, A = one-hot with p=1;
    # balance = 2 * (0.5*0.5 + 0.5*0.5) = 1, z = log(1+e)^2, nothing dropped.
    cfg = small_cfg(d_model=4, capacity_factor=4.0, aux_loss_weight=0.5, router_z_loss_weight=0.25,
                    drop_penalty_weight=1.0)
    layer = fixed_router_layer(cfg)
    x = tokens_with_logits([[1.0, 0.0], [0.0, 1.0]], 4)
    _, aux = layer(x)
    z = math.log(1 + math.e) ** 2
    assert layer.last_diagnostics["balance_loss"] == pytest.approx(1.0, abs=1e-14)
    assert layer.last_diagnostics["z_loss"] == pytest.approx(z, abs=1e-14)
    assert aux.item() == pytest.approx(0.5 * 1.0 + 0.25 * z, abs=1e-14)


def test_router_noise_only_in_training():
    cfg = small_cfg(n_experts=4, top_k=2, router_noise_std=1.0)
    torch.manual_seed(0)
    layer = ReferenceMoCLayer(cfg).to(F64)
    x = torch.randn(6, 8, dtype=F64)
    layer.eval()
    a, _ = layer(x)
    b, _ = layer(x)
    assert torch.equal(a, b)
    layer.train()
    c, _ = layer(x)
    assert not torch.allclose(a, c)


def test_router_weight_gets_aux_gradient():
    cfg = small_cfg(n_experts=4, top_k=2)
    layer = ReferenceMoCLayer(cfg).to(F64)
    _, aux = layer(torch.randn(6, 8, dtype=F64))
    aux.backward()
    assert layer.gate.weight.grad.abs().max() > 0


# ---------------------------------------------------------------------------
# Section 3: IRL
# ---------------------------------------------------------------------------
def test_ffn_hidden_dim():
    assert ffn_hidden_dim(small_cfg(d_model=32, multiple_of=16)) == 96  # 85.33 -> 96
    assert ffn_hidden_dim(small_cfg(d_model=40, n_heads=2, multiple_of=2)) == 108  # 106.67 -> 108
    assert ffn_hidden_dim(ReferenceConfig()) == 2048  # 768: 2048 exactly


def make_ffn(**kw):
    torch.manual_seed(0)
    ffn = ReferenceIRLFFN(small_cfg(**kw)).to(F64)
    with torch.no_grad():
        ffn.norm.weight.copy_(1 + 0.3 * torch.randn(8, dtype=F64))
    return ffn


def test_irl_one_step_is_plain_swiglu_residual():
    ffn = make_ffn(n_reasoning_steps=1)
    x = torch.randn(5, 8, dtype=F64)
    h, steps = ffn(x)
    torch.testing.assert_close(h, swiglu_residual(ffn, rms(2 * x, ffn.norm.weight), x), rtol=0, atol=1e-14)
    assert ffn.step_gate is None and steps.tolist() == [1.0] * 5


def test_irl_two_steps_non_adaptive():
    ffn = make_ffn(n_reasoning_steps=2, adaptive_reasoning=False)
    x = torch.randn(5, 8, dtype=F64)
    a = 1 / math.sqrt(2)
    delta = lambda h: swiglu_residual(ffn, rms(h + x, ffn.norm.weight), torch.zeros_like(x))
    h1 = x + a * delta(x)
    h2 = h1 + a * delta(h1)
    torch.testing.assert_close(ffn(x)[0], h2, rtol=0, atol=1e-14)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_irl_adaptive_activity(mode):
    ffn = make_ffn(n_reasoning_steps=2, adaptive_compute_mode=mode)
    x = torch.randn(3, 8, dtype=F64)
    a = 1 / math.sqrt(2)
    delta = lambda h: swiglu_residual(ffn, rms(h + x, ffn.norm.weight), torch.zeros_like(x))
    for q in ([0.2, 0.3, 0.5], [0.5, 0.3, 0.2], [0.3, 0.5, 0.2]):
        with torch.no_grad():
            ffn.step_gate.weight.zero_()
            ffn.step_gate.bias.copy_(torch.tensor(q, dtype=F64).log())
        if mode == "soft":
            a1, a2 = q[1] + q[2], q[2]  # P(steps >= 1), P(steps >= 2)
        else:
            top = max(range(3), key=lambda j: q[j])
            a1, a2 = float(top >= 1), float(top >= 2)
        h1 = x + a1 * a * delta(x)
        h2 = h1 + a2 * a * delta(h1)
        h, steps = ffn(x)
        torch.testing.assert_close(h, h2, rtol=0, atol=1e-14)
        assert steps[0].item() == pytest.approx(q[1] + 2 * q[2], abs=1e-14)


# ---------------------------------------------------------------------------
# Sections 4-5: mediator and fusion
# ---------------------------------------------------------------------------
def test_zero_rounds_fuses_mediator_0():
    cfg = small_cfg(moc_collab_steps=0, capacity_factor=0.5)
    layer = fixed_router_layer(cfg)
    x = tokens_with_logits([[3.0, 0.0], [5.0, 0.0], [0.0, 2.0], [0.0, 1.0]], 8)
    out, _ = layer(x)
    assert layer.last_diagnostics["keep_mask"].flatten().tolist() == [False, True, True, False]
    ex = [layer.experts[0], layer.experts[1]]
    ws = torch.stack([swiglu_residual(ex[e], rms(2 * x[n], ex[e].norm.weight), x[n]) for n, e in [(1, 0), (2, 1)]])
    med0 = layer.mediator + x[[1, 2]] @ layer.med_context.weight.T
    g = torch.sigmoid(x[[1, 2]] @ layer.fuse_gate.weight.T + layer.fuse_gate.bias)
    want = (g * med0 + (1 - g) * ws) @ layer.o_proj.weight.T
    torch.testing.assert_close(out[[1, 2]], want, rtol=0, atol=1e-13)
    torch.testing.assert_close(out[[0, 3]], x[[0, 3]] @ layer.o_proj.weight.T, rtol=0, atol=1e-14)
    layer.cfg.moc_zero_round_output = "ws"
    out_ws, _ = layer(x)
    torch.testing.assert_close(out_ws[[1, 2]], ws @ layer.o_proj.weight.T, rtol=0, atol=1e-13)


def test_one_round_by_hand_k1():
    # K=1, one kept expert per token: beta = 1, msg = v; non-adaptive (R=1).
    cfg = small_cfg(moc_collab_steps=1, capacity_factor=0.0)
    layer = fixed_router_layer(cfg)
    x = tokens_with_logits([[1.0, 0.0], [0.0, 1.0]], 8)
    out, _ = layer(x)
    W = lambda m: m.weight.T
    e = torch.stack([swiglu_residual(layer.experts[n], rms(2 * x[n], layer.experts[n].norm.weight), x[n])
                     for n in range(2)])  # token n uses expert n
    med = layer.mediator + x @ W(layer.med_context)
    mn = rms(med, layer.mediator_norm.weight)
    v = rms(e, layer.expert_norm.weight) @ W(layer.exp_v)
    mlp = layer.med_mlp
    med1 = med + F.silu(rms((mn + v) @ W(mlp[0]), mlp[1].weight)) @ W(mlp[3])
    g = torch.sigmoid(e @ W(layer.exp_feedback_e) + layer.exp_feedback_e.bias + med1 @ W(layer.exp_feedback_m))
    e1 = e + g * (rms(med1, layer.mediator_norm.weight) @ W(layer.med_to_exp))
    gam = torch.sigmoid(x @ W(layer.fuse_gate) + layer.fuse_gate.bias)
    want = (gam * med1 + (1 - gam) * e1) @ W(layer.o_proj)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-13)
    assert layer.last_diagnostics["avg_collab_steps"] == 1.0


# ---------------------------------------------------------------------------
# Block: RoPE and attention
# ---------------------------------------------------------------------------
def test_rope_rotates_interleaved_pairs():
    hd, T, theta = 8, 5, 10000.0
    x = torch.zeros(1, 1, T, hd, dtype=F64)
    x[..., 0] = 1.0  # pair (0, 1)
    x[..., 2] = 1.0  # pair (2, 3)
    y = apply_rope_interleaved(x, theta)
    t = torch.arange(T, dtype=F64)
    f1 = theta ** (-2 / hd)
    torch.testing.assert_close(y[0, 0, :, 0], t.cos(), rtol=0, atol=1e-14)
    torch.testing.assert_close(y[0, 0, :, 1], t.sin(), rtol=0, atol=1e-14)
    torch.testing.assert_close(y[0, 0, :, 2], (t * f1).cos(), rtol=0, atol=1e-14)
    torch.testing.assert_close(y[0, 0, :, 3], (t * f1).sin(), rtol=0, atol=1e-14)
    assert y[..., 4:].abs().max() == 0  # no mixing with the other half (not the "halves" layout)


def test_attention_is_causal():
    cfg = config_for_kind("moc", d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=32,
                          multiple_of=8, max_seq_len=16, n_experts=2, top_k=1, capacity_factor=0.0)
    torch.manual_seed(0)
    model = ReferenceModel(cfg).to(F64).eval()
    idx = torch.randint(0, 32, (1, 10))
    idx2 = idx.clone()
    idx2[0, 6:] = (idx2[0, 6:] + 1) % 32
    a, _, _ = model(idx)
    b, _, _ = model(idx2)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------
TINY = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=64)
EXPERTS = dict(n_experts=4, top_k=2)
MODEL_CASES = {
    "dense": ("dense", {}),
    "irl_only": ("irl_only", {"n_reasoning_steps": 3}),
    "irl_only_hard": ("irl_only", {"n_reasoning_steps": 3, "adaptive_compute_mode": "hard"}),
    "moe": ("moe", EXPERTS),
    "moc": ("moc", EXPERTS),
    "moc_hard": ("moc", {**EXPERTS, "adaptive_compute_mode": "hard", "n_reasoning_steps": 3}),
    "moc_lowrank_nomu_nofb": ("moc", {**EXPERTS, "moc_low_rank_message_dim": 8, "moc_use_mediator": False,
                                      "moc_expert_feedback": False}),
    "moc_drops_penalties": ("moc", {**EXPERTS, "capacity_factor": 0.3, "reasoning_step_penalty_weight": 0.1,
                                    "collaboration_step_penalty_weight": 0.1}),
    "moc_R0": ("moc", {**EXPERTS, "moc_collab_steps": 0}),
    "moc_topk_E_dropless": ("moc", {"n_experts": 4, "top_k": 4, "capacity_factor": 0.0}),
    "moc_first_layer_only": ("moc", {**EXPERTS, "moc_layers": [0], "n_reasoning_steps": 2}),
    "collab_only": ("collab_only", EXPERTS),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_fp64_forward_backward(case):
    kind, over = MODEL_CASES[case]
    cfg = config_for_kind(kind, **TINY, **over)
    torch.manual_seed(0)
    model = ReferenceModel(cfg).to(F64).train()
    idx = torch.randint(0, 64, (2, 32))
    logits, loss, aux = model(idx, idx)
    assert logits.shape == (2, 32, 64) and logits.dtype == F64 and loss.dtype == F64
    ce = F.cross_entropy(logits.flatten(0, 1), idx.flatten())
    assert loss.item() == pytest.approx((ce + aux).item(), abs=1e-12)
    n_moc = cfg.num_moc_layers
    want_aux = sum(d["aux"] for d in model.last_diagnostics if d is not None) / max(1, n_moc)
    assert aux.item() == pytest.approx(want_aux, abs=1e-12)
    if n_moc == 0:
        assert aux.item() == 0.0
    loss.backward()
    assert model.transformer.wte.weight.grad.abs().max() > 0
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    for block in model.transformer.h:
        if block.is_moc:
            assert block.feed_forward.gate.weight.grad.abs().max() > 0


def test_tiny_model_is_fast():
    cfg = config_for_kind("moc", **TINY, **EXPERTS)
    model = ReferenceModel(cfg)
    idx = torch.randint(0, 64, (2, 32))
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        model(idx, idx)[1].backward()
        best = min(best, time.perf_counter() - t0)
    assert best < 1.0


def test_init_scales_output_projections():
    cfg = config_for_kind("moc", d_model=64, n_layers=8, n_heads=4, n_kv_heads=4, vocab_size=64,
                          multiple_of=16, max_seq_len=16, n_experts=2, top_k=1)
    torch.manual_seed(0)
    model = ReferenceModel(cfg)
    want = 0.02 / math.sqrt(2 * 8)
    blk = model.transformer.h[0]
    assert blk.attention.o_proj.weight.std().item() == pytest.approx(want, rel=0.1)
    assert blk.feed_forward.o_proj.weight.std().item() == pytest.approx(want, rel=0.1)
    assert blk.attention.wqkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert blk.feed_forward.experts[0].w2.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert blk.feed_forward.fuse_gate.bias.abs().max() == 0
    dense = ReferenceModel(config_for_kind("dense", **{**TINY, "d_model": 64, "n_layers": 8}))
    assert dense.transformer.h[0].feed_forward.w2.weight.std().item() == pytest.approx(want, rel=0.1)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_parameter_names_match_spec():
    cfg = config_for_kind("moc", **TINY, n_experts=2, top_k=1, n_reasoning_steps=2, moc_collab_steps=2,
                          moc_low_rank_message_dim=4)
    model = ReferenceModel(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d, f = 32, ffn_hidden_dim(cfg)
    want = {"transformer.wte.weight": (64, d), "lm_head.weight": (64, d), "transformer.ln_f.weight": (d,)}
    for i in range(2):
        p = f"transformer.h.{i}."
        want.update({p + "attn_norm.weight": (d,), p + "attention.wqkv.weight": (d + 2 * 16, d),
                     p + "attention.o_proj.weight": (d, d), p + "attention.q_norm.weight": (8,),
                     p + "attention.k_norm.weight": (8,), p + "ffn_norm.weight": (d,)})
        p += "feed_forward."
        want[p + "gate.weight"] = (2, d)
        for e in range(2):
            want.update({f"{p}experts.{e}.w13.weight": (2 * f, d), f"{p}experts.{e}.w2.weight": (d, f),
                         f"{p}experts.{e}.norm.weight": (d,), f"{p}experts.{e}.step_gate.weight": (3, d),
                         f"{p}experts.{e}.step_gate.bias": (3,)})
        want.update({p + "mediator": (1, d), p + "med_context.weight": (d, d), p + "mediator_norm.weight": (d,),
                     p + "expert_norm.weight": (d,), p + "med_q.weight": (d, d), p + "exp_k.weight": (d, d),
                     p + "exp_v_down.weight": (4, d), p + "exp_v_up.weight": (d, 4),
                     p + "med_mlp.0.weight": (d, d), p + "med_mlp.1.weight": (d,), p + "med_mlp.3.weight": (d, d),
                     p + "med_to_exp.weight": (d, d), p + "exp_feedback_e.weight": (1, d),
                     p + "exp_feedback_e.bias": (1,), p + "exp_feedback_m.weight": (1, d),
                     p + "collab_step_gate.weight": (3, d), p + "collab_step_gate.bias": (3,),
                     p + "fuse_gate.weight": (1, d), p + "fuse_gate.bias": (1,), p + "o_proj.weight": (d, d)})
    assert shapes == want
    dense = ReferenceModel(config_for_kind("irl_only", **TINY, n_reasoning_steps=2))
    ff = {k.split("feed_forward.")[1] for k in dense.state_dict() if "h.0.feed_forward." in k}
    assert ff == {"w13.weight", "w2.weight", "norm.weight", "step_gate.weight", "step_gate.bias"}


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module."])
def test_checkpoint_round_trip(tmp_path, prefix):
    cfg = config_for_kind("moc", **TINY, **EXPERTS, moc_low_rank_message_dim=8)
    torch.manual_seed(0)
    model = ReferenceModel(cfg).eval()
    path = tmp_path / "latest_checkpoint.pt"
    save_research_checkpoint(model, cfg, path, prefix=prefix, step=7)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert all(k.startswith(prefix) for k in raw["model"])
    assert prefix + "transformer.h.1.feed_forward.exp_v_up.weight" in raw["model"]
    assert raw["step"] == 7 and "optimizer" in raw
    assert raw["config"]["model"]["n_experts"] == 4
    assert not set(REFERENCE_ONLY_FIELDS) & set(raw["config"]["model"])
    loaded, cfg2, _ = load_research_checkpoint(path)
    assert cfg2 == cfg
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(loaded.eval()(idx)[0], model(idx)[0], rtol=0, atol=0)
    loaded64, _, _ = load_research_checkpoint(path, dtype=F64)
    assert loaded64.lm_head.weight.dtype == F64
