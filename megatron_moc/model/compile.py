"""torch.compile where it pays: the MoC layer's stages, the norms and the loss.

One idea: the MoC layer is a chain of small elementwise ops around a few GEMMs (fp32 router
and gates, RMSNorms, the mediator's [N, K, D] work, gated residuals); eagerly each is a pass
over memory, compiled they fuse into a handful of kernels. What gets compiled (`moc_compile`):

    TopKRouter, IRLExperts, MediatorCombiner / WeightedSumCombiner   the MoC stages
    IRLFeedForward                                                    the dense FFN
    every RMSNorm not inside one of the above                         input / pre-MLP / QK norms
    the token cross-entropy (MoCGPTModel.compute_language_model_loss) fp32 CE, fused
    Megatron's unfused RoPE function (`_compile_megatron_rope`)       q and k rotation
    the dispatch gather's backward (moc/dispatch.py `sum_slot_rows`)  gather + sum over K

Each region is one module, compiled with `module.compile()` (static shapes: a training run
has one micro-batch shape); the layers share their compiled code (PyTorch inlines nn.Module
parameters as graph inputs). The grouped expert MLP inside IRLExperts is an opaque custom op
(kernels/expert_mlp_op.py), so the IRL step loop compiles into one graph. Left eager: Megatron's
TransformerLayer / SelfAttention glue (its helpers warn and read process groups per call,
which break graphs), the MoC layer's dispatch glue (with expert parallelism it holds the
all-to-all and its host-synced split sizes; the combine gather runs in the compiled combiner),
and the experts when EP > 1 (their row count changes every step).

Nothing here reads back to the host; the compiled graphs hold no host syncs either (router
capacity comes from the static token count).
"""

from __future__ import annotations

import torch

from megatron_moc.model.norm import RMSNorm
from megatron_moc.moc.experts import IRLExperts, IRLFeedForward
from megatron_moc.moc.mediator import MediatorCombiner, WeightedSumCombiner
from megatron_moc.moc.router import TopKRouter

REGION_TYPES = (TopKRouter, IRLExperts, MediatorCombiner, WeightedSumCombiner, IRLFeedForward,
                RMSNorm)


def _is_region(module: torch.nn.Module) -> bool:
    if isinstance(module, IRLExperts) and module.expert_parallel > 1:
        return False   # rows per rank change every step: recompiles (left eager)
    return isinstance(module, REGION_TYPES)


def compile_regions(model: torch.nn.Module) -> list:
    """`module.compile()` each outermost region of `model` (module docstring); returns their
    names. Idempotent. The model's own flag `compile_loss` switches the compiled loss on."""
    # Dynamo's per-code-object cache: one entry per distinct input shape / grad mode; a few
    # shapes (norms over [s, b, D] and [s, b, heads, head_dim]) plus eval mode fit well.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    names, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if _is_region(module):
            if getattr(module, "_compiled_call_impl", None) is None:
                module.compile(dynamic=False)
            inside.append(name)
            names.append(name)
    if hasattr(model, "compile_loss"):
        model.compile_loss = True
    _compile_megatron_rope()
    _compile_dispatch_backward()
    return names


def _compile_megatron_rope() -> None:
    """Megatron's unfused RoPE (interleaved pairs: strided slices, stack, neg, two products,
    a cat) is ~6 eager passes over q and k each way; compiled it is one. Megatron's
    `apply_rotary_pos_emb` looks `_apply_rotary_pos_emb_bshd` up in its module at every call,
    so swapping in the compiled function (process-wide, same math) is enough. Its fused path
    (`apply_rope_fusion`) needs Transformer Engine, which this project does not require."""
    from megatron.core.models.common.embeddings import rope_utils

    fn = rope_utils._apply_rotary_pos_emb_bshd
    if not getattr(fn, "_moc_compiled", False):
        compiled = torch.compile(fn, dynamic=False)
        compiled._moc_compiled = True
        rope_utils._apply_rotary_pos_emb_bshd = compiled


def _compile_dispatch_backward() -> None:
    """The dispatch gather's backward sums each token's K row gradients (dispatch.py
    `sum_slot_rows`): eagerly a gather writing [P, D] and a sum reading it back; compiled, one
    kernel reads the K rows and writes the token's sum. Swapped process-wide like the RoPE
    function (the backward looks the name up at call time; same math)."""
    from megatron_moc.moc import dispatch

    fn = dispatch.sum_slot_rows
    if not getattr(fn, "_moc_compiled", False):
        compiled = torch.compile(fn, dynamic=False)
        compiled._moc_compiled = True
        dispatch.sum_slot_rows = compiled


def token_cross_entropy(logits_SBV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Per-token CE [b, s] in fp32 from logits [s, b, V] (any float dtype) and labels [b, s].

    Compiled, it reads the logits once in forward (online max / sum-exp) and writes their
    gradient in one pass, where Megatron's eager vocab-parallel CE keeps an fp32 softmax copy
    [s·b, V] and makes ~8 passes over it. The logits keep their [s, b] row order (only the
    small labels and loss are transposed), so the gradient reaching the output layer is
    contiguous: no [s·b, V] copy in its backward."""
    s, b, v = logits_SBV.shape
    loss = torch.nn.functional.cross_entropy(logits_SBV.reshape(s * b, v).float(),
                                             labels_BS.t().reshape(s * b), reduction="none")
    return loss.view(s, b).t()


compiled_token_cross_entropy = torch.compile(token_cross_entropy, dynamic=False)
