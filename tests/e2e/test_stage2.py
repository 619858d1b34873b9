"""Stage II (gate-only training) through the real trainer: DeepSpeed ZeRO-2 on CPU, one rank.

- switching at a step: every non-gate parameter of the final checkpoint is bit-identical to
  the step-N checkpoint, every gate parameter moved, the LR is stage2_lr;
- resume: stopping at step N (the full-model checkpoint) and later inside Stage II, then
  resuming, gives the uninterrupted run's losses and weights exactly;
- a separate run from a checkpoint (train.stage2_from) leaves the source's non-gates alone.
The gate entropy term is on in these runs, so its schedule goes through the trainer too.
Weights are read with checkpoint_reader (weights_only=True).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_moc.training.checkpoint_reader import read_training_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "launchers", "configs", "tiny.yaml")
START, TOTAL = 8, 14
COMMON = (f"train.train_iters={TOTAL}", f"train.stage2_start_step={START}",
          "train.stage2_lr=5e-3", "model.moc_gate_entropy_coeff=0.1", "train.log_interval=1",
          "train.eval_interval=7", "train.eval_iters=1", "train.warmup_iters=3")


def run(env, data, save, *overrides):
    base = [f"train.data_path=[{data / 'stdlib'}]", f"train.tokenizer={data / 'tok.model'}",
            f"train.save={save}"]
    proc = subprocess.run([sys.executable, "-m", "megatron_moc.training.pretrain", "--config",
                           TINY, *base, *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"pretrain failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def log(save):
    out = {}
    with open(os.path.join(save, "train_log.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out.setdefault(rec["step"], {}).update(rec)
    return out


def weights(path):
    return read_training_checkpoint(str(path))[1]


@pytest.fixture(scope="module")
def full_run(env, data, tmp_path_factory):
    save = tmp_path_factory.mktemp("stage2") / "full"
    proc = run(env, data, save, *COMMON, f"train.save_interval={START}")
    return save, proc


@pytest.mark.slow
def test_stage2_from_a_step_trains_only_the_gates(full_run):
    save, proc = full_run
    assert f"Stage II from step {START + 1}" in proc.stdout
    before, after = weights(save / f"step_{START}"), weights(save / f"step_{TOTAL}")
    gates = [k for k in before if "step_gate" in k]
    assert any("collab_step_gate" in k for k in gates) and any(
        "experts.step_gate_weight" in k for k in gates)
    for key in before:
        if key in gates:
            assert not torch.equal(before[key], after[key]), f"gate {key} did not train"
        else:
            assert torch.equal(before[key], after[key]), f"{key} changed in Stage II"
    records = log(save)
    assert all(records[s]["train/lr"] == pytest.approx(5e-3) for s in range(START + 1, TOTAL + 1))
    assert records[START]["train/lr"] != pytest.approx(5e-3)
    betas = [records[s]["routing/layer00/gate_entropy_beta"] for s in (1, TOTAL)]
    assert betas == [pytest.approx(0.1), pytest.approx(0.05)]


@pytest.mark.slow
def test_stage2_resume_across_the_switch_is_exact(env, data, tmp_path, full_run):
    """Stop at step N (full-model checkpoint), resume into Stage II, stop at N + 3 (a Stage II
    checkpoint), resume to the end: losses and weights equal the uninterrupted run's."""
    full, _ = full_run
    split = tmp_path / "split"
    run(env, data, split, *COMMON, f"train.exit_interval={START}", f"train.save_interval={START}")
    run(env, data, split, *COMMON, f"train.exit_interval={START + 3}", "train.save_interval=100")
    proc = run(env, data, split, *COMMON, "train.save_interval=100")
    assert f"resumed from {split} at step {START + 3}" in proc.stdout
    a, b = log(full), log(split)
    for step in range(1, TOTAL + 1):
        assert a[step]["train/loss"] == b[step]["train/loss"], step
    wa, wb = weights(full / f"step_{TOTAL}"), weights(split / f"step_{TOTAL}")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.slow
def test_stage2_as_a_separate_run_from_a_checkpoint(env, data, tmp_path, full_run):
    full, _ = full_run
    source = full / f"step_{START}"
    save = tmp_path / "from_ckpt"
    run(env, data, save, "train.train_iters=3", f"train.stage2_from={source}",
        "train.stage2_lr=1e-2", "train.eval_interval=3", "train.eval_iters=1")
    before, after = weights(source), weights(save / "step_3")
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all("step_gate" in k for k in moved), moved
