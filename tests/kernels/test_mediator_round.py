"""The mediator round's fused kernels (kernels/mediator_round.py, through the custom ops of
kernels/mediator_round_op.py) against their plain-torch twins in float64: outputs and every
gradient, with dropped pairs, tokens with nothing kept, K = 1..4, and D that is not a power
of two. Interpreter (fp32) on a CPU machine, compiled kernels on a GPU."""

import pytest
import torch

from kernels import mediator_round
from kernels.mediator_round_op import mediator_attend, mediator_feedback


def _keep(n, k, gen, device):
    keep = torch.rand(n, k, generator=gen) < 0.7
    keep[0] = False                       # a token with every pair dropped
    keep[1] = True
    return keep.to(device)


def _states(n, k, d, keep, gen, device):
    e = torch.randn(n, k, d, generator=gen) * 2
    return torch.where(keep.cpu().unsqueeze(-1), e, 0).to(device)   # dropped pairs are 0


def _grads(fn, inputs, dout):
    """Outputs and input gradients of fn at `inputs` (leaves made here)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.backward(dout)
    return out.detach(), [None if t.grad is None else t.grad.detach() for t in leaves]


def _close(ours, ref, name, rtol=2e-4, atol=2e-5):
    torch.testing.assert_close(ours.double().cpu(), ref.cpu(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("n,k,d", [(5, 2, 32), (9, 1, 48), (7, 4, 40), (3, 3, 96)])
def test_attend_matches_fp64_twin(device, poison, n, k, d):
    gen = torch.Generator().manual_seed(n * 100 + k * 10 + d)
    keep = _keep(n, k, gen, device)
    states = _states(n, k, d, keep, gen, device)
    norm_w = (1 + 0.3 * torch.randn(d, generator=gen)).to(device)
    qk = torch.randn(n, d, generator=gen).to(device) * 3
    dout = torch.randn(n, d, generator=gen).to(device)

    def run(fn, dtype):
        args = [states.to(dtype), keep, norm_w.to(dtype), qk.to(dtype)]
        return _grads(lambda e, m, w, q: fn(e, m, w, q, 1e-5), args, dout.to(dtype))

    out, grads = run(mediator_attend, torch.float32)
    ref, ref_grads = run(mediator_round.attend_reference, torch.float64)
    _close(out, ref, "pooled")
    for name, g, rg in zip(["d states", "keep", "d norm weight", "d qk"], grads, ref_grads):
        if rg is not None:
            _close(g, rg, name)
    assert out[0].abs().sum() == 0    # nothing kept: β = 0, pooled = 0


@pytest.mark.parametrize("n,k,d", [(5, 2, 32), (9, 1, 48), (7, 4, 40)])
@pytest.mark.parametrize("hard", [False, True])
def test_feedback_matches_fp64_twin(device, poison, n, k, d, hard):
    gen = torch.Generator().manual_seed(n * 100 + k * 10 + d + hard)
    keep = _keep(n, k, gen, device)
    states = _states(n, k, d, keep, gen, device)
    fb = torch.randn(n, d, generator=gen).to(device)
    new_med = torch.randn(n, d, generator=gen).to(device)
    act = torch.rand(n, generator=gen)
    act = (act > 0.5).float() if hard else act
    act[0] = 0                            # the activity of a token with nothing kept
    w_e = (0.2 * torch.randn(1, d, generator=gen)).to(device)
    b_e = torch.randn(1, generator=gen).to(device)
    w_m = (0.2 * torch.randn(1, d, generator=gen)).to(device)
    dout = torch.randn(n, k, d, generator=gen).to(device)

    def run(fn, dtype):
        args = [states.to(dtype), keep, fb.to(dtype), new_med.to(dtype), act.to(device, dtype),
                w_e.to(dtype), b_e.to(dtype), w_m.to(dtype)]
        return _grads(fn, args, dout.to(dtype))

    out, grads = run(mediator_feedback, torch.float32)
    ref, ref_grads = run(mediator_round.feedback_reference, torch.float64)
    _close(out, ref, "states")
    names = ["d states", "keep", "d feedback", "d new mediator", "d activity", "d w_e",
             "d b_e", "d w_m"]
    for name, g, rg in zip(names, grads, ref_grads):
        if rg is not None:
            _close(g, rg, name)
    dropped = ~keep
    assert (out[dropped] == 0).all()      # dropped pairs stay zero


def test_bad_shapes_name_the_argument(device):
    states = torch.zeros(4, 2, 8, device=device)
    with pytest.raises(ValueError, match="keep_NK"):
        mediator_round.attend_fwd(states, torch.ones(4, 3, dtype=torch.bool, device=device),
                                  torch.ones(8, device=device), torch.zeros(4, 8, device=device),
                                  1e-6)
    with pytest.raises(ValueError, match="qk_ND"):
        mediator_round.attend_fwd(states, torch.ones(4, 2, dtype=torch.bool, device=device),
                                  torch.ones(8, device=device), torch.zeros(4, 9, device=device),
                                  1e-6)


def test_opcheck(device):
    """The custom ops' schemas, fake (meta) implementations and autograd registrations."""
    from kernels import mediator_round_op as ops

    gen = torch.Generator().manual_seed(3)
    n, k, d = 6, 2, 24
    keep = _keep(n, k, gen, device)
    states = _states(n, k, d, keep, gen, device).requires_grad_()
    nd = [torch.randn(n, d, generator=gen).to(device).requires_grad_() for _ in range(3)]
    w = torch.ones(d, device=device, requires_grad=True)
    act = torch.rand(n, generator=gen).to(device).requires_grad_()
    w_e, w_m = [(0.1 * torch.randn(1, d, generator=gen)).to(device).requires_grad_()
                for _ in range(2)]
    b_e = torch.zeros(1, device=device, requires_grad=True)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(ops._attend_fwd, (states, keep, w, nd[0], 1e-6), test_utils=utils)
    torch.library.opcheck(ops._feedback_fwd, (states, keep, nd[1], nd[2], act, w_e, b_e, w_m),
                          test_utils=utils)
