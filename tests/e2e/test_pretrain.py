"""End to end on CPU: data tools → pretrain (DeepSpeed ZeRO-2, gloo) → logs and checkpoints.

Every run is a subprocess of the real entry point (`python -m megatron_moc.training.pretrain`,
or torchrun for two ranks). The module shares one tiny tokenizer + dataset built by the data
tools, and one TORCH_EXTENSIONS_DIR (tests/e2e/conftest.py: DeepSpeed JIT-builds its CPU comm
op once per session).
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

# `env` and `data` (the subprocess environment, the tiny dataset): tests/e2e/conftest.py


def run_pretrain(env, data, save, *overrides, nproc=1, check=True):
    base = [f"train.data_path=[{data / 'stdlib'}]", f"train.tokenizer={data / 'tok.model'}",
            f"train.save={save}", "train.log_interval=1", "train.eval_interval=10",
            "train.eval_iters=2", "train.warmup_iters=5"]
    if nproc == 1:
        launch = [sys.executable, "-m", "megatron_moc.training.pretrain"]
    else:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                  "--master_port", str(free_port()), "-m",
                  "megatron_moc.training.pretrain"]
    proc = subprocess.run(launch + ["--config", TINY, *base, *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def train_losses(save):
    losses = {}
    with open(os.path.join(save, "train_log.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "train/loss" in rec:
                losses[rec["step"]] = rec["train/loss"]
    return losses


def final_weights(save):
    with open(os.path.join(save, "latest")) as f:
        tag = f.read().strip()
    # deepspeed-exception: DeepSpeed's own model-states shard (pickles its LossScaler).
    state = torch.load(os.path.join(save, tag, "mp_rank_00_model_states.pt"), weights_only=False)
    return state["module"]


@pytest.mark.slow
def test_pretrain_single_rank(env, data, tmp_path):
    save = tmp_path / "run"
    proc = run_pretrain(env, data, save, "train.train_iters=20")
    losses = train_losses(save)
    assert sorted(losses) == list(range(1, 21))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (18, 19, 20)) / 3
    assert last < first - 0.3, losses
    assert (save / "latest").read_text().strip() == "step_20"
    for name in ("mp_rank_00_model_states.pt", "config.yaml", "trainer_state.json"):
        assert (save / "step_20" / name).is_file(), name
    assert list((save / "tensorboard").glob("events.out.tfevents.*"))
    assert "validation at step 20" in proc.stdout and "perplexity" in proc.stdout
    assert "layer  0: gini" in proc.stdout  # routing diagnostics


# 12 steps; router noise makes the RNG state matter. No checkpoint but the last one.
RESUME = ("train.train_iters=12", "train.save_interval=1000", "model.moc_router_noise_std=0.01")


@pytest.fixture(scope="module")
def uninterrupted(env, data, tmp_path_factory):
    """12 steps in one go: the yardstick of both resume tests."""
    full = tmp_path_factory.mktemp("uninterrupted") / "full"
    run_pretrain(env, data, full, *RESUME)
    return full


def assert_same_run(full, other, steps=12):
    """Losses of steps 1..`steps` and the final weights equal (max abs diff <= 1e-6)."""
    a, b = train_losses(full), train_losses(other)
    assert sorted(b) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    wa, wb = final_weights(full), final_weights(other)
    assert wa.keys() == wb.keys()
    for k in wa:
        if isinstance(wa[k], torch.Tensor):
            assert (wa[k].float() - wb[k].float()).abs().max() <= 1e-6, k


@pytest.mark.slow
def test_resume_is_exact(env, data, tmp_path, uninterrupted):
    """12 steps in one go == 6 steps, stop, resume to 12: same losses and final weights."""
    split = tmp_path / "split"
    run_pretrain(env, data, split, *RESUME, "train.exit_interval=6")
    assert (split / "latest").read_text().strip() == "step_6"
    run_pretrain(env, data, split, *RESUME)
    assert_same_run(uninterrupted, split)


@pytest.mark.slow
def test_kill_9_then_resume_is_exact(env, data, tmp_path, uninterrupted):
    """kill -9 mid-run (after the step-6 checkpoint; a checkpoint every 6 steps), resume: the
    losses of steps 1..12 and the final weights equal those of the uninterrupted run, which
    saved no checkpoint on the way (max abs diff <= 1e-6)."""
    import signal
    import time

    killed = tmp_path / "killed"
    common = ("train.train_iters=12", "train.save_interval=6", "model.moc_router_noise_std=0.01")
    base = [f"train.data_path=[{data / 'stdlib'}]", f"train.tokenizer={data / 'tok.model'}",
            f"train.save={killed}", "train.log_interval=1", "train.eval_interval=10",
            "train.eval_iters=2", "train.warmup_iters=5", *common]
    proc = subprocess.Popen([sys.executable, "-m", "megatron_moc.training.pretrain", "--config",
                             TINY, *base], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log, deadline = killed / "train_log.jsonl", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and any(json.loads(l)["step"] >= 7 for l in log.read_text().splitlines()):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "latest").read_text().strip() == "step_6", "kill landed too late"
    run_pretrain(env, data, killed, *common)
    assert_same_run(uninterrupted, killed)


@pytest.mark.slow
def test_sigterm_saves_and_exits(env, data, tmp_path):
    import signal
    import time

    save = tmp_path / "run"
    base = [f"train.data_path=[{data / 'stdlib'}]", f"train.tokenizer={data / 'tok.model'}",
            f"train.save={save}", "train.log_interval=1", "train.eval_interval=0",
            "train.train_iters=500", "train.save_interval=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "megatron_moc.training.pretrain", "--config",
                             TINY, *base], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    log, deadline = save / "train_log.jsonl", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    assert "SIGTERM: stopping at step" in out
    tag = (save / "latest").read_text().strip()
    step = int(tag.split("_")[1])
    assert 3 <= step < 500 and (save / tag / "trainer_state.json").is_file()


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_two_ranks_zero2_match_one_rank(env, data, tmp_path, two_rank_run):
    """Global batch 8: one rank (micro 4 × grad accum 2) vs two ranks (micro 4 × DP 2; the
    session's `two_rank_run`, tests/e2e/conftest.py). Tolerance 1e-4 on the loss: the sums
    over samples are added in a different order."""
    one, two = tmp_path / "one", two_rank_run
    run_pretrain(env, data, one, "train.train_iters=8")
    a, b = train_losses(one), train_losses(two)
    assert sorted(b) == list(range(1, 9))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4, (step, a[step], b[step])


@pytest.mark.parametrize("override, culprit", [
    ("train.bogus_key=1", "bogus_key"),
    ("model.hidden_sise=64", "hidden_sise"),
    ("train.data_path=[/nonexistent/prefix]", "/nonexistent/prefix"),
    ("train.global_batch_size=6", "global_batch_size 6"),
])
@pytest.mark.slow
def test_bad_input_stops_with_one_line(env, data, tmp_path, override, culprit):
    proc = run_pretrain(env, data, tmp_path / "bad", override, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and culprit in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bad_data_stops_with_one_line(env, data, tmp_path):
    """A .bin/.idx size mismatch, and token ids >= the vocabulary of the run's tokenizer."""
    import shutil

    bad = tmp_path / "trunc"
    shutil.copy(data / "stdlib.idx", str(bad) + ".idx")
    with open(data / "stdlib.bin", "rb") as src, open(str(bad) + ".bin", "wb") as dst:
        dst.write(src.read()[:-2])
    small_tok = tmp_path / "tok400"
    subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input",
                    str(data / "stdlib.jsonl"), "--output-prefix", str(small_tok),
                    "--vocab-size", "400", "--num-threads", "2"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    for overrides, culprit in (((f"train.data_path=[{bad}]",), str(bad) + ".bin"),
                               ((f"train.tokenizer={small_tok}.model",
                                 "model.vocab_size=512"), "outside the vocabulary")):
        proc = run_pretrain(env, data, tmp_path / "bad", *overrides, check=False)
        errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and culprit in errors[0], \
            proc.stderr[-3000:]


@pytest.mark.slow
def test_ds_config_batch_mismatch_names_file(env, data, tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"train_batch_size": 16, "zero_optimization": {"stage": 2}}))
    proc = run_pretrain(env, data, tmp_path / "bad", f"train.ds_config={cfg}", check=False)
    assert proc.returncode == 2
    line = [l for l in proc.stderr.splitlines() if l.startswith("error:")][0]
    assert str(cfg) in line and "train_batch_size 16" in line and "world size 1" in line


