"""`moc_recompute` (activation recompute of mediator rounds / IRL steps) is memory-only: the
layer still matches the fp64 oracle, and the recomputed parts really run twice."""

import pytest
import torch

import tests.unit.test_layer_vs_reference as oracle
from megatron_moc.moc.mediator import MediatorCombiner


def _with_config(monkeypatch, **fields):
    real = oracle.build_pair

    def build_pair(*args, **kwargs):
        ref, ours, cfg = real(*args, **kwargs)
        for k, v in fields.items():
            setattr(cfg, k, v)     # every module reads the one shared config at forward time
        return ref, ours, cfg

    monkeypatch.setattr(oracle, "build_pair", build_pair)


@pytest.mark.parametrize("recompute", ["mediator", "experts", "all"])
@pytest.mark.parametrize("case", ["soft_S2_R2", "hard_S2_R2", "heavy_drops", "irl_only_soft"])
def test_recompute_matches_oracle(monkeypatch, case, recompute):
    _with_config(monkeypatch, moc_recompute=recompute)
    kind, overrides = oracle.CASES[case]
    oracle.check_case(kind, overrides, torch.float64, rtol=1e-6, atol=1e-9)


def test_mediator_rounds_rerun_in_backward(monkeypatch):
    calls = []
    real_round = MediatorCombiner.round
    monkeypatch.setattr(MediatorCombiner, "round",
                        lambda self, *a: calls.append(1) or real_round(self, *a))
    _with_config(monkeypatch, moc_recompute="mediator")
    kind, overrides = oracle.CASES["soft_S2_R2"]
    oracle.check_case(kind, overrides, torch.float64, rtol=1e-6, atol=1e-9)
    # check_case runs our layer forward once (R = 2 rounds) and backward once, which reruns
    # those 2 rounds: 2 + 2 (it would be 2 without recompute)
    assert len(calls) == 2 + 2
