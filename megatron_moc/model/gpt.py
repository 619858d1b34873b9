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


class MoCGPTModel(GPTModel):
    def moc_layers(self) -> List[MoCLayer]:
        return [m for m in self.modules() if isinstance(m, MoCLayer)]

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


def build_model(config, pre_process: bool = True, post_process: bool = True) -> MoCGPTModel:
    """A MoCGPTModel for `config.moc_model_kind` (RoPE with interleaved pairs, tied embeddings)."""
    return MoCGPTModel(
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
