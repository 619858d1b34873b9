"""The MoC layer with the Triton expert backend and the mediator's fused kernels
(interpreter, fp32) against the fp64 oracle, including the fp32 weight-gradient sum over the
S IRL steps (the weight-gradient chain, also under recompute) and hard-mode compaction, whose
MLP tails hold anything. With a GPU the layer runs on it (compiled kernels, fp32 with TF32
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


def test_hard_mode_never_reads_the_mlp_tails(megatron_world, device, monkeypatch):
    """Hard mode's MLP leaves its y and dX rows past the active count unwritten
    (zero_tail=False): NaN there must reach neither the output nor any gradient."""
    from kernels import grouped_gemm
    from tests.unit.test_layer_vs_reference import CASES, check_case

    real, tails = grouped_gemm.launch_gmm, []

    def gmm_with_nan_tail(a, w, offsets, gather_index=None, trans_w=False, zero_tail=True):
        c = real(a, w, offsets, gather_index, trans_w, zero_tail=zero_tail)
        if not zero_tail:
            tails.append(c.shape[0] - int(offsets[-1]))
            c[int(offsets[-1]):] = float("nan")
        return c

    monkeypatch.setattr(grouped_gemm.TritonPrimitives, "gmm", staticmethod(gmm_with_nan_tail))
    kind, overrides = CASES["hard_S2_R2"]
    check_case(kind, overrides, torch.float32, rtol=1e-4, atol=1e-5, backend="triton",
               device=device)
    assert max(tails, default=0) > 0   # some rows were inactive, and their tails poisoned
