"""fp32_logits (megatron_moc/moc/logits.py): bf16 operands give the fp32 product of the
upcast operands (forward) and gradients within bf16 rounding of the fp64 ones; fp32 / fp64
operands take the plain product. On a GPU the forward runs `torch.mm(out_dtype=fp32)`."""
import pytest
import torch

from megatron_moc.moc.logits import fp32_logits

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_operands_match_the_fp32_product(device, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g).to(device, torch.bfloat16).requires_grad_()
    w = (torch.randn(24, 64, generator=g) / 8).to(device, torch.bfloat16).requires_grad_()
    b = torch.randn(24, generator=g).to(device, torch.bfloat16).requires_grad_() if bias else None
    out = fp32_logits(x, w, b)
    assert out.dtype == torch.float32 and out.shape == (300, 24)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    ref = x64 @ w64.t() + (b64 if bias else 0)
    # bf16 x bf16 products are exact in fp32: only the fp32 summation order differs
    assert rel(out, ref) < 1e-6
    dy = torch.randn(300, 24, generator=g).to(device)
    out.backward(dy)
    ref.backward(dy.double())
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert rel(x.grad, x64.grad) < 1e-2 and rel(w.grad, w64.grad) < 1e-2
    if bias:
        assert rel(b.grad, b64.grad) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_operands_take_the_plain_product(dtype):
    x = torch.randn(10, 8, dtype=dtype, requires_grad=True)
    w = torch.randn(3, 8, dtype=dtype, requires_grad=True)
    out = fp32_logits(x, w, torch.ones(3, dtype=dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out, x @ w.t() + 1)


def test_mixed_dtypes_upcast():
    """bf16 activations with fp32 weights (fp32 params under autocast): the upcast product."""
    x = torch.randn(10, 8).bfloat16()
    w = torch.randn(3, 8)
    torch.testing.assert_close(fp32_logits(x, w), x.float() @ w.t())


def test_bad_shapes_name_both_operands():
    with pytest.raises(ValueError, match=r"\[N, D\].*\(4, 5\).*\(3, 6\)"):
        fp32_logits(torch.randn(4, 5), torch.randn(3, 6))


def _own_reference(x, w_EOD, b_EO, expert_P):
    """fp64: row p against its own expert's gate."""
    return torch.einsum("pd,pod->po", x.double(), w_EOD.double()[expert_P]) + b_EO.double()[expert_P]


@pytest.mark.parametrize("experts", [1, 3])
def test_reduced_logits_match_fp64(experts):
    """The reduction form used under torch.compile (_ReducedLogits), run eagerly: forward,
    dx and dW (row gradients land on each row's own expert; an expert without rows gets 0)."""
    from megatron_moc.moc.logits import _ReducedLogits

    g = torch.Generator().manual_seed(1)
    P, O, D = 200, 3, 48
    x = torch.randn(P, D, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(experts, O, D, generator=g) / 4).bfloat16().requires_grad_()
    expert = torch.randint(0, max(1, experts - 1), (P,), generator=g) if experts > 1 else None
    out = _ReducedLogits.apply(x, w, expert)
    e64 = torch.zeros(P, dtype=torch.long) if expert is None else expert
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _own_reference(x64, w64, torch.zeros(experts, O, dtype=torch.float64), e64)
    assert out.dtype == torch.float32 and rel(out, ref) < 1e-6
    dy = torch.randn(P, O, generator=g)
    out.backward(dy)
    ref.backward(dy.double())
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert rel(x.grad, x64.grad) < 1e-2 and rel(w.grad, w64.grad) < 1e-2
    if experts > 1:
        assert torch.all(w.grad[-1] == 0)   # the last expert has no rows


def test_compiled_gate_logits_match_eager():
    """Compiled (the reduction path) against eager (the GEMM path): own_gate_logits with E
    experts and the skinny fp32_logits (3 outputs), forward and every gradient."""
    from megatron_moc.moc.logits import own_gate_logits

    def gates(x, w_EOD, b_EO, expert, w_round, b_round):
        return own_gate_logits(x, w_EOD, b_EO, expert), fp32_logits(x, w_round, b_round)

    g = torch.Generator().manual_seed(2)
    P, E, O, D = 96, 4, 3, 32
    leaves = [torch.randn(P, D, generator=g), torch.randn(E, O, D, generator=g) / 4,
              torch.randn(E, O, generator=g), torch.randn(O, D, generator=g) / 4,
              torch.randn(O, generator=g)]
    expert = torch.randint(0, E, (P,), generator=g)
    dys = [torch.randn(P, O, generator=g), torch.randn(P, O, generator=g)]
    results = []
    for fn in (gates, torch.compile(gates, dynamic=False, fullgraph=True)):
        ins = [t.bfloat16().requires_grad_() for t in leaves]
        outs = fn(ins[0], ins[1], ins[2], expert, ins[3], ins[4])
        torch.autograd.backward(outs, dys)
        results.append([o.detach() for o in outs] + [t.grad for t in ins])
    for eager, compiled in zip(*results):
        assert eager.dtype == compiled.dtype
        assert rel(compiled, eager) < 1e-2
