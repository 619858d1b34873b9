"""End to end: real training runs → Hugging Face directories that load with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and give the training
model's logits and greedy tokens; the reverse import starts a new run (`train.init_from`);
TP = 2 and EP = 2 checkpoints convert to the weights a single-rank run trains.

Uses the session's tiny tokenizer + dataset and subprocess environment (tests/e2e/conftest.py).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.e2e.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "launchers", "configs", "tiny.yaml")


def pretrain(env, data, save, *overrides, nproc=1):
    base = [f"train.data_path=[{data / 'stdlib'}]", f"train.tokenizer={data / 'tok.model'}",
            f"train.save={save}", "train.log_interval=1", "train.eval_interval=0",
            "train.warmup_iters=1", "train.train_iters=2"]
    launch = [sys.executable, "-m", "megatron_moc.training.pretrain"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                  "--master_port", str(free_port()), "-m",
                  "megatron_moc.training.pretrain"]
    proc = subprocess.run(launch + ["--config", TINY, *base, *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="module")
def trained(env, data, tmp_path_factory):
    """One single-rank run of 2 steps, shared by the tests of this module."""
    save = tmp_path_factory.mktemp("hf_export") / "run"
    pretrain(env, data, save)
    return save


def reference(save):
    from megatron_moc.training.checkpoint_reader import read_training_checkpoint
    from tools.convert_to_hf import build_reference

    cfg, state = read_training_checkpoint(str(save))
    return build_reference(cfg, state), cfg, state


@torch.no_grad()
def max_logits_diff(model, hf, vocab):
    worst = 0.0
    for i, (b, s) in enumerate(((2, 32), (4, 17))):
        ids = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(i))
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        worst = max(worst, float((model(ids, pos, None) - hf(input_ids=ids).logits).abs().max()))
    return worst


@pytest.mark.slow
def test_trained_model_exports_loads_generates_and_comes_back(env, data, trained, tmp_path,
                                                              megatron_world):
    import sentencepiece
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_moc.generate import greedy_decode
    from megatron_moc.hf.convert import read_safetensors_dir
    from megatron_moc.training.checkpoint_reader import read_training_checkpoint
    from tools.convert_from_hf import convert_from_hf
    from tools.convert_to_hf import convert

    save, hf_dir = trained, tmp_path / "hf"
    proc = subprocess.run([sys.executable, "tools/convert_to_hf.py", "--checkpoint", str(save),
                           "--output", str(hf_dir), "--tokenizer", str(data / "tok.model")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "logits match" in proc.stdout, proc.stderr[-3000:]
    for name in ("config.json", "generation_config.json", "configuration_moc.py",
                 "modeling_moc.py", "model.safetensors", "tokenizer.json"):
        assert (hf_dir / name).is_file(), name
    assert json.loads((hf_dir / "config.json").read_text())["auto_map"]

    model, cfg, _ = reference(save)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                              dtype=torch.float32).eval()
    assert max_logits_diff(model, hf, cfg.vocab_size) < 1e-4   # as trained: capacity 1.25

    # greedy tokens: our full-recompute decode vs HF's cached generate, dropless on both sides
    tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    text = "def main(argv):\n    return parse(argv)"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(data / "tok.model"))
    assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)
    ids = torch.tensor([sp.encode(text)])
    model.config.moc_capacity_factor = -1.0
    dropless = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                                    dtype=torch.float32, capacity_factor=-1.0)
    dropless.generation_config.eos_token_id = None
    out = dropless.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                   do_sample=False)
    assert torch.equal(out, greedy_decode(model, ids, 16))

    # HF -> model directory -> HF: identical tensors; the directory starts a run (lr 1e-30
    # leaves the weights as they are, so the new run's checkpoint holds the imported ones)
    convert_from_hf(str(hf_dir), str(tmp_path / "back"))
    convert(str(tmp_path / "back"), str(tmp_path / "hf2"), verify=False)
    a, b = read_safetensors_dir(str(hf_dir)), read_safetensors_dir(str(tmp_path / "hf2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pretrain(env, data, tmp_path / "run2", f"train.init_from={tmp_path / 'back'}",
             "train.train_iters=1", "train.lr=1e-30", "train.min_lr=1e-30")
    _, started = read_training_checkpoint(str(tmp_path / "run2"))
    _, original = read_training_checkpoint(str(save))
    assert started.keys() == original.keys()
    assert all((started[k] - original[k]).abs().max() <= 1e-12 for k in original)


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_tp2_and_ep2_checkpoints_convert(env, data, trained, tmp_path, megatron_world):
    """Two ranks with TP = 2, and with EP = 2 (experts in experts_ep*.safetensors): each reads
    back as the weights of the same 2 steps on one rank (to the tolerance of a different
    reduction order), and the export's logits match the checkpoint's."""
    from transformers import AutoModelForCausalLM

    from tools.convert_to_hf import convert

    _, _, single = reference(trained)
    for name, override in (("tp2", "train.tensor_model_parallel_size=2"),
                           ("ep2", "train.expert_model_parallel_size=2")):
        pretrain(env, data, tmp_path / name, override, nproc=2)
        if name == "ep2":
            assert (tmp_path / name / "step_2" / "experts_ep01.safetensors").is_file()
        model, cfg, state = reference(tmp_path / name)
        assert state.keys() == single.keys()
        for k in single:
            assert (state[k] - single[k]).abs().max() < 1e-4, (name, k)
        convert(str(tmp_path / name), str(tmp_path / f"hf_{name}"), verify=False)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / f"hf_{name}", trust_remote_code=True,
                                                  dtype=torch.float32).eval()
        assert max_logits_diff(model, hf, cfg.vocab_size) < 1e-4, name