@pytest.mark.slow
def test_zero3_is_refused(env, data, tmp_path):
    cfg = tmp_path / "ds3.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    proc = run_pretrain(env, data, tmp_path / "bad", f"train.ds_config={cfg}", check=False)
    assert proc.returncode == 2 and "ZeRO stage 3 is not supported" in proc.stderr


# ------------------------------------------------------------------ fast checks of the pieces
@pytest.mark.parametrize("kind", ["moc", "dense"])
def test_no_weight_decay_on_norms_biases_gates(megatron_world, kind):
    from megatron_moc.config import tiny_config
    from megatron_moc.model.gpt import build_model
    from megatron_moc.training.engine import param_groups

    overrides = {} if kind == "moc" else {"moc_model_kind": "dense", "moc_irl_steps": 1}
    model = build_model(tiny_config(**overrides))
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert not (decay & no_decay) and len(decay | no_decay) == len(names)
    params = dict(model.named_parameters())
    for n in no_decay:  # 1-D: norms inside Sequential (med_mlp.1) have no "norm" in the name
        assert params[n].ndim <= 1 or any(
            s in n for s in ("norm", "bias", "router", "gate", "feedback", "mediator")), n
    for n in decay:  # only matmul weights are decayed
        assert "norm" not in n and "router" not in n and "gate" not in n, n
        assert not n.endswith(".mediator"), n
    if kind == "moc":
        assert any(n.endswith("experts.norm_weight") for n in no_decay)  # [E, D] yet a norm
        assert any(n.endswith("combiner.mediator") for n in no_decay)
        assert any("step_gate_weight" in n for n in no_decay)
        assert any("fuse_gate" in n for n in no_decay)
        assert any(n.endswith("experts.w13") for n in decay)


