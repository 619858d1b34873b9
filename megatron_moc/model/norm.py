"""RMSNorm: `x * rsqrt(mean(x²) + eps) * w` (MOC_MATH.md, every norm), computed in fp32.

Megatron's WrappedTorchNorm refuses sequence parallelism, so this is our own. Under TP with
sequence parallelism each rank normalizes different tokens: the weight is marked
`sequence_parallel` so Megatron/DeepSpeed all-reduce its gradient over the TP group.
"""

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Functional RMSNorm over the last dim. fp32 math (fp64 stays fp64), output in x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(compute)).to(x.dtype)


class RMSNorm(nn.Module):
    """Megatron-compatible norm module: `RMSNorm(config, hidden_size, eps)`."""

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-6):
        super().__init__()
        dtype = getattr(config, "params_dtype", torch.float32) if config is not None else torch.float32
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps
        if config is not None and getattr(config, "sequence_parallel", False):
            setattr(self.weight, "sequence_parallel", True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
