"""Backend choice and the plain-torch twins of the grouped-GEMM primitives.

One idea: every expert op in kernels/ is written once, as an autograd.Function over four
primitives (gmm, gmm_swiglu, gmm_swiglu_bwd, wgrad). This file picks which implementation of
those primitives runs (Triton kernels, or `torch.nn.functional.grouped_mm` with a per-expert
loop behind it) and holds the torch one. The Triton one lives in kernels/grouped_gemm.py.

Shape legend: P dispatched rows (sorted by expert), T source rows (x before a gather),
E experts, K in-dim, N out-dim, F ffn size (w13 has 2F columns: gate then up).

Backend names (the `backend=` argument of the public ops; experts.py passes its config):
    None / "auto"  Triton when `backend_available()` and the tensors suit it, else grouped_mm
    "triton"       the Triton kernels (CUDA, or the CPU interpreter under TRITON_INTERPRET=1)
    "grouped_mm"   torch.nn.functional.grouped_mm (torch >= 2.9); shapes it refuses (fp64,
                   rows not 16-byte aligned) run a per-expert loop instead
    "loop"         the per-expert loop (reads offsets back to the host: slow, for checks)
"""
from __future__ import annotations

import importlib.util
import logging
import os

import torch
import torch.nn.functional as F

from kernels import row_segments

logger = logging.getLogger(__name__)
_LOGGED: set[str] = set()   # log the chosen path once per process, not once per call

BACKENDS = ("auto", "triton", "grouped_mm", "loop")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_available() -> bool:
    """True when the Triton path can run: Triton importable and a CUDA/ROCm GPU present, or
    the Triton CPU interpreter switched on (TRITON_INTERPRET=1, used by the tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or _interpreting()


def resolve_backend(name: str | None, x: torch.Tensor) -> str:
    """Turns a backend name (see the module docstring) into the one that runs for `x`."""
    name = name or "auto"
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: choose one of {BACKENDS}")
    if name == "auto":
        triton_ok = backend_available() and (x.is_cuda or _interpreting())
        name = "triton" if triton_ok else ("grouped_mm" if hasattr(F, "grouped_mm") else "loop")
    if name == "triton" and not backend_available():
        raise ValueError("backend='triton' needs Triton and a GPU (or TRITON_INTERPRET=1); "
                         "install triton or pass backend='grouped_mm'")
    if name not in _LOGGED:
        _LOGGED.add(name)
        how = {"triton": "Triton grouped-GEMM kernels",
               "grouped_mm": "torch.nn.functional.grouped_mm fallback (no Triton path here)",
               "loop": "per-expert loop fallback (host sync per call)"}[name]
        logger.warning("kernels: expert GEMMs run on the %s", how)
    return name


# ---------------------------------------------------------------------------------------
# torch twins of the primitives (same contracts as the Triton launchers)
# ---------------------------------------------------------------------------------------

def _grouped_mm_ok(*mats: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    for m in mats:
        if m.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        if any((s * m.element_size()) % 16 for s in m.stride() if s != 1):
            return False
    return True


def _zero_tail(y: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    # rows outside every expert's rows (past offsets[E], and the gaps of segments) belong to
    # no expert: write zeros (device compare, no sync)
    return y.masked_fill_(~row_segments.row_mask(offsets, y.shape[0])[:, None], 0)


def _expert_rows_only(offsets: torch.Tensor, *mats: torch.Tensor):
    """With segments (kernels/row_segments.py), the gap rows of each [P, .] input as zeros:
    the torch paths then run over the plain offsets and the gaps add nothing (they may hold
    anything, NaN included). Plain offsets: the inputs as they are."""
    if not row_segments.is_segments(offsets):
        return mats
    keep = row_segments.row_mask(offsets, mats[0].shape[0])[:, None]
    return tuple(torch.where(keep, m, 0) for m in mats)


def _loop_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Y[rows_e] = A[rows_e] @ B[e]. Reads offsets to the host (loop backend only)."""
    out = a.new_zeros(a.shape[0], b.shape[-1])
    for e, (lo, hi) in enumerate(row_segments.host_bounds(offsets)):  # host sync: fallback
        if hi > lo:
            out[lo:hi] = (a[lo:hi].float() @ b[e].float()).to(a.dtype)
    return out


