"""The benchmark tools run what they claim: the hard-mode part's three step-2 variants (soft,
hard on row segments, hard by the compaction moves) train the same weights the same way on
the rows they keep; the model-level hard-mode bench checks hard against soft mode before it
times them, and refuses to time a hard mode that disagrees; the kernel probe reports every
GEMM for every method."""
import pytest
import torch

from tools import bench_grouped_gemm as bgg
from tools import bench_hard_mode_mlp as hard_mlp
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
    step2, leaves = hard_mlp.hard_mode_steps((3, 16, 24), 48, dtype=torch.float32)
    hard, compact, soft = (_grads(step2, leaves, m) for m in ("hard", "hard_compact", "soft"))
    for a, b in zip(hard, compact):
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

    def wrong(x, norm_w, act, w13, w2, off, steps, hard=False, expert=None):
        out = irl_steps(x, norm_w, act, w13, w2, off, steps, hard, expert)
        return out * 1.01 if hard == "segments" else out   # a hard mode 1% off
    assert bench_irl_hard_mode.check(run, leaves, irl_steps, torch.float32) <= 1e-4
    with pytest.raises(RuntimeError, match="disagrees with soft mode.*'hard h'"):
        bench_irl_hard_mode.check(run, leaves, wrong, torch.float32)


def test_probe_hard_mode_smoke():
    (res,) = probe_hard_mode.main(["--smoke"])
    assert set(res["wall_ms"]) == {"soft", "hard"} and set(res["kernel_sum_us"]) == {"soft", "hard"}


def test_wgrad_pairs_sweep_smoke(device, monkeypatch):
    """`--parts wgradpairs`: every config that runs is ranked by its speed against
    grouped_mm in the same rounds (grouped_mm itself exactly 1), one that cannot run is left
    out, and an unknown GEMM is refused before anything runs."""
    from tools import sweep_gemm_configs as sweeps
    monkeypatch.setattr(bgg, "DEV", device)
    monkeypatch.setattr(sweeps, "bench", bgg)
    with pytest.raises(ValueError, match="unknown GEMMs \\['w13_fwd'\\]"):
        sweeps.sweep_wgrad_pairs((2, 32, 48), 64, ["w13_fwd"], on_gpu=False)
    good, bad = (16, 16, 16, 4, 1, 1), (16, 16, 24, 4, 1, 1)   # 24 rows a step: no arange
    (row,) = sweeps.sweep_wgrad_pairs((2, 32, 48), 64, ["w2_wgrad"], reps=2,
                                      on_gpu=device == "cuda", tma_configs=[good, bad],
                                      ws_configs=[])
    speed = {label: r for r, _, label in row["top"]}
    assert set(speed) == {"grouped_mm", "autotuned", f"tma{good}"}
    assert speed["grouped_mm"] == 1.0 and all(r > 0 for r in speed.values())
    assert [r for r, _, _ in row["top"]] == sorted(speed.values(), reverse=True)
