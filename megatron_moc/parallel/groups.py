"""Process groups, thin over megatron.core.parallel_state and deepspeed.utils.groups.

Model code never creates groups; it asks this module.

Layout (world = TP × DP; EP divides DP):
    tensor parallel (TP)        Megatron's TP groups (attention, embeddings, sequence parallel)
    data parallel (DP)          Megatron's DP groups: the ranks with the same TP rank
    expert parallel (EP)        DeepSpeed's `ep_size_<EP>` groups: EP consecutive ranks of a DP
                                group; the all-to-all of the MoC dispatch runs over it
    expert data parallel (EDP)  DeepSpeed's: ranks holding the same experts (DP / EP of them);
                                expert gradients are reduced over it by DeepSpeed ZeRO
The expert groups are DeepSpeed's own (`_create_expert_data_and_model_parallel`, the call its
MoE layer makes), so ZeRO's expert parameter groups (`allreduce=False`, `group_name`) and the
dispatch agree on who holds which expert. Experts are not split by TP: under TP the TP ranks
of one EP rank hold the same experts and see different tokens (sequence parallel), and their
gradients are summed over TP (parallel/sequence_parallel.py).
"""

import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


class MegatronMPU:
    """The `mpu` object DeepSpeed asks for, answered by megatron.core.parallel_state.

    DeepSpeed reads data-parallel groups for gradient reduction and ZeRO partitioning, and
    names checkpoint files with `get_model_parallel_rank/world_size`, which parallel_state lacks
    (model parallel = tensor parallel here: pipeline parallelism is refused).
    """

    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(
        ps.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)

    @staticmethod
    def get_model_parallel_rank() -> int:
        return ps.get_tensor_model_parallel_rank()

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return ps.get_tensor_model_parallel_world_size()

    @staticmethod
    def get_model_parallel_group():
        return ps.get_tensor_model_parallel_group()


def free_port() -> int:
    """A TCP port free on this host now, for a world of one's store. Picking it by pid (as
    before) let two concurrent test processes collide (EADDRINUSE); the OS's ephemeral pick
    leaves only the short window until the store binds it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process(backend: str = "gloo") -> None:
    """A world of one (tests, tools): torch.distributed + Megatron groups with TP = EP = 1."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group(backend=backend, rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)


def check_sizes(world: int, tensor_parallel: int, expert_parallel: int) -> None:
    """How the sizes must divide, with the message a user sees when they do not."""
    if tensor_parallel < 1 or world % tensor_parallel:
        raise ValueError(f"train.tensor_model_parallel_size={tensor_parallel} must divide the "
                         f"world size {world}")
    dp = world // tensor_parallel
    if expert_parallel < 1 or dp % expert_parallel:
        raise ValueError(f"train.expert_model_parallel_size={expert_parallel} must divide the "
                         f"data-parallel size {dp} (= world {world} / TP {tensor_parallel})")


def build_groups(tensor_parallel: int = 1, expert_parallel: int = 1, backend: str = None) -> None:
    """Initialise torch.distributed from the launcher's env, Megatron's TP/DP groups and,
    for EP > 1, DeepSpeed's expert-parallel and expert-data-parallel groups."""
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
    check_sizes(dist.get_world_size(), tensor_parallel, expert_parallel)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)
    if expert_parallel > 1:
        import deepspeed
        from deepspeed.utils import groups as ds_groups

        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts our process group
        ds_groups.mpu = MegatronMPU()
        if expert_group_name(expert_parallel) not in ds_groups._get_expert_parallel_group_dict():
            ds_groups._create_expert_data_and_model_parallel(expert_parallel, mpu=MegatronMPU())


def expert_group_name(expert_parallel: int) -> str:
    """DeepSpeed's name for the expert groups of one EP size (also each expert param's
    `group_name`)."""
    return f"ep_size_{expert_parallel}"


def expert_parallel_group(expert_parallel: int):
    from deepspeed.utils import groups as ds_groups

    return ds_groups._get_expert_parallel_group(expert_group_name(expert_parallel))


def expert_parallel_rank(expert_parallel: int) -> int:
    if expert_parallel == 1:
        return 0
    return dist.get_rank(group=expert_parallel_group(expert_parallel))


def expert_data_parallel_group(expert_parallel: int):
    from deepspeed.utils import groups as ds_groups

    return ds_groups._get_expert_data_parallel_group(expert_group_name(expert_parallel))


def expert_data_parallel_rank(expert_parallel: int) -> int:
    if expert_parallel == 1:
        return ps.get_data_parallel_rank()
    return dist.get_rank(group=expert_data_parallel_group(expert_parallel))


def destroy_groups() -> None:
    """Forget Megatron's and DeepSpeed's groups (tests that change the layout in-process);
    torch.distributed stays initialised."""
    ps.destroy_model_parallel()
    try:
        from deepspeed.utils import groups as ds_groups
    except ImportError:  # pragma: no cover
        return
    for registry in (ds_groups._EXPERT_PARALLEL_GROUP, ds_groups._EXPERT_DATA_PARALLEL_GROUP,
                     ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
                     ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
        registry.clear()