def torch_gmm(a, w, offsets, gather_index=None, trans_w=False, use_grouped_mm=True,
              zero_tail=True):
    """[P, N] = A[rows_e] @ W[e] (W[e]^T with trans_w); A = a[gather_index] when given. Rows
    outside the experts' rows are zeros; grouped_mm's are left as it wrote them with
    zero_tail=False."""
    if gather_index is not None:
        a = a.index_select(0, gather_index)
    b = w.transpose(-2, -1) if trans_w else w
    if use_grouped_mm and _grouped_mm_ok(a, b):
        a, = _expert_rows_only(offsets, a)
        y = F.grouped_mm(a, b, offs=row_segments.starts(offsets)[1:].to(torch.int32))
        return _zero_tail(y, offsets) if zero_tail else y
    return _loop_mm(a, b, offsets)


def swiglu_bwd_math(pre: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """d[gate | up] from the saved pre-activation [P, 2F] and dh [P, F], in fp32."""
    f = dh.shape[-1]
    g, u, dh = pre[:, :f].float(), pre[:, f:].float(), dh.float()
    sig = torch.sigmoid(g)
    d_up = dh * g * sig
    d_gate = dh * u * sig * (1 + g * (1 - sig))
    return torch.cat([d_gate, d_up], dim=1).to(pre.dtype)


def torch_wgrad(a, dy, offsets, gather_index=None, accumulate_into=None, out_dtype=None,
                use_grouped_mm=True, num_experts=None, out_of_place=False):
    """dW[e] = A[rows_e]^T @ dY[rows_e] -> [E, K, N]; adds into `accumulate_into` (fp32) when
    given and returns it, or, with an out_dtype other than fp32 or with out_of_place, returns
    the sum in out_dtype and leaves `accumulate_into` as it was (grouped_gemm.launch_wgrad's
    contract)."""
    if gather_index is not None:
        a = a.index_select(0, gather_index)
    num_experts = row_segments.num_experts(offsets) if num_experts is None else num_experts
    if use_grouped_mm and _grouped_mm_ok(a.t(), dy):
        a, dy = _expert_rows_only(offsets, a, dy)
        dw = F.grouped_mm(a.t(), dy, offs=row_segments.starts(offsets)[1:].to(torch.int32))
    else:
        dw = a.new_zeros(num_experts, a.shape[1], dy.shape[1], dtype=torch.float32)
        for e, (lo, hi) in enumerate(row_segments.host_bounds(offsets)):  # host sync: loop
            dw[e] = a[lo:hi].float().t() @ dy[lo:hi].float()
    if accumulate_into is not None:
        if out_dtype in (None, torch.float32) and not out_of_place:
            return accumulate_into.add_(dw)
        return (accumulate_into + dw).to(out_dtype or a.dtype)
    return dw.to(out_dtype or a.dtype)


def wgrad_pair_composite(wgrad, a, dy, offsets, gather_index, second, accumulate_into=None,
                         out_dtype=None):
    """The sum of two row segments' weight gradients (grouped_gemm.launch_wgrad_pair's
    contract) from two calls of a `wgrad` primitive: the second segment's dW in fp32 (added
    to accumulate_into, which is left as it was), then the first's added to it and cast."""
    a2, dy2, offsets2 = second
    part = wgrad(a2, dy2, offsets2, None, accumulate_into, torch.float32, out_of_place=True)
    return wgrad(a, dy, offsets, gather_index, part, out_dtype)


class TorchPrimitives:
    """The four primitives on plain torch (grouped_mm, else a loop)."""

    def __init__(self, use_grouped_mm: bool):
        self.use_grouped_mm = use_grouped_mm

    def gmm(self, a, w, offsets, gather_index=None, trans_w=False, zero_tail=True):
        return torch_gmm(a, w, offsets, gather_index, trans_w, self.use_grouped_mm, zero_tail)

    def gmm_swiglu(self, a, w13, offsets, gather_index=None, store_pre=True, zero_tail=True):
        pre = self.gmm(a, w13, offsets, gather_index)
        f = w13.shape[-1] // 2
        h = (F.silu(pre[:, :f].float()) * pre[:, f:].float()).to(pre.dtype)
        return h, (pre if store_pre else None)

    def gmm_swiglu_bwd(self, dy, w2, offsets, pre):
        return swiglu_bwd_math(pre, self.gmm(dy, w2, offsets, trans_w=True))

    def wgrad(self, a, dy, offsets, gather_index=None, accumulate_into=None, out_dtype=None,
              out_of_place=False):
        return torch_wgrad(a, dy, offsets, gather_index, accumulate_into, out_dtype,
                           self.use_grouped_mm, out_of_place=out_of_place)

    def wgrad_pair(self, a, dy, offsets, gather_index, second, accumulate_into=None,
                   out_dtype=None):
        return wgrad_pair_composite(self.wgrad, a, dy, offsets, gather_index, second,
                                    accumulate_into, out_dtype)
