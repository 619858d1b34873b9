"""tools/trace_attribution.py on a hand-built trace: kernels charged to the compiled graph or
eager op whose scope encloses their launch, forward and backward told apart."""

import gzip
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tools.trace_attribution import _load, attribute, format_table  # noqa: E402


def _scope(name, ts, dur, tid=1):
    return {"ph": "X", "cat": "cpu_op", "name": name, "tid": tid, "ts": ts, "dur": dur}


def _launch(corr, ts, tid=1):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": tid, "ts": ts,
            "dur": 1, "args": {"correlation": corr}}


def _kernel(corr, name, dur_us):
    return {"ph": "X", "cat": "kernel", "name": name, "tid": 7, "ts": 1000 + corr,
            "dur": dur_us, "args": {"correlation": corr}}


def _trace():
    ev = [
        # forward: graph A (two kernels), then an eager add holding a nested copy
        _scope("## Call CompiledFxGraph aaaa1111", 0, 10), _launch(1, 2), _launch(2, 5),
        _scope("aten::add", 20, 10), _scope("aten::copy_", 22, 3), _launch(3, 23),
        # backward: graph B inside the autograd engine, and an eager mul in another node
        _scope("autograd::engine::evaluate_function: CompiledFunctionBackward", 40, 20),
        _scope("## Call CompiledFxGraph bbbb2222", 41, 10), _launch(4, 45),
        _scope("autograd::engine::evaluate_function: MulBackward0", 70, 10),
        _scope("aten::mul", 71, 5), _launch(5, 72),
        # a launch on another thread with no scope, and a kernel with no launch
        _launch(6, 90, tid=2),
        _kernel(1, "k_a0", 100), _kernel(2, "k_a1", 300), _kernel(3, "memcpy", 50),
        _kernel(4, "k_b", 2000), _kernel(5, "mul_k", 70), _kernel(6, "lonely", 10),
        _kernel(99, "unknown", 20),
    ]
    return ev


def test_attribution_rows():
    rows, total = attribute(_trace())
    assert abs(total - 2.55) < 1e-9
    got = {label: (r["calls"], round(r["ms"], 3)) for label, r in rows.items()}
    assert got == {
        "graph 00 aaaa1111 fwd": (2, 0.4),
        "eager aten::add": (1, 0.05),
        "graph 01 bbbb2222 bwd": (1, 2.0),
        "eager aten::mul in MulBackward0": (1, 0.07),
        "eager (no scope)": (1, 0.01),
        "unlinked": (1, 0.02),
    }
    table = format_table(rows, total)
    assert table.index("graph 01 bbbb2222 bwd") < table.index("graph 00 aaaa1111 fwd")


def test_load_gzip(tmp_path):
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": _trace()}, f)
    assert len(_load(str(path))) == len(_trace())
