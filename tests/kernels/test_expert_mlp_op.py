"""The expert MLP as custom ops (kernels/expert_mlp_op.py) against the float64 reference, eager
and under torch.compile (no graph break around it), plus torch.library's own op checks; the
weight-gradient chain of the S IRL steps against autograd's per-step gradients."""
import pytest
import torch

from kernels.expert_mlp import expert_swiglu_mlp, expert_swiglu_mlp_reference
from kernels import expert_mlp_op
from kernels.expert_mlp_op import _bwd, _fwd, expert_swiglu_mlp_op, wgrad_chain
from tests.kernels.test_expert_mlp import CASES, grads, make, rel


# The op against the float64 reference: tests/kernels/test_expert_mlp.py runs its
# reference test on both entry points (`expert_swiglu_mlp` and `expert_swiglu_mlp_op`).


def test_op_inference_saves_nothing(device):
    x, w13, w2, _, offsets, gidx = make(*CASES[0], True, device)
    with torch.no_grad():
        y, pre, h, *links = _fwd(x, w13, w2, offsets, gidx, "triton", False)
    assert pre.numel() == 0 and h.numel() == 0 and all(t.numel() == 0 for t in links)
    assert rel(y, expert_swiglu_mlp_reference(x, w13, w2, offsets, gidx)) < 1e-5


def test_opcheck(device):
    x, w13, w2, dy, offsets, gidx = make(*CASES[2], True, device)
    torch.library.opcheck(_fwd, (x, w13, w2, offsets, gidx, "triton", True),
                          test_utils=("test_schema", "test_faketensor"))
    y, pre, h, *_ = _fwd(x, w13, w2, offsets, gidx, "triton", True)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(_bwd, (dy, x, w13, w2, offsets, gidx, pre, h, "triton"),
                          test_utils=checks)
    # a chained step: links in and out; its backward adds fp32 sums without touching them
    links = (torch.zeros(w13.shape, device=device), torch.zeros(w2.shape, device=device))
    for emit in (expert_mlp_op.SUM_LINKS, expert_mlp_op.OPERAND_LINKS):
        torch.library.opcheck(_fwd, (x, w13, w2, offsets, gidx, "triton", True, *links, None,
                                     None, None, emit), test_utils=checks)
    for final in (False, True):
        torch.library.opcheck(_bwd, (dy, x, w13, w2, offsets, gidx, pre, h, "triton",
                                     torch.randn(w13.shape, device=device),
                                     torch.randn(w2.shape, device=device), final),
                              test_utils=checks)
    # the chain's last step defers its wgrads; the step before takes its operands
    torch.library.opcheck(_bwd, (dy, x, w13, w2, offsets, gidx, pre, h, "triton", None, None,
                                 False, True, None, None, None, None, None, True),
                          test_utils=checks)
    xa = x.index_select(0, gidx)
    nxt = (torch.randn_like(xa), torch.randn_like(pre), torch.randn_like(h), torch.randn_like(dy),
           offsets.double())
    torch.library.opcheck(_bwd, (dy, x, w13, w2, offsets, gidx, pre, h, "triton", None, None,
                                 True, True, *nxt), test_utils=checks)


@pytest.fixture
def operand_links(monkeypatch):
    """The chain's last step hands the step before its wgrad operands (OPERAND_LINKS), as on
    sm90, also where the fused pair kernel does not run: wgrad_pair is then its two-launch
    composite, and the chain's plumbing is what is tested."""
    from kernels import grouped_gemm as gg
    monkeypatch.setattr(gg.TritonPrimitives, "pair_fused", staticmethod(lambda dev, dt: True))
    monkeypatch.setattr(expert_mlp_op, "PAIR", True)


@pytest.fixture
def sum_links(monkeypatch):
    """Every chained step hands the step before fp32 sums (MOC_GMM_WGRAD_PAIR=off)."""
    monkeypatch.setattr(expert_mlp_op, "PAIR", False)


def irl_loop(x, w13, w2, offsets, steps, how):
    """`steps` IRL-like steps on shared weights; their weight gradients summed by `how`:
    "chain" (wgrad_chain, through the public expert_swiglu_mlp, which routes to the custom
    ops), "op_chain" (the same chain, the op called directly) or "autograd" (each step's dW
    on its own, summed by autograd)."""
    chain = wgrad_chain(steps) if how != "autograd" else None
    mlp = expert_swiglu_mlp_op if how == "op_chain" else expert_swiglu_mlp
    h = x
    for _ in range(steps):
        z = torch.nn.functional.rms_norm(h + x, (x.shape[1],), eps=1e-6)
        if chain is not None:
            y, chain = mlp(z, w13, w2, offsets, wgrad_chain=chain, backend="triton")
        else:
            y = mlp(z, w13, w2, offsets, backend="triton")
        h = h + 0.5 * y
    assert chain is None    # the last use ends it
    return h


