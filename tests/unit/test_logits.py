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
@pytest.mark.parametrize("outputs", [24, 3])   # 3: padded to 8 inside (unaligned rows)
def test_bf16_operands_match_the_fp32_product(device, bias, outputs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g).to(device, torch.bfloat16).requires_grad_()
    w = (torch.randn(outputs, 64, generator=g) / 8).to(device, torch.bfloat16).requires_grad_()
    b = (torch.randn(outputs, generator=g).to(device, torch.bfloat16).requires_grad_()
         if bias else None)
    out = fp32_logits(x, w, b)
    assert out.dtype == torch.float32 and out.shape == (300, outputs)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    ref = x64 @ w64.t() + (b64 if bias else 0)
    # bf16 x bf16 products are exact in fp32: only the fp32 summation order differs
    assert rel(out, ref) < 1e-6
    dy = torch.randn(300, outputs, generator=g).to(device)
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



def test_own_gate_logits_match_fp64():
    """Each row against its own expert's gate; an expert without rows gets no gradient."""
    from megatron_moc.moc.logits import own_gate_logits

    g = torch.Generator().manual_seed(1)
    P, E, O, D = 200, 3, 3, 48
    x = torch.randn(P, D, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(E, O, D, generator=g) / 4).bfloat16().requires_grad_()
    b = torch.randn(E, O, generator=g).bfloat16().requires_grad_()
    expert = torch.randint(0, E - 1, (P,), generator=g)
    out = own_gate_logits(x, w, b, expert)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.einsum("pd,pod->po", x64, w64[expert]) + b64[expert]
    assert out.dtype == torch.float32 and rel(out, ref) < 1e-6
    dy = torch.randn(P, O, generator=g)
    out.backward(dy)
    ref.backward(dy.double())
    for t, t64 in ((x, x64), (w, w64), (b, b64)):
        assert rel(t.grad, t64.grad) < 1e-2
    assert torch.all(w.grad[-1] == 0)
