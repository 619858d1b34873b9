"""Process groups, thin over megatron.core.parallel_state. Model code never creates groups."""

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def init_single_process(backend: str = "gloo") -> None:
    """A world of one (tests, tools): torch.distributed + Megatron groups with TP = EP = 1."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
        dist.init_process_group(backend=backend, rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


def build_groups(tensor_parallel: int = 1, expert_parallel: int = 1, backend: str = None) -> None:
    """Initialise torch.distributed from the launcher's env and Megatron's TP/EP/DP groups."""
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            expert_model_parallel_size=expert_parallel)
