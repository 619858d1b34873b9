"""Research checkpoints import with the same logits; bad checkpoints fail naming the culprit."""

import pytest
import torch

from tests.reference.lunaris_reference import (ReferenceModel, config_for_kind,
                                               save_research_checkpoint)
from tools.import_lunaris import import_checkpoint

BASE = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16,
            max_seq_len=64, n_experts=4, top_k=2)


def make_checkpoint(tmp_path, kind, prefix="", **overrides):
    base = dict(BASE)
    if kind in ("dense", "irl_only"):
        base["n_experts"] = None
    cfg = config_for_kind(kind, **{**base, **overrides})
    torch.manual_seed(0)
    ref = ReferenceModel(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "latest_checkpoint.pt"
    save_research_checkpoint(ref, cfg, path, prefix=prefix)
    return ref.eval(), path


@pytest.mark.parametrize("kind, prefix, overrides", [
    ("dense", "", {}),
    ("moc", "_orig_mod.", dict(n_reasoning_steps=2, moc_collab_steps=2)),
    ("moc", "module.", dict(n_reasoning_steps=2, adaptive_compute_mode="hard",
                            moc_low_rank_message_dim=8)),
    ("moe", "", {}),
    ("irl_only", "", dict(n_reasoning_steps=3)),
])
def test_import_gives_reference_logits(tmp_path, kind, prefix, overrides):
    ref, path = make_checkpoint(tmp_path, kind, prefix, **overrides)
    model, cfg = import_checkpoint(str(path), use_cpu_initialization=True)
    model.eval()
    assert cfg.moc_model_kind == kind
    torch.manual_seed(3)
    ids = torch.randint(0, BASE["vocab_size"], (2, 24))
    with torch.no_grad():
        ref_logits, _, _ = ref(ids)
        pos = torch.arange(24).unsqueeze(0).expand(2, 24)
        ours = model(ids, pos, None)  # [b, s, V]
    assert (ours - ref_logits).abs().max() < 1e-4


def test_missing_key_is_named(tmp_path):
    _, path = make_checkpoint(tmp_path, "moc", n_reasoning_steps=2)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model"]["transformer.h.1.feed_forward.experts.3.w2.weight"]
    torch.save(ckpt, path)
    with pytest.raises(KeyError, match=r"transformer\.h\.1\.feed_forward\.experts\.3\.w2\.weight"):
        import_checkpoint(str(path), use_cpu_initialization=True)


def test_wrong_shape_is_named(tmp_path):
    _, path = make_checkpoint(tmp_path, "moc", n_reasoning_steps=2)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["transformer.h.0.feed_forward.med_q.weight"] = torch.zeros(32, 31)
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"med_q\.weight"):
        import_checkpoint(str(path), use_cpu_initialization=True)


def test_unknown_config_field_is_named(tmp_path):
    _, path = make_checkpoint(tmp_path, "moc", n_reasoning_steps=2)
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["model"]["expert_dropout_schedule"] = "cosine"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="expert_dropout_schedule"):
        import_checkpoint(str(path), use_cpu_initialization=True)


def test_unmapped_key_is_named(tmp_path):
    _, path = make_checkpoint(tmp_path, "moc", n_reasoning_steps=2)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["transformer.h.0.feed_forward.mediator_slots"] = torch.zeros(4, 32)
    torch.save(ckpt, path)
    with pytest.raises(KeyError, match="mediator_slots"):
        import_checkpoint(str(path), use_cpu_initialization=True)


def test_cli_writes_model_dir(tmp_path):
    from megatron_moc.model.io import load_model_dir
    from tools.import_lunaris import main

    ref, path = make_checkpoint(tmp_path, "moc", n_reasoning_steps=2)
    main(["--ckpt", str(path), "--out", str(tmp_path / "imported")])
    model, cfg = load_model_dir(str(tmp_path / "imported"), use_cpu_initialization=True)
    ids = torch.randint(0, BASE["vocab_size"], (1, 16))
    with torch.no_grad():
        ours = model.eval()(ids, torch.arange(16).unsqueeze(0), None)
        ref_logits, _, _ = ref(ids)
    assert (ours - ref_logits).abs().max() < 1e-4
