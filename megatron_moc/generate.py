"""Greedy decoding with MoCGPTModel by full recomputation (no KV cache).

The reference that exported Hugging Face models are compared with: each new token is the
argmax of the last position's logits over the whole sequence so far. Every step routes all
B·T tokens again, so with capacity drops possible an earlier token's output may change as
the sequence grows (README, "Hugging Face export").
"""

import torch


@torch.no_grad()
def greedy_decode(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Args: model a MoCGPTModel; input_ids int64 [B, T]. Returns int64 [B, T + max_new_tokens]
    (prompt included). The model is put in eval mode."""
    model.eval()
    ids = input_ids
    for _ in range(max_new_tokens):
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        logits = model(ids, positions, None)  # [B, T, V]
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids
