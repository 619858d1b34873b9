"""The MoC layer with the Triton expert backend and the mediator's fused kernels
(interpreter, fp32) against the fp64 oracle, including the fp32 weight-gradient sum over the
S IRL steps (the weight-gradient chain, also under recompute) and hard-mode compaction. With a
GPU the layer runs on it (compiled kernels, fp32 with TF32 off)."""

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
