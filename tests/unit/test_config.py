"""MoCConfig: spec defaults, validation naming the field, YAML round trip."""

import pytest
import torch

from megatron_moc.config import MoCConfig, tiny_config


def test_spec_defaults():
    cfg = MoCConfig(use_cpu_initialization=True)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_attention_heads) == (768, 12, 12)
    assert (cfg.num_moe_experts, cfg.moe_router_topk, cfg.moc_capacity_factor) == (8, 2, 1.25)
    assert (cfg.moe_aux_loss_coeff, cfg.moe_z_loss_coeff, cfg.moc_drop_loss_coeff) == (1e-2, 1e-3, 1e-3)
    assert (cfg.moc_irl_steps, cfg.moc_collab_rounds, cfg.moc_adaptive_mode) == (1, 2, "soft")
    assert cfg.vocab_size == 50257 and cfg.ffn_hidden_size == 2048 and cfg.layernorm_epsilon == 1e-6


@pytest.mark.parametrize("overrides, field", [
    (dict(moe_router_topk=5), "moe_router_topk"),
    (dict(moc_irl_steps=0), "moc_irl_steps"),
    (dict(moc_adaptive_mode="medium"), "moc_adaptive_mode"),
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(moc_model_kind="mixture"), "moc_model_kind"),
    (dict(moc_model_kind="moe", moc_irl_steps=2), "moc_irl_steps"),
    (dict(moc_model_kind="irl_only", moc_irl_steps=1), "moc_irl_steps"),
    (dict(moc_collab_rounds=-1), "moc_collab_rounds"),
    (dict(moc_expert_backend="cuda"), "moc_expert_backend"),
    (dict(num_query_groups=3), "num_query_groups"),
    (dict(pipeline_model_parallel_size=2), "pipeline_model_parallel_size"),
])
def test_validation_names_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_yaml_round_trip(tmp_path):
    cfg = tiny_config(moc_adaptive_mode="hard", moc_value_rank=8)
    path = tmp_path / "c.yaml"
    cfg.to_yaml(str(path))
    back = MoCConfig.from_yaml(str(path))
    assert back.to_dict() == cfg.to_dict()


def test_yaml_unknown_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("hidden_size: 64\nnum_attention_heads: 4\nmoc_irl_stepz: 2\n")
    with pytest.raises(ValueError, match="moc_irl_stepz"):
        MoCConfig.from_yaml(str(path))


@pytest.mark.parametrize("tokens, cf, expected", [(64, 1.25, 64), (10, 1.0, 8), (10, 1.25, 8),
                                                  (3, 1.25, 2), (7, 2.0, 8), (64, 0.0, -1)])
def test_capacity(tokens, cf, expected):
    # N·K/E·cf with K = 2, E = 4 → next power of two, at most N·K.
    cfg = tiny_config(moc_capacity_factor=cf)
    assert cfg.capacity(tokens) == expected


def test_mediator_triton_backend_on_cpu_names_the_field(monkeypatch):
    """moc_mediator_backend='triton' without a GPU (and no interpreter) fails naming the
    field, before any kernel launch."""
    from megatron_moc.moc.mediator import _use_kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="moc_mediator_backend='triton'"):
        _use_kernels("triton", torch.zeros(2, 2, 4))
    assert not _use_kernels("auto", torch.zeros(2, 2, 4))
    assert not _use_kernels("torch", torch.zeros(2, 2, 4))
