"""The warp-specialized Hopper GEMM (kernels/grouped_gemm_ws.py) against a float64 reference.

Gluon kernels do not run in the CPU interpreter, so these tests need an sm90 GPU. bf16 in,
fp32 accumulation, bf16 out: the bar is bf16 rounding (relative error 1e-2 on the whole
output). Every fixed config of the autotune list runs, so a config that deadlocks or reads
the ring out of phase fails here, not inside the autotuner."""
import pytest
import torch

from kernels import grouped_gemm_tma as tma
from kernels import grouped_gemm_ws as ws
from kernels.grouped_gemm import launch_gmm

# (E, K, N, rows per expert, zero-tail rows): empty experts, one expert with every row,
# sizes that are not tile multiples, a K tail, an N tail, and a zero tail.
CASES = [
    (4, 192, 320, [130, 0, 333, 257], 0),
    (3, 128, 256, [0, 700, 0], 0),
    (5, 200, 136, [70, 0, 0, 416, 1], 77),
    (8, 768, 4096, [512] * 8, 0),
    (2, 64, 128, [0, 0], 40),
]


# GROUP_M other than the default 8 (tools/sweep_gemm_configs.py sweeps them): 1, 3 (groups
# that do not divide the row tiles) and 32 (more than there are)
GROUP_VARIANTS = [(128, 128, 64, 4, 2, 232, 40, 1), (128, 128, 64, 4, 2, 232, 40, 3),
                  (128, 256, 64, 3, ws.COOP, 232, 40, 32)]


def _usable():
    return (torch.cuda.is_available() and ws.gluon is not None
            and torch.cuda.get_device_capability()[0] == 9)


def make(e, k, n, counts, tail, trans, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    p = sum(counts) + tail
    offsets = torch.zeros(e + 1, dtype=torch.int64, device="cuda")
    offsets[1:] = torch.tensor(counts, device="cuda").cumsum(0)
    x = torch.randn(p, k, device="cuda", generator=g).bfloat16()
    shape = (e, n, k) if trans else (e, k, n)
    w = (torch.randn(shape, device="cuda", generator=g) / k ** 0.5).bfloat16()
    return x, w, offsets


def reference(x, w, offsets, trans):
    y = torch.zeros(x.shape[0], w.shape[1] if trans else w.shape[2], dtype=torch.float64,
                    device=x.device)
    bounds = offsets.tolist()
    for i in range(w.shape[0]):
        lo, hi = bounds[i], bounds[i + 1]
        we = w[i].double()
        y[lo:hi] = x[lo:hi].double() @ (we.t() if trans else we)
    return y


def rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.skipif(not _usable(), reason="needs an sm90 GPU and Gluon")
@pytest.mark.parametrize("cfg", ws.CONFIGS + GROUP_VARIANTS, ids=str)
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_ws_kernel_matches_reference(case, trans, cfg):
    x, w, offsets = make(*case, trans)
    n = w.shape[1] if trans else w.shape[2]
    c = torch.full((x.shape[0], n), float("nan"), dtype=torch.bfloat16, device="cuda")
    ws.launch_gmm_ws(x, tma.weights_2d(w), c, offsets, n, x.shape[1], w.shape[0], trans,
                     1 << max(x.shape[0] - 1, 0).bit_length(), tma.num_programs(x.device),
                     cfg=ws.config(*cfg))
    torch.cuda.synchronize()
    end = int(offsets[-1])
    assert not c[:end].isnan().any()             # every expert row written
    assert c[end:].isnan().all()                 # the tail left alone (no overhang)
    y_r = reference(x, w, offsets, trans)
    if end:
        assert rel(c[:end], y_r[:end]) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not _usable(), reason="needs an sm90 GPU and Gluon")
