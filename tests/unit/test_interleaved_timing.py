"""tools/interleaved_gemm_timing.py: the order of every round (each method takes every
position), the per-round speed ratios against ours, and the row bench_pairs builds. The CPU
path times wall clock, so the test fakes the clock and checks only the bookkeeping."""
import pytest

from tools import interleaved_gemm_timing as it


def test_rotations_put_every_method_in_every_position():
    assert it.rotations(["a", "b", "c"], 4) == [["a", "b", "c"], ["b", "c", "a"],
                                                ["c", "a", "b"], ["a", "b", "c"]]


def test_ratios_are_per_round_against_the_reference():
    times = {"ours": [2.0, 4.0], "gmm": [1.0, 8.0]}
    assert it.ratios_to("ours", times) == {"ours": [1.0, 1.0], "gmm": [2.0, 0.5]}


def test_bench_pairs_rows(monkeypatch):
    calls = []
    # fake wall clock: every timed call takes the method's own number of ms
    cost = {"triton": 2.0, "grouped_mm": 1.0, "mm": 4.0}
    clock = iter(range(10 ** 6))
    now = {"t": 0.0}

    def perf_counter():
        next(clock)
        return now["t"]

    def fn_of(m):
        def run(i):
            calls.append(m)
            now["t"] += cost[m] * 1e-3
        return run

    monkeypatch.setattr(it.time, "perf_counter", perf_counter)
    fns = {m: fn_of(m) for m in cost}
    row, = it.bench_pairs(lambda shape, p: {"w2_wgrad": (1e9, fns)}, (4, 64, 96), 256, rot=1,
                          reps=3, on_gpu=False)
    assert calls == ["triton", "grouped_mm", "mm", "grouped_mm", "mm", "triton",
                     "mm", "triton", "grouped_mm"]
    # TFLOP/s = 1e9 / t ms * 1e-9 = 1 / t
    assert (row["triton"], row["grouped_mm"], row["mm"]) == pytest.approx((0.5, 1.0, 0.25))
    # ratio = t_ours / t_method: grouped_mm twice as fast, mm half as fast
    assert (row["ratio_grouped_mm"], row["ratio_mm"]) == pytest.approx((2.0, 0.5))
    assert row["part"] == "gemm_pairs" and row["reps"] == 3
