"""The expert MLP as custom ops (kernels/expert_mlp_op.py) against the float64 reference, eager
and under torch.compile (no graph break around it), plus torch.library's own op checks."""
import pytest
import torch

from kernels.expert_mlp import expert_swiglu_mlp, expert_swiglu_mlp_reference
from kernels.expert_mlp_op import _bwd, _fwd, expert_swiglu_mlp_op
from tests.kernels.test_expert_mlp import CASES, grads, make, rel


# The op against the float64 reference: tests/kernels/test_expert_mlp.py runs its
# reference test on both entry points (`expert_swiglu_mlp` and `expert_swiglu_mlp_op`).


def test_op_inference_saves_nothing(device):
    x, w13, w2, _, offsets, gidx = make(*CASES[0], True, device)
    with torch.no_grad():
        y, pre, h = _fwd(x, w13, w2, offsets, gidx, "triton", False)
    assert pre.numel() == 0 and h.numel() == 0
    assert rel(y, expert_swiglu_mlp_reference(x, w13, w2, offsets, gidx)) < 1e-5


def test_opcheck(device):
    x, w13, w2, dy, offsets, gidx = make(*CASES[2], True, device)
    torch.library.opcheck(_fwd, (x, w13, w2, offsets, gidx, "triton", True),
                          test_utils=("test_schema", "test_faketensor"))
    y, pre, h = _fwd(x, w13, w2, offsets, gidx, "triton", True)
    torch.library.opcheck(_bwd, (dy, x, w13, w2, offsets, gidx, pre, h, "triton"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
def test_compiled_irl_loop_has_no_graph_break(device):
    """Two IRL-like steps around the public op under torch.compile: one graph, same values
    and gradients as eager (the public function routes to the custom ops while tracing)."""
    from torch._dynamo.utils import counters

    x, w13, w2, dy, offsets, _ = make(*CASES[0], False, device)

    def irl(x, w13, w2):
        h = x
        for _ in range(2):
            z = torch.nn.functional.rms_norm(h + x, (x.shape[1],), eps=1e-6)
            h = h + 0.5 * expert_swiglu_mlp(z, w13, w2, offsets, backend="triton")
        return h

    torch._dynamo.reset()
    counters.clear()
    y, leaves = grads(torch.compile(irl, fullgraph=True), (x, w13, w2))
    y.backward(dy)
    y_e, leaves_e = grads(irl, (x, w13, w2))
    y_e.backward(dy)
    assert not counters["graph_break"]
    assert rel(y, y_e) < 1e-5
    for a, b in zip(leaves, leaves_e):
        assert rel(a.grad, b.grad) < 1e-4
