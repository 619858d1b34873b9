"""Research variants against the fp64 oracle written from MOC_MATH.md "Research variants".

- Gate entropy regularization: H(q) and its gradient, the β schedule at chosen steps, and the
  MoC layer with the term on (output, aux, input gradient, every parameter gradient) against
  tests/reference/variants_reference.py on top of the main oracle.
- MoC v1: forward, aux and every gradient against the oracle's hand-written layer.
- Stage II: every non-gate parameter bit-identical after optimizer steps, the gates moved.
Tolerances as for the main layer: fp64 rtol 1e-6, fp32 rtol 1e-4.
"""

import json
import math
import os

import pytest
import torch

from megatron_moc.config import MoCConfig, tiny_config
from megatron_moc.model.gpt import build_model
from megatron_moc.model.io import load_model_state
from megatron_moc.moc.adaptive import gate_entropy, gate_entropy_beta
from megatron_moc.moc.v1 import MoCV1Layer
from megatron_moc.training import stage2
from megatron_moc.training.engine import param_groups
from tests.reference import variants_reference as vref
from tests.reference.lunaris_reference import ReferenceModel, config_for_kind
from tests.unit.test_layer_vs_reference import BASE, grads_in_our_layout
from tools.import_lunaris import config_from_research, convert_state_dict

BETA0, BETA_FINAL, WARMUP = 0.1, 0.05, 0.1


# ----------------------------------------------------------------------------- H(q)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_gate_entropy_value_and_gradient(temperature):
    torch.manual_seed(0)
    logits = torch.randn(9, 4, dtype=torch.float64) * 2
    weights = torch.randn(9, dtype=torch.float64)
    z = logits.clone().requires_grad_()
    h = gate_entropy(z, temperature)
    torch.testing.assert_close(h, vref.entropy(logits, temperature), rtol=1e-12, atol=1e-14)
    (h * weights).sum().backward()
    expected = weights[:, None] * vref.entropy_grad_wrt_logits(logits, temperature)
    torch.testing.assert_close(z.grad, expected, rtol=1e-10, atol=1e-13)
    # fp32 against the fp64 oracle
    torch.testing.assert_close(gate_entropy(logits.float(), temperature).double(),
                               vref.entropy(logits, temperature), rtol=1e-5, atol=1e-6)


def test_gate_entropy_floor_and_extremes():
    # One-hot-like rows: q_j < 1e-9 is read as 1e-9 inside the log; H -> 0, uniform -> log J.
    logits = torch.tensor([[0.0, 0.0, 0.0], [60.0, 0.0, 0.0], [0.0, -50.0, 10.0]],
                          dtype=torch.float64)
    h = gate_entropy(logits, 1.0)
    torch.testing.assert_close(h, vref.entropy(logits, 1.0), rtol=1e-12, atol=1e-15)
    assert h[0].item() == pytest.approx(math.log(3.0), rel=1e-12)
    assert 0 <= h[1].item() < 1e-20


# ----------------------------------------------------------------------------- β schedule
def test_beta_schedule_at_chosen_steps():
    # Worked by hand: T = 100, β_0 0.1, β_final 0.05, warmup 0.1 → hold to step 10, then
    # β(t) = 0.1 − 0.05·(t/100 − 0.1)/0.9.
    by_hand = {1: 0.1, 10: 0.1, 11: 0.1 - 0.05 * 0.01 / 0.9, 55: 0.075, 91: 0.055,
               100: 0.05}
    for step, value in by_hand.items():
        assert gate_entropy_beta(BETA0, BETA_FINAL, WARMUP, step, 100) == pytest.approx(
            value, abs=1e-15), step
    for total in (7, 100, 333):
        for step in range(1, total + 1):
            assert gate_entropy_beta(BETA0, BETA_FINAL, WARMUP, step, total) == pytest.approx(
                vref.beta_at(step, total, BETA0, BETA_FINAL, WARMUP), abs=1e-15)
    # warmup 0: linear from the start; warmup 1: constant β_0; rising schedules work too.
    assert gate_entropy_beta(0.2, 0.0, 0.0, 50, 100) == pytest.approx(0.1)
    assert gate_entropy_beta(0.2, 0.0, 1.0, 100, 100) == pytest.approx(0.2)
    assert gate_entropy_beta(0.01, 0.03, 0.5, 100, 100) == pytest.approx(0.03)


