"""Past 2^31 elements (issue 3: offsets and row indices in int64 where products can pass
2^31): grouped GEMMs whose [P, N] operands hold more than 2^31 elements are right in the
rows that sit past that mark, on every kernel path (warp-specialized, TMA, pointer), for the
forward (plain, gathered, SwiGLU epilogue), the dgrad, the wgrad and the SwiGLU backward.

GPU only: the operands are 4-9 GiB in bf16, hours of work for the CPU interpreter. Only
sampled rows are checked against fp32 torch: an expert's last rows (past the mark), a
whole small expert after it, and the zero tail.
"""
import pytest
import torch

from kernels import grouped_gemm as gg
from kernels import grouped_gemm_tma as tma
from kernels import grouped_gemm_ws as ws
from kernels.swiglu import launch_swiglu_bwd, swiglu_bwd_reference

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a GPU: 4-9 GiB operands")]

P = 2 ** 21 + 4099            # rows; with 1024 columns, row 2^21 starts at element 2^31
WIDE = 1024
NARROW = 64
OFFSETS = [0, 777, P - 3000, P - 300]   # expert 1 crosses row 2^21; a tail of 300 rows
SAMPLE = torch.cat([torch.arange(P - 5048, P - 3000),      # expert 1's last rows
                    torch.arange(P - 3000, P - 300)])      # all of expert 2
EXPERT_OF_SAMPLE = torch.cat([torch.full((2048,), 1), torch.full((2700,), 2)])


@pytest.fixture(params=["ws", "tma", "pointer"])
def path(request, monkeypatch):
    on = {"ws": ("on", "auto"), "tma": ("off", "on"), "pointer": ("off", "off")}[request.param]
    monkeypatch.setattr(ws, "MODE", on[0])
    monkeypatch.setattr(tma, "MODE", on[1])
    return request.param


def _offsets():
    return torch.tensor(OFFSETS, device="cuda")


def _randn(*shape, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(torch.bfloat16)


def _close(got, want, what):
    err = ((got.float() - want).norm() / want.norm()).item()
    assert err <= 1e-2, f"{what}: relative error {err:.2e} past row 2^21"


def _rows_ref(a_rows, w):
    """Sampled rows' reference: row i times the weight of its expert, in fp32."""
    out = torch.empty(a_rows.shape[0], w.shape[2], device="cuda")
    for e in EXPERT_OF_SAMPLE.unique().tolist():
        sel = (EXPERT_OF_SAMPLE == e).cuda()
        out[sel] = a_rows[sel].float() @ w[e].float()
    return out


@pytest.mark.parametrize("trans_w", [False, True])
def test_gmm_past_2_31(path, trans_w):
    # forward: y [P, WIDE] is the big one; dgrad (trans_w): its input dy [P, WIDE] is
    k, n = (WIDE, NARROW) if trans_w else (NARROW, WIDE)
    a = _randn(P, k)
    w = _randn(3, n, k, scale=k ** -0.5) if trans_w else _randn(3, k, n, scale=k ** -0.5)
    y = gg.launch_gmm(a, w, _offsets(), trans_w=trans_w)
    rows = SAMPLE.cuda()
    _close(y[rows], _rows_ref(a[rows], w.transpose(1, 2) if trans_w else w), "gmm")
    assert not y[P - 300:].any(), "the zero tail"


def test_gathered_gmm_past_2_31(path):
    """The gather prologue: source row gather_index[p] of a [P, WIDE] input, past 2^21."""
    a = _randn(P, WIDE)
    w = _randn(3, WIDE, NARROW, scale=WIDE ** -0.5)
    gidx = torch.arange(P - 1, -1, -1, device="cuda")     # row p reads row P-1-p
    gidx[:4096] = torch.arange(P - 4096, P, device="cuda")   # early rows read the last ones
    y = gg.launch_gmm(a, w, _offsets(), gather_index=gidx)
    head = torch.arange(777, 777 + 2048)                  # expert 1 rows reading past 2^21
    got = y[head.cuda()]
    want = a[gidx[head.cuda()]].float() @ w[1].float()
    _close(got, want, "gathered gmm")
    rows = SAMPLE.cuda()
    _close(y[rows], _rows_ref(a[gidx[rows]], w), "gathered gmm, late rows")


def test_swiglu_forward_past_2_31(path):
    a = _randn(P, NARROW)
    w13 = _randn(3, NARROW, WIDE, scale=NARROW ** -0.5)      # F = 512: pre [P, 1024]
    h, pre = gg.launch_gmm_swiglu(a, w13, _offsets())
    rows = SAMPLE.cuda()
    want_pre = _rows_ref(a[rows], w13)
    _close(pre[rows], want_pre, "SwiGLU pre-activation")
    f = WIDE // 2
    _close(h[rows], torch.nn.functional.silu(want_pre[:, :f]) * want_pre[:, f:], "SwiGLU h")


def test_wgrad_past_2_31(path):
    a = _randn(P, NARROW)
    dy = _randn(P, WIDE)
    off = _offsets()
    dw = gg.launch_wgrad(a, dy, off, out_dtype=torch.float32)
    for e in range(3):
        lo, hi = OFFSETS[e], OFFSETS[e + 1]
        _close(dw[e], a[lo:hi].float().t() @ dy[lo:hi].float(), f"wgrad expert {e}")


def test_swiglu_backward_past_2_31():
    f = WIDE // 2
    pre, dh = _randn(P, 2 * f), _randn(P, f)
    end = torch.tensor([P - 300], device="cuda")
    dgu = launch_swiglu_bwd(pre, dh, end)
    rows = SAMPLE.cuda()
    _close(dgu[rows], swiglu_bwd_reference(pre[rows].float(), dh[rows].float()).float(),
           "SwiGLU backward")
    assert not dgu[P - 300:].any(), "the zero tail"


@pytest.mark.parametrize("fused", ["on", "off"])
def test_dgrad_with_swiglu_backward_past_2_31(fused, monkeypatch):
    """launch_gmm_swiglu_bwd: the W2 dgrad and the SwiGLU backward, split or fused into the
    ping-pong kernel's epilogue (MOC_GMM_SWIGLU_BWD=on, sm90): d(gate | up) [P, 1024]."""
    monkeypatch.setattr(ws, "SWIGLU_BWD", fused)
    f = WIDE // 2
    dy = _randn(P, NARROW)
    w2 = _randn(3, f, NARROW, scale=NARROW ** -0.5)
    pre = _randn(P, 2 * f, scale=2.0)
    dgu = gg.launch_gmm_swiglu_bwd(dy, w2, _offsets(), pre)
    rows = SAMPLE.cuda()
    dh = _rows_ref(dy[rows], w2.transpose(1, 2))
    _close(dgu[rows], swiglu_bwd_reference(pre[rows].float(), dh).float(),
           f"dgrad + SwiGLU backward ({fused})")
