"""kernels/sustained_timing.py: back-to-back GPU time with the launches' host work hidden."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kernels import sustained_timing

ROOT = Path(__file__).resolve().parents[2]


def test_an_unknown_timing_mode_is_refused_by_name():
    env = dict(os.environ, MOC_GMM_TIMING="graph")
    run = subprocess.run([sys.executable, "-c", "import kernels.sustained_timing"], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "MOC_GMM_TIMING" in run.stderr and "'graph'" in run.stderr


def test_the_autotuners_keep_tritons_timing_without_a_gpu():
    if not torch.cuda.is_available():
        assert sustained_timing.autotune_do_bench() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_host_work_between_launches_is_not_timed():
    """A launch with 0.3 ms of host work before a ~0.2 ms kernel times as the kernel alone;
    per call (not alone after a flush), so a longer kernel times longer."""
    ms = 0.2
    cycles = int(ms * sustained_timing._cycles_per_ms(torch.cuda.current_device()))

    def slow_host():
        time.sleep(3e-4)
        torch.cuda._sleep(cycles)

    def kernel_only():
        torch.cuda._sleep(cycles)

    def twice():
        torch.cuda._sleep(2 * cycles)

    t_host, t_gpu, t_twice = sustained_timing.sustained_ms((slow_host, kernel_only, twice))
    assert abs(t_host - t_gpu) < 0.1 * t_gpu, (t_host, t_gpu)
    assert abs(t_gpu - ms) < 0.25 * ms, t_gpu
    assert 1.7 < t_twice / t_gpu < 2.3, (t_twice, t_gpu)
    med, lo, hi = sustained_timing.do_bench_sustained(kernel_only, quantiles=(0.5, 0.2, 0.8))
    assert lo <= med <= hi and abs(med - t_gpu) < 0.25 * t_gpu