@pytest.mark.parametrize("cfg", ws.SWIGLU_CONFIGS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_ws_swiglu_matches_reference(case, cfg):
    e, k, n2, counts, tail = case
    f = n2 // 2 // 8 * 8          # h [P, F] needs 16-byte rows for its descriptor
    x, w13, offsets = make(e, k, 2 * f, counts, tail, False)
    p = x.shape[0]
    h = torch.full((p, f), float("nan"), dtype=torch.bfloat16, device="cuda")
    pre = torch.full((p, 2 * f), float("nan"), dtype=torch.bfloat16, device="cuda")
    ws.launch_gmm_ws(x, tma.weights_2d(w13), h, offsets, f, k, e, False,
                     1 << max(p - 1, 0).bit_length(), tma.num_programs(x.device),
                     cfg=ws.config(*cfg), pre=pre, epilogue=1, store_pre=True)
    torch.cuda.synchronize()
    end = int(offsets[-1])
    assert not h[:end].isnan().any() and not pre[:end].isnan().any()
    assert h[end:].isnan().all() and pre[end:].isnan().all()
    pre_r = reference(x, w13, offsets, False)
    g, u = pre_r[:, :f], pre_r[:, f:]
    h_r = g * torch.sigmoid(g) * u
    if end:
        assert rel(pre[:end], pre_r[:end]) < 1e-2 and rel(h[:end], h_r[:end]) < 1e-2


def _swiglu_bwd_case(case):
    """dy [P, D], w2 [E, F, D], offsets and pre [P, 2F] for one of CASES (K as D, N as 2F)."""
    e, d, n2, counts, tail = case
    f = n2 // 2 // 8 * 8
    dy, w2, offsets = make(e, d, f, counts, tail, True)
    g = torch.Generator(device="cuda").manual_seed(1)
    pre = (2 * torch.randn(dy.shape[0], 2 * f, device="cuda", generator=g)).bfloat16()
    return dy, w2, offsets, pre


def _swiglu_bwd_reference(dy, w2, offsets, pre):
    from kernels.swiglu import swiglu_bwd_reference
    return swiglu_bwd_reference(pre.double(), reference(dy, w2, offsets, True))


@pytest.mark.gpu
@pytest.mark.skipif(not _usable(), reason="needs an sm90 GPU and Gluon")
@pytest.mark.parametrize("cfg", ws.SWIGLU_BWD_CONFIGS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_ws_swiglu_bwd_matches_reference(case, cfg):
    """EPILOGUE 2: d(gate | up) of the W2 dgrad, every expert row written, the tail not."""
    dy, w2, offsets, pre = _swiglu_bwd_case(case)
    e, f, d = w2.shape
    p = dy.shape[0]
    dgu = torch.full((p, 2 * f), float("nan"), dtype=torch.bfloat16, device="cuda")
    ws.launch_gmm_ws(dy, tma.weights_2d(w2), dgu, offsets, f, d, e, True,
                     1 << max(p - 1, 0).bit_length(), tma.num_programs(dy.device),
                     cfg=ws.config(*cfg), pre=pre, epilogue=2)
    torch.cuda.synchronize()
    end = int(offsets[-1])
    assert not dgu[:end].isnan().any()
    assert dgu[end:].isnan().all()
    if end:
        ref = _swiglu_bwd_reference(dy, w2, offsets, pre)
        assert rel(dgu[:end, :f], ref[:end, :f]) < 1e-2   # d gate
        assert rel(dgu[:end, f:], ref[:end, f:]) < 1e-2   # d up


@pytest.mark.gpu
@pytest.mark.skipif(not _usable(), reason="needs an sm90 GPU and Gluon")
@pytest.mark.parametrize("mode", ["on", "off", "auto"])
def test_swiglu_bwd_switch_picks_the_fused_kernel(mode, monkeypatch):
    """launch_gmm_swiglu_bwd runs EPILOGUE 2 with MOC_GMM_SWIGLU_BWD=on, the split dgrad +
    elementwise pass with off, and either with auto; all three agree with the reference."""
    from kernels.grouped_gemm import launch_gmm_swiglu_bwd
    monkeypatch.setattr(ws, "SWIGLU_BWD", mode)
    monkeypatch.setattr(ws, "_CHOICE", {})
    epilogues = []
    real = ws.launch_gmm_ws
    monkeypatch.setattr(ws, "launch_gmm_ws", lambda *a, **k: epilogues.append(
        k.get("epilogue", 0)) or real(*a, **k))
    dy, w2, offsets, pre = _swiglu_bwd_case(CASES[2])
    dgu = launch_gmm_swiglu_bwd(dy, w2, offsets, pre)
    end = int(offsets[-1])
    if mode == "on":
        assert 2 in epilogues
    elif mode == "off":
        assert 2 not in epilogues
    else:
        # timed both: the fused kernel ran, and its choice is kept (next to the split path's
        # own ws-or-tma choice for the plain dgrad, which auto times as well)
        assert 2 in epilogues and any(k[0] == "swiglu_bwd" for k in ws._CHOICE)
    ref = _swiglu_bwd_reference(dy, w2, offsets, pre)
    assert rel(dgu[:end], ref[:end]) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not _usable(), reason="needs an sm90 GPU and Gluon")
@pytest.mark.parametrize("trans", [False, True])
def test_launch_gmm_takes_ws_path_and_zeroes_tail(trans, monkeypatch):
    monkeypatch.setattr(ws, "MODE", "on")
    calls = []
    real = ws.launch_gmm_ws
    monkeypatch.setattr(ws, "launch_gmm_ws", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, offsets = make(*CASES[2], trans)
    y = launch_gmm(x, w, offsets, trans_w=trans)
    end = int(offsets[-1])
    assert calls and (y[end:] == 0).all()
    assert rel(y[:end], reference(x, w, offsets, trans)[:end]) < 1e-2


def test_ws_off_on_cpu_and_fp32():
    """The dispatch never offers this kernel where it cannot run."""
    assert not ws.available(torch.zeros(2, 2, dtype=torch.bfloat16))
    if torch.cuda.is_available():
        assert not ws.available(torch.zeros(2, 2, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not _usable(), reason="needs an sm90 GPU and Gluon")
def test_auto_mode_times_once_per_key(monkeypatch):
    """"auto" times both Hopper kernels on a key's first call, then keeps its choice."""
    monkeypatch.setattr(ws, "MODE", "auto")
    monkeypatch.setattr(ws, "_CHOICE", {})
    x, w, offsets = make(*CASES[0], False)
    y1 = launch_gmm(x, w, offsets)
    assert len(ws._CHOICE) == 1
    y2 = launch_gmm(x, w, offsets)
    assert len(ws._CHOICE) == 1
    end = int(offsets[-1])
    ref = reference(x, w, offsets, False)[:end]
    assert rel(y1[:end], ref) < 1e-2 and rel(y2[:end], ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not _usable(), reason="needs an sm90 GPU and Gluon")
def test_auto_choice_keeps_its_timings(monkeypatch):
    """The choice's two timings are kept for the bench's report, and agree with it."""
    monkeypatch.setattr(ws, "MODE", "auto")
    monkeypatch.setattr(ws, "_CHOICE", {})
    monkeypatch.setattr(ws, "_CHOICE_MS", {})
    x, w, offsets = make(*CASES[0], False)
    launch_gmm(x, w, offsets)
    (key, (t_ws, t_tma)), = ws._CHOICE_MS.items()
    assert t_ws > 0 and t_tma > 0 and ws._CHOICE[key] == (t_ws < t_tma)


def test_ws_kernel_compiles_for_sm90_without_a_gpu(tmp_path):
    """tools/compile_sm90.py compiles the Gluon kernels (forward / dgrad and wgrad) down to an sm90 cubin on this machine
    (no GPU needed) and fails on a compile error, a register spill or too much shared
    memory: a Triton upgrade that breaks the Gluon code fails here, in CI."""
    import os
    import subprocess
    import sys
    if ws.gluon is None:
        pytest.skip("this Triton has no Gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)   # a cached cubin would hide a source change
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    r = subprocess.run([sys.executable, os.path.join(root, "tools", "compile_sm90.py")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    # first and last config of each kind: 2 plain x 2 layouts + 2 SwiGLU + 2 SwiGLU backward
    # + 2 wgrad x 2 addends, each also with a second segment (the wgrad pair), and 4 with
    # row segments (hard IRL mode: a runtime END_SHIFT)
    assert r.stdout.count("spill bytes 0") == 20, r.stdout


@pytest.mark.parametrize("module", ["grouped_gemm_ws", "grouped_gemm_ws_wgrad"])
def test_config_rejects_an_unknown_schedule(module):
    """config(..., consumers) takes 1, 2 or COOP; anything else names the field (CPU)."""
    import importlib
    if ws.gluon is None:
        pytest.skip("this Triton has no Gluon")
    mod = importlib.import_module(f"kernels.{module}")
    with pytest.raises(ValueError, match="consumers must be 1, 2 or 'coop', got 3"):
        mod.config(128, 128, 64, 4, 3)
    cfg = mod.config(128, 256, 64, 3, ws.COOP)    # cooperative: each consumer half the rows
    half = "SUB_M" if module == "grouped_gemm_ws" else "SUB_K"
    assert cfg.kwargs[half] == 64 and cfg.kwargs["CONSUMERS"] == 2
    assert not cfg.kwargs["PINGPONG"]


def test_every_sweep_entry_is_a_config():
    """tools/sweep_gemm_configs.py's fixed configs (with and without a GROUP_M / GROUP_K)
    build kernel configs, and an unknown GEMM name is refused before anything is timed (CPU)."""
    from kernels import grouped_gemm_ws_wgrad as wsw
    from tools import sweep_gemm_configs as sweeps
    if ws.gluon is None:
        pytest.skip("this Triton has no Gluon")
    for cfg in sweeps.WS_SWEEP:
        c = ws.config(*cfg[:5], *cfg[5], *cfg[6:])
        assert c.kwargs["GROUP_M"] == (cfg[6] if len(cfg) > 6 else 8)
    for cfg in sweeps.WS_WGRAD_SWEEP:
        assert wsw.config(*cfg).kwargs["GROUP_K"] == (cfg[5] if len(cfg) > 5 else 8)
    with pytest.raises(ValueError, match="unknown GEMMs \\['w3_fwd'\\]"):
        sweeps.sweep_ws((2, 64, 64), 64, 1, ["w13_fwd", "w3_fwd"])


def test_wgrad_c_descriptor_is_over_c_only_when_it_can_take_a_tma_store():
    """The WS wgrad stores by TMA exactly when its c_desc has C's dtype: a contiguous 16-bit
    C gets a descriptor over itself (boxes of one consumer's tile); an fp32 C, or a 16-bit
    one that is not contiguous, gets a placeholder of another dtype (the smallest box), so
    the kernel stores by pointer and never writes through it (CPU)."""
    from kernels import grouped_gemm_ws_wgrad as wsw
    if ws.gluon is None:
        pytest.skip("this Triton has no Gluon")
    cfg = dict(wsw.config(128, 256, 64, 3, ws.COOP).all_kwargs())
    bf = torch.empty(4, 192, 320, dtype=torch.bfloat16)
    cases = [(bf, torch.bfloat16, [4 * 192, 320], [64, 256]),
             (bf.float(), torch.bfloat16, list(wsw.PLACEHOLDER_BOX), list(wsw.PLACEHOLDER_BOX)),
             (bf.transpose(1, 2), torch.float16, list(wsw.PLACEHOLDER_BOX),
              list(wsw.PLACEHOLDER_BOX))]
    for c, dtype, shape, box in cases:
        desc = wsw.c_descriptor(c)
        assert desc.base.dtype == dtype and list(desc.shape) == shape
        bf16 = torch.bfloat16
        a, b = torch.empty(64, 192, dtype=bf16), torch.empty(64, 320, dtype=bf16)
        wsw._size_blocks(dict(cfg, a_desc=ws._desc(a), b_desc=ws._desc(b), a2_desc=ws._desc(a),
                              b2_desc=ws._desc(b), c_desc=desc, c_ptr=c))
        assert list(desc.block_shape) == box
        assert (desc.base.dtype == c.dtype) == (c.dtype == torch.bfloat16 and c.is_contiguous())