def test_warmup_cosine_schedule():
    from megatron_moc.training.engine import warmup_cosine

    lr, min_lr = 1.0, 0.1
    values = [warmup_cosine(s, 10, 110, lr, min_lr) for s in range(120)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(min_lr + 0.5 * (lr - min_lr))
    assert values[110] == pytest.approx(min_lr) and values[119] == pytest.approx(min_lr)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_model_flops_per_token_by_hand():
    from megatron_moc.config import tiny_config
    from megatron_moc.training.metrics import model_flops_per_token

    # dense S=1, D=64, L=2, V=512, F=swiglu(64)=176 (multiple_of 16), seq 32
    cfg = tiny_config(moc_model_kind="dense", moc_irl_steps=1)
    D, L, V, F, s = 64, 2, 512, cfg.ffn_hidden_size, 32
    expected = 6 * (L * (4 * D * D + 3 * D * F) + D * V + L * 2 * s * D)
    assert model_flops_per_token(cfg, s) == expected
    # IRL steps scale the FFN term; mediator rounds add work
    irl = tiny_config(moc_model_kind="irl_only", moc_irl_steps=2, moc_adaptive_steps=False)
    assert model_flops_per_token(irl, s) == expected + 6 * L * 3 * D * F
    moc2 = model_flops_per_token(tiny_config(moc_collab_rounds=2), s)
    moc1 = model_flops_per_token(tiny_config(moc_collab_rounds=1), s)
    assert moc2 > moc1


def test_gini():
    from megatron_moc.training.metrics import gini

    assert gini(torch.tensor([5.0, 5.0, 5.0, 5.0])) == pytest.approx(0.0)
    assert gini(torch.tensor([0.0, 0.0, 0.0, 8.0])) == pytest.approx(0.75)
