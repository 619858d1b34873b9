"""Shared test setup: markers, and Megatron's world of one for in-process model tests."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def megatron_world():
    """torch.distributed (gloo) + Megatron parallel state with one rank, CPU compat on."""
    from megatron_moc.parallel.cpu_compat import enable_cpu_compat
    from megatron_moc.parallel.groups import init_single_process

    enable_cpu_compat()
    init_single_process()
    yield
