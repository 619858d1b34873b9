"""Hugging Face export / import: same logits, same greedy tokens, exact round trip, layouts.

Checkpoints here are written in DeepSpeed's file layout by hand (training/checkpoint_reader.py
documents it): `mp_rank_XX_model_states.pt` = {'module': state dict} per TP rank, and for
EP > 1 the `experts_epRR.safetensors` + `ep_layout.json` files. tests/e2e/test_hf_export_e2e.py
does the same from real training runs.
"""

import json
import os

import pytest
import torch

from megatron_moc.config import tiny_config
from megatron_moc.model.gpt import build_model
from megatron_moc.model.io import model_state
from megatron_moc.training.checkpoint_reader import (TP_SPLIT_DIM, load_init_weights,
                                                     read_training_checkpoint)
from tools.convert_from_hf import convert_from_hf
from tools.convert_to_hf import convert

KINDS = {
    "dense": dict(moc_model_kind="dense", moc_irl_steps=1),
    "irl_only": dict(moc_model_kind="irl_only", moc_irl_steps=3),
    "moe": dict(moc_model_kind="moe", moc_irl_steps=1),
    "collab_only": dict(moc_model_kind="collab_only", moc_irl_steps=1),
    "moc": dict(moc_model_kind="moc", moc_irl_steps=2, moc_collab_rounds=2),
}


def make_model(seed=0, **overrides):
    cfg = tiny_config(**overrides)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():  # move every weight off its init (norms 1, biases 0) a little
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval(), cfg


def write_checkpoint(tag_dir, cfg, state, tp=1, ep=1):
    """A tag directory in the trainer's layout, with the state split over TP and EP ranks."""
    from safetensors.torch import save_file

    os.makedirs(tag_dir, exist_ok=True)
    cfg.to_yaml(os.path.join(tag_dir, "config.yaml"))
    shards = [{} for _ in range(tp)]
    for key, value in state.items():
        dim = next((d for pattern, d in TP_SPLIT_DIM if pattern.search(key)), None)
        parts = value.chunk(tp, dim=dim) if dim is not None else [value] * tp
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    if ep > 1:
        E = cfg.num_moe_experts
        for r in range(ep):
            local = range(r * E // ep, (r + 1) * E // ep)
            save_file({f"{k}.{e}": v[e].contiguous() for k, v in state.items()
                       if ".experts." in k for e in local},
                      os.path.join(tag_dir, f"experts_ep{r:02d}.safetensors"))
        for shard in shards:  # DeepSpeed's file: EP rank 0's local experts only
            for k in [k for k in shard if ".experts." in k]:
                shard[k] = shard[k][:E // ep].clone()
        with open(os.path.join(tag_dir, "ep_layout.json"), "w") as f:
            json.dump({"expert_model_parallel_size": ep, "tensor_model_parallel_size": tp,
                       "num_experts": E}, f)
    for r, shard in enumerate(shards):
        shard["decoder.layers.0.self_attention.linear_qkv._extra_state"] = None
        torch.save({"module": shard, "dp_world_size": 1, "ds_version": "0.19.8"},
                   os.path.join(tag_dir, f"mp_rank_{r:02d}_model_states.pt"))


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                dtype=torch.float32).eval()


@torch.no_grad()
def max_logits_diff(model, hf, vocab, shapes=((2, 16), (3, 9))):
    worst = 0.0
    for i, (b, s) in enumerate(shapes):
        ids = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(i))
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        worst = max(worst, float((model(ids, pos, None) - hf(input_ids=ids).logits).abs().max()))
    return worst


