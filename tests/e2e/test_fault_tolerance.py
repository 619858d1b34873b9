"""Fault injection on CPU, 2 ranks (gloo, DeepSpeed ZeRO-2), through the real entry point
under torchrun. docs/reliability.md holds the table of these faults and what was observed.

One uninterrupted run (`reference`) is the yardstick: after each fault the run is relaunched
with the same command and its final weights must equal the reference's (max abs diff <= 1e-6).

    kill -9 of one rank at a random step, relaunch          -> same final weights
    kill -9 of one rank under torchrun --max-restarts 1    -> torchrun resumes, same weights
    newest checkpoint truncated                            -> named, older one used, same weights
    ENOSPC in the middle of a save                         -> run stops, previous checkpoint
                                                              and `latest` intact
    NaN gradient / inf loss at step k; N in a row          -> skipped (weights, LR unchanged),
                                                              counted, logged; N in a row stop
    corrupt .bin                                           -> one error line before step 1
    preprocessing killed by kill -9                        -> rerun skips finished inputs

The random kill step comes from FAULT_SEED (default: the clock) and is printed on failure.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_moc.training import atomic_checkpoint as atomic
from tests.e2e.conftest import free_port
from tests.e2e.test_pretrain import ROOT, TINY, final_weights, train_losses

# 12 steps, a checkpoint every 2, the newest 3 kept; router noise makes the RNG state matter.
COMMON = ("train.train_iters=12", "train.save_interval=2", "train.keep_last=3",
          "model.moc_router_noise_std=0.01", "train.eval_interval=0")
SEED = int(os.environ.get("FAULT_SEED", time.time_ns() % 100_000))


def torchrun(data, save, *overrides, max_restarts=0):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--max-restarts", str(max_restarts), "--master_port", str(free_port()),
            "-m", "megatron_moc.training.pretrain", "--config", TINY,
            f"train.data_path=[{data / 'stdlib'}]", f"train.tokenizer={data / 'tok.model'}",
            f"train.save={save}", "train.log_interval=1", "train.warmup_iters=5", *overrides]


def run(env, cmd, check=True):
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def log_records(save):
    """Last record per step of train_log.jsonl (a resumed run appends)."""
    out = {}
    path = os.path.join(save, "train_log.jsonl")
    if os.path.isfile(path):
        for line in open(path):
            rec = json.loads(line)
            out[rec["step"]] = rec
    return out


def worker_pids(launcher: int) -> dict:
    """{rank: pid} of the processes torchrun (pid `launcher`) started."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != launcher:
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if b"RANK" in env:
            found[int(env[b"RANK"])] = int(name)
    return found


