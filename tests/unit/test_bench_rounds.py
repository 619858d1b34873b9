"""tools/bench_grouped_gemm.py --rounds on the per-GEMM part: the order of the columns in each
round, and the medians the row keeps. Timing is faked, so no kernel runs."""

import pytest

from tools import bench_grouped_gemm as bgg


def test_abba_reverses_odd_rounds():
    assert list(bgg.abba(["a", "b"], 3)) == [(0, "a"), (0, "b"), (1, "b"), (1, "a"),
                                             (2, "a"), (2, "b")]


def test_median_upper_of_even():
    assert bgg.median([3.0, 1.0, 2.0]) == 2.0
    assert bgg.median([4.0, 1.0, 3.0, 2.0]) == 3.0
    assert bgg.median([]) != bgg.median([])   # nan


def _fake(monkeypatch):
    """One GEMM with columns triton, mm and triton_tma (added by bench_gemms); bench() runs
    the call once, records it, and returns 1, 2, 3, ... ms."""
    calls, times = [], iter(range(1, 100))
    fns = {m: (lambda i, m=m: calls.append(m)) for m in ("triton", "mm")}
    monkeypatch.setattr(bgg, "tma_only", lambda fn: lambda i: calls.append("tma"))
    monkeypatch.setattr(bgg, "gemm_fns", lambda shape, p: {"w13_wgrad": (1e9, fns)})
    monkeypatch.setattr(bgg, "bench", lambda fn, rep: (fn(), float(next(times)))[1])
    return calls


def test_gemm_rounds_order_and_medians(monkeypatch):
    calls = _fake(monkeypatch)
    row, = bgg.bench_gemms((4, 64, 96), 256, rep=1, pointer_kernels=False, rounds=3)
    assert calls == ["triton", "mm", "tma", "tma", "mm", "triton", "triton", "mm", "tma"]
    # TFLOP/s = 1e9 flops / t ms * 1e-9 = 1 / t: triton took 1, 6, 7 ms, mm 2, 5, 8 ms
    assert row["rounds_triton"] == pytest.approx([1.0, 1 / 6, 1 / 7])
    assert row["rounds_mm"] == pytest.approx([1 / 2, 1 / 5, 1 / 8])
    assert (row["triton"], row["mm"]) == pytest.approx((1 / 6, 1 / 5))


def test_gemm_one_round_as_before(monkeypatch):
    calls = _fake(monkeypatch)
    row, = bgg.bench_gemms((4, 64, 96), 256, rep=1, pointer_kernels=False)
    assert calls == ["triton", "mm", "tma"]
    assert (row["triton"], row["mm"]) == (1.0, 1 / 2)
    assert not any(k.startswith("rounds_") for k in row)