@pytest.mark.parametrize("kind, extra", [
    ("dense", {}), ("irl_only", {}), ("moe", {}), ("collab_only", {}), ("moc", {}),
    ("moc", dict(moc_adaptive_mode="hard", num_query_groups=2, moc_value_rank=8,
                 moc_mediator_vector=False, moc_feedback=False, moc_capacity_factor=0.5)),
    ("moc", dict(moc_collab_rounds=0, moc_irl_steps=3, moc_adaptive_mode="hard")),
    ("irl_only", dict(moc_adaptive_mode="hard")),
])
def test_export_gives_training_logits(tmp_path, kind, extra):
    model, cfg = make_model(**{**KINDS[kind], **extra})
    write_checkpoint(tmp_path / "run" / "step_5", cfg, model_state(model))
    (tmp_path / "run" / "latest").write_text("step_5")
    convert(str(tmp_path / "run"), str(tmp_path / "hf"), verify=False)
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == "MegatronMoCForCausalLM"
    assert max_logits_diff(model, hf, cfg.vocab_size) < 1e-4
    if extra.get("moc_capacity_factor") == 0.5:  # drops happened, and were the same
        assert any(float(s.drop_rate) > 0 for s in model.routing_stats())


def test_greedy_generate_matches_full_recompute(tmp_path):
    """HF generate (KV cache, one token per step) == greedy_decode (full recompute) when no
    pair can be dropped (dropless): capacity then cannot depend on the batch."""
    from megatron_moc.generate import greedy_decode

    model, cfg = make_model(moc_capacity_factor=-1.0, num_query_groups=2)
    write_checkpoint(tmp_path / "ckpt", cfg, model_state(model))
    convert(str(tmp_path / "ckpt"), str(tmp_path / "hf"), verify=False)
    hf = load_hf(tmp_path / "hf")
    hf.generation_config.eos_token_id = None  # our decode does not stop at EOS either
    ids = torch.randint(4, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(7))
    ours = greedy_decode(model, ids, 8)
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                         do_sample=False)
    assert torch.equal(ours, theirs), (ours, theirs)


@pytest.mark.parametrize("tp, ep", [(2, 1), (1, 2), (2, 2)])
def test_parallel_layouts_read_as_one_rank(tmp_path, tp, ep):
    model, cfg = make_model(num_query_groups=2, **KINDS["moc"])
    state = model_state(model)
    write_checkpoint(tmp_path, cfg, state, tp=tp, ep=ep)
    read_cfg, read = read_training_checkpoint(str(tmp_path))
    assert read.keys() == state.keys()
    for k in state:
        assert torch.equal(read[k], state[k]), k
    assert read_cfg.tensor_model_parallel_size == 1 and read_cfg.expert_model_parallel_size == 1


def test_layout_errors_name_the_culprit(tmp_path):
    from safetensors.torch import load_file, save_file

    model, cfg = make_model(**KINDS["moe"])
    state = model_state(model)
    write_checkpoint(tmp_path, cfg, state, tp=2, ep=2)
    shard = tmp_path / "experts_ep01.safetensors"
    tensors = load_file(shard)
    del tensors["decoder.layers.1.mlp.experts.w2.3"]
    save_file(tensors, shard)
    with pytest.raises(KeyError, match=r"decoder\.layers\.1\.mlp\.experts\.w2.*\[3\]"):
        read_training_checkpoint(str(tmp_path))
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match="experts_ep01.safetensors"):
        read_training_checkpoint(str(tmp_path))
    os.remove(tmp_path / "mp_rank_01_model_states.pt")
    with pytest.raises(ValueError, match="tensor_model_parallel_size 2"):
        read_training_checkpoint(str(tmp_path))
    # TP ranks that disagree on a replicated weight
    write_checkpoint(tmp_path / "tp", cfg, state, tp=2)
    blob = torch.load(tmp_path / "tp" / "mp_rank_01_model_states.pt", weights_only=True)
    blob["module"]["decoder.final_layernorm.weight"] += 1
    torch.save(blob, tmp_path / "tp" / "mp_rank_01_model_states.pt")
    with pytest.raises(ValueError, match="decoder.final_layernorm.weight"):
        read_training_checkpoint(str(tmp_path / "tp"))


class Payload:  # any class: weights_only loading refuses to unpickle it
    pass


