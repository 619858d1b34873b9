"""fp32 logits of the router and the adaptive gates, computed on the tensor cores.

MOC_MATH.md asks for the router (x·W_gate^T, E outputs) and the adaptive step and round
gates (d -> S+1 per expert, d -> R+1) in fp32. In bf16 training both operands are bf16
(activations, and weights stored in params_dtype), so upcasting them and running an fp32
GEMM computes exactly the products a bf16 tensor-core GEMM computes (a bf16 × bf16 product
is exact in fp32) and sums them in fp32, as the tensor cores' fp32 accumulator does. The
upcast version costs more than it buys: it writes an fp32 copy of x, and these skinny
outputs (8 to E·(S+1) = 24 columns) run on CUDA-core SIMT GEMMs, 2–3% of a MoC training
step on an H100 (docs/benchmarks.md, issue 7). So, with bf16/fp16 operands:

    forward   logits = mm(x, W^T) with fp32 output (CUDA: `torch.mm(..., out_dtype=fp32)`;
              elsewhere the upcast product, the same values)
    backward  the fp32 logit gradient is rounded once to the operands' dtype; dx = g·W and
              dW = g^T·x are GEMMs with fp32 accumulation, written in x's / W's dtype (the
              dtypes autograd would hand back anyway)

Other dtypes (fp32 / fp64 weights, the fp64 tests) take the plain upcast product.

Outputs are padded to a multiple of 8 columns inside the products (zero weight rows, sliced
off): the round gate's 3 fp32 outputs make 12-byte rows, and cuBLAS ran CUTLASS's unaligned
sm75 kernels for them, ~40 µs each for the forward, dx and dW products at the 1B config.
"""

from __future__ import annotations

import torch

_TENSOR_CORE_DTYPES = (torch.bfloat16, torch.float16)


def _mm_fp32_out(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        return torch.mm(x, w.t(), out_dtype=torch.float32)
    return x.float() @ w.float().t()


class _LowPrecisionLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return _mm_fp32_out(x, _pad_rows(w))[:, :w.shape[0]]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        O = w.shape[0]
        g = torch.nn.functional.pad(grad.to(x.dtype), (0, -O % 8))
        dx = g @ _pad_rows(w) if ctx.needs_input_grad[0] else None
        dw = (g.t() @ x)[:O] if ctx.needs_input_grad[1] else None
        return dx, dw


def _pad_rows(w: torch.Tensor) -> torch.Tensor:
    """w [O, D] with zero rows up to a multiple of 8 (module docstring)."""
    pad = -w.shape[0] % 8
    return torch.nn.functional.pad(w, (0, 0, 0, pad)) if pad else w


def fp32_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
    """x [N, D] · weight[O, D]^T (+ bias [O]) in fp32 ([N, O]; fp64 when x is fp64)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"fp32_logits: x must be [N, D] and weight [O, D], got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype == weight.dtype and x.dtype in _TENSOR_CORE_DTYPES:
        logits = _LowPrecisionLogits.apply(x, weight)
        return logits if bias is None else logits + bias.float()
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = x.to(dt) @ weight.to(dt).t()
    return logits if bias is None else logits + bias.to(dt)


def own_gate_logits(x: torch.Tensor, weight_EOD: torch.Tensor, bias_EO: torch.Tensor,
                    expert_P: torch.Tensor) -> torch.Tensor:
    """fp32 [P, O]: row p's logits under its own expert's gate, x_p · W[e_p]^T + b[e_p]
    (x [P, D], weight [E, O, D], bias [E, O], expert_P int64 [P]): one [P, D]·[D, E·O]
    product over all E gates (cheap: E·O columns), then each row keeps its expert's O.
    (A per-row reduction instead, tried under torch.compile, made inductor inline the gate's
    softmax backward into the [P, D] dx kernel once per element: 3.4 ms a layer on an H100,
    docs/benchmarks.md session 5.)"""
    E, O, D = weight_EOD.shape
    P = x.shape[0]
    logits = fp32_logits(x, weight_EOD.reshape(E * O, D), bias_EO.reshape(-1)).view(P, E, O)
    return logits.gather(1, expert_P.view(P, 1, 1).expand(P, 1, O)).squeeze(1)
