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

Under torch.compile two gate shapes run better as fused reductions than as GEMMs
(`_ReducedLogits`; measured on an H100 at the 1B MoC config, per layer and micro-batch):
- the round gate (D -> R+1 = 3 outputs): its fp32 output rows are 12 bytes, so cuBLAS ran
  CUTLASS's unaligned sm75 kernels, ~40 µs each for the forward, dx and dW products;
- each row's own step gate (`own_gate_logits`): the [P, E(S+1)] product computes E times the
  needed logits, and its dx, [P, 24]·[24, D], was fused by inductor into an addmm on top of
  the other dx, with a copy of that [P, D] gradient first (110 µs in all).
Here the forward is one reduction over D per row (x read once), dx a pointwise sum of S+1
weighted weight rows that inductor fuses into the neighbouring gradient kernels, and dW stays
one GEMM (g scattered to its expert's columns, transposed, times x). Same products, fp32
accumulation. Eagerly the reduction would build a [P, O, D] fp32 temporary, so eager mode keeps
the GEMM.
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
        return _mm_fp32_out(x, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        g = grad.to(x.dtype)
        dx = g @ w if ctx.needs_input_grad[0] else None
        dw = g.t() @ x if ctx.needs_input_grad[1] else None
        return dx, dw


class _ReducedLogits(torch.autograd.Function):
    """logits[p, o] = x_p · W[e_p, o] in fp32 for weight [E, O, D] and expert_P [P] (None:
    E = 1), as a reduction; for traced code only (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_EOD: torch.Tensor, expert_P: torch.Tensor | None):
        ctx.save_for_backward(x, w_EOD, expert_P)
        rows = w_EOD[0] if expert_P is None else w_EOD[expert_P]     # [O, D] or [P, O, D]
        return (x.unsqueeze(1).float() * rows.float()).sum(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w_EOD, expert_P = ctx.saved_tensors
        E, O, D = w_EOD.shape
        g = grad.to(x.dtype)
        rows = w_EOD[0] if expert_P is None else w_EOD[expert_P]
        dx = (g.float().unsqueeze(-1) * rows.float()).sum(-2).to(x.dtype)
        if expert_P is not None:   # row p's gradient goes to its expert's O columns
            experts_E = torch.arange(E, device=x.device)
            g = torch.where((expert_P.unsqueeze(1) == experts_E).unsqueeze(-1),
                            g.unsqueeze(1), 0).reshape(-1, E * O)
        pad = -(E * O) % 8   # keep the GEMM's rows 16-byte aligned (O = 3 is not)
        if pad:
            g = torch.nn.functional.pad(g, (0, pad))
        dw = (g.t() @ x)[:E * O].view(E, O, D)
        return dx, dw, None


def _traced_low_precision(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (torch.compiler.is_compiling() and x.dtype == weight.dtype
            and x.dtype in _TENSOR_CORE_DTYPES)


def fp32_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
    """x [N, D] · weight[O, D]^T (+ bias [O]) in fp32 ([N, O]; fp64 when x is fp64)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"fp32_logits: x must be [N, D] and weight [O, D], got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.shape[0] < 8 and _traced_low_precision(x, weight):   # skinny: a reduction
        logits = _ReducedLogits.apply(x, weight.unsqueeze(0), None)
        return logits if bias is None else logits + bias.float()
    if x.dtype == weight.dtype and x.dtype in _TENSOR_CORE_DTYPES:
        logits = _LowPrecisionLogits.apply(x, weight)
        return logits if bias is None else logits + bias.float()
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = x.to(dt) @ weight.to(dt).t()
    return logits if bias is None else logits + bias.to(dt)


def own_gate_logits(x: torch.Tensor, weight_EOD: torch.Tensor, bias_EO: torch.Tensor,
                    expert_P: torch.Tensor) -> torch.Tensor:
    """fp32 [P, O]: row p's logits under its own expert's gate, x_p · W[e_p]^T + b[e_p]
    (x [P, D], weight [E, O, D], bias [E, O], expert_P int64 [P]). Compiled with bf16 /
    fp16 operands: a reduction per row (module docstring); otherwise one [P, D]·[D, E·O]
    product over all E gates (cheap: E·O columns) and a gather."""
    E, O, D = weight_EOD.shape
    P = x.shape[0]
    if _traced_low_precision(x, weight_EOD):
        return _ReducedLogits.apply(x, weight_EOD, expert_P) + bias_EO[expert_P].float()
    logits = fp32_logits(x, weight_EOD.reshape(E * O, D), bias_EO.reshape(-1)).view(P, E, O)
    return logits.gather(1, expert_P.view(P, 1, 1).expand(P, 1, O)).squeeze(1)
