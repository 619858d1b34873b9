"""Let megatron-core 0.16 run on a CPU (gloo) for tests and the CPU quickstart.

Megatron-core is GPU-first. These are the only places it reaches for CUDA on our path, and
the one patch we apply for each (nothing else in the project patches third-party code):

- `torch.cuda.current_device()` is called by RoPE (`RotaryEmbedding.get_emb` moves its
  inv_freq there), by the global memory buffer and by the TP gather/scatter mappings.
  On a machine without CUDA we point it at the CPU device.
- `tensor_parallel.random.model_parallel_cuda_manual_seed` needs CUDA RNG state; on CPU we
  seed torch's default generator instead (see `seed_everything`).

Call `enable_cpu_compat()` once before building a model on a CPU-only machine; it is a no-op
when CUDA is available.
"""

import torch

_ENABLED = False


def enable_cpu_compat() -> bool:
    """Patch the CUDA lookups above when no GPU is present. Returns True if patched."""
    global _ENABLED
    if torch.cuda.is_available() or _ENABLED:
        return _ENABLED
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    _ENABLED = True
    return True


def seed_everything(seed: int) -> None:
    """Seed torch (and Megatron's CUDA RNG tracker when a GPU is present)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
