"""The benchmark tools run what they claim: the hard-mode part's three step-2 variants (soft,
hard by the compaction moves, hard by permutation gathers) train the same weights the same way on the
rows they keep; the model-level hard-mode bench checks hard against soft mode before it
times them, and refuses to time a hard mode that disagrees; the kernel probe reports every
GEMM for every method."""
import pytest
import torch

from tools import bench_grouped_gemm as bgg
from tools import bench_irl_hard_mode
from tools import probe_gemm_kernels, probe_hard_mode


def _grads(step2, leaves, mode):
    for t in leaves:
        t.grad = None
    step2(mode)
    return [t.grad.clone() for t in leaves[-2:]]   # w13, w2


def test_hard_mode_variants_agree(device, monkeypatch):
    monkeypatch.setattr(bgg, "DEV", device)
    monkeypatch.setattr(bgg, "ROT", 1)   # one input set: every call sees the same x and dY
    step2, leaves = bgg.hard_mode_steps((3, 16, 24), 48, dtype=torch.float32)
    hard, permute, soft = (_grads(step2, leaves, m) for m in ("hard", "hard_permute", "soft"))
    for a, b in zip(hard, permute):
        assert (a - b).norm() <= 1e-5 * b.norm()
    # soft mode runs step 2 on every row: a different (larger) update than hard mode's
    assert all((a - b).norm() > 1e-3 * b.norm() for a, b in zip(hard, soft))


def test_probe_gemm_kernels_smoke():
    report = probe_gemm_kernels.main(["--smoke"])
    assert {(r["gemm"], r["method"]) for r in report} == {
        (g, m) for g in ("w13_fwd", "w13_dgrad", "w2_fwd", "w2_dgrad", "w13_wgrad", "w2_wgrad")
        for m in ("ours", "grouped_mm", "mm")}
    assert all(r["us"] > 0 and r["kernels"] for r in report)


def test_irl_hard_mode_bench_smoke():
    """The model's own soft and hard steps, eager and compiled, agree on the 0/1 activity."""
    (res,) = bench_irl_hard_mode.main(["--smoke"])
    for how in ("eager", "compiled"):
        assert res[f"{how}_max_rel_err"] <= 1e-4
        assert res[f"{how}_soft_ms"] > 0 and res[f"{how}_hard_ms"] > 0


def test_irl_hard_mode_check_refuses_a_disagreeing_hard_mode(device, monkeypatch):
    monkeypatch.setattr(bgg, "DEV", device)
    run, leaves = bench_irl_hard_mode.setup((2, 16, 24), 20, 2, torch.float32)
    from tools.probe_irl_fusions import irl_steps

    def wrong(x, norm_w, act, w13, w2, off, steps, hard=False):
        out = irl_steps(x, norm_w, act, w13, w2, off, steps, hard)
        return out * 1.01 if hard else out   # a hard mode 1% off
    assert bench_irl_hard_mode.check(run, leaves, irl_steps, torch.float32) <= 1e-4
    with pytest.raises(RuntimeError, match="disagrees with soft mode.*'h'"):
        bench_irl_hard_mode.check(run, leaves, wrong, torch.float32)


def test_probe_hard_mode_smoke():
    (res,) = probe_hard_mode.main(["--smoke"])
    assert set(res["wall_ms"]) == {"soft", "hard"} and set(res["kernel_sum_us"]) == {"soft", "hard"}
