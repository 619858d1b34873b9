"""The warp-specialized Hopper wgrad (kernels/grouped_gemm_ws_wgrad.py) against float64.

GPU only (Gluon does not run in the CPU interpreter; tools/compile_sm90.py compiles it on the
CPU, see test_grouped_gemm_ws.py). Every fixed config runs, so a config that deadlocks or
reads the ring out of phase fails here. The rows after offsets[E] hold NaN in both operands:
an expert's last, partial chunk reads them, and the kernel must zero them in both."""
import pytest
import torch

from kernels import grouped_gemm as gg
from kernels import grouped_gemm_tma as tma
from kernels import grouped_gemm_ws as ws
from kernels import grouped_gemm_ws_wgrad as wsw

# (E, K, N, rows per expert, tail rows): K and N tails, partial last chunks, empty experts,
# one expert with every row, a NaN tail, and no rows at all.
CASES = [
    (4, 192, 320, [130, 0, 333, 257], 0),
    (3, 128, 256, [0, 700, 0], 0),
    (5, 200, 136, [70, 0, 0, 416, 1], 77),
    (8, 768, 2048, [512] * 8, 0),
    (2, 64, 128, [0, 0], 40),
]
# how the result is written: bf16 store; fp32 add in place (c is the addend); fp32 addend
# with a bf16 result (the last of S uses)
MODES = ["store", "add_in_place", "add_to_bf16"]

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (torch.cuda.is_available() and ws.gluon is not None
                                      and torch.cuda.get_device_capability()[0] == 9),
                                 reason="needs an sm90 GPU and Gluon")]


