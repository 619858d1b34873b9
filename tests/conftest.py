"""Shared test setup: markers, and Megatron's world of one for in-process model tests."""

import os
import sys

import pytest
import torch

# Kernel tests run Triton on the CPU interpreter when there is no GPU. The variable must be
# set before anything imports triton / kernels/ (model modules do, at collection time of any
# test folder), so it is set here, session-wide. `auto` never picks Triton for CPU tensors and
# the e2e subprocesses drop the variable (tests/e2e/conftest.py), so nothing else runs on it.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

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
