"""The MoC layer (and the dense IRL FFN) against the fp64 oracle written from MOC_MATH.md.

The oracle (tests/reference/lunaris_reference.py) imports nothing from megatron_moc. Weights
go from oracle to library through the research-checkpoint importer's key mapping, which also
maps gradients (the mapping is transposes, stacking and reordering: linear). For each case the
output, the aux loss, the input gradient and every parameter gradient must agree:
fp64 rtol 1e-6, fp32 rtol 1e-4.
"""

import pytest
import torch

from megatron_moc.model.gpt import build_model
from megatron_moc.model.io import load_model_state
from tests.reference.lunaris_reference import ReferenceModel, config_for_kind
from tools.import_lunaris import config_from_research, convert_state_dict

BASE = dict(d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=64, multiple_of=16,
            max_seq_len=64, n_experts=4, top_k=2)

CASES = {
    # name: (kind, overrides)
    **{f"soft_S{S}_R{R}": ("moc", dict(n_reasoning_steps=S, moc_collab_steps=R))
       for S in (1, 2, 3) for R in (0, 1, 2)},
    "hard_S2_R2": ("moc", dict(n_reasoning_steps=2, adaptive_compute_mode="hard")),
    "hard_S3_R2": ("moc", dict(n_reasoning_steps=3, adaptive_compute_mode="hard")),
    "feedback_off": ("moc", dict(moc_expert_feedback=False)),
    "mu_off": ("moc", dict(moc_use_mediator=False)),
    "low_rank": ("moc", dict(moc_low_rank_message_dim=8)),
    "non_adaptive": ("moc", dict(n_reasoning_steps=3, adaptive_reasoning=False,
                                 adaptive_collaboration=False)),
    "penalties": ("moc", dict(reasoning_step_penalty_weight=0.1,
                              collaboration_step_penalty_weight=0.2)),
    "heavy_drops": ("moc", dict(capacity_factor=0.25)),
    "heavy_drops_hard": ("moc", dict(capacity_factor=0.25, adaptive_compute_mode="hard")),
    "dropless": ("moc", dict(capacity_factor=0.0)),
    "top_k_equals_E": ("moc", dict(top_k=4)),
    "temperatures": ("moc", dict(reasoning_gate_temperature=0.5,
                                 collaboration_gate_temperature=2.0)),
    "moe": ("moe", dict()),
    "moe_drops": ("moe", dict(capacity_factor=0.25)),
    "collab_only": ("collab_only", dict()),
    "dense": ("dense", dict()),
    "irl_only_soft": ("irl_only", dict(n_reasoning_steps=3)),
    "irl_only_hard": ("irl_only", dict(n_reasoning_steps=2, adaptive_compute_mode="hard")),
}


def build_pair(kind, overrides, dtype, backend="auto", seed=0):
    base = dict(BASE)
    if kind in ("dense", "irl_only"):
        base["n_experts"] = None
    ref_cfg = config_for_kind(kind, **{**base, **overrides, "moc_zero_round_output": "ws"})
    torch.manual_seed(seed)
    ref = ReferenceModel(ref_cfg).to(dtype)
    with torch.no_grad():  # move every weight off its init value (norms = 1, biases = 0)
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cfg = config_from_research(ref_cfg.research_dict(), params_dtype=dtype,
                               use_cpu_initialization=True, moc_expert_backend=backend,
                               # "triton": the mediator's fused kernels too
                               moc_mediator_backend="triton" if backend == "triton" else "auto")
    ours = build_model(cfg)
    load_model_state(ours, convert_state_dict(ref.state_dict(), cfg), source="oracle")
    return ref, ours, cfg


def ref_layer_outputs(ref, x, is_moc):
    """(output, aux loss, layer) of the oracle's first feed-forward."""
    layer = ref.transformer.h[0].feed_forward
    out, aux = layer(x)
    return out, (aux if is_moc else torch.zeros((), dtype=x.dtype)), layer


def our_layer_outputs(ours, x, is_moc):
    """(output, aux loss) of our first MLP / MoC layer."""
    layer = ours.decoder.layers[0].mlp
    out, _ = layer(x)
    return out, (layer.last_aux_loss if is_moc else torch.zeros((), dtype=x.dtype))


def grads_in_our_layout(ref, cfg):
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p))
             for k, p in ref.named_parameters()}
    grads["lm_head.weight"] = grads["transformer.wte.weight"]
    return convert_state_dict(grads, cfg, source="oracle grads")


def check_case(kind, overrides, dtype, rtol, atol, backend="auto", tokens=24, device="cpu"):
    """The oracle runs on the CPU; our layer runs on `device` (the Triton backend needs CUDA
    tensors unless TRITON_INTERPRET is set) and is compared back on the CPU."""
    ref, ours, cfg = build_pair(kind, overrides, dtype, backend)
    ours.to(device)
    is_moc = cfg.has_experts
    torch.manual_seed(1)
    x = torch.randn(tokens, BASE["d_model"], dtype=dtype)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().to(device).requires_grad_()
    probe = torch.randn(tokens, BASE["d_model"], dtype=dtype)

    ref_out, ref_aux, ref_layer = ref_layer_outputs(ref, x_ref, is_moc)
    our_out, our_aux = our_layer_outputs(ours, x_ours, is_moc)
    torch.testing.assert_close(our_out.cpu(), ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(our_aux.cpu().to(dtype), ref_aux.to(dtype), rtol=rtol, atol=atol)

    ((ref_out * probe).sum() + 3.0 * ref_aux.to(dtype)).backward()
    ((our_out * probe.to(device)).sum() + 3.0 * our_aux.to(dtype)).backward()
    torch.testing.assert_close(x_ours.grad.cpu(), x_ref.grad, rtol=rtol, atol=atol)
    expected = grads_in_our_layout(ref, cfg)
    checked = 0
    for name, p in ours.named_parameters():
        if ".mlp." not in name:
            continue
        if p.grad is None:  # e.g. hard-mode gates: argmax has no gradient
            assert not expected[name].any(), f"{name} got no gradient, the oracle's is nonzero"
            continue
        torch.testing.assert_close(p.grad.cpu(), expected[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")
        checked += 1
    assert checked > 0
    return ref_layer


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp64(case):
    kind, overrides = CASES[case]
    check_case(kind, overrides, torch.float64, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("case", ["soft_S2_R2", "hard_S2_R2", "heavy_drops", "moe", "low_rank",
                                  "dropless", "irl_only_hard"])
@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_fp32(case, backend):
    kind, overrides = CASES[case]
    check_case(kind, overrides, torch.float32, rtol=1e-4, atol=1e-5, backend=backend)


def test_heavy_drops_include_a_token_with_every_pair_dropped():
    kind, overrides = CASES["heavy_drops"]
    ref_layer = check_case(kind, overrides, torch.float64, rtol=1e-6, atol=1e-9)
    keep = ref_layer.last_diagnostics["keep_mask"]
    assert (~keep.any(-1)).any(), "the case must contain an all-dropped token"


def test_expert_receiving_zero_tokens():
    # 2 tokens, K = 1, E = 4: at least two experts get nothing.
    overrides = dict(top_k=1, n_reasoning_steps=2, capacity_factor=0.0)
    ref_layer = check_case("moc", overrides, torch.float64, rtol=1e-6, atol=1e-9, tokens=2)
    assert (ref_layer.last_diagnostics["kept_hist"] == 0).sum() >= 2