def make(e, k, n, counts, tail, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    p = sum(counts) + tail
    offsets = torch.zeros(e + 1, dtype=torch.int64, device="cuda")
    offsets[1:] = torch.tensor(counts, device="cuda").cumsum(0)
    a = torch.randn(p, k, device="cuda", generator=g).bfloat16()
    dy = torch.randn(p, n, device="cuda", generator=g).bfloat16()
    end = sum(counts)
    a[end:], dy[end:] = float("nan"), float("nan")
    addend = torch.randn(e, k, n, device="cuda", generator=g)
    return a, dy, offsets, addend


def reference(a, dy, offsets, addend=None):
    e = offsets.shape[0] - 1
    out = torch.zeros(e, a.shape[1], dy.shape[1], dtype=torch.float64, device=a.device)
    bounds = offsets.tolist()
    for i in range(e):
        lo, hi = bounds[i], bounds[i + 1]
        out[i] = a[lo:hi].double().t() @ dy[lo:hi].double()
    return out if addend is None else out + addend.double()


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_mode(mode, a, dy, offsets, addend, launch):
    """launch(c, acc_in) for one of MODES; returns (result, its reference, tolerance)."""
    e, k, n = addend.shape
    if mode == "store":
        c = torch.full((e, k, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        return launch(c, None), reference(a, dy, offsets), 1e-2
    if mode == "add_in_place":
        c = addend.clone()
        return launch(c, c), reference(a, dy, offsets, addend), 1e-4
    c = torch.full((e, k, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    return launch(c, addend), reference(a, dy, offsets, addend), 1e-2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", wsw.CONFIGS + [(128, 128, 64, 4, 2, 3),       # GROUP_K 3, 32
                                 (128, 256, 64, 3, ws.COOP, 32)], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_ws_wgrad_matches_reference(case, cfg, mode):
    a, dy, offsets, addend = make(*case)
    k_bucket = 1 << max(a.shape[0] // case[0] - 1, 0).bit_length()
    out, ref, tol = run_mode(mode, a, dy, offsets, addend, lambda c, acc: wsw.launch_wgrad_ws(
        a, dy, c, offsets, acc, k_bucket, tma.num_programs(a.device), cfg=wsw.config(*cfg)))
    torch.cuda.synchronize()
    assert not out.isnan().any()      # every tile written; the NaN tail never read in
    assert rel(out, ref) < tol


def _through_launch_wgrad(mode, a, dy, offsets, addend):
    """launch_wgrad's three ways to write, as the expert MLP's S steps use them."""
    if mode == "store":
        return gg.launch_wgrad(a, dy, offsets)
    if mode == "add_in_place":
        return gg.launch_wgrad(a, dy, offsets, accumulate_into=addend)
    return gg.launch_wgrad(a, dy, offsets, accumulate_into=addend, out_dtype=torch.bfloat16)


@pytest.mark.parametrize("mode", MODES)
def test_launch_wgrad_auto_adds_once(mode, monkeypatch):
    """Through launch_wgrad in "auto": both kernels are timed on the key's first call (on a
    scratch output), then the chosen one writes the result: an in-place accumulation is
    added exactly once, and a separate addend is left as it was."""
    monkeypatch.setattr(ws, "MODE", "auto")
    monkeypatch.setattr(ws, "_CHOICE", {})
    a, dy, offsets, addend = make(*CASES[2])
    for _ in range(2):            # the timed first call, then the cached choice
        buf = addend.clone()
        out = _through_launch_wgrad(mode, a, dy, offsets, buf)
        ref = reference(a, dy, offsets, None if mode == "store" else addend)
        assert rel(out, ref) < (1e-4 if mode == "add_in_place" else 1e-2)
        if mode == "add_to_bf16":
            assert torch.equal(buf, addend)
    assert len(ws._CHOICE) == 1


def test_launch_wgrad_takes_ws_path(monkeypatch):
    monkeypatch.setattr(ws, "MODE", "on")
    calls = []
    real = wsw.launch_wgrad_ws
    monkeypatch.setattr(wsw, "launch_wgrad_ws", lambda *a, **k: calls.append(1) or real(*a, **k))
    a, dy, offsets, _ = make(*CASES[0])
    dw = gg.launch_wgrad(a, dy, offsets)
    assert calls and rel(dw, reference(a, dy, offsets)) < 1e-2


# second segments for the pair tests: other counts (empty where the first is not, and the
# other way round), their own NaN tails
SECOND = {0: [64, 5, 0, 300], 1: [333, 0, 1], 2: [0, 129, 64, 0, 500], 3: [256] * 8, 4: [3, 0]}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", wsw.CONFIGS, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_ws_wgrad_pair_matches_reference(case, cfg, mode):
    """Two segments of rows in one pass (launch_wgrad_ws(second=...)): the sum of both
    segments' dW (and the addend), each segment's partial last chunk zeroed on its own."""
    e, k, n, counts, tail = CASES[case]
    a, dy, offsets, addend = make(*CASES[case])
    a2, dy2, offsets2, _ = make(e, k, n, SECOND[case], 13, seed=1)
    rows = (a.shape[0] + a2.shape[0]) // e
    k_bucket = 1 << max(rows - 1, 0).bit_length()

    def launch(c, acc):
        return wsw.launch_wgrad_ws(a, dy, c, offsets, acc, k_bucket, tma.num_programs(a.device),
                                   cfg=wsw.config(*cfg), second=(a2, dy2, offsets2))

    out, ref, tol = run_mode(mode, a, dy, offsets, addend, launch)
    ref = ref + reference(a2, dy2, offsets2)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    assert rel(out, ref) < tol


@pytest.mark.parametrize("ws_wgrad", ["auto", "off"])
def test_launch_wgrad_pair_fused_and_composite_agree(ws_wgrad, monkeypatch):
    """launch_wgrad_pair: one fused pass (sm90), or under MOC_GMM_WS_WGRAD=off the composite
    of two launch_wgrad calls; both the float64 sum of both segments and the addend, which
    is left as it was."""
    monkeypatch.setattr(wsw, "MODE", ws_wgrad)
    calls = []
    real = wsw.launch_wgrad_ws
    monkeypatch.setattr(wsw, "launch_wgrad_ws",
                        lambda *a, **k: calls.append(k.get("second")) or real(*a, **k))
    e, k, n, counts, tail = CASES[2]
    a, dy, offsets, addend = make(*CASES[2])
    a2, dy2, offsets2, _ = make(e, k, n, SECOND[2], 0, seed=1)
    keep = addend.clone()
    out = gg.launch_wgrad_pair(a, dy, offsets, None, (a2, dy2, offsets2), addend,
                               torch.bfloat16)
    ref = reference(a, dy, offsets, addend) + reference(a2, dy2, offsets2)
    assert out.dtype == torch.bfloat16 and rel(out, ref) < 1e-2
    assert torch.equal(addend, keep)
    fused = [c for c in calls if c is not None]
    assert bool(fused) == (ws_wgrad == "auto")