def kill_rank_at_step(proc, save, step, rank, delay):
    """Wait until rank 0 has logged `step`, wait `delay` s more (so the kill lands anywhere in
    the next step, saves included), then SIGKILL rank `rank`. Returns the step logged then."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if max(log_records(save), default=0) >= step:
            break
        time.sleep(0.01)
    time.sleep(delay)
    pids = worker_pids(proc.pid)
    assert rank in pids, f"no rank {rank} among {pids} (run already over?)"
    os.kill(pids[rank], signal.SIGKILL)
    return max(log_records(save), default=0)


def assert_same_weights(save, reference, what):
    wa, wb = final_weights(reference), final_weights(save)
    assert wa.keys() == wb.keys()
    worst = max(((wa[k].float() - wb[k].float()).abs().max().item(), k)
                for k in wa if isinstance(wa[k], torch.Tensor))
    assert worst[0] <= 1e-6, f"{what}: max abs diff {worst[0]} in {worst[1]}"
    print(f"observed: {what}: final weights vs the uninterrupted run, max abs diff {worst[0]}")
    return worst[0]


def committed(save):
    return sorted((s, t) for s, t in atomic.committed_steps(str(save)))


@pytest.fixture(scope="module")
def reference(env, data, tmp_path_factory):
    save = tmp_path_factory.mktemp("reference") / "run"
    run(env, torchrun(data, save, *COMMON))
    return save


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_reference_run_is_complete_and_rotated(reference):
    """The yardstick itself: 12 steps, the newest 3 checkpoints, each verifies, `latest` on the
    newest, nothing left in staging, and our files are safetensors / JSON / YAML."""
    assert sorted(train_losses(reference)) == list(range(1, 13))
    assert [t for _, t in committed(reference)] == ["step_8", "step_10", "step_12"]
    assert (reference / "latest").read_text() == "step_12"
    for _, tag in committed(reference):
        assert atomic.verify(str(reference / tag)) is None
    assert not [n for n in os.listdir(reference) if n.startswith(".")]
    files = os.listdir(reference / "step_12")
    deepspeed = [n for n in files if n.endswith(".pt")]
    assert sorted(deepspeed) == ["mp_rank_00_model_states.pt",
                                 "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                 "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert all(n.endswith((".safetensors", ".json", ".yaml")) for n in set(files) - set(deepspeed))
    manifest = json.loads((reference / "step_12" / atomic.MANIFEST).read_text())
    assert manifest["step"] == 12 and manifest["world_size"] == 2
    assert set(manifest["files"]) == set(files) - {atomic.MANIFEST}


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_kill_9_one_rank_at_a_random_step_then_relaunch(env, data, reference, tmp_path):
    """SIGKILL to one rank at a random point of steps 2..10 (saves included; the runs use
    train.async_save, so the kill may also land in a background commit); torchrun stops the
    job; the same command again resumes from the newest complete checkpoint."""
    rng = random.Random(SEED)
    step, rank, delay = rng.randint(2, 9), rng.randint(0, 1), rng.uniform(0.0, 0.2)
    why = f"FAULT_SEED={SEED}: kill rank {rank} after step {step} + {delay:.2f} s"
    save = tmp_path / "killed"
    cmd = torchrun(data, save, *COMMON, "train.async_save=true")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    at = kill_rank_at_step(proc, save, step, rank, delay)
    out, _ = proc.communicate(timeout=120)
    print(f"observed: {why}; rank 0 had logged step {at}; torchrun exit code {proc.returncode}; "
          f"committed after the kill: {[t for _, t in committed(save)]}")
    assert proc.returncode != 0, f"{why}: the job survived a SIGKILL?\n{out[-2000:]}"
    assert at < 12, f"{why}: the run finished before the kill"
    newest = committed(save)
    for _, tag in newest:
        assert atomic.verify(str(save / tag)) is None, (why, tag)
    again = run(env, cmd)
    print("observed:", *[l for l in again.stdout.splitlines() if l.startswith("resumed")])
    if newest:
        assert f"resumed from {save} at step {newest[-1][0]}" in again.stdout, why
    assert_same_weights(save, reference, why)
    a, b = train_losses(reference), train_losses(save)
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in range(1, 13)), why


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_torchrun_max_restarts_resumes_after_kill_9(env, data, reference, tmp_path):
    """torchrun --max-restarts 1: a rank killed at step 5 makes torchrun restart both ranks,
    which resume from step 4; the one command then ends normally with the reference's weights."""
    save = tmp_path / "restarted"
    proc = subprocess.Popen(torchrun(data, save, *COMMON, max_restarts=1), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kill_rank_at_step(proc, save, 5, 1, 0.0)
    out, _ = proc.communicate(timeout=240)
    print("observed: exit code", proc.returncode, "|", *[l for l in out.splitlines()
                                                         if "resumed from" in l])
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out and "done at step 12" in out, out[-4000:]
    assert_same_weights(save, reference, "torchrun --max-restarts")


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_truncated_newest_checkpoint_falls_back_to_the_one_before(env, data, reference,
                                                                  tmp_path):
    save = tmp_path / "truncated"
    shutil.copytree(reference, save)
    shard = save / "step_12" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    proc = run(env, torchrun(data, save, *COMMON))
    print("observed:", *[l for l in proc.stderr.splitlines() if l.startswith("warning:")],
          *[l for l in proc.stdout.splitlines() if l.startswith("resumed")], sep="\n")
    assert (f"warning: checkpoint {save / 'step_12'} is not usable: {shard} has {size // 2} "
            f"bytes, the manifest says {size} (truncated)") in proc.stderr, proc.stderr[-3000:]
    assert f"resumed from {save} at step 10 (step_10)" in proc.stdout
    assert atomic.verify(str(save / "step_12")) is None  # re-saved, replacing the damaged one
    assert_same_weights(save, reference, "after falling back to step_10")


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_enospc_during_a_save_keeps_the_previous_checkpoint(env, data, tmp_path):
    """Rank 0's save at step 4 runs out of space half way through DeepSpeed's model shard:
    the job stops with the reason; `latest`, step_2 and every byte of it are untouched (that
    it then loads is tests/unit/test_atomic_checkpoint.py's, and the truncation test's)."""
    save = tmp_path / "enospc"
    proc = run(env, torchrun(data, save, *COMMON, "train.debug_enospc_save_step=4"),
               check=False)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    print("observed: exit code", proc.returncode, "|", *errors)
    assert errors and "saving checkpoint step_4" in errors[0] and \
        "No space left on device" in errors[0] and "`latest` still names 'step_2'" in errors[0], \
        proc.stderr[-3000:]
    assert (save / "latest").read_text() == "step_2"
    assert [t for _, t in committed(save)] == ["step_2"]
    assert atomic.verify(str(save / "step_2")) is None
    assert not (save / "step_4").exists()


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(env, data, tmp_path):
    """Step 3: a NaN in one gradient on rank 0 (the loss is finite). Steps 6-8: an infinite
    loss on rank 1 whose gradient is finite. Every skipped step leaves weights, optimizer and
    LR schedule alone on both ranks; training goes on after step 3 with the counter at 1; the
    third non-finite step in a row stops the run and step_7's checkpoint stays as it was."""
    save = tmp_path / "nan"
    proc = run(env, torchrun(data, save, "train.train_iters=12", "train.save_interval=1",
                             "train.eval_interval=0", "train.debug_nan_grad_steps=[3]",
                             "train.debug_inf_loss_steps=[6,7,8]",
                             "train.max_consecutive_nonfinite=3"), check=False)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    print("observed: exit code", proc.returncode, *errors, *[
        l for l in proc.stdout.splitlines() if "non-finite" in l], sep="\n")
    assert errors and "3 non-finite steps in a row (steps 6..8, " \
        "train.max_consecutive_nonfinite=3): stopping without saving; checkpoint 'step_7'" \
        in errors[0], proc.stderr[-3000:]
    assert "step 3: non-finite loss or gradient norm" in proc.stdout
    assert "1 in a row, 1 in all" in proc.stdout
    log = log_records(save)
    print("observed: skipped_steps by step", {k: v["train/skipped_steps"] for k, v in log.items()},
          "| grad_norm", {k: v["train/grad_norm"] for k, v in log.items()},
          "| lr", {k: v["train/lr"] for k, v in log.items()})
    assert sorted(log) == list(range(1, 9))
    assert [log[s]["train/skipped_steps"] for s in range(1, 9)] == [0, 0, 1, 1, 1, 2, 3, 4]
    assert log[3]["train/grad_norm"] == float("inf") and log[4]["train/grad_norm"] < 1e3
    # the LR schedule does not advance on a skipped step (the logged LR is the next step's)
    assert log[3]["train/lr"] == log[2]["train/lr"] and log[4]["train/lr"] > log[3]["train/lr"]
    assert log[8]["train/lr"] == log[5]["train/lr"]
    assert json.loads((save / "step_3" / "trainer_state.json").read_text())[
        "nonfinite_steps"] == 1

    def state(tag):
        d = save / tag
        # deepspeed-exception: DeepSpeed's own shards (they pickle DeepSpeed objects).
        model = torch.load(d / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        optim = [torch.load(d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                            weights_only=False)["optimizer_state_dict"]  # deepspeed-exception
                 for r in range(2)]
        flat = {k: v for k, v in model.items() if isinstance(v, torch.Tensor)}
        for r, o in enumerate(optim):
            for i, t in enumerate(o["single_partition_of_fp32_groups"]):
                flat[f"fp32.{r}.{i}"] = t
            for gi, group in o["base_optimizer_state"]["state"].items():
                for name, t in group.items():
                    if isinstance(t, torch.Tensor):
                        flat[f"adam.{r}.{gi}.{name}"] = t
        return flat

    s2, s3, s4, s5, s7 = (state(f"step_{i}") for i in (2, 3, 4, 5, 7))
    assert all(torch.equal(s2[k], s3[k]) for k in s2), "the NaN step changed the state"
    assert any(not torch.equal(s3[k], s4[k]) for k in s3), "training stopped after the NaN step"
    assert all(torch.equal(s5[k], s7[k]) for k in s5), "an inf-loss step changed the state"
    assert all(torch.isfinite(v.float()).all() for v in s7.values())
    assert (save / "latest").read_text() == "step_7" and not (save / "step_8").exists()
    assert atomic.verify(str(save / "step_7")) is None


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_corrupt_bin_stops_before_step_1(env, data, tmp_path):
    """Bytes in the middle of the .bin overwritten (same size, so only the token scan can tell):
    both ranks stop with one line naming the file, before any step or checkpoint."""
    prefix = tmp_path / "corrupt"
    shutil.copy(data / "stdlib.idx", f"{prefix}.idx")
    raw = bytearray((data / "stdlib.bin").read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = b"\xff" * 64  # uint16 65535 >= vocabulary 512
    with open(f"{prefix}.bin", "wb") as f:
        f.write(raw)
    save = tmp_path / "run"
    proc = run(env, torchrun(data, save, f"train.data_path=[{prefix}]"), check=False)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    print("observed: exit code", proc.returncode, *errors, sep="\n")
    # Each rank prints the same line (torchrun may stop one before it does, and the two
    # ranks' writes can share a line of the pipe): every "error:" is that one.
    named = f"error: {prefix}.bin: token id 65535 at token "
    assert errors and errors[0].startswith(named), proc.stderr[-3000:]
    assert "outside the vocabulary of 512" in errors[0]
    assert proc.stderr.count("error: ") == proc.stderr.count(named) <= 2
    assert "megatron_moc/" not in proc.stderr  # no traceback from our code, just the line
    assert not (save / "train_log.jsonl").exists() and not committed(save)


@pytest.mark.slow
def test_preprocessing_killed_then_rerun_skips_finished_inputs(env, data, tmp_path):
    """kill -9 of tools/preprocess_data.py once its manifest records the first input; the same
    command again skips that input and writes the same bytes as an uninterrupted run."""
    docs = [json.loads(l) for l in open(data / "stdlib.jsonl")]
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(json.dumps(d) + "\n" for d in docs[:8]))
    second.write_text("".join(json.dumps(d) + "\n" for d in docs))  # most of the work

    def cmd(prefix):
        return [sys.executable, "tools/preprocess_data.py", "--input", str(first), str(second),
                "--tokenizer", str(data / "tok.model"), "--output-prefix", str(prefix),
                "--workers", "1", "--no-progress"]

    run(env, cmd(tmp_path / "ref" / "ds"))
    out = tmp_path / "out" / "ds"
    proc = subprocess.Popen(cmd(out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    manifest, deadline = tmp_path / "out" / "ds.manifest.json", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if str(first) in json.loads(manifest.read_text())["inputs"]:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = run(env, cmd(out))
    print("observed:", again.stdout)
    assert f"skip {first}: finished in a previous run" in again.stdout, again.stdout
    for suffix in (".bin", ".idx"):
        assert (tmp_path / "out" / f"ds{suffix}").read_bytes() == \
            (tmp_path / "ref" / f"ds{suffix}").read_bytes()
