"""Total and active-per-token parameter counts for any config.

Counted from the model itself, built on the meta device (no memory, no GPU, a second or two
even for 2B), so the count can never drift from the modules. Active per token: every
parameter except the experts', plus K of the E experts (each token's pair visits K experts);
the tied embedding counts once.
"""

from dataclasses import dataclass

import torch

from megatron_moc.model.gpt import build_model


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int
    embedding: int
    experts: int

    def __str__(self) -> str:
        return (f"total {self.total / 1e6:.1f}M, active per token {self.active / 1e6:.1f}M "
                f"(embedding {self.embedding / 1e6:.1f}M, experts {self.experts / 1e6:.1f}M)")


def count_model_parameters(model, num_experts: int = 0, top_k: int = 0) -> ParamCount:
    total = experts = embedding = 0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if ".mlp.experts." in name and num_experts:
            experts += p.numel()
        if "word_embeddings" in name:
            embedding += p.numel()
    active = total - experts + (experts * top_k // num_experts if num_experts else 0)
    return ParamCount(total=total, active=active, embedding=embedding, experts=experts)


def count_parameters(config) -> ParamCount:
    """Build `config`'s model on the meta device and count. Needs Megatron's parallel state
    (a world of one is fine: `parallel.groups.init_single_process`)."""
    with torch.device("meta"):
        model = build_model(config)
    return count_model_parameters(model, config.num_moe_experts or 0, config.experts_per_token)
