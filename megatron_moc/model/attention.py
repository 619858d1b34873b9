"""Core attention through torch SDPA (causal, GQA), as a Megatron `core_attention` submodule.

Megatron's SelfAttention does the rest of MOC_MATH.md "Block / Attention": the fused
wqkv projection, per-head QK RMSNorm *before* RoPE, and RoPE on interleaved pairs
(`rotary_interleaved=True`). This module receives q [sq, b, np, hn] and k, v
[sk, b, ng, hn] and returns [sq, b, np·hn]. GQA repeats each kv head for its
np/ng query heads (`repeat_interleave`, the research code's convention).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type=None, pg_collection=None,
                 **kwargs):
        super().__init__(config=config)
        if getattr(config, "context_parallel_size", 1) > 1:
            raise ValueError("SDPACoreAttention: context parallelism is not supported")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("SDPACoreAttention: packed sequences are not supported")
        sq, b, nh, hd = query.shape
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if k.size(1) != nh:  # GQA: query head i reads kv head i // (np/ng)
            rep = nh // k.size(1)
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        mask = None if causal else (None if attention_mask is None else ~attention_mask)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, nh * hd)