def test_set_train_progress_reaches_every_moc_layer():
    model = build_model(tiny_config(moc_gate_entropy_coeff=BETA0))
    model.set_train_progress(55, 100)
    layers = model.moc_layers()
    assert len(layers) == 2 and all(l.gate_entropy_beta == pytest.approx(0.075) for l in layers)
    ids = torch.randint(0, 512, (2, 8))
    model.lm_loss(ids, ids)
    for st in model.routing_stats():
        assert st.gate_entropy_beta.item() == pytest.approx(0.075)
        assert st.step_gate_entropy.item() > 0 and st.round_gate_entropy.item() > 0


def test_zero_beta0_builds_nothing():
    """β_0 = 0 is off even with β_final > 0: the layer output, aux and stats are those of
    the default config, bit for bit."""
    torch.manual_seed(3)
    a = build_model(tiny_config())
    b = build_model(tiny_config(moc_gate_entropy_final=0.3))
    b.load_state_dict(a.state_dict())
    b.set_train_progress(90, 100)
    ids = torch.randint(0, 512, (2, 8))
    ta, _, aux_a = a.lm_loss(ids, ids)
    tb, _, aux_b = b.lm_loss(ids, ids)
    assert torch.equal(ta, tb) and torch.equal(aux_a, aux_b)
    assert all(st.gate_entropy_beta.item() == 0 and st.step_gate_entropy.item() == 0
               for st in b.routing_stats())


# ----------------------------------------------------------------------------- H in the layer
ENTROPY_CASES = {
    "soft_S2_R2": ("moc", dict(n_reasoning_steps=2, moc_collab_steps=2)),
    "hard_S2_R2": ("moc", dict(n_reasoning_steps=2, adaptive_compute_mode="hard")),
    "soft_S3_R1": ("moc", dict(n_reasoning_steps=3, moc_collab_steps=1)),  # no round gate
    "heavy_drops": ("moc", dict(n_reasoning_steps=2, capacity_factor=0.25)),
    "temperatures": ("moc", dict(n_reasoning_steps=2, reasoning_gate_temperature=0.5,
                                 collaboration_gate_temperature=2.0)),
    "non_adaptive": ("moc", dict(n_reasoning_steps=2, adaptive_reasoning=False,
                                 adaptive_collaboration=False)),
    "collab_only": ("collab_only", dict()),  # round gate only
    "moe": ("moe", dict()),  # no gate: the term is 0
}


def _entropy_pair(kind, overrides, dtype):
    ref_cfg = config_for_kind(kind, **{**BASE, **overrides, "moc_zero_round_output": "ws"})
    torch.manual_seed(0)
    ref = ReferenceModel(ref_cfg).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, p in ref.named_parameters():  # sharper gates: H away from log(S+1)
            if "step_gate" in name:
                p.mul_(8.0)
    cfg = config_from_research(ref_cfg.research_dict(), params_dtype=dtype,
                               use_cpu_initialization=True, moc_gate_entropy_coeff=BETA0,
                               moc_gate_entropy_final=BETA_FINAL,
                               moc_gate_entropy_warmup_frac=WARMUP)
    ours = build_model(cfg)
    load_model_state(ours, convert_state_dict(ref.state_dict(), cfg), source="oracle")
    return ref, ours, cfg


