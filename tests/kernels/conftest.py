"""Kernel tests: on a machine without CUDA they run the Triton kernels on the CPU
interpreter (fp32; bf16 in the interpreter gives wrong values); with CUDA the same tests run
the compiled kernels on the GPU. TRITON_INTERPRET must be set before kernels/ decorates its
kernels, so it is set here, and kernels/ is re-imported if another test folder imported it
first."""
import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("kernels.gmm_backend", "kernels.swiglu", "kernels.grouped_gemm_tma", "kernels.grouped_gemm",
                  "kernels.expert_mlp", "kernels.mediator_round", "kernels.active_rows"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    torch.backends.cuda.matmul.allow_tf32 = False   # fp32 kernels then use ieee dots
    return DEVICE


@pytest.fixture
def poison(monkeypatch):
    """Every float tensor from torch.empty / empty_like starts as NaN: an output element the
    kernels fail to write shows up as NaN."""
    real_empty, real_like = torch.empty, torch.empty_like

    def _fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(real_like(*a, **k)))


@pytest.fixture(params=["tma", "pointer"])
def gmm_path(request, monkeypatch):
    """Runs a test on both Triton GEMM paths: the TMA kernels (kernels/grouped_gemm_tma.py;
    Hopper, or the interpreter) and the pointer kernels they replace elsewhere."""
    from kernels import grouped_gemm_tma
    if request.param == "tma" and DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA kernels need a Hopper-class GPU")
    monkeypatch.setattr(grouped_gemm_tma, "MODE", "on" if request.param == "tma" else "off")
    return request.param
