"""Launchers: each pretrain_*.sh is valid bash and valid Python (so `deepspeed x.sh` works),
and the dry run prints the parameter counts without a GPU."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("recipe", ["moc_1b", "moc_2b", "moe_1b"])
def test_launcher_python_half_parses(recipe):
    # Bash executes only the top (it ends in `exec` inside _launch.sh, so `bash -n`, which
    # parses the whole file, does not apply); the dry run below executes both halves.
    script = os.path.join(ROOT, "launchers", f"pretrain_{recipe}.sh")
    compile(open(script).read(), script, "exec")


@pytest.mark.slow
def test_dry_run_through_python_and_bash():
    script = os.path.join(ROOT, "launchers", "pretrain_moc_1b.sh")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the pytest process already holds its own port
    for cmd in ([sys.executable, script, "--dry-run"], ["bash", script, "--dry-run"]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "total 1040.3M, active per token 435.9M" in out.stdout


@pytest.mark.slow
def test_launcher_takes_ep_and_tp_sizes():
    script = os.path.join(ROOT, "launchers", "pretrain_moc_1b.sh")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", EP="8", TP="2")
    for cmd in (["bash", script, "--dry-run"],):  # (the Python half: _entry.run, same vars)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "expert_model_parallel_size: 8" in out.stdout
        assert "tensor_model_parallel_size: 2" in out.stdout
