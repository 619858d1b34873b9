"""Layer specs for the five model kinds (ModuleSpec: structure declared, modules swapped).

    dense / irl_only   attention + IRLFeedForward (one expert, S steps)
    moe                attention + MoCLayer(router, IRL experts S=1, WeightedSumCombiner)
    collab_only / moc  attention + MoCLayer(router, IRL experts, MediatorCombiner)
                       (R = 0 has no mediator rounds: WeightedSumCombiner, as the research)
    moc_v1             attention + MoCV1Layer (research variant: all experts, attention router
                       and fusion; moc/v1.py)

Attention is Megatron's SelfAttention with our SDPA core attention and RMSNorm (QK-norm on).
"""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_moc.model.attention import SDPACoreAttention
from megatron_moc.model.norm import RMSNorm
from megatron_moc.moc.experts import IRLExperts, IRLFeedForward
from megatron_moc.moc.layer import MoCLayer, MoCSubmodules
from megatron_moc.moc.mediator import MediatorCombiner, WeightedSumCombiner
from megatron_moc.moc.router import TopKRouter
from megatron_moc.moc.v1 import MoCV1Layer


def get_moc_mlp_spec(config) -> ModuleSpec:
    """The FFN slot of a transformer layer for `config.moc_model_kind`."""
    kind = config.moc_model_kind
    if kind in ("dense", "irl_only"):
        return ModuleSpec(module=IRLFeedForward)
    if kind == "moc_v1":
        return ModuleSpec(module=MoCV1Layer)
    with_mediator = kind in ("moc", "collab_only") and config.moc_collab_rounds > 0
    return ModuleSpec(module=MoCLayer, submodules=MoCSubmodules(
        router=TopKRouter, experts=IRLExperts,
        combiner=MediatorCombiner if with_mediator else WeightedSumCombiner))


def get_moc_layer_spec(config) -> ModuleSpec:
    """A full transformer layer: pre-norm attention + pre-norm MoC/FFN (MOC_MATH.md Block)."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPACoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=RMSNorm,
                    k_layernorm=RMSNorm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=get_moc_mlp_spec(config),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_moc_block_spec(config) -> TransformerBlockSubmodules:
    return TransformerBlockSubmodules(
        layer_specs=[get_moc_layer_spec(config)] * config.num_layers, layer_norm=RMSNorm)