@pytest.mark.parametrize("links", ["sum_links", "operand_links"])
@pytest.mark.parametrize("steps", [2, 3])
def test_wgrad_chain_matches_autograd(device, steps, links, request):
    """fp32: the chain's one sum of the S steps' dW equals autograd's sum of per-step dW (and
    both entry points give the same values, bit for bit: the same kernels in the same order);
    the forward and dX do not change. With the last step's operands handed to the step
    before (operand_links) as with fp32 sums."""
    request.getfixturevalue(links)
    x, w13, w2, dy, offsets, _ = make(*CASES[2], False, device)
    out = {}
    for how in ("chain", "op_chain", "autograd"):
        y, leaves = grads(irl_loop, (x, w13, w2), offsets, steps, how)
        y.backward(dy)
        out[how] = [y] + [t.grad for t in leaves]
    for a, b in zip(out["chain"], out["op_chain"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(out["chain"], out["autograd"]):
        assert a.dtype == torch.float32
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("links", ["sum_links", "operand_links"])
def test_wgrad_chain_step_off_the_loss(device, links, request):
    """A chained step whose output never reaches the loss (only its link does): it adds no
    dW, and the weights' gradient is the other step's alone."""
    request.getfixturevalue(links)
    x, w13, w2, dy, offsets, _ = make(*CASES[0], False, device)
    x2 = torch.randn_like(x)
    (w13c, w2c), (w13a, w2a) = [(w13.clone().requires_grad_(), w2.clone().requires_grad_())
                                for _ in range(2)]
    _, chain = expert_swiglu_mlp(x, w13c, w2c, offsets, wgrad_chain=wgrad_chain(2))
    y2, _ = expert_swiglu_mlp(x2, w13c, w2c, offsets, wgrad_chain=chain)
    (y2 * dy).sum().backward()
    (expert_swiglu_mlp(x2, w13a, w2a, offsets) * dy).sum().backward()
    assert rel(w13c.grad, w13a.grad) < 1e-5 and rel(w2c.grad, w2a.grad) < 1e-5


def test_wgrad_chain_backward_order(device, monkeypatch, sum_links):
    """Three steps: the last one's backward (first to run) starts the fp32 sums, the middle
    one adds into them, the first one ends the chain in the weights' dtype; only it hands the
    weights a gradient, and the links hold no memory."""
    calls, real = [], expert_mlp_op._bwd

    def spy(*args):
        calls.append((args[9] is None, args[10] is None, args[11]))
        return real(*args)

    monkeypatch.setattr(expert_mlp_op, "_bwd", spy)
    x, w13, w2, dy, offsets, _ = make(*CASES[0], False, device)
    links = []
    real_fwd = expert_mlp_op._fwd
    monkeypatch.setattr(expert_mlp_op, "_fwd", lambda *a: links.append(real_fwd(*a)) or links[-1])
    y, leaves = grads(irl_loop, (x, w13, w2), offsets, 3, "op_chain")
    y.backward(dy)
    assert calls == [(True, True, False), (False, False, False), (False, False, True)]
    assert [tuple(o[3].shape) for o in links] == [tuple(w13.shape)] * 2 + [(0,)]
    assert all(o[3].stride() == (0, 0, 0) and o[4].stride() == (0, 0, 0) for o in links[:2])
    assert all(t.grad is not None for t in leaves)


def test_wgrad_chain_without_grad(device):
    x, w13, w2, _, offsets, _ = make(*CASES[0], False, device)
    with torch.no_grad():
        y, chain = expert_swiglu_mlp_op(x, w13, w2, offsets, wgrad_chain=wgrad_chain(2))
    assert chain is None
    assert rel(y, expert_swiglu_mlp_reference(x, w13, w2, offsets)) < 1e-5
    with pytest.raises(ValueError, match="steps must be >= 1"):
        wgrad_chain(0)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["autograd", "chain", "chain_operand_links"])
def test_compiled_chain_matches_eager(device, how, request):
    """The S-step loop under torch.compile (fullgraph) against eager: no graph break (the
    public function routes to the custom ops while tracing), the same values and gradients,
    with the weight-gradient chain and without."""
    from torch._dynamo.utils import counters

    if how == "chain_operand_links":
        request.getfixturevalue("operand_links")
        how = "chain"

    x, w13, w2, dy, offsets, _ = make(*CASES[0], False, device)
    torch._dynamo.reset()
    counters.clear()
    loop = torch.compile(irl_loop, fullgraph=True)
    y, leaves = grads(loop, (x, w13, w2), offsets, 3, how)
    y.backward(dy)
    y_e, leaves_e = grads(irl_loop, (x, w13, w2), offsets, 3, how)
    y_e.backward(dy)
    assert not counters["graph_break"]
    assert rel(y, y_e) < 1e-5
    for a, b in zip(leaves, leaves_e):
        assert rel(a.grad, b.grad) < 1e-5


def test_wgrad_chain_operand_links(device, monkeypatch, operand_links):
    """Two steps with operand links: the last step's backward (first to run) computes no
    wgrad and hands the step before its operands (x, d(gate|up), h, dy, offsets as float64),
    whose backward sums both steps' dW in one wgrad_pair per weight, in the weights' dtype;
    the links hold no memory. A last step whose rows differ from the step before's fails by
    name."""
    calls, real = [], expert_mlp_op._bwd

    def spy(*args):
        calls.append((args[13] is not None, args[-1] if len(args) > 18 else False))
        return real(*args)

    monkeypatch.setattr(expert_mlp_op, "_bwd", spy)
    x, w13, w2, dy, offsets, _ = make(*CASES[0], False, device)
    y, leaves = grads(irl_loop, (x, w13, w2), offsets, 2, "op_chain")
    y.backward(dy)
    assert calls == [(False, True), (True, False)]    # the last step defers, the first pairs
    w13g = leaves[1].grad
    assert w13g is not None and w13g.dtype == w13.dtype
    _, chain = expert_swiglu_mlp_op(x.clone().requires_grad_(), w13, w2, offsets,
                                    wgrad_chain=wgrad_chain(2))
    p, d = x.shape
    assert [tuple(t.shape) for t in chain.links] == [
        (p, d), (p, w13.shape[2]), (p, w2.shape[1]), (p, d), tuple(offsets.shape)]
    assert chain.links[4].dtype == torch.float64
    assert all(t.stride() == (0,) * t.dim() for t in chain.links)
    with pytest.raises(ValueError, match="last use must have the rows"):
        expert_swiglu_mlp_op(torch.cat([x, x[:1]]).requires_grad_(), w13, w2, offsets,
                             wgrad_chain=chain)
