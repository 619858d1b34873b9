"""MoCConfig: Megatron-core's TransformerConfig plus every field of MOC_MATH.md.

One config, validated once. Megatron names are kept for what Megatron already has
(`num_moe_experts`, `moe_router_topk`, `moe_aux_loss_coeff`, `moe_z_loss_coeff`,
`num_query_groups`, ...); fields that are MoC's own start with `moc_`. Defaults are the
specification's reference config. YAML in and out: `MoCConfig.from_yaml` / `to_yaml`.

Model kinds (`moc_model_kind`), MOC_MATH.md "Block":
    dense        dense SwiGLU FFN, S = 1
    irl_only     dense FFN run as an Iterative Reasoning Loop, S >= 2 (research: n_experts=None)
    moe          top-k experts, S = 1, no mediator: the baseline
    collab_only  top-k experts with the mediator, S = 1
    moc          top-k experts, S >= 1 IRL steps, mediator with R rounds
    moc_v1       the first MoC (research variant): every expert on every token, attention
                 over the E outputs to route, attention over the K chosen to fuse (moc/v1.py)

Research variants (MOC_MATH.md "Research variants beyond the main layer"): gate entropy
regularization (`moc_gate_entropy_*`, off while β_0 = 0), MoC v1 (`moc_v1_*`); Stage II
gate-only training is a training phase (`train.stage2_*`, training/stage2.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

MODEL_KINDS = ("dense", "irl_only", "moe", "collab_only", "moc", "moc_v1")
EXPERT_KINDS = ("moe", "collab_only", "moc", "moc_v1")
ADAPTIVE_MODES = ("soft", "hard")
EXPERT_BACKENDS = ("auto", "triton", "grouped_mm", "loop")
MEDIATOR_BACKENDS = ("auto", "triton", "torch")
RECOMPUTE_CHOICES = ("none", "mediator", "experts", "all")

# Fields a YAML file may set. Megatron's TransformerConfig has ~400 fields; a recipe sets
# the few below, anything else is refused so a typo never passes silently.
_MEGATRON_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "kv_channels", "init_method_std", "layernorm_epsilon", "hidden_dropout", "attention_dropout",
    "num_moe_experts", "moe_router_topk", "moe_aux_loss_coeff", "moe_z_loss_coeff",
    "moe_ffn_hidden_size", "tensor_model_parallel_size", "expert_model_parallel_size",
    "pipeline_model_parallel_size", "sequence_parallel", "bf16", "fp16",
    "recompute_granularity", "recompute_method", "recompute_num_layers",
)
_NON_YAML = ("params_dtype", "pipeline_dtype", "activation_func", "init_method",
             "output_layer_init_method", "autocast_dtype")


def swiglu_ffn_size(hidden_size: int, ffn_mult: float, multiple_of: int) -> int:
    """f = multiple_of · ceil((2/3 · ffn_mult · d) / multiple_of), as the research computes it
    (int() truncations included, so imported checkpoints get the same shapes)."""
    hidden = int(2 * int(ffn_mult * hidden_size) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class MoCConfig(TransformerConfig):
    """TransformerConfig + MoC fields. Spec defaults (MOC_MATH.md "Defaults")."""

    # --- Megatron fields given the specification's values -------------------------------
    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-6
    qk_layernorm: bool = True
    rotary_interleaved: bool = True
    add_bias_linear: bool = False
    gated_linear_unit: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    apply_rope_fusion: bool = False
    bias_activation_fusion: bool = False
    masked_softmax_fusion: bool = False
    persist_layer_norm: bool = False
    gradient_accumulation_fusion: bool = False
    num_moe_experts: Optional[int] = 8
    moe_router_topk: int = 2
    moe_aux_loss_coeff: float = 1e-2
    moe_z_loss_coeff: Optional[float] = 1e-3

    # --- model-level fields GPTModel takes as arguments ---------------------------------
    vocab_size: int = 50257
    max_position_embeddings: int = 2048
    rotary_base: float = 10000.0

    # --- MoC's own fields -----------------------------------------------------------------
    moc_model_kind: str = "moc"
    moc_ffn_mult: float = 4.0
    moc_multiple_of: int = 256
    # Router and capacity (MOC_MATH.md §1, §2). capacity_factor <= 0 means dropless.
    moc_capacity_factor: float = 1.25
    moc_router_noise_std: float = 0.0
    moc_drop_loss_coeff: float = 1e-3
    # Iterative Reasoning Loop (§3).
    moc_irl_steps: int = 1
    moc_adaptive_steps: bool = True
    moc_adaptive_mode: str = "soft"
    moc_step_gate_temperature: float = 1.0
    moc_step_penalty_coeff: float = 0.0
    # Collaboration (§4).
    moc_collab_rounds: int = 2
    moc_adaptive_rounds: bool = True
    moc_round_gate_temperature: float = 1.0
    moc_round_penalty_coeff: float = 0.0
    moc_feedback: bool = True
    moc_mediator_vector: bool = True
    moc_value_rank: int = 0
    # Systems.
    moc_expert_backend: str = "auto"
    # The mediator round's [N, K, D] work (kernels/mediator_round.py): "triton" (fused
    # kernels), "torch" (plain ops; compiled, inductor fuses them), "auto" (triton for bf16 /
    # fp16 / fp32 CUDA tensors, else torch). Speed only: same math.
    moc_mediator_backend: str = "auto"
    # torch.compile the MoC stages (router, IRL experts, mediator), the norms and the loss;
    # Megatron's attention glue stays eager (model/compile.py). Speed only: same math.
    moc_compile: bool = False
    # Activation recompute inside the MoC layer: "none", "mediator" (each mediator round is
    # recomputed in backward), "experts" (each IRL step's norm + gate work; the grouped MLP
    # keeps its own saved tensors), "all" (both). Memory only: same math.
    moc_recompute: str = "none"
    # Research variants. Gate entropy regularization: aux += -β·H(q) for every adaptive gate;
    # β = β_0 (`coeff`) for the first `warmup_frac` of training, then linear to `final` at the
    # last step. β_0 = 0 switches the term off (the research branch used 0.1 -> 0.05, 0.1).
    moc_gate_entropy_coeff: float = 0.0
    moc_gate_entropy_final: float = 0.05
    moc_gate_entropy_warmup_frac: float = 0.1
    # MoC v1: temperature τ_r of its contextual router (logits / τ_r).
    moc_v1_router_temperature: float = 1.0

    def __post_init__(self) -> None:
        self._validate_moc_fields()
        if self.moc_model_kind not in EXPERT_KINDS:
            # Dense kinds have no experts: keep Megatron's MoE machinery switched off.
            self.num_moe_experts = None
            self.moe_ffn_hidden_size = None
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = swiglu_ffn_size(
                self.hidden_size, self.moc_ffn_mult, self.moc_multiple_of)
        if self.num_moe_experts is not None and self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        self.activation_func = F.silu
        if self.moe_router_topk == 1:
            # Megatron's own router insists on this for top-1; ours does not read it.
            self.moe_router_pre_softmax = True
        super().__post_init__()

    # ------------------------------------------------------------------ validation
    def _validate_moc_fields(self) -> None:
        def bad(field: str, msg: str) -> None:
            raise ValueError(f"MoCConfig.{field}: {msg}")

        if self.moc_model_kind not in MODEL_KINDS:
            bad("moc_model_kind", f"unknown kind {self.moc_model_kind!r}; choose one of {MODEL_KINDS}")
        if self.num_layers < 1:
            bad("num_layers", f"must be >= 1, got {self.num_layers}")
        if self.hidden_size % self.num_attention_heads != 0:
            bad("num_attention_heads", f"{self.num_attention_heads} heads do not divide "
                f"hidden_size {self.hidden_size}")
        head_dim = self.kv_channels or self.hidden_size // self.num_attention_heads
        if head_dim % 2 != 0:
            bad("hidden_size", f"head_dim {head_dim} must be even for RoPE")
        kv = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % kv != 0:
            bad("num_query_groups", f"{kv} kv heads do not divide {self.num_attention_heads} heads")
        if self.vocab_size < 1:
            bad("vocab_size", f"must be >= 1, got {self.vocab_size}")
        if self.moc_irl_steps < 1:
            bad("moc_irl_steps", f"steps must be >= 1, got {self.moc_irl_steps}")
        if self.moc_collab_rounds < 0:
            bad("moc_collab_rounds", f"rounds must be >= 0, got {self.moc_collab_rounds}")
        if self.moc_adaptive_mode not in ADAPTIVE_MODES:
            bad("moc_adaptive_mode", f"unknown adaptive mode {self.moc_adaptive_mode!r}; "
                f"choose one of {ADAPTIVE_MODES}")
        if self.moc_recompute not in RECOMPUTE_CHOICES:
            bad("moc_recompute", f"unknown choice {self.moc_recompute!r}; "
                f"choose one of {RECOMPUTE_CHOICES}")
        if self.moc_expert_backend not in EXPERT_BACKENDS:
            bad("moc_expert_backend", f"unknown backend {self.moc_expert_backend!r}; "
                f"choose one of {EXPERT_BACKENDS}")
        if self.moc_mediator_backend not in MEDIATOR_BACKENDS:
            bad("moc_mediator_backend", f"unknown backend {self.moc_mediator_backend!r}; "
                f"choose one of {MEDIATOR_BACKENDS}")
        for name in ("moc_step_gate_temperature", "moc_round_gate_temperature"):
            if getattr(self, name) <= 0:
                bad(name, f"temperature must be > 0, got {getattr(self, name)}")
        if self.moc_value_rank < 0:
            bad("moc_value_rank", f"rank must be >= 0 (0 = full rank), got {self.moc_value_rank}")
        if self.moc_router_noise_std < 0:
            bad("moc_router_noise_std", f"must be >= 0, got {self.moc_router_noise_std}")
        kind, steps = self.moc_model_kind, self.moc_irl_steps
        if kind in ("dense", "moe", "collab_only") and steps != 1:
            bad("moc_irl_steps", f"kind {kind!r} runs S = 1; got {steps} (use 'moc' or 'irl_only')")
        if kind == "irl_only" and steps < 2:
            bad("moc_irl_steps", f"kind 'irl_only' needs S >= 2, got {steps} (S = 1 is 'dense')")
        if kind in EXPERT_KINDS:
            if self.num_moe_experts is None or self.num_moe_experts < 1:
                bad("num_moe_experts", f"kind {kind!r} needs >= 1 expert, got {self.num_moe_experts}")
            if not 1 <= self.moe_router_topk <= self.num_moe_experts:
                bad("moe_router_topk", f"top_k {self.moe_router_topk} must be in "
                    f"[1, num_moe_experts={self.num_moe_experts}]")
        if self.pipeline_model_parallel_size > 1:
            bad("pipeline_model_parallel_size", "pipeline parallelism is not supported yet (use 1)")
        tp, ep = self.tensor_model_parallel_size, self.expert_model_parallel_size
        if tp > 1 and not self.sequence_parallel:
            bad("sequence_parallel", f"must be true with tensor_model_parallel_size={tp}: the "
                "replicated norms and MoC weights are reduced over TP as sequence-parallel params")
        if ep > 1:
            if kind not in EXPERT_KINDS:
                bad("expert_model_parallel_size", f"{ep} needs a kind with experts, not {kind!r}")
            if self.num_moe_experts is not None and self.num_moe_experts % ep:
                bad("expert_model_parallel_size", f"{ep} must divide num_moe_experts="
                    f"{self.num_moe_experts}")
        self._validate_variant_fields()
        if self.recompute_granularity == "full":
            bad("recompute_granularity", "'full' (reentrant) recompute drops the MoC aux-loss "
                "graph; use 'selective' or None")

    def _validate_variant_fields(self) -> None:
        def bad(field: str, msg: str) -> None:
            raise ValueError(f"MoCConfig.{field}: {msg}")

        for name in ("moc_gate_entropy_coeff", "moc_gate_entropy_final"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.moc_gate_entropy_warmup_frac <= 1.0:
            bad("moc_gate_entropy_warmup_frac",
                f"must be in [0, 1], got {self.moc_gate_entropy_warmup_frac}")
        if self.moc_v1_router_temperature <= 0:
            bad("moc_v1_router_temperature", f"must be > 0, got {self.moc_v1_router_temperature}")
        if self.moc_model_kind == "moc_v1":
            if self.moc_irl_steps != 1:
                bad("moc_irl_steps", f"kind 'moc_v1' runs S = 1; got {self.moc_irl_steps}")
            if self.num_moe_experts is not None and self.num_moe_experts < 2:
                bad("num_moe_experts", "kind 'moc_v1' needs >= 2 experts (its aux loss has "
                    "the variance over experts)")
            for name in ("tensor_model_parallel_size", "expert_model_parallel_size"):
                if getattr(self, name) > 1:
                    bad(name, "kind 'moc_v1' is an ablation layer without tensor or expert "
                        "parallelism; use 1")

    # ------------------------------------------------------------------ derived
    @property
    def gate_entropy_on(self) -> bool:
        """The gate entropy term is built (and H logged) only when β_0 > 0."""
        return self.moc_gate_entropy_coeff > 0

    @property
    def has_experts(self) -> bool:
        return self.moc_model_kind in EXPERT_KINDS

    @property
    def experts_per_token(self) -> int:
        """Experts a token runs through: K, all E for MoC v1, 0 without experts."""
        if not self.has_experts:
            return 0
        return self.num_moe_experts if self.moc_model_kind == "moc_v1" else self.moe_router_topk

    @property
    def has_mediator(self) -> bool:
        return self.moc_model_kind in ("moc", "collab_only")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def adaptive_steps_on(self) -> bool:
        return self.moc_adaptive_steps and self.moc_irl_steps > 1

    @property
    def adaptive_rounds_on(self) -> bool:
        return self.moc_adaptive_rounds and self.moc_collab_rounds > 1

    def capacity(self, num_tokens: int) -> int:
        """Per-expert capacity for `num_tokens` tokens (MOC_MATH.md §2); -1 means dropless.

        Plain Python on host-known shapes: no device sync.
        """
        if self.moc_capacity_factor <= 0:
            return -1
        slots = num_tokens * self.moe_router_topk
        target = int(math.ceil(slots / self.num_moe_experts * self.moc_capacity_factor))
        if target <= 0:
            return 0
        return min(1 << int(math.ceil(math.log2(target))), slots)

    # ------------------------------------------------------------------ YAML
    @classmethod
    def yaml_fields(cls) -> tuple:
        own = tuple(f.name for f in dataclasses.fields(cls)
                    if f.name.startswith("moc_") or f.name in
                    ("vocab_size", "max_position_embeddings", "rotary_base"))
        return _MEGATRON_FIELDS + own

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "config") -> "MoCConfig":
        allowed = set(cls.yaml_fields())
        unknown = sorted(k for k in values if k not in allowed)
        if unknown:
            raise ValueError(f"{source}: unknown config field(s) {unknown}; "
                             f"known fields: see MoCConfig.yaml_fields()")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str) -> "MoCConfig":
        import yaml

        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of config fields")
        values = values.get("model", values)
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self.yaml_fields()}

    def to_yaml(self, path: Optional[str] = None) -> str:
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text


def tiny_config(**overrides: Any) -> MoCConfig:
    """A small CPU-sized config for tests and the quickstart."""
    values: Dict[str, Any] = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=512,
        max_position_embeddings=128, moc_multiple_of=16, num_moe_experts=4,
        moe_router_topk=2, moc_irl_steps=2, moc_collab_rounds=2,
        params_dtype=torch.float32, use_cpu_initialization=True,
    )
    values.update(overrides)
    return MoCConfig(**values)
