"""Hugging Face config of a megatron_moc model (`model_type = "megatron_moc"`).

Self-contained (torch-free, imports only transformers and the standard library): this file is
copied next to the weights of every exported model and loaded with `trust_remote_code=True`.
The fields are the architecture of MoCGPTModel (MOC_MATH.md) under Hugging Face names;
`training_config` keeps the full megatron_moc `MoCConfig` (loss weights, backend, ...) so that
tools/convert_from_hf.py gives back the config the model was trained with.
"""

from transformers import PretrainedConfig

MODEL_KINDS = ("dense", "irl_only", "moe", "collab_only", "moc")


class MegatronMoCConfig(PretrainedConfig):
    """Architecture of a Mixture-of-Collaboration model.

    Attention: pre-norm, fused-QKV GQA with per-head QK RMSNorm before RoPE on interleaved
    pairs (dims 2i, 2i+1). FFN slot by `moc_model_kind`: a SwiGLU FFN run `irl_steps` times
    (dense / irl_only), or top-k experts with capacity, IRL steps, and a mediator (moc /
    collab_only; `collab_rounds` = 0 or kind moe: weighted sum of the expert states).

    `capacity_factor` <= 0 routes without drops. With drops possible (> 0) the result of a token
    depends on the other tokens of the same forward call, exactly as in training: see the
    README section "Hugging Face export".
    """

    model_type = "megatron_moc"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size=50257, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=None, head_dim=None,
                 intermediate_size=2048, max_position_embeddings=2048, rope_theta=10000.0,
                 rms_norm_eps=1e-6, initializer_range=0.02, moc_model_kind="moc",
                 num_experts=8, num_experts_per_tok=2, capacity_factor=1.25, irl_steps=1,
                 adaptive_steps=True, adaptive_mode="soft", step_gate_temperature=1.0,
                 collab_rounds=2, adaptive_rounds=True, round_gate_temperature=1.0,
                 feedback=True, mediator_vector=True, value_rank=0, training_config=None,
                 use_cache=True, tie_word_embeddings=True, **kwargs):
        if moc_model_kind not in MODEL_KINDS:
            raise ValueError(f"MegatronMoCConfig.moc_model_kind: unknown kind {moc_model_kind!r};"
                             f" choose one of {MODEL_KINDS}")
        if adaptive_mode not in ("soft", "hard"):
            raise ValueError(f"MegatronMoCConfig.adaptive_mode: {adaptive_mode!r} is not "
                             "'soft' or 'hard'")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.moc_model_kind = moc_model_kind
        has_experts = moc_model_kind in ("moe", "collab_only", "moc")
        self.num_experts = num_experts if has_experts else None
        self.num_experts_per_tok = num_experts_per_tok if has_experts else None
        self.capacity_factor = capacity_factor
        self.irl_steps = irl_steps
        self.adaptive_steps = adaptive_steps
        self.adaptive_mode = adaptive_mode
        self.step_gate_temperature = step_gate_temperature
        self.collab_rounds = collab_rounds
        self.adaptive_rounds = adaptive_rounds
        self.round_gate_temperature = round_gate_temperature
        self.feedback = feedback
        self.mediator_vector = mediator_vector
        self.value_rank = value_rank
        self.training_config = training_config
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    # Derived switches, as megatron_moc.config.MoCConfig computes them.
    @property
    def has_experts(self) -> bool:
        return self.moc_model_kind in ("moe", "collab_only", "moc")

    @property
    def has_mediator(self) -> bool:
        return self.moc_model_kind in ("moc", "collab_only") and self.collab_rounds > 0

    @property
    def adaptive_steps_on(self) -> bool:
        return bool(self.adaptive_steps) and self.irl_steps > 1

    @property
    def adaptive_rounds_on(self) -> bool:
        return bool(self.adaptive_rounds) and self.collab_rounds > 1

    def capacity(self, num_tokens: int) -> int:
        """Per-expert capacity for `num_tokens` routed tokens (MOC_MATH.md §2); -1: dropless."""
        import math

        if self.capacity_factor <= 0:
            return -1
        slots = num_tokens * self.num_experts_per_tok
        target = int(math.ceil(slots / self.num_experts * self.capacity_factor))
        if target <= 0:
            return 0
        return min(1 << int(math.ceil(math.log2(target))), slots)
