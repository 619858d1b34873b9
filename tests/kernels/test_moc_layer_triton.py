"""The MoC layer with the Triton expert backend and the mediator's fused kernels
(interpreter, fp32) against the fp64 oracle, including the fp32 weight-gradient sum over the
S IRL steps (the weight-gradient chain, also under recompute) and hard mode on row segments,
whose rows outside the segments hold anything, against the compaction. With a GPU the layer runs on it (compiled kernels, fp32 with TF32
off)."""

import pytest
import torch


@pytest.mark.parametrize("case", ["soft_S2_R2", "hard_S2_R2", "heavy_drops"])
def test_layer_with_triton_backend(megatron_world, device, case):
    from tests.unit.test_layer_vs_reference import CASES, check_case

    kind, overrides = CASES[case]
    check_case(kind, overrides, torch.float32, rtol=1e-4, atol=1e-5, backend="triton",
               device=device)


@pytest.mark.parametrize("case", ["soft_S2_R2", "hard_S3_R2"])
def test_layer_with_triton_backend_and_recompute(megatron_world, device, monkeypatch, case):
    """Recomputed IRL steps carry the weight-gradient chain (kernels/expert_mlp_op.py) through
    activation checkpointing; S = 3 has a middle link."""
    from tests.unit.test_layer_vs_reference import CASES, check_case
    from tests.unit.test_recompute import _with_config

    _with_config(monkeypatch, moc_recompute="experts")
    kind, overrides = CASES[case]
    check_case(kind, overrides, torch.float32, rtol=1e-4, atol=1e-5, backend="triton",
               device=device)


def test_hard_mode_reads_no_row_outside_its_segments(megatron_world, device, monkeypatch):
    """Hard mode runs each step on row segments (depth-sorted rows, kernels/row_segments.py):
    with NaN in every row of every MLP input outside the step's segments, neither the output
    nor any gradient may see one."""
    from kernels import grouped_gemm, row_segments
    from tests.unit.test_layer_vs_reference import CASES, check_case

    prims, poisoned = grouped_gemm.TritonPrimitives, []

    def with_nan_outside(a, offsets):
        if not row_segments.is_segments(offsets):
            return a
        outside = ~row_segments.row_mask(offsets, a.shape[0])
        poisoned.append(int(outside.sum()))
        return a.masked_fill(outside[:, None], float("nan"))

    def wrap(name):
        real = getattr(prims, name)

        def poisoned_call(a, w, offsets, *args, **kwargs):
            return real(with_nan_outside(a, offsets), w, offsets, *args, **kwargs)
        monkeypatch.setattr(prims, name, staticmethod(poisoned_call))

    for name in ("gmm", "gmm_swiglu", "gmm_swiglu_bwd"):
        wrap(name)
    kind, overrides = CASES["hard_S2_R2"]
    check_case(kind, overrides, torch.float32, rtol=1e-4, atol=1e-5, backend="triton",
               device=device)
    assert max(poisoned, default=0) > 0   # some rows were inactive, and poisoned


@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
def test_hard_mode_segments_match_the_compaction(megatron_world, device, backend):
    """The two hard-mode paths of IRLExperts give the same h and gradients: depth-sorted rows
    on row segments (the layer's path) and the compaction of `_hard_step` (expert
    parallelism's), on the same rows."""
    from megatron_moc.moc.dispatch import plan_dispatch
    from tests.unit.test_layer_vs_reference import CASES, build_pair

    kind, overrides = CASES["hard_S3_R2"]
    _, ours, cfg = build_pair(kind, overrides, torch.float32, backend)
    experts = ours.decoder.layers[0].mlp.experts.to(device)
    torch.manual_seed(0)
    with torch.no_grad():   # gates that spread the rows over 0..S steps
        experts.step_gate_weight.normal_(0, 1.0)
    n, k, d = 50, 2, cfg.hidden_size
    x_ND = torch.randn(n, d, device=device)
    experts_NK = torch.randint(0, cfg.num_moe_experts, (n, k), device=device)
    keep_NK = torch.rand(n, k, device=device) > 0.2
    act_NKS, expected_NK, steps_NK = experts.depth_sorted_activity(x_ND, experts_NK)
    assert len(set(steps_NK.flatten().tolist())) == experts.steps + 1   # every depth occurs
    plan = plan_dispatch(experts_NK, keep_NK, cfg.num_moe_experts, steps_NK, experts.steps)
    rows = x_ND.index_select(0, plan.token_P)
    activity = (act_NKS.reshape(n * k, -1)[plan.pair_P], expected_NK.reshape(-1)[plan.pair_P])
    dy = torch.randn_like(rows)
    out = []
    for given in (activity, None):
        experts.zero_grad()
        x = rows.clone().requires_grad_()
        h, _ = experts(x, plan.expert_P, plan.offsets_E1, activity=given)
        (h * dy).sum().backward()
        out.append([h, x.grad] + [p.grad for p in (experts.w13, experts.w2,
                                                     experts.norm_weight)])
    for seg, compact in zip(*out):
        torch.testing.assert_close(seg, compact, rtol=1e-5, atol=1e-5)