def test_model_state_files_are_never_unpickled(tmp_path):
    model, cfg = make_model(**KINDS["dense"])
    write_checkpoint(tmp_path, cfg, model_state(model))
    blob = torch.load(tmp_path / "mp_rank_00_model_states.pt", weights_only=True)
    blob["client_state"] = Payload()
    torch.save(blob, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states\.pt.*weights_only"):
        read_training_checkpoint(str(tmp_path))


def test_roundtrip_hf_checkpoint_hf_is_identical(tmp_path):
    """HF → model directory (what train.init_from takes) → HF: every tensor identical."""
    from megatron_moc.hf.convert import read_safetensors_dir

    model, cfg = make_model(num_query_groups=2, moc_value_rank=8, **KINDS["moc"])
    write_checkpoint(tmp_path / "ckpt", cfg, model_state(model))
    convert(str(tmp_path / "ckpt"), str(tmp_path / "hf1"), verify=False, max_shard_size="100KB")
    assert (tmp_path / "hf1" / "model.safetensors.index.json").is_file()  # sharded
    convert_from_hf(str(tmp_path / "hf1"), str(tmp_path / "dir"), verify=True)
    convert(str(tmp_path / "dir"), str(tmp_path / "hf2"), verify=True)
    a, b = read_safetensors_dir(str(tmp_path / "hf1")), read_safetensors_dir(str(tmp_path / "hf2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".mlp.experts.3.down_proj.weight" in k for k in a)  # per-expert names on disk
    c1, c2 = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("hf1", "hf2"))
    assert {k: v for k, v in c1.items() if k != "transformers_version"} == \
        {k: v for k, v in c2.items() if k != "transformers_version"}
    # the model directory starts a run: weights load into a model built from the recipe
    recipe = tiny_config(num_query_groups=2, moc_value_rank=8, **KINDS["moc"])
    fresh = build_model(recipe)
    load_init_weights(fresh, recipe, str(tmp_path / "dir"))
    ids, pos = torch.randint(0, cfg.vocab_size, (2, 8)), torch.arange(8).expand(2, 8)
    with torch.no_grad():
        assert torch.equal(model(ids, pos, None), fresh.eval()(ids, pos, None))
    with pytest.raises(ValueError, match="moc_adaptive_mode='soft'.*'hard'"):
        other = tiny_config(num_query_groups=2, moc_value_rank=8, moc_adaptive_mode="hard",
                            **KINDS["moc"])
        load_init_weights(build_model(other), other, str(tmp_path / "dir"))


def test_missing_shard_or_wrong_shape_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    model, cfg = make_model(**KINDS["moe"])
    write_checkpoint(tmp_path / "ckpt", cfg, model_state(model))
    hf = tmp_path / "hf"
    convert(str(tmp_path / "ckpt"), str(hf), verify=False, max_shard_size="100KB")
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.mlp.experts.2.up_proj.weight"
    shard = hf / index[key]
    tensors = load_file(shard)
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, shard)
    with pytest.raises(ValueError, match=r"experts\.2\.up_proj"):  # shape, named
        convert_from_hf(str(hf), str(tmp_path / "out"), verify=False)
    with pytest.raises(Exception):  # transformers refuses too (it logs the key in a report)
        load_hf(hf)
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match=index[key]):
        convert_from_hf(str(hf), str(tmp_path / "out"), verify=False)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_encodes_like_sentencepiece(tmp_path, model_type):
    import sentencepiece

    from megatron_moc.hf.tokenizer import build_hf_tokenizer
    from tools.train_tokenizer import train_tokenizer

    corpus = tmp_path / "c.txt"
    lines = [f"def f_{i}(x, y={i * 7}):\n    return x ** {i} + y  # héllo wörld {i}" for i in range(300)]
    corpus.write_text("\n".join(lines))
    path = train_tokenizer([str(corpus)], str(tmp_path / "tok"), vocab_size=296,
                           model_type=model_type, num_threads=1)
    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    tok = build_hf_tokenizer(path)
    samples = lines[:20] + ["  two  spaces\tand tab\n", "unseen: 你好 😀 Ω", "12345 67", ""]
    for text in samples:
        ids = sp.encode(text)
        assert tok(text, add_special_tokens=False).input_ids == ids, text
        assert tok.decode(ids) == sp.decode(ids)
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