def _check_entropy_case(kind, overrides, dtype, rtol, atol, step=37, total=50):
    ref, ours, cfg = _entropy_pair(kind, overrides, dtype)
    ours.set_train_progress(step, total)
    beta = vref.beta_at(step, total, BETA0, BETA_FINAL, WARMUP)
    ref_layer, our_layer = ref.transformer.h[0].feed_forward, ours.decoder.layers[0].mlp
    torch.manual_seed(1)
    x = torch.randn(24, BASE["d_model"], dtype=dtype)
    probe = torch.randn_like(x)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()

    ref_out, ref_aux = ref_layer(x_ref)
    h_irl, h_round = vref.gate_entropy_terms(ref_layer, x_ref)
    ref_aux = ref_aux - beta * (h_irl + h_round)
    our_out, _ = our_layer(x_ours)
    our_aux = our_layer.last_aux_loss
    torch.testing.assert_close(our_out, ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(our_aux.to(dtype), ref_aux.to(dtype), rtol=rtol, atol=atol)
    st = our_layer.last_stats
    torch.testing.assert_close(st.step_gate_entropy.double(), h_irl.detach().double(),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(st.round_gate_entropy.double(), h_round.detach().double(),
                               rtol=1e-4, atol=1e-6)
    assert st.gate_entropy_beta.item() == pytest.approx(beta, rel=1e-6)

    ((ref_out * probe).sum() + 3.0 * ref_aux.to(dtype)).backward()
    ((our_out * probe).sum() + 3.0 * our_aux.to(dtype)).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=rtol, atol=atol)
    expected = grads_in_our_layout(ref, cfg)
    checked_gates = 0
    for name, p in ours.named_parameters():
        if ".mlp." not in name:
            continue
        if p.grad is None:
            assert not expected[name].any(), f"{name} got no gradient, the oracle's is nonzero"
            continue
        torch.testing.assert_close(p.grad, expected[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")
        checked_gates += "step_gate" in name
    return h_irl, h_round, checked_gates


@pytest.mark.parametrize("case", sorted(ENTROPY_CASES))
def test_gate_entropy_layer_fp64(case):
    kind, overrides = ENTROPY_CASES[case]
    h_irl, h_round, gates = _check_entropy_case(kind, overrides, torch.float64, 1e-6, 1e-9)
    adaptive_steps = overrides.get("n_reasoning_steps", 1) > 1 and overrides.get(
        "adaptive_reasoning", True)
    adaptive_rounds = (kind != "moe" and overrides.get("moc_collab_steps", 2) > 1
                       and overrides.get("adaptive_collaboration", True))
    assert (h_irl.item() > 0) == adaptive_steps and (h_round.item() > 0) == adaptive_rounds
    assert (gates > 0) == (adaptive_steps or adaptive_rounds)


@pytest.mark.parametrize("case", ["soft_S2_R2", "heavy_drops", "hard_S2_R2"])
def test_gate_entropy_layer_fp32(case):
    kind, overrides = ENTROPY_CASES[case]
    _check_entropy_case(kind, overrides, torch.float32, 1e-4, 1e-5)


# (Gate entropy with EP > 1: tests/e2e/test_expert_parallel.py, the per-row entropies come back
# through the expert all-to-all and equal one process's.)


# ----------------------------------------------------------------------------- MoC v1
V1_CASES = {
    "E4_K2": dict(),
    "E4_K1": dict(moe_router_topk=1),
    "E4_K4": dict(moe_router_topk=4),
    "E6_K3_tau": dict(num_moe_experts=6, moe_router_topk=3, moc_v1_router_temperature=0.5),
    "heads2": dict(num_attention_heads=2),
}


def _v1_config(dtype, **overrides):
    values = dict(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=64,
                  max_position_embeddings=64, moc_multiple_of=16, num_moe_experts=4,
                  moe_router_topk=2, moc_irl_steps=1, moc_model_kind="moc_v1",
                  params_dtype=dtype, use_cpu_initialization=True)
    values.update(overrides)
    return MoCConfig(**values)


def v1_state_from_reference(ref: vref.ReferenceMoCV1Layer, tensors=None):
    """The oracle's parameters (or `tensors`, e.g. its gradients, by the same names) in our
    layout. Linear in its inputs (transposes, stacking), so it maps gradients too."""
    t = tensors if tensors is not None else {k: v for k, v in ref.named_parameters()}
    E = ref.E
    out = {
        "experts.w13": torch.stack([torch.cat([t[f"w1.{e}.weight"].t(), t[f"w3.{e}.weight"].t()],
                                              dim=1) for e in range(E)]),
        "experts.w2": torch.stack([t[f"w2.{e}.weight"].t() for e in range(E)]),
        "router_norm.weight": t["router_norm.weight"], "router.weight": t["router.weight"],
        "router.bias": t["router.bias"], "collab_norm.weight": t["collab_norm.weight"],
        "collab_ffn.0.weight": t["ffn_c1.weight"], "collab_ffn.0.bias": t["ffn_c1.bias"],
        "collab_ffn.2.weight": t["ffn_c2.weight"], "collab_ffn.2.bias": t["ffn_c2.bias"],
        "o_proj.weight": t["o_proj.weight"],
    }
    for attn in ("router_attn", "collab_attn"):
        out[f"{attn}.in_proj_weight"] = t[f"{attn}.in_proj_weight"]
        out[f"{attn}.in_proj_bias"] = t[f"{attn}.in_proj_bias"]
        out[f"{attn}.out_proj.weight"] = t[f"{attn}.out_proj_weight"]
        out[f"{attn}.out_proj.bias"] = t[f"{attn}.out_proj_bias"]
    return out


def _check_v1(case, dtype, rtol, atol, tokens=20):
    cfg = _v1_config(dtype, **V1_CASES[case])
    torch.manual_seed(0)
    ref = vref.ReferenceMoCV1Layer(
        cfg.hidden_size, cfg.num_attention_heads, cfg.num_moe_experts, cfg.moe_router_topk,
        cfg.moe_ffn_hidden_size, cfg.moe_aux_loss_coeff, cfg.moc_v1_router_temperature).to(dtype)
    with torch.no_grad():  # every weight off its init, and the router sharp enough to matter
        for name, p in ref.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "router" in name else 0.1))
    ours = MoCV1Layer(cfg)
    ours.load_state_dict(v1_state_from_reference(ref), strict=True)

    torch.manual_seed(1)
    x = torch.randn(tokens, cfg.hidden_size, dtype=dtype)
    probe = torch.randn_like(x)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_out, ref_aux = ref(x_ref)
    our_out, none = ours(x_ours)
    assert none is None
    our_aux = ours.last_aux_loss
    torch.testing.assert_close(our_out, ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(our_aux.to(dtype), ref_aux.to(dtype), rtol=rtol, atol=atol)
    hist = torch.bincount(ref.last["topi"].reshape(-1), minlength=cfg.num_moe_experts)
    assert torch.equal(ours.last_stats.kept_hist, hist.float())

    # the aux weight is large here so its gradient is not lost under the output's
    ((ref_out * probe).sum() + 300.0 * ref_aux.to(dtype)).backward()
    ((our_out * probe).sum() + 300.0 * our_aux.to(dtype)).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=rtol, atol=atol)
    expected = v1_state_from_reference(ref, {k: p.grad for k, p in ref.named_parameters()})
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")
    return ref, ours


@pytest.mark.parametrize("case", sorted(V1_CASES))
def test_moc_v1_fp64(case):
    _check_v1(case, torch.float64, 1e-6, 1e-9)


@pytest.mark.parametrize("case", ["E4_K2", "E6_K3_tau"])
def test_moc_v1_fp32(case):
    _check_v1(case, torch.float32, 1e-4, 1e-5)


def test_moc_v1_aux_terms_reach_router_and_attention():
    """The aux loss alone: its gradient reaches the router (variance term) and the fusion
    attention (entropy term), and equals the oracle's."""
    cfg = _v1_config(torch.float64)
    torch.manual_seed(0)
    ref = vref.ReferenceMoCV1Layer(32, 4, 4, 2, cfg.moe_ffn_hidden_size).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ours = MoCV1Layer(cfg)
    ours.load_state_dict(v1_state_from_reference(ref))
    x = torch.randn(16, 32, dtype=torch.float64)
    ref(x)[1].backward()
    ours(x)
    ours.last_aux_loss.backward()
    expected = v1_state_from_reference(ref, {k: p.grad for k, p in ref.named_parameters()})
    for name in ("router.weight", "router.bias", "collab_attn.in_proj_weight"):
        assert ours.get_parameter(name).grad.abs().sum() > 0, name
        torch.testing.assert_close(ours.get_parameter(name).grad, expected[name], rtol=1e-6,
                                   atol=1e-12)


def test_moc_v1_model_sums_aux_over_layers():
    cfg = tiny_config(moc_model_kind="moc_v1", moc_irl_steps=1, num_layers=3)
    model = build_model(cfg)
    ids = torch.randint(0, 512, (2, 8))
    total, ce, aux = model.lm_loss(ids, ids)
    layers = model.moc_layers()
    assert len(layers) == 3 and all(isinstance(l, MoCV1Layer) for l in layers)
    torch.testing.assert_close(aux, torch.stack([l.last_aux_loss for l in layers]).mean())
    torch.testing.assert_close(total, ce + aux)
    assert len(model.routing_stats()) == 3


def test_moc_v1_config_checks():
    with pytest.raises(ValueError, match="moc_irl_steps"):
        _v1_config(torch.float32, moc_irl_steps=2)
    with pytest.raises(ValueError, match="num_moe_experts"):
        _v1_config(torch.float32, num_moe_experts=1, moe_router_topk=1)
    with pytest.raises(ValueError, match="moc_v1_router_temperature"):
        _v1_config(torch.float32, moc_v1_router_temperature=0.0)
    cfg = _v1_config(torch.float32)
    assert cfg.experts_per_token == 4 and not cfg.has_mediator


# ----------------------------------------------------------------------------- Stage II
def test_stage2_leaves_non_gates_bit_identical():
    torch.manual_seed(0)
    model = build_model(tiny_config(moc_irl_steps=2, moc_collab_rounds=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gates = stage2.freeze_all_but_gates(model)
    assert any(n.endswith("experts.step_gate_weight") for n in gates)
    assert any(n.endswith("experts.step_gate_bias") for n in gates)
    assert any(n.endswith("collab_step_gate.weight") for n in gates)
    assert any(n.endswith("collab_step_gate.bias") for n in gates)
    assert all("step_gate" in n for n in gates)
    # weight decay on: frozen parameters must not even be decayed
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(gates)
    for _ in range(3):
        ids = torch.randint(0, 512, (2, 16))
        total, _, _ = model.lm_loss(ids, ids)
        opt.zero_grad()
        total.backward()
        opt.step()
    for name, p in model.named_parameters():
        if name in gates:
            assert not torch.equal(p, before[name]), f"gate {name} did not move"
        else:
            assert torch.equal(p, before[name]), f"{name} changed in Stage II"
            assert p.grad is None


@pytest.mark.parametrize("overrides", [
    dict(moc_model_kind="moe", moc_irl_steps=1),
    dict(moc_model_kind="moc_v1", moc_irl_steps=1),
    dict(moc_irl_steps=1, moc_collab_rounds=1),
])
def test_stage2_refuses_models_without_gates(overrides):
    model = build_model(tiny_config(**overrides))
    with pytest.raises(ValueError, match="no adaptive gate"):
        stage2.freeze_all_but_gates(model)


def test_stage2_engine_plan(tmp_path):
    from types import SimpleNamespace

    def args(start=None, src=None):
        return SimpleNamespace(stage2_start_step=start, stage2_from=src, stage2_lr=1e-3)

    run = tmp_path / "run"
    run.mkdir()
    newest = {"tag": None}  # what checkpoint.find_checkpoint would return

    def find(load_dir):
        assert load_dir == str(run)
        return newest["tag"]

    def save_at(step):
        (run / f"step_{step}").mkdir()
        (run / f"step_{step}" / "trainer_state.json").write_text(json.dumps({"step": step}))
        newest["tag"] = f"step_{step}"

    plan = lambda a: stage2.engine_plan(a, str(run), find)  # noqa: E731
    assert plan(args()) == (False, None, False)
    assert plan(args(5)) == (False, None, False)
    assert plan(args(0, "/src")) == (True, "/src", False)
    save_at(3)
    assert plan(args(5)) == (False, None, False)
    save_at(5)  # the full-model engine's checkpoint at the start: its weights, step and RNG
    assert plan(args(5)) == (True, str(run / "step_5"), True)
    save_at(7)  # the gate-only engine's own checkpoint: loads whole
    assert plan(args(5)) == (True, None, False)
    assert plan(args(0, "/src")) == (True, None, False)  # a Stage II run resumes itself
    assert stage2.active(args(5), 5) and not stage2.active(args(5), 4)
    assert not stage2.active(args(), 10**6)


def test_stage2_argument_checks(tmp_path):
    from types import SimpleNamespace

    cfg = tiny_config()
    with pytest.raises(ValueError, match="stage2_from"):
        stage2.check_args(SimpleNamespace(stage2_start_step=3, stage2_from=str(tmp_path),
                                          stage2_lr=1e-3), cfg)
    with pytest.raises(ValueError, match="not a training checkpoint"):
        stage2.check_args(SimpleNamespace(stage2_start_step=None, stage2_from=str(tmp_path),
                                          stage2_lr=1e-3), cfg)
    with pytest.raises(ValueError, match="stage2_lr"):
        stage2.check_args(SimpleNamespace(stage2_start_step=2, stage2_from=None,
                                          stage2_lr=0.0), cfg)
    with pytest.raises(ValueError, match="no adaptive gate"):
        stage2.check_args(SimpleNamespace(stage2_start_step=2, stage2_from=None, stage2_lr=1e-3),
                          tiny_config(moc_model_kind="moe", moc_irl_steps=1))
