"""The GPT model for every kind: Megatron-core's GPTModel with our block spec, tied embeddings.

`build_model(config)` returns a `MoCGPTModel`. Its `forward` is GPTModel's (logits, or per-token
CE when `labels` are given); `aux_loss()` adds the MoC layers' aux losses from the last forward,
averaged over MoC layers as MOC_MATH.md "Model loss" says, and `lm_loss()` gives
`CE + Σ aux / n_moc_layers` in one call.
"""

from typing import List, Optional, Tuple

import torch
from megatron.core.models.gpt import GPTModel

from megatron_moc.model.specs import get_moc_block_spec
from megatron_moc.moc.layer import MoCLayer, RoutingStats
from megatron_moc.moc.v1 import MoCV1Layer

# Layers whose aux loss enters the model loss and whose stats the trainer logs.
MOC_LAYER_TYPES = (MoCLayer, MoCV1Layer)


class MoCGPTModel(GPTModel):
    # Set by model/compile.py (`moc_compile`): the per-token CE runs compiled (TP = 1 only;
    # with TP the logits are vocab-sharded and Megatron's vocab-parallel CE runs).
    compile_loss = False

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-token CE [b, s] from logits [s, b, V] (Megatron's contract)."""
        if self.compile_loss and self.config.tensor_model_parallel_size == 1:
            from megatron_moc.model.compile import compiled_token_cross_entropy

            return compiled_token_cross_entropy(logits, labels)
        return super().compute_language_model_loss(labels, logits)

    def moc_layers(self) -> List[MoCLayer]:
        return [m for m in self.modules() if isinstance(m, MOC_LAYER_TYPES)]

    def set_train_progress(self, step: int, total_steps: int) -> None:
        """Tell the layers which optimizer step (1-based) of `total_steps` comes next; the
        gate entropy β schedule reads it (MOC_MATH.md "Gate entropy regularization"). The
        trainer calls it before every step: explicit state, no globals."""
        for layer in self.moc_layers():
            if hasattr(layer, "set_train_progress"):
                layer.set_train_progress(step, total_steps)

    def aux_loss(self) -> torch.Tensor:
        """Σ_layers aux_layer / n_moc_layers of the last forward (0 for dense kinds)."""
        layers = self.moc_layers()
        if not layers:
            return self.embedding.word_embeddings.weight.new_zeros((), dtype=torch.float32)
        return torch.stack([l.last_aux_loss.float() for l in layers]).sum() / len(layers)

    def routing_stats(self) -> List[RoutingStats]:
        return [l.last_stats for l in self.moc_layers()]

    def lm_loss(self, input_ids: torch.Tensor, labels: torch.Tensor,
                loss_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (total, ce, aux): masked-mean CE over the batch plus the aux loss (fp32)."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device
                                        ).unsqueeze(0).expand_as(input_ids)
        per_token = self(input_ids, position_ids, None, labels=labels).float()  # [b, s]
        if loss_mask is None:
            ce = per_token.mean()
        else:
            mask = loss_mask.float()
            ce = (per_token * mask).sum() / mask.sum().clamp_min(1)
        aux = self.aux_loss()
        return ce + aux, ce, aux


def sum_sequence_parallel_grads_over_tp(model: torch.nn.Module) -> None:
    """Under sequence parallelism a replicated weight (the norms, the dense FFN) sees only its
    TP rank's tokens, so its gradient is partial. Megatron's own trainer all-reduces the
    params marked `sequence_parallel` after backward; DeepSpeed does not know the mark, so a
    hook sums each such gradient over the TP group as autograd produces it (before DeepSpeed's
    data-parallel reduction)."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()

    def hook(grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=group)
        return grad

    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.requires_grad:
            p.register_hook(hook)


def build_model(config, pre_process: bool = True, post_process: bool = True) -> MoCGPTModel:
    """A MoCGPTModel for `config.moc_model_kind` (RoPE with interleaved pairs, tied embeddings)."""
    model = MoCGPTModel(
        config=config,
        transformer_layer_spec=get_moc_block_spec(config),
        vocab_size=config.vocab_size,
        max_sequence_length=config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(config.rotary_base),
    )
    if config.sequence_parallel and config.tensor_model_parallel_size > 1:
        sum_sequence_parallel_grads_over_tp(model)
    if config.moc_compile:
        from megatron_moc.model.compile import compile_regions

        compile_regions(model)
    return model
