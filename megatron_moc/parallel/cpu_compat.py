"""Let megatron-core 0.16 run on a CPU (gloo) for tests and the CPU quickstart.

Megatron-core is GPU-first. These are the only places it reaches for CUDA on our path, and
the one patch we apply for each (nothing else in the project patches third-party code):

- `torch.cuda.current_device()` is called by RoPE (`RotaryEmbedding.get_emb` moves its
  inv_freq there), by the global memory buffer, the TP gather/scatter mappings and the
  all-to-all. On a machine without CUDA we point it at the CPU device.
- The RNG tracker (`tensor_parallel.get_cuda_rng_tracker`) keeps named CUDA generator states;
  the embedding forks it under sequence parallelism. On CPU we install `CPURNGStatesTracker`,
  the same tracker over torch's CPU generator, and `seed_everything` adds its named states
  with Megatron's seed offsets (`model_parallel_cuda_manual_seed` needs CUDA).

Call `enable_cpu_compat()` once before building a model on a CPU-only machine; it is a no-op
when CUDA is available.
"""

import contextlib

import torch

_ENABLED = False


def _cpu_tracker_class():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CPURNGStatesTracker(CudaRNGStatesTracker):
        """Megatron's RNG tracker with the CPU generator in place of the CUDA one."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CPURNGStatesTracker


def enable_cpu_compat() -> bool:
    """Patch the CUDA lookups above when no GPU is present. Returns True if patched."""
    global _ENABLED
    if torch.cuda.is_available() or _ENABLED:
        return _ENABLED
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    mrandom._CUDA_RNG_STATE_TRACKER = _cpu_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _ENABLED = True
    return True


def seed_everything(seed: int) -> None:
    """Seed torch and Megatron's named RNG states (data-, tensor- and expert-parallel)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    elif _ENABLED:
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import random as mrandom

        tracker = mrandom._CUDA_RNG_STATE_TRACKER
        tracker.reset()
        tp_rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
        # Megatron's offsets (model_parallel_cuda_manual_seed), EP/ETP rank 0 here.
        tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
        tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
        tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
